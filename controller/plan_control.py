"""Control of a stored restore plan (pure): approve a stage's gate (the two-person rule),
pause, resume (a failed stage is tried again), abort (back to the starting state), and
noticing that someone else commanded one of its gateways meanwhile."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from controller.plan_doc import AbortCommand, AbortDoc, PlanDoc, StageDoc


def superseded(doc: PlanDoc, gateways: Sequence[str],
               current: Mapping[str, str | None]) -> str | None:
    """Whether someone else commanded one of `gateways` while the plan ran (`current`:
    gateway -> its last command id now)."""
    for g in gateways:
        now_id = current.get(g)
        if now_id is not None and now_id not in doc.known_commands.get(g, []):
            return f"{g} received another command ({now_id}) while the plan ran"
    return None


class ControlRefused(Exception):
    """A control action that does not fit the plan's state (the message says why)."""


class SecondAdminNeeded(Exception):
    """The two-person rule: whoever started a plan does not approve its stages."""


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
        raise SecondAdminNeeded(f"{by} started plan {doc.plan_id}; a second admin must "
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
