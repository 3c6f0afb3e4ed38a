"""Durable restore plans against in-memory agents, on both stores: driven by the
controller, approved by a second admin, probed, paused, resumed after a crash (no stage
twice), held by an unreachable gateway, aborted back to the starting state, claimed
once by two controllers on one database."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.audit import HistoryQuery
from controller.auth import Principal, Role
from controller.errors import Conflict, Forbidden
from controller.plan_driver import PlanDriver
from controller.plans import parse_plan
from controller.schemas import Targets
from controller.service import Controller
from tests.unit.test_controller_support import (
    ADMIN,
    KEY_A,
    OPERATOR,
    FakeFleet,
    make_config,
    make_controller,
    settle,
    write_key,
)

ALL = Targets(all=True)
BOB = Principal(user="bob", role=Role.admin, token_id="t-bob")
FAST = {"plans": {"probe_interval_seconds": 0.05, "probe_timeout_seconds": 5}}
PLAN = parse_plan({"name": "back", "stages": [
    {"name": "case files", "profile": "casefiles", "probes": ["outside-web"]},
    {"name": "even first", "groups": ["even"], "restore": True, "gate": "approval"},
    {"name": "rest", "restore": True, "probes": ["outside-web"]}]})


@pytest.fixture
def fake_fleet() -> FakeFleet:
    return FakeFleet(["gw0", "gw1", "gw2"])


@pytest.fixture
def ctl(tmp_path: Path, fake_fleet: FakeFleet, db_url: str) -> Iterator[Controller]:
    c = make_controller(tmp_path, fake_fleet, db_url=db_url, **FAST)
    c.isolate(OPERATOR, ALL, profile="full", reason="incident", ticket="INC-1")
    yield c
    c.close()


def journal_ids(agent: Any, action: str | None = None) -> list[str]:
    return [e["request_id"] for e in agent.journal
            if e["action"] != "checkpoint" and (action is None or e["action"] == action)]


def test_a_plan_runs_stage_by_stage_with_probes_and_a_second_admin(
        ctl: Controller, fake_fleet: FakeFleet) -> None:
    started = ctl.plans.start(ADMIN, ALL, PLAN, reason="reconnect", ticket="INC-1")
    status = settle(ctl, started.plan_id)
    assert [s.state for s in status.stages] == ["done", "awaiting approval", "pending"]
    assert all(a.profile == "casefiles" for a in fake_fleet.agents.values())
    assert "awaits approval" in (status.waiting or "")
    with pytest.raises(Forbidden, match="two-person"):
        ctl.plans.approve(ADMIN, started.plan_id, reason="my own plan")
    status = ctl.plans.approve(BOB, started.plan_id, reason="checked the case files")
    status = settle(ctl, started.plan_id)
    assert status.state == "done" and status.ok
    assert [s.state for s in status.stages] == ["done", "done", "done"]
    assert status.stages[1].gateways == ["gw0", "gw2"]
    assert status.stages[1].approved_by == "bob"
    assert all(a.state == "open" for a in fake_fleet.agents.values())
    # every stage's request id once in each of its gateways' journals
    for s in status.stages:
        assert s.command_id is not None
        for g in s.gateways:
            assert journal_ids(fake_fleet.agents[g]).count(s.command_id) == 1
    records = ctl.history(HistoryQuery(action="restore"))
    stage_cmds = [r for r in records if r.detail.get("plan_id") == started.plan_id
                  and r.action == "restore" and r.outcome == "ok"]
    assert [r.detail["stage"] for r in stage_cmds] == ["case files", "even first", "rest"]
    events = [(r.action, r.outcome, r.detail.get("stage"), r.actor) for r in records
              if r.command_id == started.plan_id]
    assert ("restore.plan", "requested", None, "alice") in events
    assert ("restore.plan.approve", "ok", "even first", "bob") in events
    assert ("restore.plan.stage", "awaiting approval", "even first", "controller") in events
    assert events[-1] == ("restore.plan", "ok", None, "controller")
    refused = ctl.history(HistoryQuery(action="auth.refused"))
    assert refused[-1].actor == "alice" and refused[-1].detail["request"] == "plan.approve"


def test_probes_that_do_not_pass_fail_the_stage_and_resume_retries_it(
        ctl: Controller, fake_fleet: FakeFleet) -> None:
    fake_fleet.agents["gw1"].probe_results["outside-web"] = False
    plan = parse_plan({"stages": [{"name": "a", "profile": "casefiles",
                                   "probes": ["outside-web"], "probe_timeout": "1s"},
                                  {"name": "b", "restore": True}]})
    started = ctl.plans.start(ADMIN, ALL, plan, reason="r", ticket=None)
    status = settle(ctl, started.plan_id)
    assert status.state == "failed" and status.stages[0].state == "failed"
    assert "outside-web on gw1" in status.stages[0].note
    assert all(a.state == "isolated" for a in fake_fleet.agents.values())  # b never ran
    first = status.stages[0].command_id
    fake_fleet.agents["gw1"].probe_results["outside-web"] = True
    ctl.plans.resume(BOB, started.plan_id, reason="probe target fixed")
    status = settle(ctl, started.plan_id)
    assert status.state == "done"
    assert status.stages[0].command_id != first and status.stages[0].attempt == 2


def test_a_controller_killed_mid_stage_resumes_without_running_a_stage_twice(
        tmp_path: Path, fake_fleet: FakeFleet, db_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    ctl = make_controller(tmp_path, fake_fleet, db_url=db_url, **FAST)
    ctl.isolate(OPERATOR, ALL, profile="full", reason="incident", ticket=None)
    plan = parse_plan({"stages": [{"name": "a", "profile": "casefiles"},
                                  {"name": "b", "restore": True}]})
    monkeypatch.setattr(PlanDriver, "kick", lambda self: None)  # only the test drives
    started = ctl.plans.start(ADMIN, ALL, plan, reason="r", ticket=None)

    class Killed(BaseException):
        pass

    real = PlanDriver.write
    calls = {"n": 0}

    def dies_after_sending(self: PlanDriver, plan_id: str, change: Any) -> Any:
        # the stage's command went out and was applied; the controller dies before it
        # writes down the answers (after assign: write #1; answers: write #2)
        calls["n"] += 1
        if calls["n"] == 2:
            raise Killed
        return real(self, plan_id, change)

    monkeypatch.setattr(PlanDriver, "write", dies_after_sending)
    with pytest.raises(Killed):
        ctl.plans.driver.tick()
    monkeypatch.undo()
    sent = ctl.plans.get(started.plan_id).stages[0]
    assert sent.state == "running" and sent.command_id is not None
    assert all(a.profile == "casefiles" for a in fake_fleet.agents.values())
    ctl.close()  # (the lease still names this controller, as after a SIGKILL)

    again = Controller(make_config(tmp_path, db_url=db_url, **FAST),
                       session_factory=fake_fleet.factory).start()
    try:
        status = settle(again, started.plan_id)
        assert status.state == "done"
        assert status.stages[0].command_id == sent.command_id  # completed, not rerun
        for agent in fake_fleet.agents.values():
            assert journal_ids(agent).count(sent.command_id) == 1
            assert journal_ids(agent).count(status.stages[1].command_id) == 1
        resend = [r for r in again.history(HistoryQuery(command_id=sent.command_id))
                  if r.outcome == "requested"]
        assert [r.detail["resend"] for r in resend] == [False, True]
    finally:
        again.close()


def test_an_unreachable_gateway_holds_its_stage_and_catches_up(
        ctl: Controller, fake_fleet: FakeFleet) -> None:
    fake_fleet.agents["gw2"].up = False
    plan = parse_plan({"stages": [{"name": "a", "profile": "casefiles"},
                                  {"name": "b", "restore": True}]})
    started = ctl.plans.start(ADMIN, ALL, plan, reason="r", ticket=None)
    status = settle(ctl, started.plan_id, timeout=1.0)
    assert status.state == "running" and status.stages[0].state == "running"
    assert status.stages[0].results["gw2"] == "unreachable"
    assert "waits for gw2" in (status.waiting or "")
    assert fake_fleet.agents["gw0"].profile == "casefiles"  # the others applied
    assert fake_fleet.agents["gw0"].state == "isolated"  # and stage b did not start
    fake_fleet.agents["gw2"].up = True
    status = settle(ctl, started.plan_id)
    assert status.state == "done"
    assert journal_ids(fake_fleet.agents["gw2"]).count(status.stages[0].command_id) == 1


def test_abort_returns_every_gateway_to_its_starting_state(
        ctl: Controller, fake_fleet: FakeFleet) -> None:
    ctl.isolate(OPERATOR, Targets(gateways=("gw1",)), profile="internet", reason="x",
                ticket=None)
    ctl.restore(ADMIN, Targets(gateways=("gw2",)), reason="gw2 was clean", ticket=None)
    started = ctl.plans.start(ADMIN, ALL, PLAN, reason="r", ticket=None)
    status = settle(ctl, started.plan_id)
    assert status.stages[1].state == "awaiting approval"
    assert {g: (a.state, a.profile) for g, a in fake_fleet.agents.items()} == {
        "gw0": ("isolated", "casefiles"), "gw1": ("isolated", "casefiles"),
        "gw2": ("isolated", "casefiles")}
    ctl.plans.abort(BOB, started.plan_id, reason="new indicators")
    status = settle(ctl, started.plan_id)
    assert status.state == "aborted"
    assert [s.state for s in status.stages] == ["done", "aborted", "aborted"]
    assert {g: (a.state, a.profile) for g, a in fake_fleet.agents.items()} == {
        "gw0": ("isolated", "full"), "gw1": ("isolated", "internet"), "gw2": ("open", None)}
    assert ("restore.plan", "aborted") in [(r.action, r.outcome) for r in ctl.history(
        HistoryQuery(command_id=started.plan_id))]
    with pytest.raises(Conflict):
        ctl.plans.resume(ADMIN, started.plan_id, reason="too late")


def test_pause_holds_the_plan_until_resumed(ctl: Controller, fake_fleet: FakeFleet) -> None:
    plan = parse_plan({"stages": [{"name": "a", "profile": "casefiles", "pause": "1s"},
                                  {"name": "b", "restore": True, "pause": "1s"}]})
    started = ctl.plans.start(ADMIN, ALL, plan, reason="r", ticket=None)
    status = ctl.plans.pause(BOB, started.plan_id, reason="wait for the CSIRT")
    assert status.state == "paused" and status.stages[0].state == "paused"
    status = settle(ctl, started.plan_id)
    assert status.state == "paused"
    assert all(a.profile == "full" for a in fake_fleet.agents.values())
    ctl.plans.resume(BOB, started.plan_id, reason="go")
    assert settle(ctl, started.plan_id).state == "done"


def test_someone_else_commanding_a_plan_gateway_stops_the_plan(
        ctl: Controller, fake_fleet: FakeFleet) -> None:
    plan = parse_plan({"stages": [{"name": "a", "profile": "casefiles"},
                                  {"name": "b", "restore": True, "gate": "approval"}]})
    started = ctl.plans.start(ADMIN, ALL, plan, reason="r", ticket=None)
    settle(ctl, started.plan_id)
    ctl.isolate(OPERATOR, Targets(gateways=("gw0",)), profile="full", reason="wait",
                ticket=None)
    ctl.plans.approve(BOB, started.plan_id, reason="ok")
    status = settle(ctl, started.plan_id)
    assert status.state == "failed" and "gw0 received another command" in status.note
    assert fake_fleet.agents["gw0"].profile == "full"  # the later command stands
    assert fake_fleet.agents["gw1"].profile == "casefiles"


def test_overlapping_plans_are_refused_and_approval_for_restore_is_config(
        tmp_path: Path, fake_fleet: FakeFleet, db_url: str) -> None:
    ctl = make_controller(tmp_path, fake_fleet, db_url=db_url,
                          plans={"require_approval_for_restore": True,
                                 "probe_interval_seconds": 0.05})
    try:
        ctl.isolate(OPERATOR, ALL, profile="full", reason="x", ticket=None)
        plan = parse_plan({"stages": [{"name": "a", "profile": "casefiles"},
                                      {"name": "b", "restore": True}]})
        started = ctl.plans.start(ADMIN, ALL, plan, reason="r", ticket=None)
        assert [s.gate for s in started.stages] == ["auto", "approval"]
        with pytest.raises(Conflict, match=started.plan_id):
            ctl.plans.start(ADMIN, Targets(gateways=("gw1",)), plan, reason="r", ticket=None)
        with pytest.raises(Forbidden):
            ctl.plans.start(OPERATOR, ALL, plan, reason="r", ticket=None)
    finally:
        ctl.close()


def test_two_controllers_on_one_database_drive_a_plan_once(
        tmp_path: Path, fake_fleet: FakeFleet, db_url: str) -> None:
    # two controllers share the database and the keys (README), not their state dirs
    keys = {"audit_key_file": str(tmp_path / "audit.key"),
            "audit": {"checkpoint_key_file": str(tmp_path / "checkpoint.key")}}
    one, two = (Controller(make_config(tmp_path / n, db_url=db_url, **FAST, **keys),
                           session_factory=fake_fleet.factory).start() for n in ("one", "two"))
    try:
        key = write_key(tmp_path)
        for i, name in enumerate(fake_fleet.agents):
            one.add_gateway(ADMIN, name=name, address=f"10.99.0.{100 + i}", user="root",
                            key_path=str(key), host_key=KEY_A, trust_on_first_use=False,
                            groups=[], reason="test", ticket=None)
        one.isolate(OPERATOR, ALL, profile="full", reason="x", ticket=None)
        plan = parse_plan({"stages": [{"name": n, "profile": "casefiles" if n == "a"
                                       else None, "restore": n != "a"} for n in "ab"]})
        started = one.plans.start(ADMIN, ALL, plan, reason="r", ticket=None)
        one.plans.driver.wait()
        barrier = threading.Barrier(2)

        def drive(c: Controller) -> None:
            barrier.wait()
            for _ in range(20):
                c.plans.driver.tick()

        threads = [threading.Thread(target=drive, args=(c,)) for c in (one, two)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        status = settle(two, started.plan_id)
        assert status.state == "done"
        for agent in fake_fleet.agents.values():
            for s in status.stages:
                assert journal_ids(agent).count(s.command_id) == 1
        assert one.verify_audit().ok and two.verify_audit().ok
    finally:
        one.close()
        two.close()
