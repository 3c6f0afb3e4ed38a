"""The controller core with in-memory agents: commands, retries, host keys, plans, restart."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from controller.audit import HistoryQuery
from controller.auth import Role
from controller.errors import Forbidden, InputError, NotFound
from controller.schemas import Targets
from controller.service import Controller
from tests.unit.test_controller_support import (
    ADMIN,
    KEY_B,
    OPERATOR,
    VIEWER,
    FakeFleet,
    make_controller,
)

ALL = Targets(all=True)


@pytest.fixture
def fake_fleet() -> FakeFleet:
    return FakeFleet([f"gw{i}" for i in range(5)])


@pytest.fixture
def ctl(tmp_path: Path, fake_fleet: FakeFleet, db_url: str) -> Iterator[Controller]:
    controller = make_controller(tmp_path, fake_fleet, db_url=db_url)
    yield controller
    controller.close()


def actions(c: Controller, **kw: object) -> list[tuple[str, str]]:
    return [(r.action, r.outcome) for r in c.history(HistoryQuery(**kw))]  # type: ignore[arg-type]


def test_isolate_all_then_restore(ctl: Controller, fake_fleet: FakeFleet) -> None:
    res = ctl.isolate(OPERATOR, ALL, profile="internet", reason="CSIRT warning",
                      ticket="INC-42")
    assert res.ok and res.counts == {"verified": 5}
    agent = fake_fleet.agents["gw3"]
    op, args = agent.calls[-1]
    assert op == "isolate"
    assert args == {"profile": "internet", "reason": "CSIRT warning", "actor": "olga",
                    "ticket": "INC-42"}
    assert all(v.state == "isolated" and v.verification == "verified" for v in ctl.views())
    res = ctl.restore(ADMIN, ALL, reason="all clear", ticket=None)
    assert res.ok and all(a.state == "open" for a in fake_fleet.agents.values())
    records = ctl.history(HistoryQuery(action="isolate"))
    assert [(r.outcome, r.actor, r.reason, r.ticket) for r in records] == [
        ("requested", "olga", "CSIRT warning", "INC-42"), ("ok", "olga", "CSIRT warning",
                                                          "INC-42")]
    assert len(records[1].detail["results"]) == 5
    assert records[1].detail["results"][0]["evidence"]["status"] == "verified"
    assert ctl.verify_audit().ok


def test_unreachable_gateway_is_reported_and_retried(ctl: Controller,
                                                     fake_fleet: FakeFleet) -> None:
    fake_fleet.agents["gw2"].up = False
    res = ctl.isolate(OPERATOR, ALL, profile="internet", reason="incident", ticket=None)
    assert not res.ok
    bad = [r for r in res.results if not r.ok]
    assert [(r.gateway, r.outcome, r.will_retry) for r in bad] == [("gw2", "unreachable", True)]
    assert "refused" in bad[0].message and "retry" in bad[0].message
    assert sum(r.ok for r in res.results) == 4
    view = next(v for v in ctl.views() if v.name == "gw2")
    assert view.pending is not None and view.reachable is False
    ctl.poll_once()  # still down: nothing changes, nothing is sent
    assert fake_fleet.agents["gw2"].calls == []
    fake_fleet.agents["gw2"].up = True
    time.sleep(0.06)  # past the backoff
    ctl.poll_once()
    assert fake_fleet.agents["gw2"].state == "isolated"
    view = next(v for v in ctl.views() if v.name == "gw2")
    assert view.pending is None and view.state == "isolated"
    retry = [r for r in ctl.history(HistoryQuery(action="isolate", gateway="gw2"))
             if r.detail.get("retry_of")]
    assert retry and retry[-1].outcome == "ok" and retry[-1].actor == "olga"
    assert ("state.reachable", "observed") in actions(ctl, gateway="gw2")



def test_a_pending_change_that_arrived_after_all_is_recorded_not_sent_again(
        ctl: Controller, fake_fleet: FakeFleet) -> None:
    """A request lost in a cut link can still reach the agent when the link returns
    (TCP retransmits it): the poll finds it applied, drops the pending change without
    sending it again, and says so in the audit log under the command's id."""
    agent = fake_fleet.agents["gw2"]
    agent.up = False
    res = ctl.isolate(OPERATOR, Targets(gateways=("gw2",)), profile="internet",
                      reason="incident", ticket=None)
    agent.up, agent.state, agent.profile = True, "isolated", "internet"
    agent.actor, agent.reason = "olga", "incident"  # what the late request journaled
    time.sleep(0.06)  # past the backoff
    ctl.poll_once()
    assert [op for op, _ in agent.calls if op not in ("ping", "status")] == []
    assert next(v for v in ctl.views() if v.name == "gw2").pending is None
    found = ctl.history(HistoryQuery(action="state.pending_delivered"))
    assert [(r.targets, r.detail["command_id"]) for r in found] == \
        [(["gw2"], res.command_id)]

def test_newer_command_replaces_a_pending_one(ctl: Controller, fake_fleet: FakeFleet) -> None:
    fake_fleet.agents["gw1"].up = False
    ctl.isolate(OPERATOR, Targets(gateways=("gw1",)), profile="full", reason="x", ticket=None)
    ctl.restore(ADMIN, Targets(gateways=("gw1",)), reason="false alarm", ticket=None)
    fake_fleet.agents["gw1"].up = True
    time.sleep(0.06)
    ctl.poll_once()
    agent = fake_fleet.agents["gw1"]
    assert [op for op, _ in agent.calls if op not in ("ping", "status")] == ["restore"]
    assert agent.state == "open"


def test_pending_expires(tmp_path: Path, db_url: str) -> None:
    fleet = FakeFleet(["gw0"])
    c = make_controller(tmp_path, fleet, db_url=db_url,
                        fleet={"pending_ttl_seconds": 0, "parallelism": 4})
    fleet.agents["gw0"].up = False
    c.isolate(OPERATOR, ALL, profile="internet", reason="x", ticket=None)
    fleet.agents["gw0"].up = True
    time.sleep(0.06)
    c.poll_once()
    assert fleet.agents["gw0"].state == "open"
    assert ("state.pending_expired", "observed") in actions(c)
    c.close()


def test_changed_host_key_is_refused_audited_once_and_nothing_sent(
        ctl: Controller, fake_fleet: FakeFleet) -> None:
    agent = fake_fleet.agents["gw4"]
    agent.host_key = KEY_B
    res = ctl.isolate(OPERATOR, ALL, profile="internet", reason="x", ticket=None)
    r = next(r for r in res.results if r.gateway == "gw4")
    assert (r.outcome, r.error_code, r.will_retry) == ("refused", "host_key_mismatch", False)
    for _ in range(3):
        time.sleep(0.06)
        ctl.poll_once()
    assert agent.calls == [] and agent.auth_attempts == 0
    refusals = ctl.history(HistoryQuery(action="hostkey"))
    assert len(refusals) == 1
    assert refusals[0].detail["presented"] == KEY_B
    assert next(v for v in ctl.views() if v.name == "gw4").pending is None


def test_a_reinstalled_gateway_is_re_pinned_keeping_its_state_and_history(
        ctl: Controller, fake_fleet: FakeFleet, tmp_path: Path) -> None:
    from tests.unit.test_controller_support import write_key

    ctl.isolate(OPERATOR, ALL, profile="internet", reason="incident", ticket=None)
    agent = fake_fleet.agents["gw4"]
    agent.host_key, agent.epoch = KEY_B, agent.epoch + 1  # reinstalled: a new host key
    res = ctl.probe(OPERATOR, ALL, reason="probe")
    assert [r.error_code for r in res.results if r.gateway == "gw4"] == ["host_key_mismatch"]
    with pytest.raises(Forbidden):  # an operator may not re-pin
        ctl.require(OPERATOR, Role.admin, "changing a gateway")
    with pytest.raises(InputError):  # nothing to change
        ctl.update_gateway(ADMIN, "gw4", reason="x", ticket=None)
    with pytest.raises(InputError):  # a key path that means nothing on this host
        ctl.update_gateway(ADMIN, "gw4", key_path="id_new", reason="x", ticket=None)
    with pytest.raises(NotFound):
        ctl.update_gateway(ADMIN, "gw9", host_key=KEY_B, reason="x", ticket=None)
    (tmp_path / "rotated").mkdir()
    new_key = str(write_key(tmp_path / "rotated"))
    ctl.update_gateway(ADMIN, "gw4", host_key=KEY_B, key_path=new_key,
                       reason="reinstalled after the disk swap", ticket="CHG-7")
    gw = ctl.inventory.get("gw4")
    assert (gw.host_key, gw.key_path) == (KEY_B, new_key)
    ctl.poll_once()
    view = next(v for v in ctl.views() if v.name == "gw4")
    assert view.reachable and view.state == "isolated"  # the state survived the change
    updates = ctl.history(HistoryQuery(action="gateway.update"))
    assert [(r.actor, r.ticket) for r in updates] == [("alice", "CHG-7")]
    assert updates[0].detail["changed"]["host_key"][1] == KEY_B
    assert set(updates[0].detail["changed"]) == {"host_key", "key_path"}
    assert ctl.restore(ADMIN, Targets(gateways=("gw4",)), reason="back", ticket=None).ok


def test_trust_on_first_use_pins_and_then_holds(tmp_path: Path, db_url: str) -> None:
    fleet = FakeFleet(["gw0"])
    c = make_controller(tmp_path, fleet, db_url=db_url, add=False)
    from tests.unit.test_controller_support import write_key

    c.add_gateway(ADMIN, name="gw0", address="10.99.0.100", user="root",
                  key_path=str(write_key(tmp_path)), host_key=None, trust_on_first_use=True,
                  groups=[], reason="new box", ticket=None)
    c.poll_once()
    assert c.inventory.get("gw0").host_key == fleet.agents["gw0"].host_key
    assert ("hostkey.pinned", "ok") in actions(c)
    fleet.agents["gw0"].host_key = KEY_B
    fleet.agents["gw0"].epoch += 1
    res = c.isolate(OPERATOR, ALL, profile="internet", reason="x", ticket=None)
    assert res.results[0].error_code == "host_key_mismatch"
    c.close()


def test_break_glass_and_drift_become_history(ctl: Controller, fake_fleet: FakeFleet) -> None:
    ctl.poll_once()
    assert actions(ctl, action="state") == [("state.first_contact", "observed")] * 5
    fake_fleet.agents["gw0"].local_change("full")
    fake_fleet.agents["gw1"].drift_repairs = 1
    ctl.poll_once()
    changed = ctl.history(HistoryQuery(action="state.changed"))
    assert [r.targets for r in changed] == [["gw0"]]
    assert "root@console" in changed[0].reason
    assert [r.targets for r in ctl.history(HistoryQuery(action="state.drift_repaired"))] == \
        [["gw1"]]
    ctl.poll_once()
    assert len(ctl.history(HistoryQuery(action="state"))) == 7  # nothing new


def test_refusals_are_audited(ctl: Controller) -> None:
    with pytest.raises(NotFound):
        ctl.isolate(OPERATOR, Targets(gateways=("gw0", "typo")), profile="internet",
                    reason="x", ticket=None)
    with pytest.raises(Forbidden):
        ctl.require(VIEWER, Role.operator, "isolate")
    refused = ctl.history(HistoryQuery(action="request.refused")) + \
        ctl.history(HistoryQuery(action="auth.refused"))
    assert [(r.actor, r.outcome) for r in refused] == [("olga", "refused"), ("vic", "refused")]
    assert "typo" in refused[0].reason


def test_unknown_profile_is_refused_before_anything_is_sent(ctl: Controller,
                                                            fake_fleet: FakeFleet) -> None:
    fake_fleet.agents["gw3"].profiles = ["internet"]
    # before the first poll the controller does not know the profiles: the agent decides
    ctl.poll_once()
    assert next(v for v in ctl.views() if v.name == "gw3").agent_version == "0.0-fake"
    with pytest.raises(InputError) as err:
        ctl.isolate(OPERATOR, ALL, profile="full", reason="typo?", ticket=None)
    assert "gw3" in str(err.value) and "it has: internet" in str(err.value)
    assert "gw0" not in str(err.value)  # the others do have it
    assert all(not any(op == "isolate" for op, _ in a.calls) for a in fake_fleet.agents.values())
    assert all(a.state == "open" for a in fake_fleet.agents.values())
    refused = ctl.history(HistoryQuery(action="request.refused"))
    assert [(r.actor, r.detail.get("profile")) for r in refused] == [("olga", "full")]
    # the profile every targeted gateway has still goes through
    assert ctl.isolate(OPERATOR, ALL, profile="internet", reason="x", ticket=None).ok


def test_restart_keeps_inventory_history_and_state(tmp_path: Path, db_url: str) -> None:
    fleet = FakeFleet(["gw0", "gw1"])
    c = make_controller(tmp_path, fleet, db_url=db_url)
    fleet.agents["gw1"].up = False
    c.isolate(OPERATOR, ALL, profile="internet", reason="x", ticket="T-1")
    c.checkpoints.wait()  # the checkpoint after the isolate (and its record) first
    before = (c.views(), c.history(HistoryQuery()))
    c.close()
    again = make_controller(tmp_path, fleet, db_url=db_url, add=False)
    assert again.views() == before[0]
    assert again.history(HistoryQuery()) == before[1]
    assert again.verify_audit().ok
    fleet.agents["gw1"].up = True
    again.poll_once()  # the pending isolate survived the restart
    assert fleet.agents["gw1"].state == "isolated"
    again.close()


def test_allow_and_probe(ctl: Controller, fake_fleet: FakeFleet) -> None:
    flow = {"cidr": "192.0.2.0/24", "proto": "tcp", "ports": [443], "direction": "out",
            "duration_seconds": 3600}
    res = ctl.allow(OPERATOR, Targets(gateways=("gw0",)), flow=flow, reason="chain partner",
                    ticket=None)
    assert res.ok
    assert fake_fleet.agents["gw0"].calls[-1][1]["cidr"] == "192.0.2.0/24"
    fake_fleet.agents["gw1"].verified = False
    res = ctl.probe(OPERATOR, Targets(gateways=("gw0", "gw1")), reason="")
    assert [r.outcome for r in res.results] == ["verified", "unverified"]
    probe = ctl.history(HistoryQuery(action="probe"))[-1]
    assert probe.detail["results"][1]["probes"][0]["name"] == "outside-web"


def _flow(cidr: str) -> dict[str, object]:
    return {"cidr": cidr, "proto": "tcp", "ports": [443], "direction": "out",
            "duration_seconds": 3600}


def test_exception_breadth_depends_on_the_role(ctl: Controller, fake_fleet: FakeFleet) -> None:
    gw0 = Targets(gateways=("gw0",))
    for who, cidr in ((OPERATOR, "198.51.0.0/16"), (OPERATOR, "2001:db8::/32")):
        with pytest.raises(Forbidden, match="needs an admin"):
            ctl.allow(who, gw0, flow=_flow(cidr), reason="too wide", ticket=None)
    for who in (OPERATOR, ADMIN):
        for cidr in ("0.0.0.0/0", "::/0"):
            with pytest.raises(InputError, match="whole internet"):
                ctl.allow(who, gw0, flow=_flow(cidr), reason="restore in all but name",
                          ticket=None)
    assert fake_fleet.agents["gw0"].calls == []  # nothing was sent anywhere
    ctl.refusals.flush(everything=True)  # per user and window: the first, then a count
    refusals = [r for r in ctl.history(HistoryQuery()) if r.outcome == "refused"]
    first = [r for r in refusals if r.action != "refusal.summary"]
    counted = [r.detail for r in refusals if r.action == "refusal.summary"]
    assert len(first) + sum(d["count"] for d in counted) == 6
    assert all(r.detail["request"] == "allow" for r in first)
    assert all(d["requests"] == {"allow": d["count"]} for d in counted)
    assert ctl.allow(ADMIN, gw0, flow=_flow("198.51.0.0/16"), reason="wide, by an admin",
                     ticket=None).ok
    assert ctl.allow(OPERATOR, gw0, flow=_flow("203.0.113.0/24"), reason="narrow",
                     ticket=None).ok


def test_exceptions_are_listed_extended_and_revoked(ctl: Controller,
                                                   fake_fleet: FakeFleet) -> None:
    gw0 = Targets(gateways=("gw0",))
    ctl.allow(ADMIN, gw0, flow=_flow("198.51.0.0/16"), reason="wide", ticket=None)
    ctl.allow(OPERATOR, gw0, flow=_flow("203.0.113.0/24"), reason="narrow", ticket=None)
    [listing] = ctl.exceptions(VIEWER, gw0)
    wide, narrow = (e["id"] for e in listing.result["exceptions"])  # type: ignore[index]
    with pytest.raises(Forbidden):  # an operator cannot keep a wide flow open longer
        ctl.change_exception(OPERATOR, "extend", gateway="gw0", exception_id=wide,
                             reason="keep it", ticket=None, duration_seconds=7200)
    res = ctl.change_exception(OPERATOR, "extend", gateway="gw0", exception_id=narrow,
                               reason="hearing moved", ticket="INC-7", duration_seconds=7200)
    assert res.ok and fake_fleet.agents["gw0"].calls[-1] == (
        "extend", {"id": narrow, "duration_seconds": 7200, "reason": "hearing moved",
                   "actor": "olga", "ticket": "INC-7"})
    assert ctl.change_exception(OPERATOR, "revoke", gateway="gw0", exception_id=wide,
                                reason="closing is always allowed", ticket=None).ok
    [listing] = ctl.exceptions(VIEWER, gw0)
    assert [e["id"] for e in listing.result["exceptions"]] == [narrow]  # type: ignore[index]
    assert actions(ctl, action="extend") == [("extend", "requested"), ("extend", "ok")]
    assert actions(ctl, action="revoke") == [("revoke", "requested"), ("revoke", "ok")]
    bad = ctl.change_exception(OPERATOR, "revoke", gateway="gw0", exception_id="0" * 12,
                               reason="gone", ticket=None)
    assert not bad.ok and "no live exception" in bad.results[0].message


def test_metrics(ctl: Controller, fake_fleet: FakeFleet) -> None:
    fake_fleet.agents["gw0"].up = False
    ctl.isolate(OPERATOR, ALL, profile="internet", reason="x", ticket=None)
    text = generate_latest(ctl.metrics.registry).decode()
    assert 'drawbridge_controller_gateways{state="isolated"} 4.0' in text
    assert 'drawbridge_controller_gateway_up{gateway="gw0"} 0.0' in text
    assert 'drawbridge_controller_commands_total{result="partial",verb="isolate"} 1.0' in text
    assert 'drawbridge_controller_gateway_results_total{outcome="unreachable",verb="isolate"}' \
        in text
    assert "drawbridge_controller_command_duration_seconds_bucket" in text
    assert "drawbridge_controller_pending_changes 1.0" in text


def test_a_retry_never_overrides_a_newer_command(ctl: Controller,
                                                 fake_fleet: FakeFleet) -> None:
    from controller.states import Pending

    fake_fleet.agents["gw0"].up = False
    ctl.isolate(OPERATOR, Targets(gateways=("gw0",)), profile="full", reason="old", ticket=None)
    stale = ctl.states.get("gw0").pending
    assert stale is not None
    ctl.restore(ADMIN, Targets(gateways=("gw0",)), reason="newer", ticket=None)
    fake_fleet.agents["gw0"].up = True
    # the poller decided to retry `stale` just before the restore was accepted:
    res = ctl.run_command(ctl.inventory.select(names=("gw0",)), action="isolate",
                          op="isolate", actor="olga", reason="old", ticket=None,
                          args={"profile": "full"}, retry_of=stale)
    assert res.results == []
    assert ctl.history(HistoryQuery(action="isolate"))[-1].outcome == "superseded"
    assert not any(op == "isolate" for op, _ in fake_fleet.agents["gw0"].calls)
    assert isinstance(ctl.states.get("gw0").pending, Pending)  # the restore's, still owed
    assert ctl.states.get("gw0").pending.op == "restore"  # type: ignore[union-attr]
