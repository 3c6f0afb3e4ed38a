"""The metrics collector: names, values and labels built fresh at scrape time, from the
state file, the drop counters and in-memory results; no global registry."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.errors import NftError
from agent.metrics import (
    STATES,
    AgentCollector,
    DurationHistogram,
    Health,
    MetricsServer,
    make_registry,
)
from agent.probes import ProbeResult
from agent.state import DesiredState, ExceptionEntry, StateStore, VerificationResult
from tests.unit.conftest import make_config

NOW = 1_800_000_000.0


def samples(registry: object) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()  # type: ignore[arg-type]
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(data: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    return data[(name, tuple(sorted(labels.items())))]


def probe(name: str, ok: bool, outcome: str = "unreachable") -> ProbeResult:
    return ProbeResult(name=name, type="tcp", target="198.51.100.10:443", outcome=outcome,  # type: ignore[arg-type]
                       detail="timeout", expected="unreachable", ok=ok,
                       duration_seconds=0.25, checked_at=NOW)


def exception(expires_at: float) -> ExceptionEntry:
    cfg = make_config()
    flow = cfg.profiles["casefiles"].allow[0]
    return ExceptionEntry(id="e1", flow=flow, expires_at=expires_at, created_at=NOW - 60,
                          actor="a", reason="r")


class Sources:
    def __init__(self, tmp_path: Path) -> None:
        self.store = StateStore(tmp_path / "state")
        self.counter_values: dict[str, tuple[int, int]] = {}
        self.counter_calls = 0
        self.counter_error: Exception | None = None
        self.latest: dict[str, ProbeResult] = {}
        self.histogram = DurationHistogram()
        self.health = Health()
        self.repairs = 0

    def counters(self) -> dict[str, tuple[int, int]]:
        self.counter_calls += 1
        if self.counter_error is not None:
            raise self.counter_error
        return self.counter_values

    def collector(self) -> AgentCollector:
        return AgentCollector(
            gateway="gw-ams-1", store=self.store, counters=self.counters,
            probes=lambda: self.latest, last_sweep=lambda: NOW - 5,
            drift_repairs=lambda: self.repairs, apply=self.histogram, health=self.health,
            probe_order=["outside-web", "mgmt-ssh"], clock=lambda: NOW,
        )


@pytest.fixture
def src(tmp_path: Path) -> Sources:
    return Sources(tmp_path)


def test_open_gateway(src: Sources) -> None:
    src.store.save(DesiredState(since=NOW - 100, verification=VerificationResult(
        status="verified", checked_at=NOW - 10)))
    data = samples(make_registry(src.collector(), process_metrics=False))
    assert value(data, "drawbridge_agent_up") == 1
    info = [dict(labels) for name, labels in data if name == "drawbridge_agent_info"]
    assert len(info) == 1 and info[0]["gateway"] == "gw-ams-1" and info[0]["version"]
    assert value(data, "drawbridge_isolated") == 0
    assert value(data, "drawbridge_isolation_verified") == 1
    assert value(data, "drawbridge_isolation_since_timestamp_seconds") == NOW - 100
    assert value(data, "drawbridge_verification_timestamp_seconds") == NOW - 10
    assert value(data, "drawbridge_profile_info", profile="open") == 1
    for state in STATES:
        assert value(data, "drawbridge_isolation_state", state=state) == \
            (1 if state == "open" else 0)
    assert value(data, "drawbridge_exceptions_active") == 0
    assert not any(k[0] == "drawbridge_exceptions_next_expiry_timestamp_seconds" for k in data)
    for direction in ("input", "output", "forward"):  # no table: counters read as zero
        assert value(data, "drawbridge_dropped_packets_total", direction=direction) == 0
        assert value(data, "drawbridge_dropped_bytes_total", direction=direction) == 0
    assert value(data, "drawbridge_drift_repairs_total") == 0
    assert value(data, "drawbridge_apply_duration_seconds_count") == 0


def test_isolated_unverified_with_probes_counters_and_exceptions(src: Sources) -> None:
    src.store.save(DesiredState(
        profile="casefiles", since=NOW - 30,
        exceptions=(exception(NOW + 600), exception(NOW - 1)),
        verification=VerificationResult(status="unverified", failing=("outside-web",))))
    src.counter_values = {"dropped_input": (5, 300), "dropped_output": (7, 420),
                          "dropped_forward": (11, 924)}
    src.latest = {"mgmt-ssh": probe("mgmt-ssh", True, "reachable"),
                  "outside-web": probe("outside-web", False, "reachable")}
    src.repairs = 2
    for seconds in (0.004, 0.02, 0.02, 3.0):
        src.histogram.observe(seconds)
    src.health.in_sync = True
    data = samples(make_registry(src.collector(), process_metrics=False))
    assert value(data, "drawbridge_isolated") == 1
    assert value(data, "drawbridge_isolation_verified") == 0
    assert value(data, "drawbridge_isolation_state", state="isolated_unverified") == 1
    assert value(data, "drawbridge_isolation_state", state="isolated") == 0
    assert value(data, "drawbridge_isolation_in_sync") == 1
    assert value(data, "drawbridge_profile_info", profile="casefiles") == 1
    assert value(data, "drawbridge_exceptions_active") == 1  # the expired one is not counted
    assert value(data, "drawbridge_exceptions_next_expiry_timestamp_seconds") == NOW + 600
    assert value(data, "drawbridge_dropped_packets_total", direction="forward") == 11
    assert value(data, "drawbridge_dropped_bytes_total", direction="output") == 420
    assert value(data, "drawbridge_probe_success", probe="outside-web") == 0
    assert value(data, "drawbridge_probe_success", probe="mgmt-ssh") == 1
    assert value(data, "drawbridge_probe_reachable", probe="outside-web") == 1
    assert value(data, "drawbridge_probe_duration_seconds", probe="mgmt-ssh") == 0.25
    assert value(data, "drawbridge_probe_sweep_timestamp_seconds") == NOW - 5
    assert value(data, "drawbridge_drift_repairs_total") == 2
    assert value(data, "drawbridge_apply_duration_seconds_bucket", le="0.005") == 1
    assert value(data, "drawbridge_apply_duration_seconds_bucket", le="0.025") == 3
    assert value(data, "drawbridge_apply_duration_seconds_bucket", le="2.5") == 3
    assert value(data, "drawbridge_apply_duration_seconds_bucket", le="+Inf") == 4
    assert value(data, "drawbridge_apply_duration_seconds_count") == 4
    assert value(data, "drawbridge_apply_duration_seconds_sum") == pytest.approx(3.044)


def test_readback_failure_shows_as_out_of_sync(src: Sources) -> None:
    src.store.save(DesiredState(profile="internet", verification=VerificationResult(
        status="unverified", failing=("readback",))))
    data = samples(make_registry(src.collector(), process_metrics=False))
    assert value(data, "drawbridge_isolation_in_sync") == 0  # from the state file
    src.health.in_sync = True  # the reconcile loop has since seen it match
    data = samples(make_registry(src.collector(), process_metrics=False))
    assert value(data, "drawbridge_isolation_in_sync") == 1


def test_unreadable_sources_mark_the_agent_down_but_scrape_still_works(src: Sources) -> None:
    src.store.ensure_dir()
    src.store.state_path.write_text("{not json")
    src.counter_error = NftError("netlink: Operation not permitted")
    data = samples(make_registry(src.collector(), process_metrics=False))
    assert value(data, "drawbridge_agent_up") == 0
    assert not any(k[0] == "drawbridge_isolated" for k in data)
    assert not any(k[0] == "drawbridge_dropped_packets_total" for k in data)
    assert value(data, "drawbridge_drift_repairs_total") == 0


def test_failed_reconcile_marks_the_agent_down(src: Sources) -> None:
    src.health.reconcile_ok = False
    data = samples(make_registry(src.collector(), process_metrics=False))
    assert value(data, "drawbridge_agent_up") == 0


def test_values_are_fresh_at_every_scrape_and_registration_reads_nothing(src: Sources) -> None:
    registry = make_registry(src.collector(), process_metrics=False)
    assert src.counter_calls == 0  # registering did not collect (it would run nft)
    assert value(samples(registry), "drawbridge_isolated") == 0
    src.store.save(DesiredState(profile="internet"))
    assert value(samples(registry), "drawbridge_isolated") == 1
    assert src.counter_calls == 2


def test_histogram_buckets_are_cumulative() -> None:
    h = DurationHistogram(buckets=(0.1, 1.0))
    for s in (0.05, 0.1, 0.5, 7.0):
        h.observe(s)
    buckets, total = h.snapshot()
    assert buckets == [("0.1", 2), ("1.0", 3), ("+Inf", 4)]
    assert total == pytest.approx(7.65)


def test_process_metrics_are_included_by_default(src: Sources) -> None:
    data = samples(make_registry(src.collector()))
    assert value(data, "process_resident_memory_bytes") > 0


def test_import_registers_nothing_in_the_global_registry() -> None:
    code = ("from prometheus_client import REGISTRY; before = set(REGISTRY._names_to_collectors); "
            "import agent.metrics, agent.daemon; "
            "print(set(REGISTRY._names_to_collectors) - before)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "set()"


def test_server_serves_the_registry_on_loopback(src: Sources) -> None:
    server = MetricsServer(make_registry(src.collector(), process_metrics=False),
                           "127.0.0.1", 0)
    server.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics",
                                    timeout=5) as response:
            body = response.read().decode()
    finally:
        server.stop()
    assert "drawbridge_isolated 0.0" in body
    assert "# TYPE drawbridge_dropped_packets_total counter" in body
