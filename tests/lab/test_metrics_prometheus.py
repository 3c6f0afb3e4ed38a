"""A real Prometheus server (Debian's package) in the lab's management namespace scrapes
the agent on the gateway's management address, as in production. Asked through its HTTP
API, it sees drawbridge_isolated go 0 -> 1 -> 0 and the drop counters rise while isolated;
it also loads the alert rules of deploy/prometheus."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from drawbridge_lab import Lab
from tests.lab.agent_rig import wait_for
from tests.lab.test_probes_lab import METRICS_PORT, PY, ProbedAgent, outside_probes

pytestmark = pytest.mark.lab

PROMETHEUS = shutil.which("prometheus")
RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "rules" / \
    "drawbridge-alerts.yml"
PROM_PORT = 9090
QUERY = ("import sys, urllib.request; "
         "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())")


class Prometheus:
    """prometheus on 127.0.0.1 inside the management namespace, scraping every second."""

    def __init__(self, lab: Lab, workdir: Path, targets: list[str]) -> None:
        self.lab = lab
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{
                "job_name": "drawbridge-agent", "scrape_interval": "1s",
                "scrape_timeout": "900ms", "static_configs": [{"targets": targets}],
            }],
        }))
        self.log_path = workdir / "prometheus.log"
        with open(self.log_path, "ab") as log:
            assert PROMETHEUS is not None
            self.proc = lab.popen(lab.mgmt_ns, [
                PROMETHEUS, f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{PROM_PORT}", "--log.level=warn",
            ], stdin=subprocess.DEVNULL, stdout=log, stderr=log)

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{PROM_PORT}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        out = self.lab.run(self.lab.mgmt_ns, [PY, "-I", "-S", "-c", QUERY, url], check=False,
                           timeout=20)
        if out.returncode != 0:
            return None
        doc = json.loads(out.stdout)
        assert doc["status"] == "success", doc
        return doc["data"]

    def value(self, expr: str) -> float | None:
        """The instant value of a one-series query, None while there is none."""
        data = self.api("query", query=expr)
        if not data or not data["result"]:
            return None
        return float(data["result"][0]["value"][1])

    def wait_value(self, expr: str, want: Any, timeout: float = 30) -> None:
        check = want if callable(want) else (lambda v: v == want)
        wait_for(lambda: (v := self.value(expr)) is not None and check(v), timeout,
                 f"Prometheus to see {expr} {want}", step=0.3)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def agent(lab: Lab, tmp_path: Path) -> Iterator[ProbedAgent]:
    probed = ProbedAgent(lab, lab.gateways[0], tmp_path / "agent")
    probed.workdir.mkdir()
    yield probed
    probed.stop()


@pytest.fixture
def prometheus(lab: Lab, tmp_path: Path) -> Iterator[Prometheus]:
    if PROMETHEUS is None:
        pytest.skip("prometheus not installed (Debian package: prometheus)")
    gw = lab.gateways[0]
    server = Prometheus(lab, tmp_path / "prometheus",
                        [f"{gw.mgmt_addr4}:{METRICS_PORT}", f"[{gw.mgmt_addr6}]:{METRICS_PORT}"])
    try:
        wait_for(lambda: server.api("status/buildinfo") is not None, 30, "prometheus to start",
                 step=0.2)
    except AssertionError:
        server.stop()
        raise AssertionError(f"prometheus did not start:\n{server.log()}") from None
    yield server
    server.stop()


def test_prometheus_sees_isolation_and_drops(lab: Lab, agent: ProbedAgent,
                                             prometheus: Prometheus) -> None:
    gw = lab.gateways[0]
    agent.write_config(outside_probes(lab), probe_interval=1.0)
    agent.start()
    started = time.time()
    up = 'up{job="drawbridge-agent"}'
    prometheus.wait_value(f"count({up} == 1)", 2)  # both management addresses, v4 and v6
    prometheus.wait_value(f'drawbridge_isolated{{instance="{gw.mgmt_addr4}:{METRICS_PORT}"}}', 0)
    prometheus.wait_value("min(drawbridge_probe_success)", 1)

    change = agent.cli("isolate", "--reason", "NetScaler advisory", "--json")
    assert change.returncode == 0, change.stdout + change.stderr
    prometheus.wait_value("min(drawbridge_isolated)", 1)
    # the scrape itself still works: management is open in every state
    prometheus.wait_value(f"count({up} == 1)", 2)
    prometheus.wait_value("min(drawbridge_isolation_verified)", 1)

    # blocked traffic: an internal host and the internet try to talk through the gateway
    def knock() -> None:
        for _ in range(3):
            lab.ping_ok(gw.internal_ns, lab.outside_addr4, timeout=0.2)
            lab.udp_ok(lab.outside_ns, gw.internal_host6, 5353, timeout=0.2)

    dropped = 'sum(drawbridge_dropped_packets_total{direction="forward"})'
    knock()
    prometheus.wait_value(dropped, lambda v: v >= 2 * 6)  # two series (v4+v6 targets)
    first = prometheus.value(dropped)
    assert first is not None
    knock()
    prometheus.wait_value(dropped, lambda v: v > first)
    prometheus.wait_value('max(rate(drawbridge_dropped_packets_total{direction="forward"}'
                          '[1m])) > 0', lambda v: v > 0)

    change = agent.cli("restore", "--reason", "all clear", "--json")
    assert change.returncode == 0, change.stdout + change.stderr
    prometheus.wait_value("max(drawbridge_isolated)", 0)
    prometheus.wait_value('max(drawbridge_isolation_state{state="open"})', 1)

    # the whole story from Prometheus's storage: 0 -> 1 -> 0, nothing else (the range
    # ends a little in the future: its last step must not fall before the last sample)
    series = prometheus.api(
        "query_range", query=f'drawbridge_isolated{{instance="{gw.mgmt_addr4}:{METRICS_PORT}"}}',
        start=str(started - 5), end=str(time.time() + 2), step="1")
    values = [int(float(v)) for _, v in series["result"][0]["values"]]
    story = [v for i, v in enumerate(values) if i == 0 or v != values[i - 1]]
    assert story == [0, 1, 0], values

    # the alert rules of deploy/prometheus load and evaluate in a real server
    groups = prometheus.api("rules")["groups"]
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    assert "DrawbridgeIsolatedButUnverified" in rules
    assert {r["health"] for r in rules.values()} == {"ok"}, rules
    assert all(r["state"] == "inactive" for r in rules.values()
               if r["name"] != "DrawbridgeProbesStale")
