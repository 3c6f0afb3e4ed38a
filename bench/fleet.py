"""Controller fan-out: `drawbridge isolate --all` vs Ansible ad-hoc, in the namespace lab.

    .venv/bin/python -m bench.fleet [--sizes 10,25,50] [--rounds 3] [--no-write]

For each N: a lab with N gateways, each running the agent daemon and an sshd whose
authorized_keys holds the controller's key (restricted to `drawbridge-agent rpc`)
and, for the comparison only, an unrestricted key for Ansible. The controller runs
in the management namespace with its sessions warm (it connects at start).

Measured, in the same run:
- drawbridge: wall time of `drawbridge isolate --all` (CLI start to exit), every
  gateway applied, read back and verified (each result checked);
- Ansible: `ansible all -f N -m shell -a 'nft -f <the same ruleset> && nft list table
  inet drawbridge'` (apply + read back), with pipelining, no fact gathering, no file
  copy (the rendered ruleset is already on the gateway's disk): its best case;
- single gateway: isolate + read back over the API on a warm session (HTTP client
  in the management namespace), and a bare `status` request on the SSH channel.

Results go to BENCHMARKS.md, section "## Controller fan-out (issue 4)" (only that
section is touched). Everything runs inside lab namespaces; nothing on the host.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.report import write_section
from drawbridge_lab import Lab
from drawbridge_lab.fleet import API_URL, FleetRig, fingerprint, wait_for

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Controller fan-out (issue 4)"
AGENT = str(Path(sys.executable).with_name("drawbridge-agent"))


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def p95(xs: list[float]) -> float:
    if not xs:
        return float("nan")
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


# -- drawbridge ----------------------------------------------------------------------------


def prepare_controller(rig: FleetRig) -> None:
    """Inventory written on the controller host directly (fast for 50 gateways); tokens."""
    from controller.auth import Principal, Role
    from controller.config import load_config
    from controller.service import Controller

    rig.write_controller_config(poll_interval=5.0, parallelism=64)
    ctl = Controller(load_config(rig.controller_config)).open()
    try:
        admin = Principal(user="bench", role=Role.admin, token_id="-")
        for g in rig.gateways:
            ctl.add_gateway(admin, name=g.gw.name, address=g.gw.mgmt_addr4, user="root",
                            key_path=str(rig.key),
                            host_key=fingerprint(g.host_key.with_suffix(".pub")),
                            trust_on_first_use=False, groups=["bench"], reason="benchmark",
                            ticket=None)
        rig.tokens["admin"] = ctl.create_token(user="bench", role=Role.admin,
                                               created_by="bench", reason="benchmark")
    finally:
        ctl.close()


def all_reachable(rig: FleetRig) -> bool:
    proc = rig.cli("status", "--json", role="admin")
    try:
        views = json.loads(proc.stdout)
    except json.JSONDecodeError:
        return False
    return len(views) == len(rig.gateways) and all(v["reachable"] for v in views)


def drawbridge_round(rig: FleetRig, verb: str) -> tuple[float, float]:
    """Wall time of the CLI, and the controller's own command duration."""
    args = ["isolate", "--all", "--reason", "bench"] if verb == "isolate" else \
        ["restore", "--all", "--reason", "bench"]
    started = time.perf_counter()
    proc = rig.cli(*args, "--json", role="admin", timeout=600)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"drawbridge {verb} failed ({proc.returncode}): "
                           f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout)
    want = "isolated" if verb == "isolate" else "open"
    bad = [r for r in result["results"] if r["outcome"] != "verified" or r["state"] != want]
    if bad or len(result["results"]) != len(rig.gateways):
        raise RuntimeError(f"not every gateway {want} and verified: {bad}")
    return wall, float(result["duration_seconds"])


SINGLE = r"""
import json, statistics, sys, time, httpx
url, token, gw, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
h = {"Authorization": "Bearer " + token}
iso, server, agent = [], [], []
with httpx.Client(base_url=url, headers=h, timeout=60) as c:
    for i in range(rounds + 2):
        t = time.perf_counter()
        r = c.post("/v1/isolate", json={"targets": {"gateways": [gw]}, "reason": "bench"})
        dt = time.perf_counter() - t
        body = r.json()
        res = body["results"][0]
        assert res["outcome"] == "verified" and res["state"] == "isolated", body
        if i >= 2:
            iso.append(dt); server.append(res["duration_seconds"])
            agent.append(res["apply_seconds"])
        r = c.post("/v1/restore", json={"targets": {"gateways": [gw]}, "reason": "bench"})
        assert r.json()["ok"], r.text
print(json.dumps({"http": iso, "controller": server, "apply": agent}))
"""

CHANNEL = r"""
import json, sys, time
from controller.config import SshSettings
from controller.transport.ssh import AgentSession, SshTarget
host, key, fp, name, rounds = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
s = AgentSession(SshTarget(name=name, host=host, port=22, user="root", key_path=key,
                           host_key=fp), SshSettings())
t = time.perf_counter(); s.connect(); connect = time.perf_counter() - t
out = []
for _ in range(rounds):
    t = time.perf_counter(); s.request("ping", {}); out.append(time.perf_counter() - t)
st = []
for _ in range(rounds):
    t = time.perf_counter(); s.request("status", {}); st.append(time.perf_counter() - t)
s.close()
print(json.dumps({"connect": connect, "ping": out, "status": st}))
"""


def single_gateway(rig: FleetRig, rounds: int) -> dict[str, list[float]]:
    lab = rig.lab
    proc = lab.run(lab.mgmt_ns, [sys.executable, "-c", SINGLE, API_URL, rig.tokens["admin"],
                                 rig.gateways[0].gw.name, str(rounds)], timeout=600)
    data: dict[str, list[float]] = json.loads(proc.stdout)
    g = rig.gateways[1]
    proc = lab.run(lab.mgmt_ns, [sys.executable, "-c", CHANNEL, g.gw.mgmt_addr4, str(rig.key),
                                 fingerprint(g.host_key.with_suffix(".pub")), g.gw.name,
                                 str(rounds)], timeout=600)
    channel = json.loads(proc.stdout)
    data["ping"] = channel["ping"]
    data["status"] = channel["status"]
    data["connect"] = [channel["connect"]]
    return data


# -- ansible ------------------------------------------------------------------------------


class Ansible:
    def __init__(self, rig: FleetRig, work: Path) -> None:
        self.rig = rig
        self.work = work
        self.control = work / "cp"
        self.control.mkdir(parents=True, exist_ok=True)
        lines = ["[gateways]"]
        for g in rig.gateways:
            ruleset = g.dir / "isolate.nft"
            out = subprocess.run([AGENT, "-c", str(g.config), "render", "--profile",
                                  "internet"], capture_output=True, text=True, check=True)
            ruleset.write_text(out.stdout)
            lines.append(f"{g.gw.name} ansible_host={g.gw.mgmt_addr4} ruleset={ruleset}")
        self.inventory = work / "inventory.ini"
        self.inventory.write_text("\n".join(lines) + "\n")

    def env(self) -> list[str]:
        assert self.rig.ansible_key is not None
        return [
            "ANSIBLE_HOST_KEY_CHECKING=False", "ANSIBLE_PIPELINING=True",
            "ANSIBLE_REMOTE_USER=root", f"ANSIBLE_PRIVATE_KEY_FILE={self.rig.ansible_key}",
            f"ANSIBLE_SSH_CONTROL_PATH_DIR={self.control}",
            "ANSIBLE_PYTHON_INTERPRETER=/usr/bin/python3", "ANSIBLE_LOCALHOST_WARNING=False",
            f"ANSIBLE_LOCAL_TEMP={self.work / 'tmp'}", "ANSIBLE_NOCOLOR=True",
            "ANSIBLE_DEPRECATION_WARNINGS=False",
        ]

    def run(self, command: str) -> float:
        n = len(self.rig.gateways)
        argv = ["env", *self.env(), "ansible", "all", "-i", str(self.inventory), "-f", str(n),
                "-m", "ansible.builtin.shell", "-a", command, "-o"]
        started = time.perf_counter()
        proc = self.rig.lab.run(self.rig.lab.mgmt_ns, argv, check=False, timeout=1800)
        wall = time.perf_counter() - started
        ok = len(re.findall(r"\| CHANGED \|", proc.stdout))
        if proc.returncode != 0 or ok != n:
            raise RuntimeError(f"ansible failed ({proc.returncode}, {ok}/{n} ok): "
                               f"{proc.stdout[-3000:]}{proc.stderr[-2000:]}")
        return wall

    def isolate(self) -> float:
        return self.run("nft -f {{ ruleset }} && nft list table inet drawbridge > /dev/null")

    def restore(self) -> float:
        return self.run("nft delete table inet drawbridge")

    def stop_masters(self) -> None:
        """The ssh ControlPersist masters Ansible left behind (ours: by control path)."""
        marker = str(self.control)
        for pid_dir in Path("/proc").iterdir():
            if not pid_dir.name.isdigit():
                continue
            try:
                cmdline = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in cmdline and cmdline.startswith("ssh"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid_dir.name), signal.SIGTERM)


# -- one size ------------------------------------------------------------------------------


def bench_size(n: int, rounds: int, single_rounds: int, *, single: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"n": n}
    work = Path(tempfile.mkdtemp(prefix=f"bench-fleet-{n}-"))
    t0 = time.perf_counter()
    try:
        with Lab.create(gateways=n, services=False) as lab:
            rig = FleetRig(lab, work, probes=False, reconcile_interval=3600, ansible_key=True)
            ansible: Ansible | None = None
            try:
                rig.start(parallel=8)
                prepare_controller(rig)
                rig.start_controller()
                wait_for(lambda: all_reachable(rig), 300, "every gateway connected")
                out["setup_seconds"] = time.perf_counter() - t0
                print(f"  N={n}: fleet up in {out['setup_seconds']:.0f}s", file=sys.stderr)
                drawbridge_round(rig, "isolate")  # warm-up: first apply on each agent
                drawbridge_round(rig, "restore")
                walls, servers = [], []
                for _ in range(rounds):
                    wall, server = drawbridge_round(rig, "isolate")
                    walls.append(wall)
                    servers.append(server)
                    drawbridge_round(rig, "restore")
                out["drawbridge_wall"] = walls
                out["drawbridge_controller"] = servers
                print(f"  N={n}: drawbridge {median(walls):.2f}s", file=sys.stderr)

                ansible = Ansible(rig, work / "ansible")
                cold = ansible.isolate()
                ansible.restore()
                warm = []
                for _ in range(rounds):
                    warm.append(ansible.isolate())
                    ansible.restore()
                out["ansible_cold"] = cold
                out["ansible_warm"] = warm
                print(f"  N={n}: ansible {median(warm):.2f}s (first run {cold:.2f}s)",
                      file=sys.stderr)
                if single:
                    out["single"] = single_gateway(rig, single_rounds)
            finally:
                if ansible is not None:
                    ansible.stop_masters()
                rig.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


# -- report --------------------------------------------------------------------------------


def machine() -> str:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError):
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024 / 1024:.0f} GiB"
    ansible = subprocess.run(["ansible", "--version"], capture_output=True, text=True,
                             check=False).stdout.splitlines()[:1]
    return (f"{cpu}, {os.cpu_count()} CPUs, {mem} RAM; Linux {platform.release()}; "
            f"Python {platform.python_version()}; {ansible[0] if ansible else 'ansible ?'}")


def render(results: list[dict[str, Any]], rounds: int, note: str = "") -> str:
    today = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    lines = [
        SECTION, "",
        f"`.venv/bin/python -m bench.fleet` on {today}; {machine()}.",
        "",
        "Time from starting `drawbridge isolate --all` (the CLI process, in the lab's",
        "management namespace) to its exit with every gateway applied, read back and",
        "verified, vs `ansible all -f N -m shell -a 'nft -f <ruleset> && nft list table",
        "inet drawbridge'` applying the same ruleset (rendered by the agent for each",
        "gateway) over SSH to the same sshd's, with an unrestricted key. Ansible gets its",
        "best case: pipelining, no facts, no file copy, ssh ControlPersist (\"warm\" reuses",
        "the masters of the previous run). The controller's sessions are warm (it keeps one",
        "open per gateway). Agents run without probes here, so \"verified\" is the read-back;",
        f"median of {rounds} rounds after one warm-up round. The controller-side column is",
        "the controller's own time from accepting the command to the last gateway's",
        "verified result; the rest of the wall time is the CLI's start (Python imports,",
        "`ip netns exec`) and the HTTP call.",
        *([note] if note else []),
        "",
        "| N | drawbridge isolate --all | (controller-side) | Ansible warm | Ansible first run "
        "| speed-up (warm) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        d, a = median(r["drawbridge_wall"]), median(r["ansible_warm"])
        lines.append(f"| {r['n']} | {d:.2f} s | {median(r['drawbridge_controller']):.2f} s "
                     f"| {a:.2f} s | {r['ansible_cold']:.2f} s | {a / d:.1f}x |")
    single = next((r["single"] for r in results if "single" in r), None)
    if single:
        ms = lambda xs: f"{median(xs) * 1000:.1f} ms (p95 {p95(xs) * 1000:.1f})"  # noqa: E731
        lines += [
            "",
            f"Single gateway on a warm session ({len(single['http'])} rounds):",
            "",
            f"- isolate + read back + verify, HTTP round trip to the controller: "
            f"{ms(single['http'])}",
            f"- of which controller to agent over SSH (request to answer): "
            f"{ms(single['controller'])}",
            f"- of which nft apply in the agent: {ms(single['apply'])}",
            f"- a bare `ping` on the open SSH channel: {ms(single['ping'])}; "
            f"`status` (reads the table back): {ms(single['status'])}",
            f"- for comparison, a new SSH session up to the first answer: "
            f"{single['connect'][0] * 1000:.0f} ms",
        ]
    last = results[-1]
    speedup = median(last["ansible_warm"]) / median(last["drawbridge_wall"])
    lines += ["", f"Goals of issue 4: at least 10x faster than Ansible at N = 50 "
              f"(measured at N = {last['n']}: {speedup:.1f}x); a single gateway isolated and "
              "read back in under 100 ms on a warm connection" + (
                  f" (measured: {median(single['http']) * 1000:.0f} ms through the API)."
                  if single else ".")]
    lines += ["", "Setup per size (lab, agents, sshd's, controller connecting to every "
              "gateway): " + ", ".join(f"N={r['n']}: {r['setup_seconds']:.0f} s"
                                        for r in results) + ".", ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10,25,50",
                    type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--single-rounds", type=int, default=30)
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--json", type=Path, help="also dump raw numbers here")
    ap.add_argument("--note", default="", help="a sentence added to the report")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if os.geteuid() != 0 or shutil.which("ansible") is None:
        sys.exit("needs root (namespaces) and ansible (apt-get install ansible-core)")
    results = []
    for n in args.sizes:
        print(f"N={n} ...", file=sys.stderr)
        results.append(bench_size(n, args.rounds, args.single_rounds,
                                  single=n == min(args.sizes)))
        if args.json:  # after every size: a later failure keeps what was measured
            args.json.write_text(json.dumps(results, indent=2))
    text = render(results, args.rounds, args.note)
    print(text)
    if not args.no_write:
        write_section(SECTION, text.removeprefix(SECTION))


if __name__ == "__main__":
    main()
