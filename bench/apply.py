"""Isolate/restore latency and allowlist apply time, against raw `nft -f` and iptables-restore.

    .venv/bin/python -m bench.apply [--sizes 1000,10000,100000] [--reps 5]

Everything runs inside a network namespace this script creates and deletes; the
host's own ruleset is never touched. Prints a markdown table (and --json).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.report import write_section

SMALL_PROFILE = "internet"
SECTION = "## Isolation engine (issue 2)"
NOTES = """\
How to read it:

- "Drawbridge engine" is `Engine.isolate` in the agent process: validate, build the
  policy, dry-check the structure (once per structure per process), write the desired
  state (fsync), apply in one transaction, read the table back through the JSON API and
  compare it with the intent. That is what a request on the controller's warm SSH
  channel costs on the gateway. "drawbridge-agent CLI" is the break-glass command on
  the console: a new Python process each time (imports, config load), no daemon.
- "warm apply" is policy + dry check + the nftables transaction, the part comparable
  to `nft -f` of the same script (the floor, which includes its own process start);
  nftables is driven in-process through libnftables, so Drawbridge saves the fork+exec
  and spends it on validation. "cold" adds compiling the profile (collapsing and
  sorting the allowlist), which the daemon does once at start for every profile.
- The read-back of 100k elements is the cost of proof: nft dumps every element as JSON.
  The reconcile loop therefore compares structure (chains, rules, sets) every
  `reconcile_interval` and set contents every `full_check_interval`.
- iptables-restore gets the same allowlist as linear rules (request and reply, local
  and forwarded: 4 rules per CIDR), into the legacy backend.
- Goal of issue 2: within 1.3x of raw `nft -f` at every size. Measured (warm): {ratios}.
"""


def _median(samples: list[float]) -> float:
    return statistics.median(samples) if samples else float("nan")


def _timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _allowlist(n: int) -> list[dict[str, Any]]:
    # every other /24, so nothing collapses and the kernel gets n intervals
    return [{"cidr": str(ipaddress.ip_network((0x0B000000 + i * 512, 24))), "proto": "tcp",
             "ports": [443], "direction": "out"} for i in range(n)]


def _config(state_dir: str, sizes: list[int]) -> dict[str, Any]:
    return {
        "gateway": "bench", "internal_networks": ["10.20.0.0/16", "fd20::/48"],
        "internal_interfaces": ["inside"], "state_dir": state_dir,
        "management": [{"cidr": "10.99.0.0/24", "proto": "tcp", "ports": [22, 9630]}],
        "profiles": {f"allow{n}": {"allow": _allowlist(n)} for n in sizes},
    }


def _iptables_rules(n: int) -> str:
    """The same allowlist as linear iptables rules: request and reply, forward and local."""
    lines = ["*filter", ":INPUT DROP [0:0]", ":FORWARD DROP [0:0]", ":OUTPUT DROP [0:0]",
             "-A INPUT -i lo -j ACCEPT", "-A OUTPUT -o lo -j ACCEPT"]
    for rule in _allowlist(n):
        c = rule["cidr"]
        lines += [f"-A OUTPUT -d {c} -p tcp --dport 443 -j ACCEPT",
                  f"-A INPUT -s {c} -p tcp --sport 443 -j ACCEPT",
                  f"-A FORWARD -s 10.20.0.0/16 -d {c} -p tcp --dport 443 -j ACCEPT",
                  f"-A FORWARD -d 10.20.0.0/16 -s {c} -p tcp --sport 443 -j ACCEPT"]
    lines.append("COMMIT\n")
    return "\n".join(lines)


def _run(argv: list[str], stdin: str | None = None) -> None:
    subprocess.run(argv, input=stdin, text=True, check=True, capture_output=True)


def inside(sizes: list[int], reps: int) -> dict[str, Any]:
    """Runs in the bench namespace."""
    from agent.config import parse_config
    from agent.engine import Engine
    from agent.nft.render import render
    from agent.requests import IsolateRequest, RestoreRequest

    results: dict[str, Any] = {"small": {}, "sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        cfg_data = _config(tmp, sizes)
        started = time.perf_counter()
        config = parse_config(cfg_data)
        results["config_load_seconds"] = time.perf_counter() - started

        # -- small policy: command to read-back verified ---------------------------------
        engine = Engine(config)
        iso, res, raw_iso, raw_back, cli_iso, cli_res = [], [], [], [], [], []
        script = engine.render(SMALL_PROFILE)
        script_path = Path(tmp, "small.nft")
        script_path.write_text(script)
        cfg_path = Path(tmp, "agent.toml")
        cfg_path.write_text(_toml(cfg_data | {"profiles": {}}))
        agent = [str(Path(sys.executable).with_name("drawbridge-agent")), "-c", str(cfg_path)]
        for i in range(reps):
            iso.append(_timed(lambda i=i: engine.isolate(
                IsolateRequest(profile=SMALL_PROFILE, reason=f"bench {i}"))))
            res.append(_timed(lambda: engine.restore(RestoreRequest(reason="bench"))))
            raw_iso.append(_timed(lambda: _run(["nft", "-f", str(script_path)])))
            raw_back.append(_timed(lambda: _run(["nft", "-j", "list", "table", "inet",
                                                  "drawbridge"])))
            _run(["nft", "delete", "table", "inet", "drawbridge"])
            cli_iso.append(_timed(lambda: _run([*agent, "isolate", "--reason", "bench"])))
            cli_res.append(_timed(lambda: _run([*agent, "restore", "--reason", "bench"])))
        results["small"] = {
            "isolate_engine": _median(iso), "restore_engine": _median(res),
            "isolate_cli": _median(cli_iso), "restore_cli": _median(cli_res),
            "raw_nft_apply": _median(raw_iso), "raw_nft_apply_readback":
                _median(raw_iso) + _median(raw_back),
        }

        # -- allowlist sizes ----------------------------------------------------------------
        ipt = shutil.which("iptables-legacy-restore") or shutil.which("iptables-restore")
        for n in sizes:
            profile = f"allow{n}"
            cold = Engine(config)
            first = cold.isolate(IsolateRequest(profile=profile, reason="bench cold"))
            assert first.in_sync, first.problems
            warm: list[dict[str, float]] = []
            raw: list[float] = []
            path = Path(tmp, f"{profile}.nft")
            path.write_text(render(cold.policy_for(cold.store.load())))  # type: ignore[arg-type]
            for i in range(reps if n < 100_000 else max(1, reps // 2)):
                # the same profile again is a no-op: apply the whole table from open
                cold.restore(RestoreRequest(reason=f"bench warm {i}"))
                r = cold.isolate(IsolateRequest(profile=profile, reason=f"bench warm {i}"))
                assert r.changed
                assert r.in_sync, r.problems
                warm.append(r.timings)
                raw.append(_timed(lambda path=path: _run(["nft", "-f", str(path)])))
            cold.restore(RestoreRequest(reason="bench"))
            ipt_times: list[float] = []
            if ipt:
                rules = _iptables_rules(n)
                for _ in range(max(1, reps // 2)):
                    ipt_times.append(_timed(lambda rules=rules: _run([ipt], rules)))
                _run([ipt], "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n"
                     ":OUTPUT ACCEPT [0:0]\nCOMMIT\n")

            def phase(name: str, runs: list[dict[str, float]] = warm) -> float:
                return _median([t.get(name, 0.0) for t in runs])

            warm_apply = phase("policy") + phase("check") + phase("apply")
            results["sizes"][n] = {
                "cold_compile_and_apply": sum(first.timings.get(k, 0.0)
                                              for k in ("policy", "check", "apply")),
                "warm_apply": warm_apply,
                "warm_readback": phase("readback"),
                "raw_nft_f": _median(raw),
                "iptables_restore": _median(ipt_times) if ipt_times else None,
                "iptables_binary": os.path.basename(ipt) if ipt else None,
                "ratio_vs_raw": warm_apply / _median(raw),
            }
    return results


def _toml(data: dict[str, Any]) -> str:
    lines = [f'gateway = "{data["gateway"]}"',
             f"internal_networks = {json.dumps(data['internal_networks'])}",
             f"internal_interfaces = {json.dumps(data['internal_interfaces'])}",
             f'state_dir = "{data["state_dir"]}"', "[metrics]", "enabled = false"]
    for m in data["management"]:
        lines += ["[[management]]", f'cidr = "{m["cidr"]}"', f'proto = "{m["proto"]}"',
                  f"ports = {json.dumps(m['ports'])}"]
    return "\n".join(lines) + "\n"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    nft = subprocess.run(["nft", "--version"], capture_output=True, text=True).stdout.strip()
    return (f"{os.cpu_count()} cores, {cpu}, kernel {platform.release()}, {nft}, "
            f"Python {platform.python_version()}")


def report(results: dict[str, Any]) -> str:
    ms = lambda s: "n/a" if s is None else f"{s * 1000:.1f} ms"  # noqa: E731
    small = results["small"]
    out = [f"Machine: {machine()}", f"Date: {time.strftime('%Y-%m-%d')}", "",
           "Small policy (internet profile), median, command to read-back verified:", "",
           "| operation | Drawbridge engine | drawbridge-agent CLI | raw `nft -f` "
           "| raw `nft -f` + `nft -j list` |",
           "|---|---|---|---|---|",
           f"| isolate | {ms(small['isolate_engine'])} | {ms(small['isolate_cli'])} | "
           f"{ms(small['raw_nft_apply'])} | {ms(small['raw_nft_apply_readback'])} |",
           f"| restore | {ms(small['restore_engine'])} | {ms(small['restore_cli'])} | | |",
           "", "Allowlist profile apply time (median; warm = profile compiled once per agent "
           "start):", "",
           "| CIDRs | Drawbridge warm apply | raw `nft -f` (floor) | ratio | iptables-restore "
           "(linear) | Drawbridge read-back | cold: compile + apply |",
           "|---|---|---|---|---|---|---|"]
    for n, r in results["sizes"].items():
        out.append(f"| {int(n):,} | {ms(r['warm_apply'])} | {ms(r['raw_nft_f'])} | "
                   f"{r['ratio_vs_raw']:.2f}x | {ms(r['iptables_restore'])} "
                   f"({r['iptables_binary']}) | {ms(r['warm_readback'])} | "
                   f"{ms(r['cold_compile_and_apply'])} |")
    ratios = ", ".join(f"{r['ratio_vs_raw']:.2f}x" for r in results["sizes"].values())
    out += ["", "`.venv/bin/python -m bench.apply` (root; runs in a namespace it creates).",
            "", NOTES.replace("{ratios}", ratios)]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print raw results as JSON")
    parser.add_argument("--write", action="store_true",
                        help=f"also replace the section {SECTION!r} of BENCHMARKS.md")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if args.inside:
        print(json.dumps(inside(sizes, args.reps)))
        return
    if os.geteuid() != 0:
        sys.exit("bench.apply needs root (it creates a network namespace)")
    ns = f"dbb-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        proc = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "bench.apply", "--inside",
             "--sizes", args.sizes, "--reps", str(args.reps)],
            check=True, capture_output=True, text=True)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    results = json.loads(proc.stdout)
    print(json.dumps(results, indent=2) if args.json else report(results))
    if args.write:
        write_section(SECTION, report(results))


if __name__ == "__main__":
    main()
