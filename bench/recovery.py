"""Issue 8: the paths that must be fast and small when things go wrong.

    .venv/bin/python -m bench.recovery [--reps 15] [--sizes 0,10000] [--json] [--write]

In a one-gateway namespace lab (everything runs inside the gateway's namespace):

- the boot path (`drawbridge-agent boot`, as its unit runs it before the network is
  up): process start to table in force, with the table gone (a reboot), for an
  `internet` profile and allowlist profiles; against `nft -f` of the saved ruleset (the
  floor), and the slow path (the config changed since the ruleset was saved: the profile
  is compiled);
- the break-glass CLI per call (`status`, and an `isolate`/`restore` pair) with the
  daemon running (the CLI relays to its socket) and without it (the CLI applies
  itself); against `nft list table` (the floor);
- the `rpc` forced command that every controller session keeps open: its start time
  (spawn to the answer of a `ping`) and its RSS, with the daemon running (a relay) and
  without it (it loads the engine itself: what every session cost before);
- the daemon's RSS with no probes configured, after start and after an isolate.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.apply import machine
from bench.report import write_section

SECTION = "## Recovery paths: boot, break-glass, the rpc relay (issue 8)"
AGENT = str(Path(sys.executable).with_name("drawbridge-agent"))


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def _timed(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def profile_toml(sizes: list[int]) -> str:
    """A profile per size: n outbound /24s (every other one: nothing collapses)."""
    out = []
    for n in sizes:
        if n == 0:
            continue
        flows = ", ".join(
            f'{{ cidr = "{ipaddress.ip_network((0x0B000000 + i * 512, 24))}", '
            f'proto = "tcp", ports = [443], direction = "out" }}' for i in range(n))
        out.append(f"[profiles.allow{n}]\nallow = [{flows}]\n")
    return "\n".join(out)


def _profile(n: int) -> str:
    return "internet" if n == 0 else f"allow{n}"


class Inside:
    """Runs in the gateway's namespace: every timing and RSS of this benchmark."""

    def __init__(self, config: Path, reps: int) -> None:
        self.config, self.reps = config, reps
        self.agent = [AGENT, "-c", str(config)]
        self.state_dir = Path(self._state_dir())

    def _state_dir(self) -> str:
        for line in self.config.read_text().splitlines():
            if line.startswith("state_dir"):
                return line.split("=", 1)[1].strip().strip('"')
        raise RuntimeError("no state_dir in the config")

    def cli(self, *args: str) -> None:
        subprocess.run([*self.agent, *args], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)

    def _in_force(self) -> bool:
        listing = subprocess.run(["nft", "-t", "list", "table", "inet", "drawbridge"],
                                 capture_output=True, text=True)
        return listing.returncode == 0 and "chain forward" in listing.stdout

    def boot(self, sizes: list[int]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        saved = self.state_dir / "boot.nft"
        for n in sizes:
            self.cli("isolate", "--profile", _profile(n), "--reason", "bench: boot")
            fast, floor, slow = [], [], []
            for _ in range(self.reps):
                subprocess.run(["nft", "delete", "table", "inet", "drawbridge"], check=True)
                fast.append(_timed([*self.agent, "boot"]))
                assert self._in_force(), "the boot path left no table in force"
                subprocess.run(["nft", "delete", "table", "inet", "drawbridge"], check=True)
                floor.append(_timed(["nft", "-f", str(saved)]))
            text = self.config.read_text()
            for i in range(max(3, self.reps // 5)):
                # an edit of the config since the last apply: the boot compiles the profile
                self.config.write_text(text + f"\n# edit {i}\n")
                subprocess.run(["nft", "delete", "table", "inet", "drawbridge"], check=True)
                slow.append(_timed([*self.agent, "boot"]))
                assert self._in_force(), "the slow boot path left no table in force"
            self.config.write_text(text)
            self.cli("isolate", "--profile", _profile(n), "--reason", "bench: resave")
            out[str(n)] = {"boot": _median(fast), "boot_max": max(fast),
                           "nft_f": _median(floor), "slow": _median(slow)}
        self.cli("restore", "--reason", "bench: boot done")
        return out

    def calls(self) -> dict[str, float]:
        """One CLI call, isolated: status, and a restore/isolate pair (per verb)."""
        self.cli("isolate", "--reason", "bench: calls")

        def change() -> float:
            t = _timed([*self.agent, "restore", "--reason", "bench: call"])
            return (t + _timed([*self.agent, "isolate", "--reason", "bench: call"])) / 2

        floor = [_timed(["nft", "list", "table", "inet", "drawbridge"])
                 for _ in range(self.reps)]
        python = [_timed([sys.executable, "-c", "pass"]) for _ in range(self.reps)]
        out = {"status": _median([_timed([*self.agent, "status"]) for _ in range(self.reps)]),
               "python": _median(python), "nft_list": _median(floor),
               "change": _median([change() for _ in range(self.reps)])}
        self.cli("restore", "--reason", "bench: calls done")
        return out

    def rpc(self) -> dict[str, float]:
        """Spawn the forced command, ping through it; its RSS once it answered."""
        times, rss = [], []
        ping = json.dumps({"v": 1, "id": "bench", "op": "ping"}).encode() + b"\n"
        for _ in range(self.reps):
            started = time.perf_counter()
            proc = subprocess.Popen([*self.agent, "rpc"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE)
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(ping)
            proc.stdin.flush()
            answer = json.loads(proc.stdout.readline())
            times.append(time.perf_counter() - started)
            assert answer.get("ok"), answer
            rss.append(_rss_mb(proc.pid))
            proc.stdin.close()
            proc.wait(10)
        return {"start": _median(times), "rss_mb": _median(rss)}

    def run(self, sizes: list[int]) -> dict[str, Any]:
        out: dict[str, Any] = {"boot": self.boot(sizes)}
        out["calls_direct"] = self.calls()
        out["rpc_direct"] = self.rpc()
        with open(self.state_dir.parent / "agent.log", "ab") as log:
            daemon = subprocess.Popen([*self.agent, "run"], stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 30
            while not (self.state_dir / "agent.sock").exists():
                if time.monotonic() > deadline or daemon.poll() is not None:
                    raise RuntimeError("the daemon did not start (see agent.log)")
                time.sleep(0.05)
            self.cli("status")  # the daemon answers: its start-up work is done
            time.sleep(1.0)
            out["daemon_rss_idle_mb"] = _rss_mb(daemon.pid)
            out["calls_daemon"] = self.calls()
            out["rpc_relay"] = self.rpc()
            self.cli("isolate", "--reason", "bench: rss")
            time.sleep(1.0)
            out["daemon_rss_isolated_mb"] = _rss_mb(daemon.pid)
            self.cli("restore", "--reason", "bench: done")
        finally:
            daemon.terminate()
            daemon.wait(15)
        return out


def run(sizes: list[int], reps: int) -> dict[str, Any]:
    from drawbridge_lab.agentconf import agent_toml
    from drawbridge_lab.topology import Lab

    with Lab.create(gateways=1) as lab, tempfile.TemporaryDirectory() as tmp:
        gw = lab.gateways[0]
        os.chmod(tmp, 0o700)
        config = Path(tmp, "agent.toml")
        config.write_text(agent_toml(lab, gw, Path(tmp, "state")) + profile_toml(sizes))
        proc = lab.run(gw.ns, [sys.executable, "-m", "bench.recovery", "--inside",
                               "--config", str(config), "--reps", str(reps),
                               "--sizes", ",".join(map(str, sizes))], timeout=3600,
                       check=False)
        if proc.returncode != 0:
            sys.exit(f"bench.recovery failed inside the gateway:\n{proc.stderr}")
        return json.loads(proc.stdout)  # type: ignore[no-any-return]


def report(r: dict[str, Any]) -> str:
    ms: Callable[[float], str] = lambda s: f"{s * 1000:.0f} ms"  # noqa: E731
    load = os.getloadavg()[0]
    out = [f"Machine: {machine()}", f"Date: {time.strftime('%Y-%m-%d')}; load average at the "
           f"end of the run: {load:.1f}", "",
           "Boot path, process start to table in force (the table deleted first, as after a "
           "reboot), median (max); the floor is `nft -f` of the saved ruleset; the slow path "
           "is a boot after the config was edited (the profile compiled from it). Goal: "
           "< 150 ms:", "",
           "| profile | `drawbridge-agent boot` | `nft -f boot.nft` (floor) "
           "| slow path (config edited) |", "|---|---|---|---|"]
    for n, b in r["boot"].items():
        name = "internet" if n == "0" else f"{int(n):,} allow entries"
        out.append(f"| {name} | {ms(b['boot'])} ({ms(b['boot_max'])}) | {ms(b['nft_f'])} | "
                   f"{ms(b['slow'])} |")
    cd, cn = r["calls_daemon"], r["calls_direct"]
    out += ["", "Break-glass CLI per call (process start to exit, median), with the daemon "
            "running (the CLI relays to its socket: no pydantic, no engine) and without it (the "
            "CLI validates and applies itself, what every call cost before). Goal: < 200 ms; "
            "floor: `nft list table inet drawbridge`:", "",
            "| call | daemon running | no daemon (break-glass) | `nft list table` (floor) |",
            "|---|---|---|---|",
            f"| `status` | {ms(cd['status'])} | {ms(cn['status'])} | {ms(cd['nft_list'])} |",
            f"| `isolate` / `restore` (mean of the pair) | {ms(cd['change'])} | "
            f"{ms(cn['change'])} | |",
            "", "The `rpc` forced command (one per controller session, for as long as it "
            "lives), spawn to the answer of a `ping`, and its resident memory. Goal: < 15 MB "
            "while the daemon runs:", "",
            "| | start | RSS |", "|---|---|---|",
            f"| daemon running (relay to the socket) | {ms(r['rpc_relay']['start'])} | "
            f"{r['rpc_relay']['rss_mb']:.1f} MB |",
            f"| no daemon (loads the engine; what each session cost before) | "
            f"{ms(r['rpc_direct']['start'])} | {r['rpc_direct']['rss_mb']:.1f} MB |",
            "", f"The daemon with no probes configured (its config also holds the allowlist "
            f"profiles above): {r['daemon_rss_idle_mb']:.1f} MB RSS after start, "
            f"{r['daemon_rss_isolated_mb']:.1f} MB after an isolate (`internet`).", "",
            "The relay and the boot path read only the config's top-level keys (the text "
            "before its first table): a big allowlist profile costs them nothing. Before "
            "that, parsing a config with a 10,000-entry profile added about 200 ms to every "
            "boot, relay start and CLI call.", "",
            "`.venv/bin/python -m bench.recovery` (root; a namespace lab of its own). Every "
            f"time includes the Python interpreter's start ({ms(cd['python'])} for "
            "`python -c pass` in the same run); the boot path and the relay import neither "
            "pydantic nor typer."]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0,10000",
                        help="allowlist sizes of the boot profiles (0: internet)")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--write", action="store_true",
                        help=f"also replace the section {SECTION!r} of BENCHMARKS.md")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if args.inside:
        print(json.dumps(Inside(args.config, args.reps).run(sizes)))
        return
    if os.geteuid() != 0:
        sys.exit("bench.recovery needs root (it builds a namespace lab)")
    results = run(sizes, args.reps)
    print(json.dumps(results, indent=2) if args.json else report(results))
    if args.write:
        write_section(SECTION, report(results))


if __name__ == "__main__":
    main()
