"""Probe sweep speed against fping and an asyncio connect loop; agent idle cost; scrape time.

    .venv/bin/python -m bench.probe_sweep [--targets 256] [--timeout 1.0] [--reps 5]
                                          [--idle-seconds 60] [--scrapes 200] [--json]

Needs root. Everything runs in a namespace lab this script builds and removes
(`drawbridge_lab`): the outside host answers for a whole benchmark prefix
(198.18.0.0/16, an AnyIP `local` route), and a table in the outside namespace
silently drops half of the targets, so half are reachable and half filtered.
From the gateway namespace, in the same run and on the same targets:

- ICMP: our sweep (`agent.probe_sweep.measure`) vs `fping -r 0 -t TIMEOUT -i 0` and
  `-i 1` (same timeout, no retries; 0 or 1 ms between targets, fping's default is 10);
- TCP: our `tcp-syn` and `tcp` sweeps vs a plain asyncio connect loop
  (`asyncio.gather` of `open_connection` with the same timeout).

Then the agent daemon runs on the gateway with 20 probes every 15 s (open state,
so probes really go out): RSS and CPU over an idle window; and `/metrics` is
fetched from the management namespace (fresh connection per scrape, as in a
cold Prometheus scrape) while isolated and while open.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.report import write_section

REACHABLE_NET = "198.18.0.0/24"
FILTERED_NET = "198.18.1.0/24"
ANYIP_NET = "198.18.0.0/16"
TCP_PORT = 80
METRICS_PORT = 9630
AGENT = str(Path(sys.executable).with_name("drawbridge-agent"))


def targets(n: int) -> tuple[list[str], list[str]]:
    half = n // 2
    up = [str(ipaddress.ip_network(REACHABLE_NET)[i + 1]) for i in range(half)]
    down = [str(ipaddress.ip_network(FILTERED_NET)[i + 1]) for i in range(n - half)]
    return up, down


def _median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


# -------------------------------------------------------------------- inside the gateway


async def _connect_all(addrs: Sequence[str], port: int, timeout: float) -> list[bool]:
    async def one(addr: str) -> bool:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(addr, port), timeout)
        except (OSError, TimeoutError):
            return False
        writer.close()
        return True

    return list(await asyncio.gather(*(one(a) for a in addrs)))


def inside_sweeps(n: int, timeout: float, reps: int) -> dict[str, Any]:
    """Runs in the gateway namespace: every tool on the same targets, `reps` times each."""
    from agent.probe_sweep import measure
    from agent.probe_types import ProbeSpec
    from agent.probe_wire import load_scapy

    up, down = targets(n)
    addrs = up + down
    cold, _ = _timed(load_scapy)
    out: dict[str, Any] = {"targets": n, "timeout": timeout, "reps": reps,
                           "scapy_import_seconds": cold}

    def ours(kind: str) -> Callable[[], int]:
        if kind == "icmp":
            specs = [ProbeSpec("icmp", a, None, timeout) for a in addrs]
        else:
            specs = [ProbeSpec(kind, a, TCP_PORT, timeout) for a in addrs]  # type: ignore[arg-type]
        return lambda: sum(m.outcome == "reachable" for m in measure(specs))

    def fping(interval_ms: int) -> Callable[[], int]:
        def run() -> int:
            proc = subprocess.run(["fping", "-a", "-r", "0", "-t", str(int(timeout * 1000)),
                                   "-i", str(interval_ms), *addrs],
                                  capture_output=True, text=True, check=False)
            return len(proc.stdout.split())

        return run

    def asyncio_loop() -> int:
        return sum(asyncio.run(_connect_all(addrs, TCP_PORT, timeout)))

    tools = {"icmp: ours": ours("icmp"), "icmp: fping -i 0": fping(0),
             "icmp: fping -i 1": fping(1),
             "tcp-syn: ours": ours("tcp-syn"), "tcp connect: ours": ours("tcp"),
             "tcp connect: asyncio loop": asyncio_loop}
    for fn in tools.values():  # warm-up: neighbour entries, sockets, code paths
        fn()
    results: dict[str, Any] = {}
    for name, fn in tools.items():
        times, found = [], []
        for _ in range(reps):
            seconds, reachable = _timed(fn)
            times.append(seconds)
            found.append(reachable)
        results[name] = {"median": _median(times), "min": min(times), "max": max(times),
                         "reachable": found}
    out["sweeps"] = results
    return out


def inside_scrapes(url: str, count: int) -> dict[str, Any]:
    """Runs in the management namespace: `count` scrapes, a fresh connection each."""
    import http.client
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    times, size = [], 0
    for _ in range(count):
        started = time.perf_counter()
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=5)
        conn.request("GET", parts.path)
        body = conn.getresponse().read()
        conn.close()
        times.append(time.perf_counter() - started)
        size = len(body)
    times.sort()
    return {"count": count, "median": _median(times), "p95": times[int(0.95 * (count - 1))],
            "max": times[-1], "bytes": size}


def inside_collect(config_path: str, count: int) -> dict[str, Any]:
    """Runs in the gateway namespace: the agent's collector and exposition alone (what a
    scrape costs the agent, without HTTP), on the live state, after one probe sweep."""
    from prometheus_client import generate_latest

    from agent.config import load_config
    from agent.daemon import Daemon

    daemon = Daemon(load_config(Path(config_path)))
    daemon.probes.run(isolated=daemon.engine.store.load().isolated)
    times = []
    for _ in range(count):
        started = time.perf_counter()
        generate_latest(daemon.registry)
        times.append(time.perf_counter() - started)
    times.sort()
    return {"count": count, "median": _median(times), "p95": times[int(0.95 * (count - 1))],
            "max": times[-1]}


# -------------------------------------------------------------------- orchestration


def _proc_stats(pid: int) -> tuple[float, int, int]:
    """(cpu seconds, RSS bytes, peak RSS bytes) of a process."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    rss = hwm = 0
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    return cpu, rss, hwm


def _agent_config(lab: Any, workdir: Path, n_probes: int) -> Path:
    gw = lab.gateways[0]
    up, down = targets(2 * n_probes)
    kinds = ["icmp", "tcp", "tcp-syn", "dns"]
    lines = [
        f'gateway = "{gw.name}"', f"internal_networks = {json.dumps(list(gw.internal_networks))}",
        f'internal_interfaces = ["{gw.inside_if}", "{gw.inside2_if}"]',
        f'state_dir = "{workdir / "state"}"', "probe_interval = 15",
        "[metrics]", f'listen = "[::]:{METRICS_PORT}"',
        "[[management]]", f'cidr = "{lab.mgmt_subnet4}"', 'proto = "tcp"',
        f"ports = [22, {METRICS_PORT}]",
    ]
    for i in range(n_probes):
        kind = kinds[i % len(kinds)]
        addr = up[i // 2] if i % 2 == 0 else down[i // 2]
        target = addr if kind == "icmp" else f"{addr}:{53 if kind == 'dns' else TCP_PORT}"
        expect = "reachable" if i % 2 == 0 else "unreachable"
        lines += ["[[probes]]", f'name = "p{i:02d}-{kind}"', f'type = "{kind}"',
                  f'target = "{target}"', "timeout = 1.0",
                  f'expect = {{ open = "{expect}", isolated = "unreachable" }}']
    path = workdir / "agent.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _inner(lab: Any, ns: str, *args: str, timeout: float = 600) -> Any:
    proc = lab.run(ns, [sys.executable, "-m", "bench.probe_sweep", *args], timeout=timeout)
    return json.loads(proc.stdout)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from drawbridge_lab.topology import Lab

    machine_info = machine()
    with Lab.create(gateways=1) as lab, tempfile.TemporaryDirectory() as tmp:
        gw = lab.gateways[0]
        lab.run(lab.outside_ns, ["ip", "route", "add", "local", ANYIP_NET, "dev", "lo"])
        lab.run(lab.outside_ns, ["nft", "-f", "-"], input=(
            "table inet bench {\n chain input {\n type filter hook input priority 0;"
            f" policy accept;\n ip daddr {FILTERED_NET} drop\n }}\n}}\n"))
        sweeps = _inner(lab, gw.ns, "--inside-sweeps", str(args.targets), str(args.timeout),
                        str(args.reps))

        workdir = Path(tmp)
        config = _agent_config(lab, workdir, args.probes)
        with open(workdir / "agent.log", "ab") as log:
            daemon = lab.popen(gw.ns, [AGENT, "-c", str(config), "run"], stdout=log, stderr=log)
        url = f"http://{gw.mgmt_addr4}:{METRICS_PORT}/metrics"
        deadline = time.monotonic() + 30
        while lab.run(lab.mgmt_ns, ["curl", "-sf", "-o", "/dev/null", url],
                      check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError((workdir / "agent.log").read_text())
            time.sleep(0.2)
        time.sleep(args.warmup)
        cpu0, _, _ = _proc_stats(daemon.pid)
        t0 = time.monotonic()
        rss_samples = []
        while time.monotonic() - t0 < args.idle_seconds:
            time.sleep(1.0)
            rss_samples.append(_proc_stats(daemon.pid)[1])
        cpu1, rss, hwm = _proc_stats(daemon.pid)
        elapsed = time.monotonic() - t0
        idle = {"seconds": elapsed, "probes": args.probes, "interval": 15,
                "cpu_percent": 100 * (cpu1 - cpu0) / elapsed, "cpu_seconds": cpu1 - cpu0,
                "rss_bytes": rss, "rss_max_bytes": max(rss_samples), "peak_rss_bytes": hwm}

        scrape_open = _inner(lab, lab.mgmt_ns, "--inside-scrapes", url, str(args.scrapes))
        lab.run(gw.ns, [AGENT, "-c", str(config), "isolate", "--reason", "bench"], check=False)
        scrape_isolated = _inner(lab, lab.mgmt_ns, "--inside-scrapes", url, str(args.scrapes))
        collect = _inner(lab, gw.ns, "--inside-collect", str(config), str(args.scrapes))
        lab.run(gw.ns, [AGENT, "-c", str(config), "restore", "--reason", "bench"], check=False)
        daemon.terminate()
        daemon.wait(10)
    return {"machine": {**machine_info, "loadavg_end": os.getloadavg()[0]}, "sweeps": sweeps,
            "idle": idle, "scrape": {"open": scrape_open, "isolated": scrape_isolated,
                                     "collect": collect}}


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    fping = subprocess.run(["fping", "-v"], capture_output=True, text=True, check=False)
    return {"nproc": os.cpu_count(), "kernel": platform.release(), "cpu": model,
            "python": platform.python_version(),
            "fping": (fping.stdout or fping.stderr).strip().splitlines()[0],
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"),
            "loadavg_start": os.getloadavg()[0]}


SECTION = "## Probes and metrics (issue 3)"
NOTES = """\
How to read it:

- The sweep is bound by the timeout: every probe is sent up front (packets laid out by
  scapy once per kind, ids/ports/checksums patched per probe) and answers are matched
  as they arrive, so 128 silent targets cost one timeout, not 128. fping's default 10 ms
  spacing would make its sweep about 3.6 s (256 x 10 ms + the timeout; not measured);
  at `-i 1` the 1 ms spacing is the difference. All tools
  found exactly the 128 reachable targets in every run.
- Idle RSS includes scapy (about 30 MB of it; the MAC vendor table scapy loads at import,
  11 MB, is dropped right after, since IP probes never use it). The peak (VmHWM) is the
  moment of that import, before the table is dropped.
- The scrape is served by prometheus_client's threaded WSGI server; the agent's own part
  (state file, nft drop counters through libnftables, probe results, exposition) is the
  "in-process" row. The HTTP client ran on the same 2-CPU machine, in the management
  namespace, one new connection per scrape.
- An earlier run while another session's 25-gateway Ansible benchmark saturated the
  machine (load average 10-20) measured a median ICMP sweep of 1066 ms and scrape medians
  of 6-20 ms (p95 up to 36 ms): the sweep holds up under load, the scrape tail does not.
"""


def markdown(r: dict[str, Any]) -> str:
    m, s = r["machine"], r["sweeps"]
    ms = lambda x: f"{x * 1000:.0f} ms"  # noqa: E731
    n = s["targets"]
    lines = [
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), kernel {m['kernel']}, Python "
        f"{m['python']}, {m['fping']}; {m['date']}; 1-min load average "
        f"{m['loadavg_start']:.2f} at start, {m['loadavg_end']:.2f} at end (a shared "
        "machine: tails are noisy). `.venv/bin/python -m bench.probe_sweep` (root, "
        "namespace lab).",
        "",
        f"Sweep of {n} targets from the gateway namespace ({n // 2} reachable, {n - n // 2} "
        f"silently dropped), timeout {s['timeout']:g} s, no retries; median of {s['reps']} "
        "runs after a warm-up run:",
        "",
        "| sweep | median | min | max | reachable found |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, v in s["sweeps"].items():
        found = sorted(set(v["reachable"]))
        lines.append(f"| {name} | {ms(v['median'])} | {ms(v['min'])} | {ms(v['max'])} | "
                     f"{'/'.join(str(f) for f in found)} of {n // 2} |")
    icmp = s["sweeps"]["icmp: ours"]["median"] / s["sweeps"]["icmp: fping -i 0"]["median"]
    tcp = (s["sweeps"]["tcp-syn: ours"]["median"]
           / s["sweeps"]["tcp connect: asyncio loop"]["median"])
    i, sc = r["idle"], r["scrape"]
    mb = lambda b: f"{b / 2**20:.1f} MB"  # noqa: E731
    lines += [
        "",
        f"Ratios: ICMP ours / fping -i 0 {icmp:.2f}x (goal: within 2x); tcp-syn ours/asyncio "
        f"{tcp:.2f}x. One-time scapy import in a fresh process: "
        f"{ms(s['scapy_import_seconds'])} (the daemon pays it once at its first sweep).",
        "",
        "| agent (`drawbridge-agent run`) | value | goal |",
        "|---|---:|---:|",
        f"| idle RSS, {i['probes']} probes every {i['interval']} s (end of "
        f"{i['seconds']:.0f} s window) | {mb(i['rss_bytes'])} | < 80 MB |",
        f"| max RSS in the window / peak (VmHWM) | {mb(i['rss_max_bytes'])} / "
        f"{mb(i['peak_rss_bytes'])} | |",
        f"| idle CPU | {i['cpu_percent']:.2f} % ({i['cpu_seconds']:.2f} s CPU in "
        f"{i['seconds']:.0f} s) | |",
        f"| `/metrics` scrape, isolated: median / p95 / max ({sc['isolated']['count']} "
        f"scrapes, new connection each) | {sc['isolated']['median'] * 1000:.1f} / "
        f"{sc['isolated']['p95'] * 1000:.1f} / {sc['isolated']['max'] * 1000:.1f} ms | "
        "< 20 ms |",
        f"| `/metrics` scrape, open: median / p95 / max | {sc['open']['median'] * 1000:.1f} / "
        f"{sc['open']['p95'] * 1000:.1f} / {sc['open']['max'] * 1000:.1f} ms | < 20 ms |",
        f"| metrics built in-process (collect + exposition, no HTTP), isolated: median / "
        f"p95 / max | {sc['collect']['median'] * 1000:.1f} / {sc['collect']['p95'] * 1000:.1f}"
        f" / {sc['collect']['max'] * 1000:.1f} ms | |",
        f"| `/metrics` body | {sc['isolated']['bytes']} bytes | |",
    ]
    lines += ["", NOTES]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.probe_sweep",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=1.0)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--probes", type=int, default=20)
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--warmup", type=float, default=5.0,
                        help="seconds after start before the idle window")
    parser.add_argument("--scrapes", type=int, default=200)
    parser.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    parser.add_argument("--write", action="store_true",
                        help=f"also replace the section {SECTION!r} of BENCHMARKS.md")
    parser.add_argument("--inside-sweeps", nargs=3, metavar=("N", "TIMEOUT", "REPS"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--inside-scrapes", nargs=2, metavar=("URL", "COUNT"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--inside-collect", nargs=2, metavar=("CONFIG", "COUNT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inside_sweeps:
        n, timeout, reps = args.inside_sweeps
        print(json.dumps(inside_sweeps(int(n), float(timeout), int(reps))))
        return 0
    if args.inside_collect:
        config_path, count = args.inside_collect
        print(json.dumps(inside_collect(config_path, int(count))))
        return 0
    if args.inside_scrapes:
        url, count = args.inside_scrapes
        print(json.dumps(inside_scrapes(url, int(count))))
        return 0
    if os.geteuid() != 0:
        parser.error("needs root (builds network namespaces)")
    for tool in ("ip", "nft", "fping", "curl"):
        if shutil.which(tool) is None:
            parser.error(f"needs {tool} on PATH")
    result = run(args)
    print(json.dumps(result, indent=2) if args.json else markdown(result))
    if args.write:
        write_section(SECTION, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
