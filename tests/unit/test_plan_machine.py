"""The restore plan state machine (pure): next steps, what their outcomes do, control."""

from __future__ import annotations

import itertools

import pytest

from controller.plan_control import (
    ControlRefused,
    SecondAdminNeeded,
    abort,
    approve,
    pause,
    resume,
    superseded,
)
from controller.plan_doc import GatewayStart, PlanDoc, StageDoc, stage_label
from controller.plan_machine import (
    AbortSend,
    AwaitApproval,
    Finish,
    Idle,
    Probe,
    Send,
    Skip,
    StageDone,
    StageFailed,
    Timing,
    apply_abort_sent,
    apply_assign,
    apply_await,
    apply_finish,
    apply_probed,
    apply_sent,
    apply_skip,
    apply_stage_done,
    apply_stage_failed,
    next_step,
)

GWS = ["gw0", "gw1", "gw2"]
T = Timing(retry_seconds=5.0, probe_interval=2.0)


def stage(i: int, name: str, **kw: object) -> StageDoc:
    data: dict[str, object] = {"index": i, "name": name, "action": "isolate",
                               "profile": "casefiles", "gateways": GWS, **kw}
    return StageDoc.model_validate(data)


def plan(*stages: StageDoc, **kw: object) -> PlanDoc:
    starts = {"gw0": GatewayStart(state="isolated", profile="internet"),
              "gw1": GatewayStart(state="isolated", profile="full"),
              "gw2": GatewayStart(state="open")}
    data: dict[str, object] = {
        "plan_id": "p1", "name": "back", "actor": "alice", "reason": "r", "created_at": 0.0,
        "targets": GWS, "start": starts, "stages": list(stages),
        "known_commands": {g: ["c0"] for g in GWS}, **kw}
    return PlanDoc.model_validate(data)


ids = (f"id{n}" for n in itertools.count(1))


def run_stage(doc: PlanDoc, now: float, outcome: str = "verified") -> PlanDoc:
    step = next_step(doc, now, T)
    assert isinstance(step, Send) and step.new_command, step
    doc = apply_assign(doc, step.index, next(ids), now)
    return apply_sent(doc, step.index, dict.fromkeys(step.gateways, outcome), {}, now, T)


def test_stages_run_in_order_and_the_plan_is_done() -> None:
    doc = plan(stage(0, "case files"), stage(1, "rest", action="restore", profile=None))
    doc = run_stage(doc, 1.0)
    assert doc.stage(0).state == "sending" and doc.stage(0).attempt == 1
    assert next_step(doc, 1.0, T) == StageDone(0)
    doc = apply_stage_done(doc, 0, 1.0)
    assert doc.current == 1 and doc.stage(0).state == "done"
    doc = run_stage(doc, 2.0)
    doc = apply_stage_done(doc, 1, 2.0)
    step = next_step(doc, 3.0, T)
    assert step == Finish("done")
    doc = apply_finish(doc, step, 3.0)
    assert doc.state == "done" and isinstance(next_step(doc, 4.0, T), Idle)


def test_the_command_id_is_recorded_before_sending_and_known_to_the_plan() -> None:
    doc = plan(stage(0, "a"))
    doc = apply_assign(doc, 0, "cmd-a", 1.0)
    assert doc.stage(0).command_id == "cmd-a" and doc.stage(0).results == {}
    assert doc.known_commands["gw0"] == ["c0", "cmd-a"]
    # a driver that died here finds the id: the same command again, to everyone
    assert next_step(doc, 1.0, T) == Send(0, tuple(GWS), new_command=False)


def test_a_resumed_stage_only_asks_the_gateways_that_did_not_answer() -> None:
    doc = apply_assign(plan(stage(0, "a")), 0, "cmd-a", 1.0)
    doc = apply_sent(doc, 0, {"gw0": "verified", "gw1": "unreachable", "gw2": "verified"},
                     {}, 1.0, T)
    assert isinstance(next_step(doc, 2.0, T), Idle)  # waits: retry_seconds
    assert next_step(doc, 6.5, T) == Send(0, ("gw1",), new_command=False)
    doc = apply_sent(doc, 0, {"gw1": "verified"}, {}, 6.5, T)
    assert next_step(doc, 6.5, T) == StageDone(0)


@pytest.mark.parametrize("outcome", ["unverified", "failed", "refused"])
def test_a_gateway_that_does_not_apply_and_verify_fails_the_stage_and_the_plan(
        outcome: str) -> None:
    doc = apply_assign(plan(stage(0, "a"), stage(1, "b")), 0, "cmd-a", 1.0)
    doc = apply_sent(doc, 0, {"gw0": "verified", "gw1": outcome, "gw2": "verified"},
                     {"gw1": "nft said no"}, 1.0, T)
    assert doc.state == "failed" and doc.stage(0).state == "failed"
    assert "gw1" in doc.note and "nft said no" in doc.stage(0).note
    assert isinstance(next_step(doc, 2.0, T), Idle)
    assert doc.stage(1).state == "pending"
    again = resume(doc, accepted_commands={"gw1": "someone-else"})
    assert again.state == "running" and again.stage(0).state == "pending"
    assert "someone-else" in again.known_commands["gw1"]
    assert next_step(again, 3.0, T) == Send(0, tuple(GWS), new_command=True)


def test_approval_gate_comes_before_the_stage_applies_and_needs_a_second_admin() -> None:
    doc = plan(stage(0, "a", gate="approval"))
    assert next_step(doc, 1.0, T) == AwaitApproval(0)
    doc = apply_await(doc, 0)
    assert isinstance(next_step(doc, 2.0, T), Idle)
    assert stage_label(doc, doc.stage(0)) == "awaiting approval"
    with pytest.raises(SecondAdminNeeded, match="two-person"):
        approve(doc, by="alice", reason="mine", now=3.0)
    doc, approved = approve(doc, by="bob", reason="checked", now=3.0)
    assert (approved.approved_by, approved.approval_reason) == ("bob", "checked")
    assert next_step(doc, 3.0, T) == Send(0, tuple(GWS), new_command=True)
    with pytest.raises(ControlRefused, match="approved already"):
        approve(doc, by="carol", reason="again", now=4.0)


def test_probes_must_pass_on_every_gateway_within_the_timeout() -> None:
    doc = plan(stage(0, "a", probes=["outside-web", "dns"], probe_timeout=10.0))
    doc = run_stage(doc, 0.0)
    assert next_step(doc, 0.0, T) == Probe(0)
    ok = {"outside-web": True, "dns": True}
    doc = apply_probed(doc, 0, {"gw0": ok, "gw1": {"outside-web": True}}, 0.5, T)
    assert isinstance(next_step(doc, 1.0, T), Idle)  # next round at 2.5
    assert next_step(doc, 2.5, T) == Probe(0)
    doc = apply_probed(doc, 0, {"gw1": ok, "gw2": ok}, 2.5, T)
    assert next_step(doc, 2.5, T) == StageDone(0)
    bad = apply_probed(run_stage(plan(stage(0, "a", probes=["dns"], probe_timeout=10.0)), 0.0),
                       0, {"gw0": {"dns": False}}, 0.5, T)
    step = next_step(bad, 11.0, T)
    assert isinstance(step, StageFailed) and "dns on gw0" in step.why
    assert "gw1 (" not in step.why and "dns on gw1" in step.why


def test_a_stage_that_repeats_the_previous_profile_is_a_pure_checkpoint() -> None:
    doc = plan(stage(0, "a"), stage(1, "check", no_change=True, probes=["dns"],
                                    gate="approval"))
    doc = apply_stage_done(run_stage(doc, 0.0), 0, 0.0)
    assert next_step(doc, 1.0, T) == AwaitApproval(1)
    doc, _ = approve(apply_await(doc, 1), by="bob", reason="ok", now=1.0)
    assert next_step(doc, 1.0, T) == Probe(1)  # no command: gate and probes only


def test_pause_between_stages_and_pausing_the_plan() -> None:
    doc = plan(stage(0, "a"), stage(1, "b", pause_seconds=60.0))
    doc = apply_stage_done(run_stage(doc, 0.0), 0, 10.0)
    assert doc.stage(1).not_before == 70.0
    assert isinstance(next_step(doc, 69.0, T), Idle)
    assert isinstance(next_step(doc, 70.0, T), Send)
    held = pause(doc, by="bob")
    assert held.state == "paused" and isinstance(next_step(held, 80.0, T), Idle)
    assert stage_label(held, held.stage(1)) == "paused"
    with pytest.raises(ControlRefused):
        pause(held, by="bob")
    assert resume(held, accepted_commands={}).state == "running"


def test_a_stage_without_gateways_is_skipped() -> None:
    doc = plan(stage(0, "nobody", gateways=[]), stage(1, "b"))
    step = next_step(doc, 0.0, T)
    assert isinstance(step, Skip)
    doc = apply_skip(doc, step, 0.0)
    assert doc.stage(0).state == "skipped" and doc.current == 1


def test_abort_returns_touched_gateways_to_their_starting_state() -> None:
    first = stage(0, "a", gateways=["gw0", "gw1"])
    doc = plan(first, stage(1, "b", action="restore", profile=None))
    doc = apply_stage_done(run_stage(doc, 0.0), 0, 0.0)
    doc = apply_assign(doc, 1, "cmd-b", 1.0)  # stage b was sent when the abort came
    doc = abort(doc, by="bob", reason="wrong call", now=2.0, new_id=lambda: next(ids))
    assert doc.state == "aborting" and doc.abort is not None
    cmds = {(c.op, c.profile): c.gateways for c in doc.abort.commands}
    assert cmds == {("isolate", "internet"): ["gw0"], ("isolate", "full"): ["gw1"],
                    ("restore", None): ["gw2"]}
    assert all(c.command_id for c in doc.abort.commands)  # assigned before sending
    step = next_step(doc, 2.0, T)
    assert isinstance(step, AbortSend)
    for i, c in enumerate(doc.abort.commands):
        outcome = "unreachable" if c.gateways == ["gw2"] else "verified"
        doc = apply_abort_sent(doc, i, dict.fromkeys(c.gateways, outcome), 2.0, T)
    assert isinstance(next_step(doc, 3.0, T), Idle)  # gw2 holds the abort
    gw2 = next(i for i, c in enumerate(doc.abort.commands) if c.gateways == ["gw2"])
    assert next_step(doc, 7.5, T) == AbortSend(gw2, ("gw2",))
    doc = apply_abort_sent(doc, gw2, {"gw2": "verified"}, 7.5, T)
    step = next_step(doc, 7.5, T)
    assert isinstance(step, Finish) and step.state == "aborted"
    doc = apply_finish(doc, step, 7.5)
    assert [s.state for s in doc.stages] == ["done", "aborted"]
    assert stage_label(doc, doc.stage(1)) == "aborted"


def test_abort_of_an_untouched_plan_sends_nothing() -> None:
    doc = abort(plan(stage(0, "a")), by="bob", reason="never mind", now=0.0,
                new_id=lambda: "x")
    assert doc.abort is not None and doc.abort.commands == []
    assert doc.abort.untouched == GWS
    assert next_step(doc, 0.0, T) == Finish("aborted", doc.note)


def test_a_failure_arriving_after_an_abort_does_not_undo_it() -> None:
    doc = apply_assign(plan(stage(0, "a")), 0, "cmd-a", 0.0)
    doc = abort(doc, by="bob", reason="stop", now=1.0, new_id=lambda: "x")
    doc = apply_stage_failed(doc, 0, "late answer", 2.0)
    assert doc.state == "aborting"


def test_someone_else_commanding_a_gateway_is_noticed() -> None:
    doc = apply_assign(plan(stage(0, "a")), 0, "cmd-a", 0.0)
    assert superseded(doc, GWS, {"gw0": "cmd-a", "gw1": "c0", "gw2": None}) is None
    found = superseded(doc, GWS, {"gw0": "cmd-a", "gw1": "op-isolate-full", "gw2": None})
    assert found is not None and "gw1" in found and "op-isolate-full" in found
