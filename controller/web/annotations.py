"""Grafana annotations from the audit log (pure): isolate, restore, exceptions, plan stages.

Shaped for Grafana's JSON / Infinity data sources: a list of
`{time, timeEnd?, title, text, tags}` with times in epoch milliseconds.
An exception is a region (time to timeEnd: when it was meant to expire).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from controller.audit import AuditRecord
from controller.web.timeline import describe_flow

# Which records become annotations: decisions and what the poller saw change.
ANNOTATED = ("isolate", "restore", "allow", "restore.plan", "state.changed",
             "state.drift_repaired", "state.unreachable", "state.reachable")


def annotation(rec: AuditRecord) -> dict[str, Any] | None:
    if rec.action not in ANNOTATED:
        return None
    if rec.outcome == "requested" and rec.action != "restore.plan":
        return None  # the result record says what happened
    start_ms = rec.ts_us // 1000
    gateways = rec.targets
    kind = rec.action
    stage = rec.detail.get("stage") if rec.action in ("isolate", "restore") else None
    title = f"{rec.action} {rec.outcome}"
    if stage:
        kind = "stage"
        title = f"plan stage {stage}: {rec.outcome}"
    elif rec.action == "restore.plan":
        plan = rec.detail.get("plan")
        name = plan.get("name") if isinstance(plan, dict) else plan
        title = f"restore plan {name or ''} {rec.outcome}".replace("  ", " ")
    text = f"#{rec.seq} by {rec.actor}: {rec.reason}" + (f" [{rec.ticket}]" if rec.ticket
                                                         else "")
    if gateways:
        text += f" ({', '.join(gateways)})"
    out: dict[str, Any] = {"time": start_ms, "title": title, "text": text,
                           "tags": ["drawbridge", kind, rec.outcome, *gateways],
                           "seq": rec.seq}
    if rec.action == "allow":
        args = rec.detail.get("args") or {}
        try:
            seconds = float(args.get("duration_seconds") or 0)
        except (TypeError, ValueError):
            seconds = 0.0
        if seconds > 0:
            out["timeEnd"] = start_ms + round(seconds * 1000)
        out["title"] = f"exception {describe_flow(args)}: {rec.outcome}"
    return out


def to_annotations(records: Sequence[AuditRecord]) -> list[dict[str, Any]]:
    return [a for rec in records if (a := annotation(rec)) is not None]
