"""A Drawbridge agent on a lab gateway: its config, its CLI, its daemon."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drawbridge_lab import Lab
from drawbridge_lab.agentconf import agent_toml
from drawbridge_lab.flows import EXPECT, MGMT_PORT, STATE_INDEX, Flow, flow_matrix
from drawbridge_lab.topology import Gateway

__all__ = ["AGENT", "EXPECT", "MGMT_PORT", "STATE_INDEX", "AgentRig", "Flow", "flow_matrix",
           "toml_config", "wait_for"]

AGENT = str(Path(sys.executable).with_name("drawbridge-agent"))


def toml_config(
    lab: Lab, gw: Gateway, state_dir: Path, *, extra: str = "", reconcile_interval: float = 0.5
) -> str:
    return agent_toml(lab, gw, state_dir, reconcile_interval=reconcile_interval,
                      mgmt_ports=(MGMT_PORT, 9630), full_check_interval=0) + f"""
[profiles.casefiles]
allow = [{{ cidr = "{lab.outside_addr4}/32", proto = "tcp", ports = [443], direction = "out" }}]
{extra}
"""


@dataclass
class AgentRig:
    lab: Lab
    gw: Gateway
    workdir: Path
    extra_config: str = ""
    daemon: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.state_dir = self.workdir / "state"
        self.config_path = self.workdir / "agent.toml"
        self.config_path.write_text(
            toml_config(self.lab, self.gw, self.state_dir, extra=self.extra_config)
        )

    def cli(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            ["ip", "netns", "exec", self.gw.ns, AGENT, "-c", str(self.config_path), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"drawbridge-agent {' '.join(args)} exited {proc.returncode}:"
                f"\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def status(self) -> dict[str, Any]:
        out = self.cli("status", "--json", check=False)
        return json.loads(out.stdout)  # type: ignore[no-any-return]

    def nft(self, *args: str, check: bool = True) -> str:
        return self.lab.run(self.gw.ns, ["nft", *args], check=check).stdout

    def ruleset(self) -> str:
        return self.nft("list", "ruleset")

    def rules_as_meant(self, what: tuple[str, ...] = ("ruleset",)) -> str:
        """A listing to compare across time: no counter values (-s), and no connection
        ids in the dynamic `live` set (both change with every packet)."""
        listing = self.nft("-s", "list", *what, check=False)
        return re.sub(r"(set live \{[^}]*?timeout \S+\n)\t+elements = \{[^}]*\}\n",
                      r"\1", listing)

    def has_table(self) -> bool:
        return "table inet drawbridge" in self.ruleset()

    def state_bytes(self) -> bytes | None:
        path = self.state_dir / "state.json"
        return path.read_bytes() if path.exists() else None

    def start_daemon(self) -> subprocess.Popen[bytes]:
        log = open(self.workdir / "agent.log", "ab")  # noqa: SIM115
        self.daemon = self.lab.popen(
            self.gw.ns, [AGENT, "-c", str(self.config_path), "run"], stdout=log, stderr=log
        )
        log.close()
        wait_for(lambda: (self.state_dir / "agent.sock").exists(), 15, "agent socket")
        return self.daemon

    def stop_daemon(self, sig: int = signal.SIGTERM) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            os.killpg(self.daemon.pid, sig)
            self.daemon.wait(10)
        self.daemon = None

    def log(self) -> str:
        path = self.workdir / "agent.log"
        return path.read_text() if path.exists() else ""


def wait_for(cond: Callable[[], bool], timeout: float, what: str, step: float = 0.05) -> float:
    """Polls `cond`; returns the seconds it took, fails the test with `what` on timeout."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if cond():
            return time.monotonic() - started
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
