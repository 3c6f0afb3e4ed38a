"""Commands whose accepting replica died before it recorded their outcome.

The holders of their gateways carried them out (the rows are done); the outcome
record that the accepting replica would have written is written by a live replica
instead, once: the rows are locked with SKIP LOCKED while it is written, then
marked (controller/command_queue.py).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING, Any

from controller.audit import AuditEvent
from controller.command_path import audit_result
from controller.command_queue import CommandQueue, QueuedCommand
from controller.fleet import GatewayResult

if TYPE_CHECKING:
    from controller.service import Controller

log = logging.getLogger("drawbridge.controller.replicas")


def report_orphans(ctl: Controller, queue: CommandQueue, live: set[tuple[str, str]],
                   me: str) -> int:
    """Record what nobody recorded; how many commands were recorded here."""
    done = 0
    for command_id in queue.orphaned(live):
        done += queue.report(command_id, lambda cmd, rows: _record(ctl, cmd, rows, me))
    return done


def _record(ctl: Controller, cmd: QueuedCommand, rows: list[dict[str, Any]], me: str) -> None:
    results = [GatewayResult.model_validate(r) for r in rows if r.get("gateway")]
    counts = Counter(r.outcome for r in results)
    ok = all(r.ok for r in results)
    overall = "ok" if ok else ("failed" if not any(r.ok for r in results) else "partial")
    log.info("recording %s %s: accepted by %s, which stopped before it could", cmd.action,
             cmd.command_id, cmd.accepted_by)
    ctl.record(AuditEvent(
        actor=cmd.actor, action=cmd.action, outcome=overall, reason=cmd.reason,
        ticket=cmd.ticket, targets=tuple(r.gateway for r in results),
        command_id=cmd.command_id,
        detail={"op": cmd.op, "args": cmd.args, "counts": dict(counts),
                "results": [audit_result(r) for r in results],
                "accepted_by": cmd.accepted_by, "recorded_by": me,
                "note": "the replica that accepted this command stopped before it "
                        "finished; the replicas holding its gateways carried it out"}))
