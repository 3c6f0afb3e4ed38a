"""A Drawbridge agent on a lab gateway: its config, its CLI, its daemon, and the flow matrix
of DESIGN.md ("Isolation semantics") checked with real packets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drawbridge_lab import Lab
from drawbridge_lab.topology import Gateway

AGENT = str(Path(sys.executable).with_name("drawbridge-agent"))
FLOWCHECK = str(Path(__file__).with_name("flowcheck.py"))
MGMT_PORT = 22  # an echo service stands in for the controller's SSH


def toml_config(
    lab: Lab, gw: Gateway, state_dir: Path, *, extra: str = "", reconcile_interval: float = 0.5
) -> str:
    nets = ", ".join(f'"{n}"' for n in gw.internal_networks)
    return f"""
gateway = "{gw.name}"
internal_networks = [{nets}]
state_dir = "{state_dir}"
reconcile_interval = {reconcile_interval}
full_check_interval = 0

[metrics]
enabled = false

[[management]]
cidr = "10.99.0.0/24"
proto = "tcp"
ports = [{MGMT_PORT}, 9630]

[[management]]
cidr = "fd99::/64"
proto = "tcp"
ports = [{MGMT_PORT}, 9630]

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


# -- the flow matrix of DESIGN.md ---------------------------------------------------------


@dataclass(frozen=True)
class Flow:
    row: str
    src_ns: str
    kind: str  # tcp | udp | icmp
    addr: str
    port: int = 0

    @property
    def id(self) -> str:
        return f"{self.row} {self.kind}/{self.port} -> {self.addr}"


# expected reachability per row: open, internet profile, full profile
EXPECT: dict[str, tuple[bool, bool, bool]] = {
    "internal->outside": (True, False, False),
    "outside->internal": (True, False, False),
    "outside->gateway": (True, False, False),
    "gateway->outside": (True, False, False),
    "internal->gateway": (True, True, False),
    "gateway->internal": (True, True, False),
    "internal->internal2 (routed)": (True, True, False),
    "internal2->internal (routed)": (True, True, False),
    "mgmt->gateway": (True, True, True),
    "loopback": (True, True, True),
}
STATE_INDEX = {"open": 0, "internet": 1, "full": 2}


def flow_matrix(lab: Lab, gw: Gateway) -> list[Flow]:
    out4, out6 = lab.outside_addr4, lab.outside_addr6
    flows: list[Flow] = []

    def triple(row: str, src: str, addr: str, tcp: int, udp: int) -> None:
        flows.extend(
            [
                Flow(row, src, "tcp", addr, tcp),
                Flow(row, src, "udp", addr, udp),
                Flow(row, src, "icmp", addr),
            ]
        )

    for v in ("4", "6"):
        out = out4 if v == "4" else out6
        a = lambda name, v=v: getattr(gw, f"{name}{v}")  # noqa: E731
        triple("internal->outside", gw.internal_ns, out, 443, 53)
        triple("outside->internal", lab.outside_ns, a("internal_host"), 80, 5353)
        triple("outside->gateway", lab.outside_ns, a("outside_addr"), 8443, 5353)
        triple("gateway->outside", gw.ns, out, 443, 53)
        triple("internal->gateway", gw.internal_ns, a("inside_addr"), 8443, 5353)
        triple("gateway->internal", gw.ns, a("internal_host"), 80, 5353)
        triple("internal->internal2 (routed)", gw.internal_ns, a("internal2_host"), 80, 5353)
        triple("internal2->internal (routed)", gw.internal2_ns, a("internal_host"), 80, 5353)
        flows.append(Flow("mgmt->gateway", lab.mgmt_ns, "tcp", a("mgmt_addr"), MGMT_PORT))
        flows.append(Flow("loopback", gw.ns, "tcp", "127.0.0.1" if v == "4" else "::1", 8443))
    return flows


def check_flows(flows: Iterable[Flow]) -> dict[Flow, bool]:
    """Every flow checked with real packets, concurrently, one helper per source namespace."""
    by_ns: dict[str, list[Flow]] = {}
    for f in flows:
        by_ns.setdefault(f.src_ns, []).append(f)

    def run(ns: str, items: list[Flow]) -> dict[Flow, bool]:
        spec = [{"id": f.id, "kind": f.kind, "addr": f.addr, "port": f.port} for f in items]
        proc = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, FLOWCHECK, json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        result = json.loads(proc.stdout)
        return {f: bool(result[f.id]) for f in items}

    with ThreadPoolExecutor(max_workers=len(by_ns)) as pool:
        parts = list(pool.map(lambda kv: run(*kv), by_ns.items()))
    return {f: ok for part in parts for f, ok in part.items()}


def matrix_mismatches(results: dict[Flow, bool], state: str) -> list[str]:
    index = STATE_INDEX[state]
    return sorted(
        f"{f.id}: expected {'pass' if EXPECT[f.row][index] else 'drop'}, got "
        f"{'pass' if ok else 'drop'}"
        for f, ok in results.items()
        if ok != EXPECT[f.row][index]
    )
