"""`make demo`: the isolation drill of DESIGN.md, in a throwaway namespace lab.

A gateway runs the Drawbridge agent. The drill cuts it off the internet as a
precaution, keeps one emergency flow with a chain partner open for a while,
brings case files back first (a named profile), then restores everything,
checking every row of the flow table with real packets at each step. The lab
is torn down at the end, also on failure or Ctrl-C; nothing outside its
namespaces is touched.
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

from drawbridge_lab.flows import EXPECT, MGMT_PORT, STATE_INDEX, Flow, check_flows, flow_matrix
from drawbridge_lab.topology import Gateway, Lab

AGENT = str(Path(sys.executable).with_name("drawbridge-agent"))


def agent_config(lab: Lab, gw: Gateway, state_dir: Path) -> str:
    nets = ", ".join(f'"{n}"' for n in gw.internal_networks)
    return f"""
gateway = "{gw.name}"
internal_networks = [{nets}]
state_dir = "{state_dir}"
reconcile_interval = 1.0

[metrics]
enabled = false

[[management]]
cidr = "{lab.mgmt_subnet4}"
proto = "tcp"
ports = [{MGMT_PORT}, 9630]

[[management]]
cidr = "{lab.mgmt_subnet6}"
proto = "tcp"
ports = [{MGMT_PORT}, 9630]

[profiles.casefiles]
description = "stage 1 of reconnection: consulting case files at the outside host"
allow = [{{ cidr = "{lab.outside_addr4}/32", proto = "tcp", ports = [443], direction = "out" }},
         {{ cidr = "{lab.outside_addr6}/128", proto = "tcp", ports = [443], direction = "out" }}]
"""


class Drill:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    console = Console(width=max(110, Console().width))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="drawbridge-demo-") as tmp, \
            Lab.create(gateways=1) as lab:
        lab.start_services(lab.gateways[0].ns, tcp=[MGMT_PORT])
        console.print(f"Lab {lab.prefix}: gateway {lab.gateways[0].ns}, internal networks "
                      f"{', '.join(lab.gateways[0].internal_networks)}", highlight=False)
        code = Drill(lab, Path(tmp), console).run()
    console.print(f"(lab torn down; {time.monotonic() - started:.1f} s)")
    sys.exit(code)


if __name__ == "__main__":
    main()
