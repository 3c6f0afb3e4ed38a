"""The restore plan state machine (pure): a plan's document, and the next step to take.

A stored plan is one document (`PlanDoc`, JSON in the `plans` row): its stages,
each stage's progress, and the gateways' state when the plan started. The driver
(controller/plan_driver.py) asks `next_step` what to do, does it (a stage's
command, probes, ...), and writes the outcome back with the `apply_*` functions
here; control actions (approve, pause, resume, abort) change the document through
the functions here too. Nothing in this module does I/O or reads a clock.

A stage moves through

    pending -> [awaiting approval] -> sending -> [probing] -> done
                                         \\-> failed    \\-> failed

`sending` means a command id was assigned (and recorded) before anything was sent:
a driver that died mid-stage finds the id and sends again under it, which the agent
answers without applying twice; gateways that answered are not asked again; an
unreachable one holds the stage and is asked again every `retry_seconds`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

PlanState = Literal["running", "paused", "failed", "done", "aborting", "aborted"]
StageState = Literal["pending", "awaiting approval", "sending", "probing", "done", "failed",
                     "aborted", "skipped"]
ACTIVE: tuple[PlanState, ...] = ("running", "aborting")  # what the driver works on
OPEN: tuple[PlanState, ...] = ("running", "paused", "failed", "aborting")  # not finished
FINISHED: tuple[PlanState, ...] = ("done", "aborted")
OK_OUTCOMES = ("verified", "applied")
HOLD_OUTCOMES = ("unreachable",)  # the gateway may come back: the stage waits for it


class GatewayStart(BaseModel):
    model_config = ConfigDict(frozen=True)

    state: str | None  # open | isolated | None (never seen)
    profile: str | None = None


class StageDoc(BaseModel):
    model_config = ConfigDict(frozen=True)

    index: int
    name: str
    action: Literal["isolate", "restore"]
    profile: str | None = None
    gateways: list[str]
    gate: Literal["auto", "approval"] = "auto"
    probes: list[str] = Field(default_factory=list)
    probe_timeout: float = 300.0
    pause_seconds: float = 0.0
    no_change: bool = False  # the previous stage's profile again: gate and probes only
    state: StageState = "pending"
    command_id: str | None = None
    attempt: int = 0
    results: dict[str, str] = Field(default_factory=dict)  # gateway -> last outcome
    next_try_at: float | None = None
    not_before: float | None = None  # its pause ends then
    probes_started_at: float | None = None
    probes_next_at: float | None = None
    probe_results: dict[str, dict[str, bool]] = Field(default_factory=dict)
    approved_by: str | None = None
    approved_at: float | None = None
    approval_reason: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    note: str = ""


class AbortCommand(BaseModel):
    model_config = ConfigDict(frozen=True)

    command_id: str
    op: Literal["isolate", "restore"]
    profile: str | None = None
    gateways: list[str]
    results: dict[str, str] = Field(default_factory=dict)
    next_try_at: float | None = None


class AbortDoc(BaseModel):
    model_config = ConfigDict(frozen=True)

    by: str
    reason: str
    at: float
    commands: list[AbortCommand] = Field(default_factory=list)
    untouched: list[str] = Field(default_factory=list)  # never changed by the plan
    unknown: list[str] = Field(default_factory=list)  # starting state unknown: left alone


class PlanDoc(BaseModel):
    model_config = ConfigDict(frozen=True)

    plan_id: str
    name: str
    actor: str
    reason: str
    ticket: str | None = None
    created_at: float
    targets: list[str]
    start: dict[str, GatewayStart]
    stages: list[StageDoc]
    state: PlanState = "running"
    current: int = 0
    # per gateway, the command ids that may be its last one while the plan runs: the one
    # it had at the start, the plan's own, and any a resume accepted. Another one means
    # someone else commanded the gateway meanwhile, and the plan stops there.
    known_commands: dict[str, list[str]] = Field(default_factory=dict)
    seq: int | None = None  # the audit record that started the plan
    abort: AbortDoc | None = None
    note: str = ""
    finished_at: float | None = None
    paused_by: str | None = None

    def stage(self, index: int) -> StageDoc:
        return self.stages[index]

    def with_stage(self, stage: StageDoc) -> PlanDoc:
        stages = list(self.stages)
        stages[stage.index] = stage
        return self.model_copy(update={"stages": stages})


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


def superseded(doc: PlanDoc, gateways: Sequence[str],
               current: Mapping[str, str | None]) -> str | None:
    """Whether someone else commanded one of `gateways` while the plan ran (`current`:
    gateway -> its last command id now)."""
    for g in gateways:
        now_id = current.get(g)
        if now_id is not None and now_id not in doc.known_commands.get(g, []):
            return f"{g} received another command ({now_id}) while the plan ran"
    return None


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


# -- control ---------------------------------------------------------------------------------


class ControlRefused(Exception):
    """A control action that does not fit the plan's state (the message says why)."""


def approve(doc: PlanDoc, *, by: str, reason: str, now: float) -> tuple[PlanDoc, StageDoc]:
    """The current stage's gate, passed by `by` (the two-person rule: not the admin who
    started the plan)."""
    if doc.state not in ("running", "paused"):
        raise ControlRefused(f"plan {doc.plan_id} is {doc.state}: nothing to approve")
    if doc.current >= len(doc.stages):
        raise ControlRefused(f"plan {doc.plan_id} has no stage left to approve")
    stage = doc.stage(doc.current)
    if stage.gate != "approval" or stage.state not in ("pending", "awaiting approval"):
        raise ControlRefused(f"stage {stage.name!r} does not await approval "
                             f"(it is {stage.state}, gate {stage.gate})")
    if stage.approved_by is not None:
        raise ControlRefused(f"stage {stage.name!r} was approved already by "
                             f"{stage.approved_by}")
    if by == doc.actor:
        raise PermissionError(f"{by} started plan {doc.plan_id}; a second admin must "
                              "approve its stages (two-person rule)")
    stage = stage.model_copy(update={"approved_by": by, "approved_at": now,
                                     "approval_reason": reason})
    return doc.with_stage(stage), stage


def pause(doc: PlanDoc, *, by: str) -> PlanDoc:
    if doc.state != "running":
        raise ControlRefused(f"plan {doc.plan_id} is {doc.state}, not running")
    return doc.model_copy(update={"state": "paused", "paused_by": by})


def resume(doc: PlanDoc, *, accepted_commands: Mapping[str, str | None]) -> PlanDoc:
    """Paused: carry on. Failed: try the failed stage again (a new command id), taking the
    gateways' commands since (`accepted_commands`, gateway -> last command id) as the new
    baseline: whoever commanded them meanwhile was seen by whoever resumes."""
    if doc.state == "paused":
        return doc.model_copy(update={"state": "running", "paused_by": None})
    if doc.state != "failed":
        raise ControlRefused(f"plan {doc.plan_id} is {doc.state}: only a paused or failed "
                             "plan resumes")
    stage = doc.stage(doc.current)
    retry = stage.model_copy(update={
        "state": "pending", "results": {}, "next_try_at": None, "probe_results": {},
        "probes_started_at": None, "probes_next_at": None, "note": ""})
    known = dict(doc.known_commands)
    for g, c in accepted_commands.items():
        if c is not None and c not in known.get(g, []):
            known[g] = [*known.get(g, []), c]
    return doc.with_stage(retry).model_copy(update={
        "state": "running", "note": "", "known_commands": known})


def abort(doc: PlanDoc, *, by: str, reason: str, now: float,
          new_id: Callable[[], str]) -> PlanDoc:
    """Back to the starting state: every gateway a stage touched gets the profile it had
    when the plan started (isolated again if it was isolated, restored if it was open);
    one command per target state, its id assigned here, before anything is sent."""
    if doc.state not in ("running", "paused", "failed"):
        raise ControlRefused(f"plan {doc.plan_id} is {doc.state}: nothing to abort")
    touched = sorted({g for s in doc.stages if s.command_id is not None and not s.no_change
                      for g in s.gateways})
    groups: dict[tuple[str, str | None], list[str]] = {}
    unknown: list[str] = []
    for g in touched:
        start = doc.start.get(g)
        if start is None or start.state not in ("open", "isolated"):
            unknown.append(g)
        elif start.state == "open":
            groups.setdefault(("restore", None), []).append(g)
        else:
            groups.setdefault(("isolate", start.profile or "internet"), []).append(g)
    commands = [AbortCommand(command_id=new_id(), op="isolate" if op == "isolate" else "restore",
                             profile=profile, gateways=gws)
                for (op, profile), gws in sorted(groups.items(), key=lambda kv: kv[0][0])]
    untouched = sorted(set(doc.targets) - set(touched))
    note = f"aborted by {by}: {reason}"
    return doc.model_copy(update={
        "state": "aborting", "note": note,
        "abort": AbortDoc(by=by, reason=reason, at=now, commands=commands,
                          untouched=untouched, unknown=unknown)})


# -- how a stage looks --------------------------------------------------------------------------


def stage_label(doc: PlanDoc, stage: StageDoc) -> str:
    """A stage's state in words: done, running, awaiting approval, pending, failed,
    aborted, paused (or skipped)."""
    if stage.state in ("sending", "probing"):
        return "paused" if doc.state == "paused" else (
            "aborted" if doc.state in ("aborting", "aborted") else "running")
    if stage.state == "awaiting approval":
        return "paused" if doc.state == "paused" else "awaiting approval"
    if stage.state == "pending" and doc.state == "paused" and stage.index == doc.current:
        return "paused"
    return stage.state
