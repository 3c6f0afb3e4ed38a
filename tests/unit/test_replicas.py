"""Controller replicas in one process, on a real PostgreSQL, with in-memory agents:
leases spread over the replicas, any replica accepts any command, the lease holder
alone talks to a gateway, a dead replica's gateways are taken over and what it
accepted is carried out once, under its command id."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.audit import HistoryQuery
from controller.auth import Role
from controller.config import SshSettings
from controller.lease_store import ReplicaIdInUse
from controller.schemas import CommandResult, Targets
from controller.service import Controller
from controller.transport.ssh import SshTarget
from tests.unit.test_controller_support import (
    ADMIN,
    KEY_A,
    OPERATOR,
    FakeFleet,
    FakeSession,
    make_config,
    write_key,
)

NAMES = [f"gw{i}" for i in range(6)]


class Sessions:
    """One controller's session factory over the shared fake agents; who it connected."""

    def __init__(self, fleet: FakeFleet) -> None:
        self.fleet = fleet
        self.targets: list[str] = []

    def factory(self, target: SshTarget, settings: SshSettings) -> FakeSession:
        self.targets.append(target.name)
        return self.fleet.factory(target, settings)


def replica(tmp: Path, name: str, fleet: FakeFleet, pg_url: str,
            **overrides: Any) -> tuple[Controller, Sessions]:
    sessions = Sessions(fleet)
    config = make_config(tmp / name, db_url=pg_url, audit_key_file=str(tmp / "audit.key"),
                         audit={"checkpoint_key_file": str(tmp / "checkpoint.key")},
                         replica_id=name, **overrides)
    return Controller(config, session_factory=sessions.factory).start(), sessions


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - t0


@pytest.fixture
def fleet() -> FakeFleet:
    return FakeFleet(NAMES)


@pytest.fixture
def pair(tmp_path: Path, fleet: FakeFleet,
         pg_url: str) -> Iterator[tuple[Controller, Controller, Sessions, Sessions]]:
    a, sa_ = replica(tmp_path, "a", fleet, pg_url)
    key = write_key(tmp_path)
    for i, name in enumerate(NAMES):
        a.add_gateway(ADMIN, name=name, address=f"10.99.0.{100 + i}", user="root",
                      key_path=str(key), host_key=KEY_A, trust_on_first_use=False,
                      groups=["lab"], reason="test", ticket=None)
    b, sb = replica(tmp_path, "b", fleet, pg_url)  # joins the audit chain a began
    assert b.audit.alarm is None
    assert [r.detail["replica_id"] for r in b.history(HistoryQuery(action="replica.joined"))] \
        == ["b"]
    wait_for(lambda: len(a.replicas.held()) == 3 and len(b.replicas.held()) == 3,  # type: ignore[union-attr]
             5, "the leases split 3/3")
    yield a, b, sa_, sb
    for c in (a, b):
        c.close()


def held(c: Controller) -> set[str]:
    assert c.replicas is not None
    return c.replicas.held()


def test_leases_split_and_either_replica_runs_any_command(
        pair: tuple[Controller, Controller, Sessions, Sessions], fleet: FakeFleet) -> None:
    a, b, sa_, sb = pair
    assert held(a) | held(b) == set(NAMES) and not held(a) & held(b)
    events: list[dict[str, Any]] = []
    res = b.isolate(OPERATOR, Targets(all=True), profile="internet", reason="drill",
                    ticket="INC-1", emit=events.append)
    assert res.ok and res.counts == {"verified": 6}
    assert events[0]["event"] == "accepted"
    assert sum(e["event"] == "result" for e in events) == 6
    for agent in fleet.agents.values():  # carried out once, under the command id
        assert agent.state == "isolated" and agent.request_ids == [res.command_id]
    # the signed checkpoint after the isolate reached every gateway, sent by its holder
    wait_for(lambda: all(any(e["action"] == "checkpoint" for e in ag.journal)
                         for ag in fleet.agents.values()), 10, "the checkpoints")
    # only the holder of a gateway's lease opened a session to it
    assert set(sa_.targets) == held(a) and set(sb.targets) == held(b)
    res = a.restore(ADMIN, Targets(all=True), reason="all clear", ticket=None)
    assert res.ok and all(ag.state == "open" for ag in fleet.agents.values())
    assert a.verify_audit().ok and b.verify_audit().ok
    # polls: each replica polls what it holds
    assert set(a.poll_once()) == held(a) and set(b.poll_once()) == held(b)
    # a refresh polls every gateway, each by its holder
    before = {v.name: v.observed_at for v in a.views()}
    a.refresh(actor="vic")
    assert all((v.observed_at or 0) > (before[v.name] or 0) for v in a.views())
    assert set(sa_.targets) == held(a) and set(sb.targets) == held(b)
    # reads go to the holder too
    assert [r.gateway for r in a.exceptions(OPERATOR, Targets(gateways=tuple(held(b))))] \
        == sorted(held(b), key=NAMES.index)


def test_a_killed_replicas_command_is_carried_out_once_by_its_successor(
        pair: tuple[Controller, Controller, Sessions, Sessions], fleet: FakeFleet) -> None:
    a, b, _, _ = pair
    theirs = sorted(held(a))
    assert a.replicas is not None
    a.replicas.crash()  # keeps no lease any more, works no queue; gives nothing back
    out: list[CommandResult] = []
    t0 = time.monotonic()
    worker = threading.Thread(target=lambda: out.append(a.isolate(
        OPERATOR, Targets(gateways=tuple(theirs)), profile="full", reason="last words",
        ticket=None)))
    worker.start()  # accepted by the dead replica: queued, nobody may run it yet
    worker.join(10)
    took = time.monotonic() - t0
    assert out and out[0].ok, out
    assert took < 2.0 + 0.3 + 2.0  # TTL + renew + slack
    assert held(b) == set(NAMES)
    for name in theirs:
        agent = fleet.agents[name]
        assert agent.profile == "full" and agent.request_ids == [out[0].command_id]
    assert b.verify_audit().ok


def test_a_request_in_flight_when_its_replica_dies_is_not_applied_twice(
        pair: tuple[Controller, Controller, Sessions, Sessions], fleet: FakeFleet) -> None:
    a, b, _, _ = pair
    name = sorted(held(a))[0]
    agent = fleet.agents[name]
    agent.delay = 1.5  # the request is on its way when the replica dies
    out: list[CommandResult] = []
    worker = threading.Thread(target=lambda: out.append(b.isolate(
        OPERATOR, Targets(gateways=(name,)), profile="internet", reason="r", ticket=None)))
    worker.start()
    wait_for(lambda: agent.active == 1, 5, "the request to arrive")
    assert a.replicas is not None
    a.replicas.crash()
    worker.join(15)
    assert out and out[0].ok
    # b sent it again under the same id after taking over: answered, not applied
    assert agent.request_ids == [out[0].command_id]
    wait_for(lambda: agent.replays == [out[0].command_id], 5, "b's resend")
    assert name in held(b)


def test_a_clean_stop_hands_over_at_once(
        pair: tuple[Controller, Controller, Sessions, Sessions]) -> None:
    a, b, _, _ = pair
    assert a.replicas is not None
    a.replicas.stop(release=True)
    took = wait_for(lambda: held(b) == set(NAMES), 5, "b to take everything")
    assert took < 1.5  # well before the 2 s TTL would have run out
    assert [(r.replica_id, r.live) for r in b.replicas.overview()] == [  # type: ignore[union-attr]
        ("a", False), ("b", True)]


def test_a_replica_id_in_use_is_refused(
        pair: tuple[Controller, Controller, Sessions, Sessions], tmp_path: Path,
        fleet: FakeFleet, pg_url: str) -> None:
    with pytest.raises(ReplicaIdInUse, match="in use"):
        replica(tmp_path, "a", fleet, pg_url)


def test_gateways_removed_and_added_follow_the_leases(
        pair: tuple[Controller, Controller, Sessions, Sessions], tmp_path: Path,
        fleet: FakeFleet) -> None:
    a, b, _, _ = pair
    gone = sorted(held(b))[0]
    a.remove_gateway(ADMIN, gone, reason="decommissioned", ticket=None)
    wait_for(lambda: gone not in held(b), 3, "the removed gateway's lease to go")
    fleet.agents["gw-new"] = type(fleet.agents[gone])("gw-new")
    a.add_gateway(ADMIN, name="gw-new", address="10.99.0.200", user="root",
                  key_path=str(write_key(tmp_path)), host_key=KEY_A,
                  trust_on_first_use=False, groups=[], reason="new", ticket=None)
    wait_for(lambda: "gw-new" in held(a) | held(b), 3, "someone to hold the new gateway")
    res = b.isolate(OPERATOR, Targets(gateways=("gw-new",)), profile="internet",
                    reason="r", ticket=None)
    assert res.ok
    history = a.history(HistoryQuery(action="isolate"))
    assert [r.outcome for r in history] == ["requested", "ok"]


def test_replicas_endpoint_metrics_and_shared_ui_secret(
        pair: tuple[Controller, Controller, Sessions, Sessions]) -> None:
    from fastapi.testclient import TestClient
    from prometheus_client import generate_latest

    from controller.api import create_app

    a, b, _, _ = pair
    token = a.create_token(user="v", role=Role.viewer, created_by="t", reason="t")
    with TestClient(create_app(b)) as client:
        body = client.get("/v1/replicas", headers={"Authorization": f"Bearer {token}"}).json()
    assert body["replica_mode"] and body["me"] == "b"
    assert {(r["replica_id"], r["live"], r["gateways"]) for r in body["replicas"]} == {
        ("a", True, 3), ("b", True, 3)}
    text = generate_latest(a.metrics.registry).decode()
    assert 'drawbridge_controller_leases_held{replica="a"} 3.0' in text
    assert "drawbridge_controller_replicas_live 2.0" in text
    from controller.api import _ui_secret
    assert _ui_secret(a) == _ui_secret(b)  # a form from one is good on the other


def test_rows_given_up_when_the_lease_lapses_are_queued_again_in_order(
        pair: tuple[Controller, Controller, Sessions, Sessions], fleet: FakeFleet) -> None:
    a, b, _, _ = pair
    assert a.replicas is not None
    name = sorted(held(a))[0]
    agent = fleet.agents[name]
    agent.delay = 0.5
    out: list[CommandResult] = []
    one = threading.Thread(target=lambda: out.append(b.isolate(
        OPERATOR, Targets(gateways=(name,)), profile="full", reason="first", ticket=None)))
    one.start()
    wait_for(lambda: agent.active == 1, 5, "the first request to arrive")
    two = threading.Thread(target=lambda: out.append(b.restore(
        ADMIN, Targets(gateways=(name,)), reason="second", ticket=None)))
    two.start()
    wait_for(lambda: len(a.replicas.queue.rows()) >= 2 and all(  # type: ignore[union-attr]
        r["state"] != "queued" for r in a.replicas.queue.rows()), 5,  # type: ignore[union-attr]
        "a to claim the second one too")
    with a.replicas._tick_lock:  # a stalls: it no longer trusts its lease, and cannot
        with a.replicas._lock:  # renew it for a while (less than the TTL)
            a.replicas._valid_until = 0.0
        time.sleep(1.2)  # the first request ends (0.5 s), the second finds the lease gone
    one.join(10)
    two.join(10)
    assert [r.ok for r in out] == [True, True], (a.replicas.queue.rows(), a.replicas._fence,
                                                 a.replicas._given_up, a.replicas.held())
    ops = [op for op, _ in agent.calls if op in ("isolate", "restore")]
    assert ops == ["isolate", "restore"] and agent.state == "open"  # in order, once each
    rows = a.replicas.queue.rows()
    assert [r["attempts"] for r in rows if r["reason"] == "second"] == [2]


def test_a_known_replica_without_its_head_file_is_an_alarm_not_a_join(
        pair: tuple[Controller, Controller, Sessions, Sessions], tmp_path: Path,
        fleet: FakeFleet, pg_url: str) -> None:
    _, b, _, _ = pair
    assert b.replicas is not None
    b.replicas.stop(release=True)
    b.close()
    (tmp_path / "b" / "state" / "audit.head").unlink()  # b's head file is lost
    again, _ = replica(tmp_path, "b", fleet, pg_url)
    try:
        assert again.audit.alarm is not None and "missing" in again.audit.alarm.problem
    finally:
        again.close()
