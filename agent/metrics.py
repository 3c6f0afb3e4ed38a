"""Prometheus metrics of the agent, built fresh at every scrape.

A custom collector reads, at scrape time, what is cheap to read: the desired
state file (small JSON), the table's named drop counters (no set is listed,
however large) and in-memory values (latest probe results, drift repairs,
apply durations). Nothing here registers anything at import time or touches
prometheus_client's global default registry: the daemon builds a registry
and passes it to the HTTP server.

Names follow Prometheus conventions (base units, `_total` counters,
`_seconds`, `_timestamp_seconds`), and every label has a bounded set of
values: probe names and profile names come from the config file, `state`
and `direction` from fixed lists.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from agent.errors import DrawbridgeError
from agent.nft.rules import COUNTERS, SPOOFED_COUNTER
from agent.probes import ProbeResult
from agent.state import DesiredState, StateStore
from agent.version import package_version

STATES = ("open", "open_unverified", "isolated", "isolated_unverified")
APPLY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
log = logging.getLogger("drawbridge.metrics")


class DurationHistogram:
    """Bucket counts of observed durations; thread-safe, fed by the engine's on_apply."""

    def __init__(self, buckets: Sequence[float] = APPLY_BUCKETS) -> None:
        self.bounds = tuple(sorted(buckets))
        self._counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        with self._lock:
            self._counts[bisect.bisect_left(self.bounds, seconds)] += 1
            self._sum += seconds

    def snapshot(self) -> tuple[list[tuple[str, float]], float]:
        """Cumulative buckets as prometheus_client wants them, and the sum."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), counts, strict=True):
            running += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return buckets, total


@dataclass
class Health:
    """What the daemon's loops found last; written by the daemon, read at scrape."""

    in_sync: bool | None = None  # last read-back of the reconcile loop (None: not yet)
    reconcile_ok: bool = True  # the last reconcile ran without error
    reconcile_at: float | None = None


@dataclass(frozen=True)
class Snapshot:
    """Everything one scrape reports; `build_metrics` turns it into metric families."""

    gateway: str
    version: str
    state: DesiredState | None  # None: the state file could not be read
    counters: Mapping[str, tuple[int, int]] | None  # None: nft could not be read
    probes: Sequence[ProbeResult] = ()
    last_sweep_at: float | None = None
    drift_repairs: int = 0
    apply_buckets: Sequence[tuple[str, float]] = ()
    apply_sum: float = 0.0
    in_sync: bool | None = None
    reconcile_ok: bool = True
    bypass_paths: int = 0
    unresolved: int = 0
    now: float = field(default_factory=time.time)


def state_label(state: DesiredState) -> str:
    base = "isolated" if state.isolated else "open"
    return base if state.verification.status == "verified" else f"{base}_unverified"


def _gauge(name: str, doc: str, value: float, labels: Mapping[str, str] | None = None,
           ) -> GaugeMetricFamily:
    if not labels:
        return GaugeMetricFamily(name, doc, value=value)
    family = GaugeMetricFamily(name, doc, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


def _state_metrics(s: Snapshot, state: DesiredState) -> Iterator[Metric]:
    yield _gauge("drawbridge_isolated", "1 when this gateway is isolated (desired state).",
                 1.0 if state.isolated else 0.0)
    current = state_label(state)
    family = GaugeMetricFamily(
        "drawbridge_isolation_state",
        "1 for the current state: open or isolated, and whether probes verified it.",
        labels=["state"])
    for name in STATES:
        family.add_metric([name], 1.0 if name == current else 0.0)
    yield family
    yield _gauge("drawbridge_isolation_verified",
                 "1 when the read-back and every probe agree with the current state.",
                 1.0 if state.verification.status == "verified" else 0.0)
    in_sync = s.in_sync if s.in_sync is not None else "readback" not in state.verification.failing
    yield _gauge("drawbridge_isolation_in_sync",
                 "1 when the kernel's ruleset matched the desired state at the last check.",
                 1.0 if in_sync else 0.0)
    yield _gauge("drawbridge_isolation_since_timestamp_seconds",
                 "When the current state (open or isolated) began, Unix time.", state.since)
    if state.verification.checked_at is not None:
        yield _gauge("drawbridge_verification_timestamp_seconds",
                     "When the current state's verification was last recorded, Unix time.",
                     state.verification.checked_at)
    yield _gauge("drawbridge_profile_info", "The active isolation profile ('open' when open).",
                 1.0, {"profile": state.profile or "open"})
    live = state.live_exceptions(s.now)
    yield _gauge("drawbridge_exceptions_active", "Exceptions (timed open flows) not yet expired.",
                 float(len(live)))
    if live:
        yield _gauge("drawbridge_exceptions_next_expiry_timestamp_seconds",
                     "When the next live exception expires, Unix time.",
                     min(e.expires_at for e in live))


def _counter_metrics(counters: Mapping[str, tuple[int, int]]) -> Iterator[Metric]:
    packets = CounterMetricFamily(
        "drawbridge_dropped_packets", "Packets dropped by the isolation table, by hook "
        "(restarts at 0 when the table is replaced or removed).", labels=["direction"])
    octets = CounterMetricFamily(
        "drawbridge_dropped_bytes", "Bytes dropped by the isolation table, by hook.",
        labels=["direction"])
    for direction, name in COUNTERS.items():
        n_packets, n_bytes = counters.get(name, (0, 0))
        packets.add_metric([direction], float(n_packets))
        octets.add_metric([direction], float(n_bytes))
    yield packets
    yield octets
    yield CounterMetricFamily(
        "drawbridge_spoofed_packets", "Packets dropped because their source address is not "
        "believed on the interface they came in on (anti-spoofing; restarts at 0 when the "
        "table is replaced or removed).", value=float(counters.get(SPOOFED_COUNTER, (0, 0))[0]))


def _probe_metrics(s: Snapshot) -> Iterator[Metric]:
    success = GaugeMetricFamily(
        "drawbridge_probe_success",
        "1 when the probe's last result agreed with its expectation for the current state.",
        labels=["probe"])
    reachable = GaugeMetricFamily(
        "drawbridge_probe_reachable", "1 when the probe's target answered at the last run.",
        labels=["probe"])
    duration = GaugeMetricFamily(
        "drawbridge_probe_duration_seconds",
        "How long the probe's last run took (until the answer or the timeout).",
        labels=["probe"])
    for r in s.probes:
        success.add_metric([r.name], 1.0 if r.ok else 0.0)
        reachable.add_metric([r.name], 1.0 if r.outcome == "reachable" else 0.0)
        duration.add_metric([r.name], r.duration_seconds)
    yield success
    yield reachable
    yield duration
    if s.last_sweep_at is not None:
        yield _gauge("drawbridge_probe_sweep_timestamp_seconds",
                     "When the last scheduled probe sweep finished, Unix time.", s.last_sweep_at)


def build_metrics(s: Snapshot) -> list[Metric]:
    """The metric families of one scrape (pure: everything comes from the snapshot)."""
    readable = s.state is not None and s.counters is not None
    out: list[Metric] = [
        _gauge("drawbridge_agent_up", "1 when the agent could read its state and nftables "
               "at this scrape and its last reconcile ran.",
               1.0 if readable and s.reconcile_ok else 0.0),
        _gauge("drawbridge_agent_info", "The agent's gateway name and version.", 1.0,
               {"gateway": s.gateway, "version": s.version}),
    ]
    if s.state is not None:
        out.extend(_state_metrics(s, s.state))
    if s.counters is not None:
        out.extend(_counter_metrics(s.counters))
    out.extend(_probe_metrics(s))
    out.append(CounterMetricFamily(
        "drawbridge_drift_repairs", "Times the reconcile loop found the kernel's ruleset "
        "differing from the desired state and repaired it (since the agent started).",
        value=float(s.drift_repairs)))
    out.append(_gauge("drawbridge_bypass_paths", "Paths around the isolation table's forward "
                      "chain (flowtables, fwd/dup in other tables) at the last check.",
                      float(s.bypass_paths)))
    out.append(_gauge("drawbridge_management_hosts_unresolved", "Management hostnames whose "
                      "last lookup failed (their last good answer, if any, still holds).",
                      float(s.unresolved)))
    apply = HistogramMetricFamily(
        "drawbridge_apply_duration_seconds",
        "Time to apply one nftables transaction (isolate, restore, exception, repair).")
    buckets = list(s.apply_buckets) or DurationHistogram().snapshot()[0]
    apply.add_metric([], buckets, s.apply_sum)
    out.append(apply)
    return out


class AgentCollector(Collector):
    """Gathers a Snapshot at scrape time; every source is optional and failure-isolated."""

    def __init__(
        self,
        *,
        gateway: str,
        store: StateStore,
        counters: Callable[[], Mapping[str, tuple[int, int]]],
        probes: Callable[[], Mapping[str, ProbeResult]] = dict,
        last_sweep: Callable[[], float | None] = lambda: None,
        drift_repairs: Callable[[], int] = lambda: 0,
        bypass_paths: Callable[[], int] = lambda: 0,
        unresolved: Callable[[], int] = lambda: 0,
        apply: DurationHistogram | None = None,
        health: Health | None = None,
        probe_order: Sequence[str] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.gateway = gateway
        self.store = store
        self.counters = counters
        self.probes = probes
        self.last_sweep = last_sweep
        self.drift_repairs = drift_repairs
        self.bypass_paths = bypass_paths
        self.unresolved = unresolved
        self.apply = apply or DurationHistogram()
        self.health = health or Health()
        self.probe_order = tuple(probe_order)
        self.clock = clock
        self.version = package_version()

    def snapshot(self) -> Snapshot:
        state: DesiredState | None
        try:
            state = self.store.load()
        except DrawbridgeError as exc:
            log.warning("scrape: %s", exc)
            state = None
        counters: Mapping[str, tuple[int, int]] | None
        try:
            counters = self.counters()
        except DrawbridgeError as exc:
            log.warning("scrape: %s", exc)
            counters = None
        latest = self.probes()
        order = [n for n in self.probe_order if n in latest] or sorted(latest)
        buckets, total = self.apply.snapshot()
        return Snapshot(
            gateway=self.gateway, version=self.version, state=state, counters=counters,
            probes=[latest[n] for n in order], last_sweep_at=self.last_sweep(),
            drift_repairs=self.drift_repairs(), apply_buckets=buckets, apply_sum=total,
            in_sync=self.health.in_sync, reconcile_ok=self.health.reconcile_ok,
            bypass_paths=self.bypass_paths(), unresolved=self.unresolved(), now=self.clock(),
        )

    def collect(self) -> Iterator[Metric]:
        yield from build_metrics(self.snapshot())

    def describe(self) -> list[Metric]:
        return []  # no collect() at registration time: it would run nft


def make_registry(collector: Collector, *, process_metrics: bool = True) -> CollectorRegistry:
    """A fresh registry with the agent's collector (and process_* metrics)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    if process_metrics:
        ProcessCollector(registry=registry)
    return registry


class MetricsServer:
    """`/metrics` over HTTP (prometheus_client's threaded WSGI server), stoppable."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        from prometheus_client import start_http_server

        self._server, self._thread = start_http_server(self.port, self.host,
                                                       registry=self.registry)
        self.port = int(self._server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
