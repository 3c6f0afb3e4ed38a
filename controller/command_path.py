"""The path every command takes: audit the intent, fan out (directly, or as a replica
through the queue), settle each gateway's answer into its state, audit the results.

A mixin of the Controller (controller/service.py): the attributes and methods it uses
are the Controller's, declared here for the type checker. Every decision is audited
before it is carried out (the `requested` record) and again with its per-gateway
results, so an incident lead can see both what was asked and what happened, even if
the controller died in between.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from controller.audit import AuditEvent, AuditRecord
from controller.command_queue import QueuedCommand
from controller.errors import ControllerError, HostKeyMismatch
from controller.fleet import CHANGE_OPS, EXCEPTION_OPS, GatewayResult
from controller.inventory import Gateway
from controller.polling import SYSTEM_ACTOR
from controller.schemas import CommandResult
from controller.states import GatewayState, Pending
from controller.transport.link import GatewayLink
from controller.transport.protocol import AgentChange

if TYPE_CHECKING:
    from controller.checkpoints import Checkpointer
    from controller.config import ControllerConfig
    from controller.fleet import Fleet
    from controller.inventory import Inventory
    from controller.metrics import ControllerMetrics
    from controller.replicas import Replicas
    from controller.states import StateStore

log = logging.getLogger("drawbridge.controller")

Emit = Callable[[dict[str, Any]], None]
STATE_OPS = ("isolate", "restore")
CONFIRMED_OPS = ("isolate", "restore", "allow")  # may carry a confirmation deadline


def noop(event: dict[str, Any]) -> None:
    del event


def short_id() -> str:
    return uuid.uuid4().hex[:16]


def audit_result(res: GatewayResult) -> dict[str, Any]:
    """What the audit record keeps of one gateway's result (incl. probe evidence)."""
    keep = res.model_dump(exclude={"result"}, exclude_none=True)
    if res.result:
        if "verification" in res.result:
            keep["evidence"] = res.result["verification"]
        if "probes" in res.result:
            keep["probes"] = res.result["probes"]
    return keep


class CommandPath:
    """`run_command` of the Controller and what it runs on each gateway's answer."""

    config: ControllerConfig
    clock: Callable[[], float]
    inventory: Inventory
    states: StateStore
    fleet: Fleet
    metrics: ControllerMetrics
    replicas: Replicas | None
    _mismatch_reported: dict[str, str]
    _report_lock: threading.Lock
    _inflight: set[str]
    _inflight_lock: threading.Lock

    if TYPE_CHECKING:
        @property
        def checkpoints(self) -> Checkpointer: ...

        def record(self, event: AuditEvent) -> AuditRecord: ...

    def run_command(self, gateways: Sequence[Gateway], *, action: str, op: str, actor: str,
                    reason: str, ticket: str | None, args: dict[str, Any],
                    emit: Emit = noop, command_id: str | None = None,
                    detail: dict[str, Any] | None = None,
                    retry_of: Pending | None = None) -> CommandResult:
        """Audit the intent, fan out, keep each gateway's state, audit the results.

        The command id is the envelope id of every request it sends and the hash of its
        `requested` record goes with it: the agent journals both with the change (so the
        controller's story and the gateways' can be compared: controller/reconcile.py),
        and a request sent again under the same id is answered, not applied again. A
        retry of an undelivered change (`retry_of`) therefore keeps its command's id."""
        if retry_of is not None:
            command_id = retry_of.command_id
        command_id = command_id or short_id()
        names = [g.name for g in gateways]
        started, t0 = self.clock(), time.perf_counter()
        extra = dict(detail or {})
        if retry_of is not None:
            extra.update(retry_of=retry_of.command_id, attempt=retry_of.attempts + 1)
        requested = self.record(AuditEvent(
            actor=actor, action=action, outcome="requested", reason=reason, ticket=ticket,
            targets=tuple(names), command_id=command_id,
            detail={"op": op, "args": args, **extra}))
        with self._inflight_lock:
            self._inflight.add(command_id)
        try:
            result = self._fan_out(gateways, action=action, op=op, actor=actor,
                                   reason=reason, ticket=ticket, args=args, emit=emit,
                                   command_id=command_id, audit=requested.hash, extra=extra,
                                   retry_of=retry_of, started=started, t0=t0)
        finally:
            with self._inflight_lock:
                self._inflight.discard(command_id)
        if op in STATE_OPS and any(r.ok for r in result.results):
            self.checkpoints.request(f"after {action} {command_id}")
        return result

    def _fan_out(self, gateways: Sequence[Gateway], *, action: str, op: str, actor: str,
                 reason: str, ticket: str | None, args: dict[str, Any], emit: Emit,
                 command_id: str, audit: str, extra: dict[str, Any],
                 retry_of: Pending | None, started: float, t0: float) -> CommandResult:
        profile = args.get("profile") if op == "isolate" else None

        def accept(candidates: Sequence[Gateway]) -> Sequence[Gateway]:
            """Under the fleet's accept lock: the recorded intent follows accept order."""
            chosen = list(candidates)
            if retry_of is not None:  # only where nothing newer was accepted meanwhile
                current = {g.name: self.states.get(g.name).pending for g in chosen}
                chosen = [g for g in chosen if (p := current[g.name]) is not None
                          and p.command_id == retry_of.command_id]
            if op in STATE_OPS:
                pending = Pending(
                    command_id=command_id, action=action, op=op, args=args, actor=actor,
                    reason=reason, ticket=ticket,
                    accepted_at=retry_of.accepted_at if retry_of else started,
                    attempts=retry_of.attempts + 1 if retry_of else 1)
                self.states.update_many([g.name for g in chosen], pending=pending,
                                        last_command_id=command_id)
            emit({"event": "accepted", "command_id": command_id, "action": action,
                  "targets": [g.name for g in chosen], "total": len(chosen)})
            return chosen

        rpc_args = {**args, "reason": reason, "actor": actor}
        if op in CHANGE_OPS and ticket:
            rpc_args["ticket"] = ticket
        deadline = getattr(self.config.confirm, op, None) if op in CONFIRMED_OPS else None
        if deadline is not None:
            rpc_args.setdefault("confirm_within_seconds", deadline)
        if op == "probe":
            rpc_args = {}

        def after(gw: Gateway, link: GatewayLink, res: GatewayResult) -> GatewayResult:
            return self.settle_result(gw, link, res, command_id=command_id, op=op,
                                      actor=actor, reason=reason)

        mutating = op in CHANGE_OPS

        def on_result(r: GatewayResult) -> None:
            emit({"event": "result", "result": r.model_dump(mode="json")})

        if self.replicas is not None:
            results = self._queued(gateways, action=action, op=op, actor=actor, reason=reason,
                                   ticket=ticket, args=args, command_id=command_id,
                                   audit=audit if mutating else None, retry_of=retry_of,
                                   started=started, emit=emit, on_result=on_result)
        else:
            results = self.fleet.run(
                gateways, op, lambda gw: rpc_args, after=after, accept=accept,
                on_result=on_result, request_id=command_id if mutating else None,
                audit=audit if mutating else None)
        names = [r.gateway for r in results]
        counts = Counter(r.outcome for r in results)
        ok = all(r.ok for r in results)
        overall = "ok" if ok else ("failed" if not any(r.ok for r in results) else "partial")
        if not results and gateways:
            overall = "superseded"  # a retry that newer commands made moot
        duration = time.perf_counter() - t0
        log.info("%s %s by %s on %d gateway(s) in %.2fs: %s", action, command_id, actor,
                 len(results), duration, dict(counts) or overall)
        self.metrics.commands.labels(verb=action, result=overall).inc()
        self.metrics.latency.labels(verb=action).observe(duration)
        for r in results:
            self.metrics.gateway_results.labels(verb=action, outcome=r.outcome).inc()
        self.record(AuditEvent(
            actor=actor, action=action, outcome=overall, reason=reason, ticket=ticket,
            targets=tuple(names), command_id=command_id,
            detail={"op": op, "args": args, "counts": dict(counts),
                    "duration_seconds": round(duration, 4),
                    "results": [audit_result(r) for r in results], **extra}))
        if self.replicas is not None:  # nobody else need record it
            me = self.replicas.me
            self.replicas.queue.mark_reported(command_id, me.replica_id, me.incarnation)
        return CommandResult(
            command_id=command_id, action=action, op=op, actor=actor, reason=reason,
            ticket=ticket, profile=profile, stage=extra.get("stage"), targets=names,
            results=results, ok=ok, counts=dict(counts), started_at=started,
            duration_seconds=duration)

    def _queued(self, gateways: Sequence[Gateway], *, action: str, op: str, actor: str,
                reason: str, ticket: str | None, args: dict[str, Any], command_id: str,
                audit: str | None, retry_of: Pending | None, started: float, emit: Emit,
                on_result: Callable[[GatewayResult], None]) -> list[GatewayResult]:
        """As a replica: queue the command for the gateways' lease holders and wait for
        their results (controller/replicas.py)."""
        assert self.replicas is not None
        me = self.replicas.me
        command = QueuedCommand(command_id=command_id, action=action, op=op, args=args,
                                actor=actor, reason=reason, ticket=ticket,
                                accepted_at=started, accepted_by=me.replica_id,
                                accepted_incarnation=me.incarnation, audit=audit)
        pending = Pending(
            command_id=command_id, action=action, op=op, args=args, actor=actor,
            reason=reason, ticket=ticket,
            accepted_at=retry_of.accepted_at if retry_of else started,
            attempts=retry_of.attempts + 1 if retry_of else 1) if op in STATE_OPS else None

        def accepted(names: list[str]) -> None:
            emit({"event": "accepted", "command_id": command_id, "action": action,
                  "targets": names, "total": len(names)})

        return self.replicas.run(gateways, command, pending=pending, retry_of=retry_of,
                                 on_accept=accepted, on_result=on_result)

    def settle_result(self, gw: Gateway, link: GatewayLink, res: GatewayResult, *,
                      command_id: str, op: str, actor: str, reason: str) -> GatewayResult:
        """Runs on the fan-out thread, still holding the gateway's turn (as a replica: on
        the replica holding the gateway's lease): what the gateway said becomes its
        state; a change delivered (or refused for good) is no longer owed."""
        if res.result and res.result.get("provisional"):
            problem = self.confirm_provisional(gw, link, res.result["provisional"])
            if problem is not None:
                res = res.model_copy(update={"message": f"{res.message}; not confirmed "
                                             f"({problem}): the agent rolls it back at its "
                                             "deadline"})
        now = self.clock()
        self.host_key_bookkeeping(gw, link, res.error_code)
        changes: dict[str, Any] = {}
        if link.host_key_seen:
            changes["host_key_seen"] = link.host_key_seen
        if res.outcome not in ("unreachable", "refused"):
            changes.update(reachable=True, last_contact_at=now, last_error_code=None,
                           last_error=None)
        else:
            changes.update(reachable=False, last_error_code=res.error_code,
                           last_error=res.message)
        if res.result and op in CHANGE_OPS:
            change = AgentChange.model_validate(res.result)
            changes.update(state=change.state, profile=change.profile,
                           verification=change.verification.status, in_sync=change.in_sync,
                           generation=change.generation, problems=change.problems,
                           observed_at=now)
            if op not in EXCEPTION_OPS:
                changes.update(since=now, gw_actor=actor, gw_reason=reason)
        will_retry = res.outcome == "unreachable" and op in STATE_OPS

        def settle(current: GatewayState) -> dict[str, Any]:
            ours = current.pending is not None and current.pending.command_id == command_id
            if ours and not will_retry:
                return {**changes, "pending": None}  # delivered (or refused for good)
            return changes

        after = self.states.modify(gw.name, settle)
        will_retry = will_retry and after.pending is not None \
            and after.pending.command_id == command_id
        if will_retry:
            return res.model_copy(update={
                "will_retry": True,
                "message": res.message + " - will retry when the gateway answers"})
        return res

    def confirm_provisional(self, gw: Gateway, link: GatewayLink,
                            provisional: dict[str, Any]) -> str | None:
        """The gateway answered over its management path, so that path works: make its
        provisional change final (commit-confirmed). Not confirming leaves the agent to
        roll it back at its deadline, which is what a change that cut us off needs.
        Returns why it could not confirm, or None."""
        request_id = provisional.get("request_id")
        try:
            link.call("confirm", {"request_id": request_id, "actor": SYSTEM_ACTOR,
                                  "reason": "the controller reaches the gateway"})
        except ControllerError as exc:
            log.warning("%s: confirming %s failed: %s", gw.name, request_id, exc)
            return exc.message
        self.record(AuditEvent(actor=SYSTEM_ACTOR, action="confirm", outcome="ok",
                               reason=f"{provisional.get('action')} confirmed: the controller "
                                      "reaches the gateway", targets=(gw.name,),
                               detail={"request_id": request_id}))
        return None

    def host_key_bookkeeping(self, gw: Gateway, link: GatewayLink, code: str | None) -> None:
        """Audit a refused host key once per key seen; pin a key trusted on first use."""
        if code in ("host_key_mismatch", "host_key_unknown"):
            err = link.last_error
            presented = err.presented if isinstance(err, HostKeyMismatch) else "?"
            with self._report_lock:
                if self._mismatch_reported.get(gw.name) == presented:
                    return
                self._mismatch_reported[gw.name] = presented
            self.record(AuditEvent(
                actor=SYSTEM_ACTOR, action="hostkey.refused", outcome="refused",
                reason=err.message if err else "host key refused", targets=(gw.name,),
                detail={"expected": gw.host_key, "presented": presented,
                        "address": gw.address, "code": code}))
            return
        if code is None and link.connected:
            with self._report_lock:
                self._mismatch_reported.pop(gw.name, None)
            seen = link.host_key_seen
            if gw.host_key is None and gw.trust_on_first_use and seen:
                self.inventory.pin_host_key(gw.name, seen)
                link.update(self.inventory.get(gw.name))
                self.record(AuditEvent(
                    actor=SYSTEM_ACTOR, action="hostkey.pinned", outcome="ok",
                    reason="trust on first use, as asked at 'gateway add'", targets=(gw.name,),
                    detail={"host_key": seen, "address": gw.address}))
