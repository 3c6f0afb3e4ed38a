"""Wiring between the engine and the probes: verification after every change, the
`probe` request, and the latest results the metrics collector reads.

A state is `verified` only when the kernel holds what was meant (read-back) and
every probe with an expectation for that state agrees with it. Probes whose
expectation for the state is `any` are not run by the verifier: a change only
waits for the probes it affects.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from agent.config import AgentConfig, ProbeConfig
from agent.probes import ProbeResult, run_probes
from agent.results import Verifier, readback_only
from agent.rpc import ProbeHandler
from agent.state import DesiredState, StateStore, VerificationResult

READBACK = "readback"
Runner = Callable[..., list[ProbeResult]]


def verification_from(
    results: Sequence[ProbeResult], in_sync: bool, checked_at: float
) -> VerificationResult:
    """Verified only when the read-back matches and every checked probe agrees."""
    failing: list[str] = []
    detail: list[str] = []
    if not in_sync:
        failing.append(READBACK)
        detail.append("the kernel's ruleset differs from the desired state")
    for result in results:
        if not result.ok:
            failing.append(result.name)
            detail.append(result.describe())
    return VerificationResult(
        status="unverified" if failing else "verified", checked_at=checked_at,
        failing=tuple(failing), detail=tuple(detail),
    )


class ProbeService:
    """Runs the configured probes and remembers the latest result of each."""

    def __init__(
        self,
        probes: Sequence[ProbeConfig],
        *,
        runner: Runner = run_probes,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.probes = tuple(probes)
        self.runner = runner
        self.clock = clock
        self._lock = threading.Lock()
        self._latest: dict[str, ProbeResult] = {}
        self._last_sweep_at: float | None = None

    def run(self, *, isolated: bool, checked_only: bool = False) -> list[ProbeResult]:
        """Run the probes (concurrently); `checked_only` skips those expecting `any`."""
        probes = [p for p in self.probes
                  if not checked_only or p.expect.for_state(isolated) != "any"]
        results = self.runner(probes, isolated=isolated) if probes else []
        with self._lock:
            # A probe not run now keeps what it found last, but its verdict is for the
            # current state: one that expects `any` here cannot be failing.
            for probe in self.probes:
                old = self._latest.get(probe.name)
                if old is not None and probe.expect.for_state(isolated) == "any":
                    self._latest[probe.name] = dataclasses.replace(old, expected="any", ok=True)
            self._latest.update({r.name: r for r in results})
            if not checked_only:
                self._last_sweep_at = self.clock()
        return results

    def verify(self, state: DesiredState, in_sync: bool) -> VerificationResult:
        """The engine's verifier: the probes this state has expectations for."""
        results = self.run(isolated=state.isolated, checked_only=True)
        return verification_from(results, in_sync, self.clock())

    def latest(self) -> dict[str, ProbeResult]:
        with self._lock:
            return dict(self._latest)

    @property
    def last_sweep_at(self) -> float | None:
        with self._lock:
            return self._last_sweep_at

    def report(self, state: DesiredState) -> dict[str, Any]:
        """The `probe` request: every probe, judged against the current state."""
        results = self.run(isolated=state.isolated)
        checked = [r for r in results if r.expected != "any"]
        verdict = verification_from(checked, True, self.clock())
        out: dict[str, Any] = {
            "state": "isolated" if state.isolated else "open",
            "profile": state.profile,
            "probes": [r.to_dict() for r in results],
            "ok": verdict.status == "verified",
            "failing": list(verdict.failing),
        }
        if not results:
            out["note"] = "no probes configured"
        return out

    def handler(self, store: StateStore) -> ProbeHandler:
        def handle() -> dict[str, Any]:
            return self.report(store.load())

        return handle


def verifier_for(config: AgentConfig, service: ProbeService | None = None) -> Verifier:
    """Probe-backed verification when probes are configured; else read-back only."""
    if not config.probes:
        return readback_only
    return (service or ProbeService(config.probes)).verify


def probe_handler(config: AgentConfig, service: ProbeService | None = None) -> ProbeHandler:
    return (service or ProbeService(config.probes)).handler(StateStore(config.state_dir))


__all__ = ["ProbeService", "probe_handler", "verification_from", "verifier_for"]
