"""Restore plans as the controller's users see them: start, status, approve, pause,
resume, abort. The plan is stored and driven by the scheduler (controller/
plan_driver.py), never by the request that started it.

Who may do what: every action needs an admin (a plan restores); an approval
needs an admin other than the one who started the plan (the two-person rule;
`[plans] require_approval_for_restore = true` puts that gate before every stage
that fully restores). Every action and every refusal is audited with the plan id.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from controller.audit import AuditEvent
from controller.auth import Principal, Role
from controller.errors import Conflict, ControllerError, Forbidden
from controller.inventory import Gateway
from controller.plan_control import (
    ControlRefused,
    SecondAdminNeeded,
    abort,
    approve,
    pause,
    resume,
)
from controller.plan_doc import HOLD_OUTCOMES, GatewayStart, PlanDoc, StageDoc, stage_label
from controller.plan_driver import PlanDriver, new_command_id
from controller.plan_machine import Idle as IdleStep
from controller.plan_machine import next_step
from controller.plans import Plan, Stage
from controller.schemas import Targets

if TYPE_CHECKING:
    from controller.service import Controller

log = logging.getLogger("drawbridge.controller.plans")


class StageStatus(BaseModel):
    index: int
    name: str
    state: str  # done, running, awaiting approval, pending, failed, aborted, paused, skipped
    action: str
    profile: str | None
    gateways: list[str]
    gate: str
    probes: list[str]
    checkpoint_only: bool
    command_id: str | None
    attempt: int
    results: dict[str, str]
    probe_results: dict[str, dict[str, bool]]
    approved_by: str | None
    approved_at: float | None
    approval_reason: str | None
    not_before: float | None
    started_at: float | None
    finished_at: float | None
    note: str


class PlanStatus(BaseModel):
    plan_id: str
    name: str
    state: str  # running, paused, failed, done, aborting, aborted
    ok: bool  # done
    actor: str
    reason: str
    ticket: str | None
    created_at: float
    finished_at: float | None
    targets: list[str]
    current_stage: str | None
    waiting: str | None  # why the driver waits, in words
    note: str
    seq: int | None
    start: dict[str, GatewayStart]
    stages: list[StageStatus]
    abort: dict[str, Any] | None


def waiting_for(doc: PlanDoc, now: float) -> str | None:
    """Why the plan is not moving on right now, in words (None: it is)."""
    step = next_step(doc, now)
    if isinstance(step, IdleStep):
        return step.why
    if doc.state == "running" and doc.current < len(doc.stages):
        stage = doc.stage(doc.current)
        held = [g for g in stage.gateways if stage.results.get(g) in HOLD_OUTCOMES]
        if stage.state == "sending" and held:
            return f"stage {stage.name!r} waits for {', '.join(held)} (asked again)"
    return None


def status_of(doc: PlanDoc, now: float) -> PlanStatus:
    current = doc.stage(doc.current).name if doc.current < len(doc.stages) else None
    return PlanStatus(
        plan_id=doc.plan_id, name=doc.name, state=doc.state, ok=doc.state == "done",
        actor=doc.actor, reason=doc.reason, ticket=doc.ticket, created_at=doc.created_at,
        finished_at=doc.finished_at, targets=doc.targets, current_stage=current,
        waiting=waiting_for(doc, now), note=doc.note, seq=doc.seq,
        start=doc.start, abort=doc.abort.model_dump(mode="json") if doc.abort else None,
        stages=[StageStatus(
            index=s.index, name=s.name, state=stage_label(doc, s), action=s.action,
            profile=s.profile, gateways=s.gateways, gate=s.gate, probes=s.probes,
            checkpoint_only=s.no_change, command_id=s.command_id, attempt=s.attempt,
            results=s.results, probe_results=s.probe_results, approved_by=s.approved_by,
            approved_at=s.approved_at, approval_reason=s.approval_reason,
            not_before=s.not_before, started_at=s.started_at, finished_at=s.finished_at,
            note=s.note) for s in doc.stages])


def build_stages(plan_stages: Sequence[Stage], gateways: Sequence[Gateway], *,
                 approval_for_restore: bool, probe_timeout: float) -> list[StageDoc]:
    """The stages of a plan over these gateways (pure)."""
    out: list[StageDoc] = []
    for i, stage in enumerate(plan_stages):
        members = [g.name for g in gateways if stage.selects(g.name, g.groups)]
        prev = out[-1] if out else None
        no_change = prev is not None and (prev.action, prev.profile) == \
            (stage.action, stage.profile) and set(members) <= set(prev.gateways)
        gate = "approval" if stage.gate == "approval" or (approval_for_restore and stage.restore) \
            else "auto"
        out.append(StageDoc(
            index=i, name=stage.name, action="restore" if stage.restore else "isolate",
            profile=stage.profile, gateways=members, gate=gate, probes=list(stage.probes),
            probe_timeout=float(stage.probe_timeout_seconds or probe_timeout),
            pause_seconds=float(stage.pause_seconds), no_change=no_change,
            not_before=None))
    return out


class Plans:
    def __init__(self, ctl: Controller, owner: str) -> None:
        self.ctl = ctl
        self.driver = PlanDriver(ctl, owner)
        self.store = self.driver.store

    # -- reading ---------------------------------------------------------------------------

    def get(self, plan_id: str) -> PlanStatus:
        return status_of(self.store.get(plan_id), self.ctl.clock())

    def list(self, *, limit: int = 20) -> list[PlanStatus]:
        now = self.ctl.clock()
        return [status_of(d, now) for d in self.store.find(limit=limit)]

    # -- starting --------------------------------------------------------------------------

    def start(self, principal: Principal, targets: Targets, plan: Plan, *, reason: str,
              ticket: str | None, start: str | None = None,
              through: str | None = None) -> PlanStatus:
        ctl = self.ctl
        ctl.require(principal, Role.admin, "a restore plan", request="plan.start")
        gateways = ctl.select(principal, targets, "plan.start")
        try:
            window = plan.window(start, through)
            busy = self.store.open_plans_with([g.name for g in gateways])
            if busy:
                raise Conflict(f"plan {busy[0].plan_id} ({busy[0].name!r}, {busy[0].state}) "
                               "is not finished and has gateways of this one; finish or abort "
                               "it first")
        except ControllerError as exc:
            ctl.refused(principal, "plan.start", exc)
            raise
        starts = self._starting_states(gateways)
        stages = build_stages(window, gateways,
                              approval_for_restore=ctl.config.plans.require_approval_for_restore,
                              probe_timeout=ctl.config.plans.probe_timeout_seconds)
        plan_id, now = new_command_id(), ctl.clock()
        if stages and stages[0].pause_seconds:  # the first stage's pause starts now
            stages[0] = stages[0].model_copy(update={"not_before": now + stages[0].pause_seconds})
        names = [g.name for g in gateways]
        rec = ctl.record(AuditEvent(
            actor=principal.user, action="restore.plan", outcome="requested", reason=reason,
            ticket=ticket, targets=tuple(names), command_id=plan_id,
            detail={"plan": plan.model_dump(mode="json"), "plan_id": plan_id,
                    "stages": [s.name for s in stages],
                    "gates": {s.name: s.gate for s in stages if s.gate != "auto"},
                    "start": {g: s.model_dump() for g, s in starts.items()}}))
        known = {g: [c] for g in names if (c := ctl.states.get(g).last_command_id)}
        doc = PlanDoc(plan_id=plan_id, name=plan.name, actor=principal.user, reason=reason,
                      ticket=ticket, created_at=now, targets=names, start=starts,
                      stages=stages, known_commands=known, seq=rec.seq)
        self.store.create(doc, now)
        self.driver.kick()
        return status_of(doc, now)

    def _starting_states(self, gateways: Sequence[Gateway]) -> dict[str, GatewayStart]:
        """What each gateway is now (asked first where the controller never saw it)."""
        ctl = self.ctl
        unknown = [g for g in gateways if ctl.states.get(g.name).state is None]
        if unknown:
            ctl.on_holders(unknown, "poll", {})  # as a replica: by each one's holder
        out: dict[str, GatewayStart] = {}
        for g in gateways:
            st = ctl.states.get(g.name)
            out[g.name] = GatewayStart(state=st.state,
                                       profile=st.profile if st.state == "isolated" else None)
        return out

    # -- control ---------------------------------------------------------------------------

    def _control(self, principal: Principal, plan_id: str, verb: str, reason: str,
                 change: Callable[[PlanDoc], PlanDoc],
                 detail: Callable[[PlanDoc, PlanDoc], dict[str, Any]] | None = None
                 ) -> PlanStatus:
        ctl = self.ctl
        what = f"plan.{verb}"
        ctl.require(principal, Role.admin, f"{verb} a restore plan", request=what)
        before: list[PlanDoc] = []

        def fn(doc: PlanDoc) -> PlanDoc:
            before[:] = [doc]
            return change(doc)

        try:
            try:
                after = self.store.modify(plan_id, fn, now=ctl.clock())
            except ControlRefused as exc:
                raise Conflict(str(exc)) from None
            except SecondAdminNeeded as exc:
                raise Forbidden(str(exc)) from None
        except ControllerError as exc:
            ctl.refused(principal, what, exc, detail={"plan_id": plan_id})
            raise
        old = before[0]
        ctl.record(AuditEvent(
            actor=principal.user, action=f"restore.plan.{verb}", outcome="ok", reason=reason,
            ticket=old.ticket, targets=tuple(after.targets), command_id=plan_id,
            detail={"plan": after.name, "plan_id": plan_id, "from": old.state,
                    "to": after.state, **(detail(old, after) if detail else {})}))
        self.driver.kick()
        return status_of(after, ctl.clock())

    def approve(self, principal: Principal, plan_id: str, *, reason: str) -> PlanStatus:
        now = self.ctl.clock()
        approved: list[StageDoc] = []

        def change(doc: PlanDoc) -> PlanDoc:
            new, stage = approve(doc, by=principal.user, reason=reason, now=now)
            approved[:] = [stage]
            return new

        return self._control(principal, plan_id, "approve", reason, change,
                             lambda old, new: {"stage": approved[0].name,
                                               "stage_index": approved[0].index,
                                               "started_by": old.actor})

    def pause(self, principal: Principal, plan_id: str, *, reason: str) -> PlanStatus:
        return self._control(principal, plan_id, "pause", reason,
                             lambda doc: pause(doc, by=principal.user))

    def resume(self, principal: Principal, plan_id: str, *, reason: str) -> PlanStatus:
        doc = self.store.get(plan_id)
        current = {g: self.ctl.states.get(g).last_command_id for g in doc.targets}
        return self._control(principal, plan_id, "resume", reason,
                             lambda d: resume(d, accepted_commands=current),
                             lambda old, new: {"retry_stage": new.stage(new.current).name
                                               if old.state == "failed" else None})

    def abort(self, principal: Principal, plan_id: str, *, reason: str) -> PlanStatus:
        now = self.ctl.clock()
        return self._control(
            principal, plan_id, "abort", reason,
            lambda doc: abort(doc, by=principal.user, reason=reason, now=now,
                              new_id=new_command_id),
            lambda old, new: {"return_to": {g: s.model_dump() for g, s in new.start.items()},
                              "commands": [c.model_dump() for c in new.abort.commands]
                              if new.abort else []})

