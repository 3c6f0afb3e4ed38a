"""Where the page's plan progress and checkpoints come from, behind small protocols.

Restore plans are stored and driven by the controller (controller/plan_store.py):
`DbPlanSource` shows them as the page, the report and the plan-stage metric want
them. Checkpoints (signed chain heads, controller/checkpoints.py): the last one and
where it was recorded, from `DbCheckpointSource`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from controller.checkpoints import CheckpointStore
from controller.plan_doc import PlanDoc, stage_label
from controller.plan_store import PlanStore

# Stage states in words (controller/plan_machine.py stage_label; "skipped": no gateway
# of the plan is in it).
STAGE_STATES = ("done", "running", "awaiting approval", "pending", "failed", "aborted",
                "paused", "skipped")


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
    state: str  # running | paused | failed | done | aborting | aborted
    seq: int  # the record that started it
    stages: tuple[StageView, ...] = field(default=())
    end_seq: int | None = None
    note: str = ""


class PlanSource(Protocol):
    def plans(self, since: float, until: float) -> Sequence[PlanView]:
        """Plans that started or ran within [since, until], oldest first."""


class DbPlanSource:
    """Plans as the controller stores and drives them (controller/plan_store.py)."""

    def __init__(self, store: PlanStore, *, limit: int = 1000) -> None:
        self.store = store
        self.limit = limit

    def plans(self, since: float, until: float) -> Sequence[PlanView]:
        docs = [d for d in self.store.find(since=since, limit=self.limit)
                if d.created_at <= until]
        return [plan_view(d) for d in sorted(docs, key=lambda d: d.created_at)]

    def latest(self) -> PlanView | None:
        """The most recent plan, whenever it ran (for the plan-stage metric)."""
        found = self.store.find(limit=1)
        return plan_view(found[0]) if found else None


def plan_view(doc: PlanDoc) -> PlanView:
    """What the page, the report and the metric show of a stored plan (pure)."""
    note = doc.note
    if doc.state == "running" and doc.current < len(doc.stages):
        stage = doc.stage(doc.current)
        if stage.state == "awaiting approval":
            note = note or f"stage {stage.name!r} awaits approval by a second admin"
    return PlanView(
        plan_id=doc.plan_id, name=doc.name, actor=doc.actor, reason=doc.reason,
        ticket=doc.ticket, started_at=doc.created_at, state=doc.state, seq=doc.seq or 0,
        stages=tuple(StageView(
            name=s.name, state=stage_label(doc, s), gateways=tuple(s.gateways),
            note=s.note or (f"approved by {s.approved_by}" if s.approved_by else ""))
            for s in doc.stages),
        note=note)


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


class DbCheckpointSource:
    """The last signed checkpoint (controller/checkpoints.py) and where it was recorded."""

    def __init__(self, store: CheckpointStore) -> None:
        self.store = store

    def last(self) -> Checkpoint | None:
        found = self.store.last()
        if found is None:
            return None
        cp = found.checkpoint
        on = found.recorded_on
        where = (f"signed with key {cp.key_id}; recorded on {len(on)} of {len(found.anchored)} "
                 "gateway(s)" + (f": {', '.join(on)}" if 0 < len(on) <= 5 else ""))
        return Checkpoint(seq=cp.seq, hash=cp.head_hash, at=cp.time, where=where)
