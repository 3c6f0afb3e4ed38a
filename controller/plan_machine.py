"""The restore plan state machine (pure): the next step a plan needs, and what the
outcome of each step does to its document.

A stored plan is one document (`PlanDoc`, controller/plan_doc.py). The driver
(controller/plan_driver.py) asks `next_step` what to do, does it (a stage's
command, probes, ...), and writes the outcome back with the `apply_*` functions
here; control actions (approve, pause, resume, abort) are controller/
plan_control.py. Nothing in this module does I/O or reads a clock.

A stage moves through

    pending -> [awaiting approval] -> sending -> [probing] -> done
                                         \\-> failed    \\-> failed

`sending` means a command id was assigned (and recorded) before anything was sent:
a driver that died mid-stage finds the id and sends again under it, which the agent
answers without applying twice; gateways that answered are not asked again; an
unreachable one holds the stage and is asked again every `retry_seconds`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from controller.plan_doc import HOLD_OUTCOMES, OK_OUTCOMES, PlanDoc, PlanState, StageDoc


@dataclass(frozen=True)
class Timing:
    retry_seconds: float = 5.0  # an unreachable gateway is asked again this often
    probe_interval: float = 5.0


# -- steps ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Idle:
    why: str


@dataclass(frozen=True)
class Finish:
    state: PlanState
    note: str = ""


@dataclass(frozen=True)
class Skip:
    index: int
    why: str


@dataclass(frozen=True)
class AwaitApproval:
    index: int


@dataclass(frozen=True)
class Send:
    index: int
    gateways: tuple[str, ...]
    new_command: bool  # a new command id (first attempt, or a retry after a failure)


@dataclass(frozen=True)
class Probe:
    index: int


@dataclass(frozen=True)
class StageDone:
    index: int


@dataclass(frozen=True)
class StageFailed:
    index: int
    why: str


@dataclass(frozen=True)
class AbortSend:
    command: int  # index into abort.commands
    gateways: tuple[str, ...]


Step = Idle | Finish | Skip | AwaitApproval | Send | Probe | StageDone | StageFailed | AbortSend


def next_step(doc: PlanDoc, now: float, timing: Timing = Timing()) -> Step:
    """What the plan needs next (pure)."""
    if doc.state == "aborting":
        return _abort_step(doc, now)
    if doc.state != "running":
        return Idle(f"the plan is {doc.state}")
    if doc.current >= len(doc.stages):
        return Finish("done")
    stage = doc.stage(doc.current)
    match stage.state:
        case "pending":
            if not stage.gateways:
                return Skip(stage.index, "none of the plan's gateways is in this stage")
            if stage.not_before is not None and now < stage.not_before:
                return Idle(f"stage {stage.name!r} waits for its pause to end")
            if stage.gate == "approval" and stage.approved_by is None:
                return AwaitApproval(stage.index)
            if stage.no_change:
                return Probe(stage.index) if stage.probes else StageDone(stage.index)
            return Send(stage.index, tuple(stage.gateways), new_command=True)
        case "awaiting approval":
            if stage.approved_by is None:
                return Idle(f"stage {stage.name!r} awaits approval by a second admin")
            if stage.no_change:
                return Probe(stage.index) if stage.probes else StageDone(stage.index)
            return Send(stage.index, tuple(stage.gateways), new_command=True)
        case "sending":
            waiting = tuple(g for g in stage.gateways
                            if stage.results.get(g) not in OK_OUTCOMES)
            if stage.command_id is None:
                return Send(stage.index, tuple(stage.gateways), new_command=True)
            if waiting:
                if stage.next_try_at is not None and now < stage.next_try_at:
                    return Idle(f"stage {stage.name!r} waits for {', '.join(waiting)}")
                return Send(stage.index, waiting, new_command=False)
            return Probe(stage.index) if stage.probes else StageDone(stage.index)
        case "probing":
            if probes_passed(stage):
                return StageDone(stage.index)
            started = stage.probes_started_at if stage.probes_started_at is not None else now
            if now - started >= stage.probe_timeout:
                return StageFailed(stage.index, "probes did not pass within "
                                   f"{stage.probe_timeout:g}s: {probe_failures(stage)}")
            if stage.probes_next_at is not None and now < stage.probes_next_at:
                return Idle(f"stage {stage.name!r} waits for its probes")
            return Probe(stage.index)
        case "failed":
            return Finish("failed", stage.note)
        case _:  # done, skipped, aborted: the plan moves on (see apply_stage_done)
            return Idle(f"stage {stage.name!r} is {stage.state}")


def _abort_step(doc: PlanDoc, now: float) -> Step:
    assert doc.abort is not None
    for i, cmd in enumerate(doc.abort.commands):
        waiting = tuple(g for g in cmd.gateways if cmd.results.get(g) not in OK_OUTCOMES)
        if not waiting:
            continue
        if any(cmd.results.get(g) not in (*HOLD_OUTCOMES, None) for g in waiting):
            return Finish("failed", f"abort: {', '.join(waiting)} could not be returned to "
                                    "the starting state")
        if cmd.next_try_at is not None and now < cmd.next_try_at:
            return Idle(f"abort waits for {', '.join(waiting)}")
        return AbortSend(i, waiting)
    return Finish("aborted", doc.note)


def probes_passed(stage: StageDoc) -> bool:
    return all(stage.probe_results.get(g, {}).get(p) is True
               for g in stage.gateways for p in stage.probes)


def probe_failures(stage: StageDoc) -> str:
    bad = [f"{p} on {g}" + (" (not configured there)" if p not in stage.probe_results.get(g, {})
                            and g in stage.probe_results else "")
           for g in stage.gateways for p in stage.probes
           if stage.probe_results.get(g, {}).get(p) is not True]
    return ", ".join(bad) or "none"


# -- applying what happened ------------------------------------------------------------------


def apply_skip(doc: PlanDoc, step: Skip, now: float) -> PlanDoc:
    stage = doc.stage(step.index).model_copy(update={"state": "skipped", "note": step.why,
                                                     "finished_at": now})
    return _advance(doc.with_stage(stage), now)


def apply_await(doc: PlanDoc, index: int) -> PlanDoc:
    return doc.with_stage(doc.stage(index).model_copy(update={"state": "awaiting approval"}))


def apply_assign(doc: PlanDoc, index: int, command_id: str, now: float) -> PlanDoc:
    """Before anything is sent: the stage's (new) command id, recorded."""
    stage = doc.stage(index)
    stage = stage.model_copy(update={
        "state": "sending", "command_id": command_id, "attempt": stage.attempt + 1,
        "results": {}, "next_try_at": None, "started_at": stage.started_at or now,
        "note": ""})
    known = {g: [*doc.known_commands.get(g, []), command_id] for g in stage.gateways}
    return doc.with_stage(stage).model_copy(update={
        "known_commands": {**doc.known_commands, **known}})


def apply_sent(doc: PlanDoc, index: int, outcomes: Mapping[str, str], messages: Mapping[str, str],
               now: float, timing: Timing = Timing()) -> PlanDoc:
    """The answers to a stage's command: ok ones stay ok; an unreachable gateway holds the
    stage; anything else (refused, failed, unverified) fails it, and the plan."""
    stage = doc.stage(index)
    results = {**stage.results, **outcomes}
    bad = {g: o for g, o in outcomes.items() if o not in OK_OUTCOMES and o not in HOLD_OUTCOMES}
    if bad:
        why = "; ".join(f"{g}: {o}" + (f" ({messages[g]})" if messages.get(g) else "")
                        for g, o in sorted(bad.items()))
        return apply_stage_failed(doc.with_stage(stage.model_copy(update={"results": results})),
                                  index, f"did not apply and verify: {why}", now)
    waiting = any(results.get(g) not in OK_OUTCOMES for g in stage.gateways)
    stage = stage.model_copy(update={
        "results": results, "next_try_at": now + timing.retry_seconds if waiting else None})
    return doc.with_stage(stage)


def apply_probe_started(doc: PlanDoc, index: int, now: float) -> PlanDoc:
    stage = doc.stage(index)
    if stage.state == "probing":
        return doc
    return doc.with_stage(stage.model_copy(update={"state": "probing",
                                                   "probes_started_at": now}))


def apply_probed(doc: PlanDoc, index: int, results: Mapping[str, Mapping[str, bool]],
                 now: float, timing: Timing = Timing()) -> PlanDoc:
    """Probe results by gateway (probe name -> ok); a gateway that did not answer keeps
    what it said before (nothing, the first time)."""
    stage = doc.stage(index)
    merged = {**stage.probe_results, **{g: dict(r) for g, r in results.items()}}
    return doc.with_stage(stage.model_copy(update={
        "state": "probing", "probe_results": merged,
        "probes_started_at": stage.probes_started_at if stage.probes_started_at is not None
        else now, "probes_next_at": now + timing.probe_interval}))


def apply_stage_done(doc: PlanDoc, index: int, now: float) -> PlanDoc:
    stage = doc.stage(index).model_copy(update={"state": "done", "finished_at": now})
    return _advance(doc.with_stage(stage), now)


def apply_stage_failed(doc: PlanDoc, index: int, why: str, now: float) -> PlanDoc:
    stage = doc.stage(index).model_copy(update={"state": "failed", "note": why,
                                                "finished_at": now})
    doc = doc.with_stage(stage)
    if doc.state not in ("running", "paused"):  # e.g. aborted meanwhile: that stands
        return doc
    return doc.model_copy(update={"state": "failed",
                                  "note": f"stage {stage.name!r} failed: {why}"})


def _advance(doc: PlanDoc, now: float) -> PlanDoc:
    """To the next stage; its pause starts now."""
    current = doc.current + 1
    if current < len(doc.stages):
        nxt = doc.stage(current)
        if nxt.pause_seconds and nxt.state == "pending" and nxt.not_before is None:
            doc = doc.with_stage(nxt.model_copy(update={"not_before": now + nxt.pause_seconds}))
    return doc.model_copy(update={"current": current})


def apply_finish(doc: PlanDoc, step: Finish, now: float) -> PlanDoc:
    stages = doc.stages
    if step.state == "aborted":
        stages = [s if s.state in ("done", "skipped", "failed")
                  else s.model_copy(update={"state": "aborted"}) for s in stages]
    return doc.model_copy(update={"state": step.state, "stages": stages, "finished_at": now,
                                  "note": step.note or doc.note})


def apply_abort_sent(doc: PlanDoc, index: int, outcomes: Mapping[str, str], now: float,
                     timing: Timing = Timing()) -> PlanDoc:
    assert doc.abort is not None
    commands = list(doc.abort.commands)
    cmd = commands[index]
    results = {**cmd.results, **outcomes}
    waiting = any(results.get(g) not in OK_OUTCOMES for g in cmd.gateways)
    commands[index] = cmd.model_copy(update={
        "results": results, "next_try_at": now + timing.retry_seconds if waiting else None})
    return doc.model_copy(update={"abort": doc.abort.model_copy(update={"commands": commands})})
