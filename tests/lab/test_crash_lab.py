"""kill -9 of the agent in the middle of applying leaves the old ruleset or the new one,
never a mix; restarting the agent converges to the desired state on disk."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from drawbridge_lab import Lab
from tests.lab.agent_rig import AGENT, AgentRig, wait_for

pytestmark = pytest.mark.lab
BIG = 15_000  # large enough that an apply takes a noticeable fraction of a second


def big_profile() -> str:
    entries = ",\n".join(
        f'  {{ cidr = "{ipaddress.ip_network((0x0B000000 + i * 512, 24))}", proto = "tcp", '
        'ports = [443], direction = "out" }' for i in range(BIG))
    return f"[profiles.big]\nallow = [\n{entries}\n]\n"


@pytest.fixture
def big_rig(lab: Lab, tmp_path: Path) -> AgentRig:
    lab.start_services(lab.gateways[0].ns, tcp=[22])
    return AgentRig(lab, lab.gateways[0], tmp_path, extra_config=big_profile())


def table(rig: AgentRig) -> str | None:
    return rig.rules_as_meant(("table", "inet", "drawbridge")) or None


def test_kill_9_mid_apply_leaves_old_or_new_and_restart_converges(big_rig: AgentRig) -> None:
    rig = big_rig
    started = time.monotonic()
    rig.cli("isolate", "--profile", "big", "--reason", "reference", timeout=300)
    full_run = time.monotonic() - started
    new = table(rig)
    rig.cli("isolate", "--profile", "internet", "--reason", "reference")
    old = table(rig)
    assert new and old and new != old and new.count(" . tcp . 443") >= BIG

    outcomes = []
    # kill at points spread over a whole run: before, during and after the commit
    for delay in (full_run * f for f in (0.3, 0.6, 0.8, 0.9, 1.0, 1.5)):
        proc = subprocess.Popen(
            ["ip", "netns", "exec", rig.gw.ns, AGENT, "-c", str(rig.config_path), "isolate",
             "--profile", "big", "--reason", f"killed after {delay}s"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        live = table(rig)
        assert live in (old, new), f"mixed ruleset after kill at {delay}s"
        outcomes.append("new" if live == new else "old")

        desired = json.loads((rig.state_dir / "state.json").read_text())["profile"]
        rig.start_daemon()
        wait_for(lambda desired=desired: table(rig) == (new if desired == "big" else old),
                 30, f"convergence to {desired} after kill at {delay}s")
        assert rig.status()["in_sync"]
        rig.stop_daemon()
        rig.cli("isolate", "--profile", "internet", "--reason", "reset")
        assert table(rig) == old
    # the kills really hit before and after the commit, not just one side of it
    assert "old" in outcomes and "new" in outcomes, outcomes
