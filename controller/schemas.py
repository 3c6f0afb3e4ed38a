"""Request and response bodies of the HTTP API (published in its OpenAPI schema).

Reasons, tickets, names, networks and ports are validated with the agent's own
rules (agent.requests, agent.config), so the controller refuses exactly what
the agent would, before anything is sent anywhere.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent.config import Name, Network, PortRange, check_ports_fit_proto
from agent.nettypes import Direction, Proto
from agent.requests import MAX_EXCEPTION_SECONDS, ExceptionId, Ticket
from agent.text import FreeText, Reason
from controller.audit import AuditRecord, VerifyReport
from controller.fleet import GatewayResult
from controller.inventory import Fingerprint, SshUser
from controller.plans import Plan


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Targets(_Body):
    gateways: tuple[Name, ...] = Field(default=(), max_length=10_000)
    groups: tuple[Name, ...] = Field(default=(), max_length=1000)
    all: bool = False

    @model_validator(mode="after")
    def _some(self) -> Targets:
        if self.all and (self.gateways or self.groups):
            raise ValueError("'all' cannot be combined with gateways or groups")
        if not self.all and not self.gateways and not self.groups:
            raise ValueError("say which gateways: gateways, groups or all")
        return self


class Mutating(_Body):
    """Every call that changes something says why (and may name a ticket)."""

    reason: Reason
    ticket: Ticket = None


class IsolateBody(Mutating):
    targets: Targets
    profile: Name = "internet"


class RestoreBody(Mutating):
    targets: Targets
    plan: Plan | None = None
    from_stage: str | None = Field(default=None, max_length=100)
    through_stage: str | None = Field(default=None, max_length=100)


class PlanStartBody(Mutating):
    """A restore plan, stored and driven by the controller (`from_stage`/`through_stage`:
    only that window of its stages)."""

    targets: Targets
    plan: Plan
    from_stage: str | None = Field(default=None, max_length=100)
    through_stage: str | None = Field(default=None, max_length=100)


class PlanControlBody(Mutating):
    """approve, pause, resume, abort: why (kept in the audit log)."""


class AcknowledgeBody(Mutating):
    """An admin accepts the chain as the database holds it now, after a tamper alarm."""


class CheckpointFileBody(_Body):
    source: str = Field(default="checkpoint file", max_length=500)  # e.g. its file name
    content: dict[str, Any]


class VerifyBody(_Body):
    """Checkpoints (exported files) the chain must agree with."""

    checkpoint_files: list[CheckpointFileBody] = Field(default_factory=list, max_length=100)


class AllowBody(Mutating):
    """One exact flow: explicit ports (ICMP: echo, no ports), `out` unless asked."""

    targets: Targets
    cidr: Network
    proto: Proto
    ports: tuple[PortRange, ...] = Field(default=(), max_length=64)
    direction: Direction = "out"
    duration_seconds: int = Field(gt=0, le=MAX_EXCEPTION_SECONDS)

    @model_validator(mode="after")
    def _ports(self) -> AllowBody:
        check_ports_fit_proto(self.proto, self.ports)
        if self.proto != "icmp" and not self.ports:
            raise ValueError(f"{self.proto} exceptions need explicit ports (e.g. 443)")
        return self


class ExtendBody(Mutating):
    gateway: Name
    id: ExceptionId
    duration_seconds: int = Field(gt=0, le=MAX_EXCEPTION_SECONDS)


class RevokeBody(Mutating):
    gateway: Name
    id: ExceptionId


class ProbeBody(_Body):
    targets: Targets
    reason: FreeText = ""


class GatewayAddBody(Mutating):
    name: Name
    address: str = Field(min_length=1, max_length=300)
    user: SshUser = "root"
    key_path: str = Field(min_length=1, max_length=4096)
    host_key: Fingerprint = None
    trust_on_first_use: bool = False
    groups: tuple[Name, ...] = Field(default=(), max_length=32)


class GatewayRemoveBody(Mutating):
    pass


class GatewayUpdateBody(Mutating):
    """What changes (the rest stays): a re-pinned host key, a rotated controller key, a
    moved sshd. The gateway keeps its name, state, pending change and history."""

    address: str | None = Field(default=None, min_length=1, max_length=300)
    user: SshUser | None = None
    key_path: str | None = Field(default=None, min_length=1, max_length=4096)
    host_key: Fingerprint = None
    trust_on_first_use: bool = False  # forget the pinned key; pin the next one seen


class TokenCreateBody(Mutating):
    user: str = Field(min_length=1, max_length=64)
    role: Literal["viewer", "operator", "admin"]
    description: FreeText = ""


# -- responses -------------------------------------------------------------------------


class ErrorBody(BaseModel):
    code: str
    message: str
    details: list[dict[str, Any]] = Field(default_factory=list)


class ErrorResponse(BaseModel):
    error: ErrorBody


class PendingView(BaseModel):
    command_id: str
    action: str
    op: str
    profile: str | None = None
    actor: str
    reason: str
    accepted_at: float
    attempts: int


class GatewayView(BaseModel):
    name: str
    address: str
    user: str
    key_path: str
    host_key: str | None
    trust_on_first_use: bool
    groups: list[str]
    reachable: bool | None = None
    state: str | None = None
    profile: str | None = None
    verification: str | None = None
    in_sync: bool | None = None
    generation: int | None = None
    since: float | None = None
    actor: str | None = None
    reason: str | None = None
    drift_repairs: int | None = None
    problems: list[str] = Field(default_factory=list)
    exceptions: list[dict[str, Any]] = Field(default_factory=list)
    last_contact_at: float | None = None
    observed_at: float | None = None
    last_error_code: str | None = None
    last_error: str | None = None
    agent_version: str | None = None  # what the gateway runs, from its last status
    config_digest: str | None = None
    pending: PendingView | None = None


class CommandResult(BaseModel):
    command_id: str
    action: str
    op: str
    actor: str
    reason: str
    ticket: str | None = None
    profile: str | None = None
    stage: str | None = None
    targets: list[str]
    results: list[GatewayResult]
    ok: bool
    counts: dict[str, int]
    started_at: float
    duration_seconds: float


class HistoryResponse(BaseModel):
    records: list[AuditRecord]


class TokenCreated(BaseModel):
    token: str
    user: str
    role: str


class Health(BaseModel):
    status: str
    gateways: int
    schema_version: int
    audit_records: int
    audit_alarm: str | None = None  # a tamper alarm holds the audit log (writes refused)


__all__ = ["AuditRecord", "VerifyReport"]  # re-exported: API response models
