"""A stored restore plan's document: its stages, each stage's progress, and the gateways'
state when the plan started (JSON in the `plans` row, controller/plan_store.py), and
how a stage's state reads in words.

The state machine over it is controller/plan_machine.py, the control actions
(approve, pause, resume, abort) controller/plan_control.py.
"""

from __future__ import annotations

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
