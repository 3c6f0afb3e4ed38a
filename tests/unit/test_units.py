"""The systemd units pass `systemd-analyze verify` (with ExecStart pointed at this venv)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
INSTALLED = "/opt/drawbridge/venv/bin/"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_units_verify(tmp_path: Path) -> None:
    here = str(Path(sys.executable).parent) + "/"
    units = []
    for unit in sorted(UNITS.glob("*.service")):
        copy = tmp_path / unit.name
        copy.write_text(unit.read_text().replace(INSTALLED, here))
        units.append(str(copy))
    proc = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True,
                          text=True, timeout=60, check=False)
    # messages about units of the host (network-pre.target, ...) are not ours to judge
    ours = [ln for ln in proc.stderr.splitlines() if any(Path(u).name in ln for u in units)]
    assert proc.returncode == 0 and not ours, proc.stderr


def test_the_boot_unit_runs_before_any_network() -> None:
    boot = (UNITS / "drawbridge-agent-boot.service").read_text()
    for line in ("DefaultDependencies=no", "Wants=network-pre.target", "Type=oneshot"):
        assert line in boot
    assert "Before=network-pre.target" in boot
    agent = (UNITS / "drawbridge-agent.service").read_text()
    assert "Type=notify" in agent and "WatchdogSec=" in agent and "ExecReload=" in agent
