"""Where the page's plan progress and checkpoints come from, behind small protocols.

Restore plans are recorded today only as audit records (`restore.plan`
requested/ok/stopped, and one `restore` command per stage carrying
`plan_id` and `stage`); `plans_from_audit` rebuilds their progress from those.
When plans become durable database rows, a source reading them replaces
`AuditPlanSource` without touching the page, the report or the metric.
Checkpoints (signed chain heads) do not exist yet: `NoCheckpoints` says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from controller.audit import AuditLog, AuditRecord, HistoryQuery

# Stage states, as the durable plans will name them (plus "skipped": no gateway in it).
STAGE_STATES = ("done", "running", "awaiting approval", "pending", "failed", "aborted",
                "skipped")


@dataclass(frozen=True)
class StageView:
    name: str
    state: str  # one of STAGE_STATES
    gateways: tuple[str, ...] = ()
    seq: int | None = None  # the record that last changed this stage
    note: str = ""


@dataclass(frozen=True)
class PlanView:
    plan_id: str
    name: str
    actor: str
    reason: str
    ticket: str | None
    started_at: float
    state: str  # running | done | failed
    seq: int  # the record that started it
    stages: tuple[StageView, ...] = field(default=())
    end_seq: int | None = None
    note: str = ""


class PlanSource(Protocol):
    def plans(self, since: float, until: float) -> Sequence[PlanView]:
        """Plans that started or ran within [since, until], oldest first."""


def _stage_state(outcome: str) -> str:
    return {"requested": "running", "ok": "done", "superseded": "aborted"}.get(outcome,
                                                                             "failed")


def plans_from_audit(records: Sequence[AuditRecord]) -> list[PlanView]:
    """Plan progress from `restore.plan` and stage records (pure)."""
    plans: dict[str, PlanView] = {}
    for rec in sorted(records, key=lambda r: r.seq):
        plan_id = rec.command_id if rec.action == "restore.plan" else \
            rec.detail.get("plan_id")
        if not isinstance(plan_id, str):
            continue
        plan = plans.get(plan_id)
        if plan is None:
            name = rec.detail.get("plan")
            name = name.get("name") if isinstance(name, dict) else name
            plan = PlanView(plan_id=plan_id, name=str(name or "restore plan"),
                            actor=rec.actor, reason=rec.reason, ticket=rec.ticket,
                            started_at=rec.ts_us / 1e6, state="running", seq=rec.seq)
        if rec.action == "restore.plan" and rec.outcome == "requested":
            names = [str(s) for s in rec.detail.get("stages") or []]
            plan = replace(plan, stages=tuple(StageView(n, "pending") for n in names))
        elif rec.action == "restore.plan":
            plan = _finished(plan, rec)
        else:
            plan = _stage(plan, rec)
        plans[plan_id] = plan
    return sorted(plans.values(), key=lambda p: p.seq)


def _stage(plan: PlanView, rec: AuditRecord) -> PlanView:
    name = str(rec.detail.get("stage"))
    view = StageView(name, _stage_state(rec.outcome), tuple(rec.targets), rec.seq)
    stages = list(plan.stages)
    for i, old in enumerate(stages):
        if old.name == name:
            stages[i] = view
            break
    else:
        stages.append(view)
    return replace(plan, stages=tuple(stages))


def _finished(plan: PlanView, rec: AuditRecord) -> PlanView:
    stopped = rec.detail.get("stopped")
    by_name = {s.name: s for s in plan.stages}
    stages: list[StageView] = []
    for item in rec.detail.get("stages") or []:
        if not isinstance(item, dict):
            continue
        name = str(item.get("name"))
        old = by_name.get(name, StageView(name, "pending"))
        skipped = item.get("skipped")
        if skipped:
            state = "aborted" if str(skipped).startswith("not run") else "skipped"
            old = replace(old, state=state, note=str(skipped))
        elif item.get("ok") is False:
            old = replace(old, state="failed")
        elif item.get("ok"):
            old = replace(old, state="done")
        stages.append(old)
    return replace(plan, stages=tuple(stages) or plan.stages,
                   state="done" if rec.outcome == "ok" else "failed", end_seq=rec.seq,
                   note=str(stopped or ""))


class AuditPlanSource:
    """Plans as the audit log tells them (today's only record of plans)."""

    def __init__(self, audit: AuditLog, *, limit: int = 20_000) -> None:
        self.audit = audit
        self.limit = limit

    def plans(self, since: float, until: float) -> Sequence[PlanView]:
        records = self.audit.query(HistoryQuery(since=since, until=until, action="restore",
                                                limit=self.limit))
        return plans_from_audit(records)

    def latest(self) -> PlanView | None:
        """The most recent plan, whenever it ran (for the plan-stage metric)."""
        last = self.audit.query(HistoryQuery(action="restore.plan", limit=1))
        if not last or last[-1].command_id is None:
            return None
        records = self.audit.query(HistoryQuery(command_id=last[-1].command_id, limit=1000))
        stage_records = self.audit.query(HistoryQuery(
            since=records[0].ts_us / 1e6 if records else None, action="restore",
            limit=self.limit))
        found = plans_from_audit([r for r in stage_records
                                  if r.command_id == last[-1].command_id
                                  or r.detail.get("plan_id") == last[-1].command_id])
        return found[-1] if found else None


@dataclass(frozen=True)
class Checkpoint:
    """A chain head recorded somewhere else (signed, or sent off the controller)."""

    seq: int
    hash: str
    at: float
    where: str


class CheckpointSource(Protocol):
    def last(self) -> Checkpoint | None:
        """The most recent checkpoint, None when there is none."""


class NoCheckpoints:
    """Checkpoints are not implemented yet: there is never one."""

    def last(self) -> Checkpoint | None:
        return None
