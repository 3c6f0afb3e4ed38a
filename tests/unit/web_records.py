"""Audit records for the page/report unit tests, as the controller writes them."""

from __future__ import annotations

from typing import Any

from controller.audit import AuditRecord, format_time
from controller.plan_doc import GatewayStart, PlanDoc, StageDoc

T0 = 1_750_000_000.0


def rec(seq: int, at: float, action: str, outcome: str, targets: list[str], *,
        reason: str = "r", detail: dict[str, Any] | None = None, actor: str = "alice",
        ticket: str | None = None, command_id: str | None = None) -> AuditRecord:
    ts_us = round((T0 + at) * 1e6)
    return AuditRecord(seq=seq, time=format_time(ts_us), ts_us=ts_us, actor=actor,
                       action=action, outcome=outcome, targets=targets, reason=reason,
                       ticket=ticket, command_id=command_id, detail=detail or {},
                       prev_hash=f"{seq - 1:064x}", hash=f"{seq:064x}")


def results(gateways: list[str], state: str, profile: str | None = None, *,
            outcome: str = "verified") -> list[dict[str, Any]]:
    return [{"gateway": g, "op": "x", "outcome": outcome, "ok": outcome != "unreachable",
             "state": None if outcome == "unreachable" else state,
             "profile": profile, "verification": "verified"} for g in gateways]


def allow_args(seconds: int = 3600) -> dict[str, Any]:
    return {"cidr": "203.0.113.0/24", "proto": "tcp", "ports": ["443"], "direction": "out",
            "duration_seconds": seconds}


def drill() -> list[AuditRecord]:
    """isolate gw0+gw1 at 60 s; exception on gw0 at 300 s (1 h); gw1 unreachable 500-900 s;
    a two-stage plan at 1000 s (casefiles) and 1200 s (restore)."""
    both = ["gw0", "gw1"]
    plan = {"plan": "reconnect", "plan_id": "p1"}
    return [
        rec(1, 60, "isolate", "requested", both, reason="NetScaler", command_id="c1"),
        rec(2, 61, "isolate", "ok", both, reason="NetScaler", ticket="INC-1", command_id="c1",
            detail={"op": "isolate", "results": results(both, "isolated", "internet")}),
        rec(3, 300, "allow", "ok", ["gw0"], reason="chain partner", command_id="c2",
            detail={"op": "allow", "args": allow_args(),
                    "results": results(["gw0"], "isolated", "internet")}),
        rec(4, 500, "state.unreachable", "observed", ["gw1"], actor="controller",
            reason="gw1: agent unreachable"),
        rec(5, 900, "state.reachable", "observed", ["gw1"], actor="controller",
            reason="gw1 back", detail={"state": "isolated", "profile": "internet"}),
        rec(6, 1000, "restore.plan", "requested", both, reason="all clear", command_id="p1",
            detail={"plan": {"name": "reconnect"}, "stages": ["case files", "everything"]}),
        rec(7, 1001, "restore", "ok", both, reason="all clear", command_id="c3",
            detail={**plan, "stage": "case files", "op": "isolate",
                    "results": results(both, "isolated", "casefiles")}),
        rec(8, 1200, "restore", "ok", both, reason="all clear", command_id="c4",
            detail={**plan, "stage": "everything", "op": "restore",
                    "results": results(both, "open")}),
        rec(9, 1201, "restore.plan", "ok", both, reason="all clear", command_id="p1",
            detail={"plan": "reconnect", "stages": [
                {"name": "case files", "ok": True}, {"name": "everything", "ok": True}]}),
    ]


def drill_plan(**changes: Any) -> PlanDoc:
    """The drill's plan as the controller stores it, done (`changes`: other states)."""
    both = ["gw0", "gw1"]
    stages = [
        StageDoc(index=0, name="case files", action="isolate", profile="casefiles",
                 gateways=both, state="done", command_id="c3", attempt=1,
                 results=dict.fromkeys(both, "verified"), finished_at=T0 + 1001),
        StageDoc(index=1, name="everything", action="restore", gateways=both, state="done",
                 command_id="c4", attempt=1, results=dict.fromkeys(both, "verified"),
                 finished_at=T0 + 1200),
    ]
    doc = PlanDoc(plan_id="p1", name="reconnect", actor="alice", reason="all clear",
                  created_at=T0 + 1000, targets=both,
                  start=dict.fromkeys(both, GatewayStart(state="isolated", profile="internet")),
                  stages=stages, state="done", current=2, seq=6, finished_at=T0 + 1201)
    return doc.model_copy(update=changes)
