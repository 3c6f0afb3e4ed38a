"""`make demo`: the isolation drill (docs/network-engineer.md), in a throwaway namespace lab.

Three gateways run the Drawbridge agent behind an sshd that only lets the
controller's key run `drawbridge-agent rpc`; the controller and the engineer's
CLI run in the management namespace. The drill cuts every gateway off the
internet as a precaution, keeps one emergency flow with a chain partner open
for a while, brings the gateways back with a staged restore plan (case files
first), and ends with the history and an audit-chain check. At every step
real TCP, UDP and ICMP packets go along every row of the flow table.

`--local` runs the break-glass variant instead: one gateway, the agent's own
CLI on the gateway, no controller.

The lab is torn down at the end, also on failure or Ctrl-C; nothing outside
its namespaces is touched.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from drawbridge_lab.agentconf import agent_toml
from drawbridge_lab.fleet import CASEFILES_PORT, FleetRig
from drawbridge_lab.flows import EXPECT, MGMT_PORT, STATE_INDEX, Flow, check_flows, flow_matrix
from drawbridge_lab.topology import Gateway, Lab

AGENT = str(Path(sys.executable).with_name("drawbridge-agent"))


def agent_config(lab: Lab, gw: Gateway, state_dir: Path) -> str:
    return agent_toml(lab, gw, state_dir, mgmt_ports=(MGMT_PORT, 9630)) + f"""
[profiles.casefiles]
description = "stage 1 of reconnection: consulting case files at the outside host"
allow = [{{ cidr = "{lab.outside_addr4}/32", proto = "tcp", ports = [443], direction = "out" }},
         {{ cidr = "{lab.outside_addr6}/128", proto = "tcp", ports = [443], direction = "out" }}]
"""


class LocalDrill:
    def __init__(self, lab: Lab, workdir: Path, console: Console) -> None:
        self.lab, self.console = lab, console
        self.gw = lab.gateways[0]
        self.config = workdir / "agent.toml"
        self.config.write_text(agent_config(lab, self.gw, workdir / "state"))
        self.flows = flow_matrix(lab, self.gw)
        self.failures = 0

    def agent(self, *args: str) -> dict[str, Any]:
        proc = subprocess.run(
            ["ip", "netns", "exec", self.gw.ns, AGENT, "-c", str(self.config), *args, "--json"],
            capture_output=True, text=True, check=False, timeout=300)
        if proc.returncode not in (0, 6):
            raise SystemExit(f"drawbridge-agent {args[0]} failed: {proc.stderr.strip()}")
        result: dict[str, Any] = json.loads(proc.stdout)
        return result

    def step(self, title: str, *args: str) -> None:
        self.console.rule(f"[bold]{title}")
        if args:
            self.console.print(f"$ drawbridge-agent {' '.join(args)}", style="dim",
                               highlight=False)
            result = self.agent(*args)
            ms = result.get("apply_seconds", 0) * 1000
            self.console.print(
                f"-> {result['state']} ({result.get('profile') or 'no profile'}), applied in "
                f"{ms:.0f} ms, read-back {'matches' if result['in_sync'] else 'DIFFERS'}, "
                f"{result['verification']['status']}", highlight=False)

    def matrix(self, expect: str, allowed: Callable[[Flow], bool] = lambda f: False) -> None:
        """The flow table now; flows that `allowed` selects (an exception, a profile's
        allow rule) are listed on their own and must pass."""
        results = check_flows(self.flows)
        rows: dict[str, list[bool]] = {}
        extra: dict[str, bool] = {}
        for flow, ok in results.items():
            if allowed(flow):
                extra[f"  allowed: {flow.id}"] = ok
            else:
                rows.setdefault(flow.row, []).append(ok)
        table = Table("flow (seen at the gateway)", "tcp/udp/icmp, v4+v6", "expected")
        for row, oks in rows.items():
            want = "pass" if EXPECT[row][STATE_INDEX[expect]] else "drop"
            got = "pass" if all(oks) else "drop" if not any(oks) else "MIXED"
            self._row(table, row, got, want)
        for name, ok in extra.items():
            self._row(table, name, "pass" if ok else "drop", "pass")
        self.console.print(table)

    def _row(self, table: Table, name: str, got: str, want: str) -> None:
        if got != want:
            self.failures += 1
            got = f"[bold red]{got}[/]"
        table.add_row(name, got, want)
        self.console.print(table)

    def run(self) -> int:
        lab = self.lab
        self.step("Before: everything open")
        self.matrix("open")

        self.step("Precautionary isolation", "isolate", "--profile", "internet", "--reason",
                  "NCSC: Citrix NetScaler vulnerabilities abused; precaution")
        self.matrix("internet")

        self.step("Emergency process with a chain partner (expires by itself)", "allow",
                  "--cidr", f"{lab.outside_addr4}/32", "--proto", "tcp", "--port", "443",
                  "--for", "10m", "--reason", "urgent case with chain partner")
        partner = lambda f: (f.kind, f.port, f.addr) == ("tcp", 443, lab.outside_addr4)  # noqa: E731
        self.matrix("internet", partner)

        self.step("Stage 1 of reconnection: case files", "isolate", "--profile", "casefiles",
                  "--reason", "case files verified clean; bring back consultation")
        casefiles = lambda f: (f.kind, f.port) == ("tcp", 443) and f.addr in (  # noqa: E731
            lab.outside_addr4, lab.outside_addr6)
        self.matrix("internet", casefiles)

        self.step("Restore: systems back, step by step done", "restore", "--reason",
                  "investigation closed; all systems cleared")
        self.matrix("open")

        self.console.rule("[bold]Journal on the gateway (what was cut, when, by whom, why)")
        proc = subprocess.run(["ip", "netns", "exec", self.gw.ns, AGENT, "-c", str(self.config),
                               "journal"], capture_output=True, text=True, check=False,
                              env={**os.environ, "COLUMNS": "160"})
        print(proc.stdout, flush=True)  # already laid out by the agent's CLI
        if self.failures:
            self.console.print(f"[bold red]{self.failures} flows did not match the table")
            return 1
        self.console.print("[bold green]Drill complete: every flow matched the table at "
                           "every step.")
        return 0


PLAN = """
name = "reconnect after the NetScaler incident"

[[stages]]
name = "case files first"
profile = "casefiles"

[[stages]]
name = "everything else"
restore = true
"""


class FleetDrill:
    """The drill through the controller: what an engineer types, with proof."""

    def __init__(self, lab: Lab, workdir: Path, console: Console) -> None:
        self.lab, self.workdir, self.console = lab, workdir, console
        self.rig = FleetRig(lab, workdir)
        self.failures = 0

    def drawbridge(self, title: str, *args: str, ok_codes: tuple[int, ...] = (0,)) -> None:
        self.console.rule(f"[bold]{title}")
        self.console.print(f"$ drawbridge {' '.join(args)}", style="dim", highlight=False)
        proc = self.rig.cli(*args)
        print(proc.stdout.rstrip(), flush=True)  # laid out by the CLI itself
        if proc.returncode not in ok_codes:
            self.failures += 1
            self.console.print(f"[bold red]exit {proc.returncode}[/] {proc.stderr.strip()}")

    def packets(self, expect: str, extra: dict[Flow, bool] | None = None) -> None:
        """Every gateway's inside host towards the outside, gw0's whole flow table
        (management is checked as the SSH greeting the controller relies on), and
        `extra` flows with their own expectation (an exception, say)."""
        gw0 = self.lab.gateways[0]
        flows = [f for f in flow_matrix(self.lab, gw0) if f.row != "mgmt->gateway"]
        flows += [Flow("internal->outside", gw.internal_ns, "tcp", self.lab.outside_addr4, 443)
                  for gw in self.lab.gateways[1:]]
        extra = extra or {}
        results = check_flows([*flows, *extra])
        table = Table("flow (seen at the gateway)", "got", "expected")
        rows: dict[str, list[bool]] = {}
        for flow in flows:
            rows.setdefault(flow.row, []).append(results[flow])
        for row, oks in rows.items():
            want = EXPECT[row][STATE_INDEX[expect]]
            got = all(oks) if all(oks) or not any(oks) else None
            self._row(table, row + (" (all gateways)" if row == "internal->outside" else ""),
                      got, want)
        ssh = all(self.lab.banner_ok(self.lab.mgmt_ns, gw.mgmt_addr4, 22)
                  for gw in self.lab.gateways)
        self._row(table, "mgmt->gateway SSH (all gateways)", ssh, True)
        for flow, want in extra.items():
            self._row(table, f"{flow.row}: {flow.kind}/{flow.port} -> {flow.addr}",
                      results[flow], want)
        self.console.print(table)

    def _row(self, table: Table, name: str, got: bool | None, want: bool) -> None:
        text = {True: "pass", False: "drop", None: "MIXED"}[got]
        if got != want:
            self.failures += 1
            text = f"[bold red]{text}[/]"
        table.add_row(name, text, "pass" if want else "drop")

    def run(self) -> int:
        rig, lab = self.rig, self.lab
        self.console.print("Starting agents and sshd's on the gateways, the controller in the "
                           "management namespace ...")
        rig.start()
        rig.write_controller_config()
        rig.make_tokens()
        rig.start_controller()
        rig.add_gateways()
        (self.workdir / "plan.toml").write_text(PLAN)

        self.drawbridge("The inventory", "gateway", "list")
        self.packets("open")
        self.drawbridge("Precautionary isolation of every gateway", "isolate", "--all",
                        "--profile", "internet", "--ticket", "INC-2025-0717", "--reason",
                        "NCSC: Citrix NetScaler vulnerabilities abused; precaution")
        self.packets("internet")
        self.drawbridge("Emergency process with a chain partner (expires by itself)", "allow",
                        lab.gateways[0].name, "--cidr", f"{lab.outside_addr4}/32", "--proto",
                        "tcp", "--port", "8443", "--direction", "out", "--for", "10m", "--reason",
                        "urgent case with chain partner")
        gw0, gw1 = lab.gateways[0], lab.gateways[1]
        self.packets("internet", {
            Flow("exception on gw0 (internal)", gw0.internal_ns, "tcp", lab.outside_addr4,
                 8443): True,
            Flow("exception on gw0 (gateway)", gw0.ns, "tcp", lab.outside_addr4, 8443): True,
            Flow("no exception on gw1", gw1.internal_ns, "tcp", lab.outside_addr4, 8443): False,
        })
        self.drawbridge("Status", "status")
        plan = str(self.workdir / "plan.toml")
        self.drawbridge("Reconnection, stage 1: case files", "restore", "--all", "--plan", plan,
                        "--through", "case files first", "--reason",
                        "case-file systems verified clean; bring back consultation")
        self.packets("internet", {
            Flow(f"case files from {gw.name}", gw.internal_ns, "tcp", lab.outside_addr4,
                 CASEFILES_PORT): True for gw in lab.gateways})
        self.drawbridge("Reconnection, stage 2: everything else", "restore", "--all", "--plan",
                        plan, "--from", "everything else", "--reason",
                        "investigation closed; all systems cleared")
        self.packets("open")
        self.drawbridge("History: what was cut, when, by whom, why", "history")
        self.drawbridge("Audit chain", "audit", "verify")
        if self.failures:
            self.console.print(f"[bold red]{self.failures} checks did not match")
            return 1
        self.console.print("[bold green]Drill complete: every gateway applied and verified, "
                           "every flow matched the table at every step.")
        return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local", action="store_true",
                        help="break-glass drill: one gateway, the agent CLI, no controller")
    parser.add_argument("--gateways", type=int, default=3, help="fleet size (default 3)")
    args = parser.parse_args()
    console = Console(width=max(110, Console().width))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="drawbridge-demo-") as tmp, \
            Lab.create(gateways=1 if args.local else args.gateways) as lab:
        gw = lab.gateways[0]
        console.print(f"Lab {lab.prefix}: {len(lab.gateways)} gateway(s); {gw.name} has "
                      f"internal networks {', '.join(gw.internal_networks)}", highlight=False)
        if args.local:
            lab.start_services(gw.ns, tcp=[MGMT_PORT])
            code = LocalDrill(lab, Path(tmp), console).run()
        else:
            drill = FleetDrill(lab, Path(tmp), console)
            try:
                code = drill.run()
            finally:
                drill.rig.stop()
    console.print(f"(lab torn down; {time.monotonic() - started:.1f} s)")
    sys.exit(code)


if __name__ == "__main__":
    main()
