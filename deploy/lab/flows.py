"""The flow table of docs/design.md, checked with real packets.

`flow_matrix` lists every row as concrete flows (TCP, UDP, ICMP; IPv4 and IPv6)
between the lab's namespaces; `check_flows` runs them all concurrently, one
helper process per source namespace, so a phase with many blocked flows costs
one timeout rather than one per flow.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from drawbridge_lab.topology import Gateway, Lab

FLOWCHECK = str(Path(__file__).with_name("flowcheck.py"))
MGMT_PORT = 22  # an echo service on the gateway stands in for the controller's SSH



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

        def a(name: str, v: str = v) -> str:
            return str(getattr(gw, f"{name}{v}"))

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
