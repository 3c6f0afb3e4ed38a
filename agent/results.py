"""What the engine answers: change results, status, verification helpers, timings.

Shared by the engine, the RPC layer and the CLI; the controller reads the same
shapes from the wire.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

from pydantic import BaseModel, ConfigDict

from agent.state import DesiredState, ExceptionEntry, Provisional, VerificationResult


class Verifier(Protocol):
    """Runs probes against the state just applied (see probes.py)."""

    def __call__(self, state: DesiredState, in_sync: bool) -> VerificationResult: ...


BYPASS = "bypass"


def with_bypass(verdict: VerificationResult, found: tuple[str, ...],
                accepted: bool) -> VerificationResult:
    """A state is not verified while packets can go around our forward chain, unless
    the operator declared flow offload a choice (`allow_flow_offload`)."""
    if not found or accepted:
        return verdict
    return verdict.model_copy(update={
        "status": "unverified", "failing": (*verdict.failing, BYPASS),
        "detail": (*verdict.detail, *(f"bypass: {b}" for b in found)),
    })


def readback_only(state: DesiredState, in_sync: bool) -> VerificationResult:
    """Without probes, the read-back is the only evidence there is."""
    del state
    return VerificationResult(
        status="verified" if in_sync else "unverified",
        checked_at=time.time(),
        failing=() if in_sync else ("readback",),
    )


class ChangeResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    action: str
    gateway: str
    state: str
    profile: str | None
    changed: bool
    in_sync: bool
    problems: tuple[str, ...] = ()
    verification: VerificationResult
    apply_seconds: float
    generation: int
    note: str = ""
    timings: dict[str, float] = {}  # seconds per phase: policy, check, apply, readback, verify
    bypass: tuple[str, ...] = ()  # paths around our forward chain (offload.py)
    request_id: str | None = None
    replayed: bool = False  # the answer of an earlier identical request (replay.py)
    provisional: Provisional | None = None  # to be confirmed before its deadline


class Status(BaseModel):
    model_config = ConfigDict(frozen=True)

    gateway: str
    state: str
    profile: str | None
    since: float
    actor: str
    reason: str
    in_sync: bool
    problems: tuple[str, ...]
    verification: VerificationResult
    exceptions: tuple[ExceptionEntry, ...]
    generation: int
    drift_repairs: int
    bypass: tuple[str, ...] = ()
    unresolved: tuple[str, ...] = ()  # management hostnames whose lookup fails (resolve.py)
    agent_version: str = ""
    config_digest: str = ""  # which config the agent runs (config.config_digest)
    provisional: Provisional | None = None
    unconfirmed: str = ""
    profiles: tuple[str, ...] = ()  # what this gateway's config offers


class Phases:
    """Wall time per phase of one change, for the result and the benchmarks."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, name: str) -> float:
        now = time.perf_counter()
        self.times[name] = now - self._last
        self._last = now
        return self.times[name]

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 6) for k, v in self.times.items()}


@dataclass
class EngineStats:
    """In-process counters the metrics collector reads (this process's lifetime)."""

    drift_repairs: int = 0
    last_apply_seconds: float = 0.0
    bypass: tuple[str, ...] = ()  # as last seen


