"""The restore plan driver: the one function the scheduler calls (`PlanDriver.tick`), and
what it does for each step the state machine asks for.

A tick claims each running plan in turn (controller/plan_store.py: SELECT ... FOR
UPDATE SKIP LOCKED and a lease, so two controllers on one database never drive one
plan), then takes steps (controller/plan_machine.py) until the plan has to wait
(an approval, a pause, an unreachable gateway, its probes' next round). Every step
writes its outcome to the plan's document before the next one starts, and a
stage's command id is written before the command is sent: a controller killed at
any point resumes the plan where it was, and a stage whose command was sent is
completed by sending it again under the same id, which the agent answers without
applying it twice.

Ticks run on the driver's own thread (`kick`: at once, after a start or a control
action; the scheduler: every `[plans] interval_seconds`), never in a request.
Changes of a stage's or the plan's state are audited here (`restore.plan.stage`,
`restore.plan`), each record naming the plan id and the stage.
"""

from __future__ import annotations

import logging
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from controller.audit import AuditEvent
from controller.errors import ControllerError, LeaseLost
from controller.fleet import GatewayResult
from controller.plan_control import superseded
from controller.plan_doc import PlanDoc
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
    Step,
    Timing,
    apply_abort_sent,
    apply_assign,
    apply_await,
    apply_finish,
    apply_probe_started,
    apply_probed,
    apply_sent,
    apply_skip,
    apply_stage_done,
    apply_stage_failed,
    next_step,
)
from controller.plan_store import PlanStore

if TYPE_CHECKING:
    from collections.abc import Callable

    from controller.service import Controller

log = logging.getLogger("drawbridge.controller.plans")

SYSTEM_ACTOR = "controller"
MAX_STEPS = 200  # per plan and tick: a plan that never waits cannot hold the driver
STAGE_EVENTS = ("awaiting approval", "done", "failed", "skipped")
END_OUTCOMES = MappingProxyType({"done": "ok", "failed": "failed", "aborted": "aborted"})


def new_command_id() -> str:
    return uuid.uuid4().hex[:16]


class PlanDriver:
    def __init__(self, ctl: Controller, owner: str) -> None:
        self.ctl = ctl
        self.owner = owner
        self.store = PlanStore(ctl.db)
        cfg = ctl.config
        self.timing = Timing(retry_seconds=cfg.plans.probe_interval_seconds,
                             probe_interval=cfg.plans.probe_interval_seconds)
        # longer than any one step may block (a stage's command or its probes)
        self.lease = 2 * cfg.ssh.request_timeout + 60.0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plans")
        self._queued: Future[Any] | None = None
        self._queue_lock = threading.Lock()
        self._stopping = threading.Event()

    # -- when ------------------------------------------------------------------------------

    def kick(self) -> None:
        """A tick soon, on the driver's thread (one waiting tick serves every kick)."""
        with self._queue_lock:
            if self._queued is not None and not self._queued.done() \
                    and not self._queued.running():
                return
            try:
                self._queued = self._pool.submit(self._safe_tick)
            except RuntimeError:  # shut down
                return

    def _safe_tick(self) -> None:
        try:
            self.tick()
        except Exception:  # the next tick must still come
            if self._stopping.is_set():  # the controller is closing under it
                log.info("plan driver tick stopped: the controller is closing")
                return
            log.exception("plan driver tick failed")

    def wait(self, timeout: float = 60.0) -> None:
        with self._queue_lock:
            queued = self._queued
        if queued is not None:
            queued.result(timeout)

    def shutdown(self) -> None:
        """No new step starts; a step under way ends on its own (its outcome is written,
        or it is taken up again after the restart)."""
        self._stopping.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def tick(self) -> list[str]:
        """Drive every plan this controller can claim, until each has to wait. Returns
        the plans driven. This is what the scheduler calls."""
        driven: list[str] = []
        with self._lock:
            while not self._stopping.is_set():
                plan_id = self.store.claim(self.owner, self.ctl.clock(), self.lease,
                                           exclude=driven)
                if plan_id is None:
                    return driven
                driven.append(plan_id)
                try:
                    self.drive(plan_id)
                except LeaseLost as exc:
                    log.warning("%s", exc.message)
                except ControllerError as exc:
                    log.warning("plan %s: %s (tried again next tick)", plan_id, exc.message)
                finally:
                    self.store.release(plan_id, self.owner)
            return driven

    # -- what ------------------------------------------------------------------------------

    def drive(self, plan_id: str) -> None:
        for _ in range(MAX_STEPS):
            if self._stopping.is_set():
                return
            doc = self.store.get(plan_id)
            step = next_step(doc, self.ctl.clock(), self.timing)
            if isinstance(step, Idle):
                return
            self.ctl.metrics.plan_steps.labels(step=type(step).__name__).inc()
            self.do(doc, step)

    def write(self, plan_id: str, change: Callable[[PlanDoc], PlanDoc | None]) -> PlanDoc:
        """Apply `change` to the stored document (while holding the lease) and audit the
        state changes it made."""
        before: list[PlanDoc] = []

        def fn(doc: PlanDoc) -> PlanDoc | None:
            before[:] = [doc]
            return change(doc)

        after = self.store.modify(plan_id, fn, now=self.ctl.clock(), owner=self.owner,
                                  lease=self.lease)
        if before:
            self.record_changes(before[0], after)
        return after

    def do(self, doc: PlanDoc, step: Step) -> None:
        now = self.ctl.clock
        pid = doc.plan_id
        match step:
            case Finish():
                self.write(pid, lambda d: apply_finish(d, step, now()))
            case Skip():
                self.write(pid, lambda d: apply_skip(d, step, now()))
            case AwaitApproval():
                self.write(pid, lambda d: apply_await(d, step.index))
            case StageDone():
                self.write(pid, lambda d: apply_stage_done(d, step.index, now()))
            case StageFailed():
                self.write(pid, lambda d: apply_stage_failed(d, step.index, step.why, now()))
            case Send():
                self.send(doc, step)
            case Probe():
                self.probe(doc, step)
            case AbortSend():
                self.abort_send(doc, step)

    def _last_commands(self, gateways: tuple[str, ...]) -> dict[str, str | None]:
        return {g: self.ctl.states.get(g).last_command_id for g in gateways}

    def send(self, doc: PlanDoc, step: Send) -> None:
        now = self.ctl.clock
        stage = doc.stage(step.index)
        stopped = superseded(doc, step.gateways, self._last_commands(step.gateways))
        if stopped is not None:
            self.write(doc.plan_id, lambda d: apply_stage_failed(d, step.index, stopped, now()))
            return
        if step.new_command:
            doc = self.write(doc.plan_id,
                             lambda d: apply_assign(d, step.index, new_command_id(), now()))
            stage = doc.stage(step.index)
        assert stage.command_id is not None
        members = [g for g in self.ctl.inventory.all() if g.name in step.gateways]
        missing = sorted(set(step.gateways) - {g.name for g in members})
        if missing:
            self.write(doc.plan_id, lambda d: apply_stage_failed(
                d, step.index, f"no longer in the inventory: {', '.join(missing)}", now()))
            return
        result = self.ctl.run_command(
            members, action="restore", op=stage.action, actor=doc.actor, reason=doc.reason,
            ticket=doc.ticket, args={"profile": stage.profile} if stage.profile else {},
            command_id=stage.command_id,
            detail={"plan": doc.name, "plan_id": doc.plan_id, "stage": stage.name,
                    "stage_index": stage.index, "attempt": stage.attempt,
                    "resend": not step.new_command})
        outcomes, messages = _outcomes(result.results)
        self.write(doc.plan_id, lambda d: apply_sent(d, step.index, outcomes, messages, now(),
                                                     self.timing))

    def probe(self, doc: PlanDoc, step: Probe) -> None:
        now = self.ctl.clock
        stage = doc.stage(step.index)
        self.write(doc.plan_id, lambda d: apply_probe_started(d, step.index, now()))
        members = [g for g in self.ctl.inventory.all() if g.name in stage.gateways]
        answers = self.ctl.read(members, "probe", actor="controller")  # via the holders
        results: dict[str, dict[str, bool]] = {}
        for r in answers:
            if r.result is None or r.outcome in ("unreachable", "refused", "failed"):
                continue  # asked again next round (until the stage's probe timeout)
            results[r.gateway] = {str(p.get("name")): bool(p.get("ok"))
                                  for p in r.result.get("probes", []) if isinstance(p, dict)}
        self.write(doc.plan_id, lambda d: apply_probed(d, step.index, results, now(),
                                                       self.timing))

    def abort_send(self, doc: PlanDoc, step: AbortSend) -> None:
        now = self.ctl.clock
        assert doc.abort is not None
        cmd = doc.abort.commands[step.command]
        members = [g for g in self.ctl.inventory.all() if g.name in step.gateways]
        result = self.ctl.run_command(
            members, action="restore", op=cmd.op, actor=doc.abort.by, reason=doc.abort.reason,
            ticket=doc.ticket, args={"profile": cmd.profile} if cmd.profile else {},
            command_id=cmd.command_id,
            detail={"plan": doc.name, "plan_id": doc.plan_id, "stage": "(abort)",
                    "abort": True})
        outcomes, _ = _outcomes(result.results)
        gone = {g: "failed" for g in step.gateways if g not in {m.name for m in members}}
        self.write(doc.plan_id, lambda d: apply_abort_sent(d, step.command,
                                                           {**outcomes, **gone}, now(),
                                                           self.timing))

    # -- the record ------------------------------------------------------------------------

    def record_changes(self, before: PlanDoc, after: PlanDoc) -> None:
        for old, new in zip(before.stages, after.stages, strict=True):
            if old.state == new.state or new.state not in STAGE_EVENTS:
                continue
            self.ctl.record(AuditEvent(
                actor=SYSTEM_ACTOR, action="restore.plan.stage", outcome=new.state,
                reason=new.note or f"stage {new.name!r} of plan {after.name!r}: {new.state}",
                ticket=after.ticket, targets=tuple(new.gateways), command_id=after.plan_id,
                detail={"plan": after.name, "plan_id": after.plan_id, "stage": new.name,
                        "stage_index": new.index, "stage_command_id": new.command_id,
                        "results": new.results, "probes": new.probe_results,
                        "approved_by": new.approved_by}))
        if before.state != after.state and after.state in END_OUTCOMES:
            self.ctl.record(AuditEvent(
                actor=SYSTEM_ACTOR, action="restore.plan", outcome=END_OUTCOMES[after.state],
                reason=after.note or f"plan {after.name!r} {after.state}",
                ticket=after.ticket, targets=tuple(after.targets), command_id=after.plan_id,
                detail={"plan": after.name, "plan_id": after.plan_id, "note": after.note,
                        "stages": [{"name": s.name, "state": s.state,
                                    "command_id": s.command_id} for s in after.stages]}))


def _outcomes(results: list[GatewayResult]) -> tuple[dict[str, str], dict[str, str]]:
    return ({r.gateway: r.outcome for r in results},
            {r.gateway: r.message for r in results if r.message})
