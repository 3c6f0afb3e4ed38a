"""deploy/prometheus: the alert rules pass `promtool check rules` and their unit tests
(`promtool test rules`), the scrape config passes `promtool check config`, and every
drawbridge_ metric the rules use is one the agent exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.metrics import Snapshot, build_metrics
from agent.state import DesiredState
from controller.metrics import ControllerMetrics

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"
RULES = PROM / "rules" / "drawbridge-alerts.yml"
RULE_TESTS = PROM / "tests" / "drawbridge-alerts.test.yml"
CONFIG = PROM / "prometheus.yml"
PROMTOOL = shutil.which("promtool")

needs_promtool = pytest.mark.skipif(PROMTOOL is None,
                                    reason="promtool not installed (Debian: prometheus)")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60,
                          check=False)


@needs_promtool
def test_rules_check() -> None:
    out = promtool("check", "rules", str(RULES))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


@needs_promtool
def test_rules_unit_tests() -> None:
    out = promtool("test", "rules", str(RULE_TESTS))
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_scrape_config_check() -> None:
    out = promtool("check", "config", str(CONFIG))
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_is_unit_tested() -> None:
    alerts = set(re.findall(r"^\s*- alert: (\w+)", RULES.read_text(), re.M))
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert alerts and alerts <= tested, alerts - tested


def test_rules_use_only_exported_metrics() -> None:
    snapshot = Snapshot(gateway="gw", version="0", state=DesiredState(), counters={},
                        last_sweep_at=1.0)
    exported = set()
    for family in build_metrics(snapshot):
        exported.add(family.name)
        exported.update(s.name for s in family.samples)
    # metrics only present with data: probes, exceptions
    exported |= {"drawbridge_probe_success", "drawbridge_probe_reachable",
                 "drawbridge_probe_duration_seconds",
                 "drawbridge_exceptions_next_expiry_timestamp_seconds"}
    # the controller's (a labelled counter is only exported once it has a label)
    controller = ControllerMetrics()
    controller.checkpoint_misses.labels(gateway="gw")
    for family in controller.registry.collect():
        exported.update(s.name for s in family.samples)
    used = set(re.findall(r"\b(drawbridge_[a-z_]+)", RULES.read_text()))
    assert used and used <= exported, used - exported
