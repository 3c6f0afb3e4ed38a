"""Controller replicas at fleet size: one controller, then two replicas, against 1,000
simulated gateways, with Ansible `-m raw` against the same gateways as the reference.

    .venv/bin/python -m bench.replicas [--gateways 1000] [--ansible-sizes 10,100,1000]
                                       [--rounds 3] [--no-write] [--json FILE]

The gateways are drawbridge_lab.simagents: one process, one real SSH server (asyncssh)
answering every gateway's address like `drawbridge-agent rpc` (request ids answered
once, each change journalled), a change taking --apply-ms (20 ms: about a real
agent's nft apply and read-back, BENCHMARKS.md "Isolation engine"). The controllers
are real `drawbridge-controller serve` processes on a throwaway PostgreSQL (replica
mode), the CLI the real `drawbridge`, all in one lab namespace on this machine.

Measured: each controller process's resident memory and threads with the fleet
connected, per gateway (less the same process with an empty inventory); the wall
time of `drawbridge isolate --all` (CLI start to exit, every gateway's answer
verified); the time for the survivor to take over a SIGKILLed replica's gateways
(leases, sessions up) and for an `isolate --all` sent to the survivor at the kill to
finish; every command applied once per gateway (the simulator's journal). Results
go to BENCHMARKS.md, section "## Controller replicas (issue 10)".
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.fleet import machine
from bench.report import write_section
from drawbridge_lab import Lab
from drawbridge_lab.fleet import fingerprint, keygen, wait_for
from drawbridge_lab.postgres import PostgresServer
from drawbridge_lab.replicas import ReplicaRig
from drawbridge_lab.simagents import address, name

SECTION = "## Controller replicas (issue 10)"
SIM_PORT = 2222


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


class Bench:
    def __init__(self, lab: Lab, work: Path, pg: PostgresServer, n: int,
                 apply_ms: float) -> None:
        self.lab = lab
        self.work = work
        self.n = n
        self.apply_ms = apply_ms
        self.url = pg.create_database("bench_replicas")
        self.key = keygen(work / "controller_key", "bench-controller")
        self.host_key = keygen(work / "sim_host_key", "sim-host")
        (work / "authorized_keys").write_text(self.key.with_suffix(".pub").read_text())
        self.journal = work / "sim-journal.txt"
        self.rig = ReplicaRig(lab, work / "replicas", self.url, count=2)
        # polls every 15 s (the default); commands get the default 64 fan-out threads
        self.rig.write_configs(poll_interval=15.0, ssh={"request_timeout": 60})
        self.sim: subprocess.Popen[bytes] | None = None

    # -- setup -------------------------------------------------------------------------------

    def start_sim(self) -> None:
        ready = self.work / "sim.ready"
        with open(self.work / "sim.log", "ab") as log:
            self.sim = self.lab.popen(self.lab.mgmt_ns, [
                sys.executable, "-m", "drawbridge_lab.simagents", "--count", str(self.n),
                "--port", str(SIM_PORT), "--host-key", str(self.host_key),
                "--authorized-keys", str(self.work / "authorized_keys"),
                "--journal", str(self.journal), "--apply-ms", str(self.apply_ms),
                "--ready", str(ready)], stdout=log, stderr=log)
        wait_for(ready.exists, 30, "the simulated gateways")

    def inventory(self) -> None:
        """1,000 `gateway add`s on the controller host (in-process, like the CLI's API
        call but without 1,000 CLI starts); groups n10, n100 for the smaller sizes."""
        from controller.auth import Principal, Role
        from controller.config import load_config
        from controller.service import Controller

        ctl = Controller(load_config(self.rig.replicas[0].config)).open()  # no leases
        admin = Principal(user="bench", role=Role.admin, token_id="-")
        fp = fingerprint(self.host_key.with_suffix(".pub"))
        try:
            for i in range(self.n):
                groups = ["sim"] + [f"n{k}" for k in (10, 100) if i < k]
                ctl.add_gateway(admin, name=name(i), address=f"{address(i)}:{SIM_PORT}",
                                user="root", key_path=str(self.key), host_key=fp,
                                trust_on_first_use=False, groups=groups, reason="benchmark",
                                ticket=None)
        finally:
            ctl.close()

    def reachable(self, since: float = 0.0) -> int:
        rows = self.rig.query("SELECT count(*) AS n FROM gateway_state WHERE reachable AND "
                              "last_contact_at > :t", t=since)
        return int(rows[0].n)

    def settle(self) -> None:
        time.sleep(3)  # let start-up garbage and thread pools settle before reading /proc

    # -- measurements --------------------------------------------------------------------------

    def isolate_round(self, via: int, targets: list[str]) -> tuple[float, float]:
        """Wall time of the CLI and the controller's own duration, all verified; then
        restore (not timed)."""
        t0 = time.perf_counter()
        res = self.rig.cli_json(via, "isolate", *targets, "--reason", "bench", timeout=900)
        wall = time.perf_counter() - t0
        bad = [r for r in res["results"] if r["outcome"] != "verified"]
        want = self.n if targets == ["--all"] else None
        if bad or (want is not None and len(res["results"]) != want):
            raise RuntimeError(f"isolate: {len(bad)} not verified: {bad[:3]}")
        back = self.rig.cli_json(via, "restore", *targets, "--reason", "bench", timeout=900)
        if not back["ok"]:
            raise RuntimeError("restore failed")
        return wall, float(res["duration_seconds"])

    def rounds(self, via: int, targets: list[str], rounds: int) -> dict[str, list[float]]:
        self.isolate_round(via, targets)  # warm-up
        walls, inside = [], []
        for _ in range(rounds):
            w, c = self.isolate_round(via, targets)
            walls.append(w)
            inside.append(c)
        return {"wall": walls, "controller": inside}

    def applied_twice(self) -> int:
        lines = self.journal.read_text().splitlines() if self.journal.exists() else []
        counts = Counter((ln.split()[0], ln.split()[1]) for ln in lines if ln.strip())
        return sum(1 for c in counts.values() if c > 1)

    def applied_total(self) -> int:
        return len(self.journal.read_text().splitlines()) if self.journal.exists() else 0

    # -- the phases ---------------------------------------------------------------------------

    def run(self, rounds: int) -> dict[str, Any]:
        out: dict[str, Any] = {"n": self.n, "apply_ms": self.apply_ms}
        rig = self.rig
        self.start_sim()
        rig.make_tokens()
        rig.start(0)
        self.settle()
        out["empty"] = rig.proc_status(0)
        t0 = time.monotonic()
        self.inventory()
        out["inventory_seconds"] = time.monotonic() - t0
        t0 = time.monotonic()
        wait_for(lambda: self.reachable() == self.n, 600, "one controller to reach all")
        out["one_connect_seconds"] = time.monotonic() - t0
        print(f"  one controller: {self.n} sessions in {out['one_connect_seconds']:.1f}s",
              file=sys.stderr)
        self.settle()
        out["one_status"] = rig.proc_status(0)
        out["one"] = self.rounds(0, ["--all"], rounds)
        out["one_sizes"] = {str(k): self.rounds(0, ["--group", f"n{k}"], rounds)
                            for k in (10, 100) if k < self.n}
        out["one_status_after"] = rig.proc_status(0)
        print(f"  one controller: isolate --all {median(out['one']['wall']):.2f}s",
              file=sys.stderr)

        # two replicas: b joins, a gives back half
        mark = time.time()
        rig.start(1)
        t0 = time.monotonic()
        wait_for(lambda: len(rig.held_by("replica-b")) >= self.n // 2 - 1, 120,
                 "the leases to split")
        out["split_seconds"] = time.monotonic() - t0
        # every gateway answered after b started: a's at its next poll, b's on taking them
        wait_for(lambda: self.reachable(mark) == self.n, 600, "both to reach all")
        self.settle()
        out["two_status"] = [rig.proc_status(0), rig.proc_status(1)]
        out["two_held"] = [len(rig.held_by("replica-a")), len(rig.held_by("replica-b"))]
        out["two_via_a"] = self.rounds(0, ["--all"], rounds)
        out["two_via_b"] = self.rounds(1, ["--all"], rounds)
        print(f"  two replicas: isolate --all {median(out['two_via_a']['wall']):.2f}s (via a),"
              f" {median(out['two_via_b']['wall']):.2f}s (via b)", file=sys.stderr)

        # takeover: SIGKILL b, send isolate --all to a at once
        theirs = rig.held_by("replica-b")
        out["killed_held"] = len(theirs)
        env = [f"DRAWBRIDGE_URL={rig.replicas[0].url}", f"DRAWBRIDGE_TOKEN={rig.tokens['admin']}"]
        killed = time.time()
        t0 = time.monotonic()
        rig.kill(1)
        cli = self.lab.popen(self.lab.mgmt_ns, ["env", *env, str(Path(sys.executable).parent /
                                                                 "drawbridge"),
                                                "isolate", "--all", "--reason", "after kill",
                                                "--json"], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL)
        leases = sessions = None
        while leases is None or sessions is None:
            now = time.monotonic() - t0
            if now > 120:
                raise RuntimeError("no takeover within 120 s")
            if leases is None and set(rig.held_by("replica-a")) >= set(theirs):
                leases = now
            if sessions is None and self.reachable(killed) >= self.n:
                sessions = now
            time.sleep(0.1)
        stdout, _ = cli.communicate(timeout=600)
        isolate_done = time.monotonic() - t0
        res = json.loads(stdout)
        if not res["ok"]:
            raise RuntimeError(f"isolate after the kill: {res['counts']}")
        out["takeover"] = {"leases": leases, "sessions": sessions,
                           "isolate_all": isolate_done}
        self.rig.cli_json(0, "restore", "--all", "--reason", "bench", timeout=900)
        verify = self.rig.cli_json(0, "audit", "verify", timeout=600)
        out["audit_ok"] = bool(verify["ok"])
        out["applied_total"] = self.applied_total()
        out["applied_twice"] = self.applied_twice()
        print(f"  takeover of {len(theirs)}: leases {leases:.1f}s, sessions {sessions:.1f}s, "
              f"isolate --all {isolate_done:.1f}s", file=sys.stderr)
        return out

    def ansible(self, sizes: list[int]) -> dict[str, dict[str, float]]:
        """`ansible -m raw` against the same simulated gateways (each exec waits
        --apply-ms and exits 0, like an nft apply)."""
        inv = self.work / "ansible.ini"
        inv.write_text("[sim]\n" + "".join(f"{name(i)} ansible_host={address(i)}\n"
                                           for i in range(self.n)))
        control = self.work / "cp"
        control.mkdir(exist_ok=True)
        env = ["ANSIBLE_HOST_KEY_CHECKING=False", "ANSIBLE_REMOTE_USER=root",
               f"ANSIBLE_PRIVATE_KEY_FILE={self.key}",
               f"ANSIBLE_SSH_CONTROL_PATH_DIR={control}",
               "ANSIBLE_SSH_ARGS=-o ControlMaster=auto -o ControlPersist=120s "
               "-o UserKnownHostsFile=/dev/null -o StrictHostKeyChecking=no",
               f"ANSIBLE_LOCAL_TEMP={self.work / 'atmp'}", "ANSIBLE_NOCOLOR=True",
               "ANSIBLE_DEPRECATION_WARNINGS=False", "ANSIBLE_LOCALHOST_WARNING=False",
               f"HOME={self.work}"]
        out: dict[str, dict[str, float]] = {}
        for size in sizes:
            forks = min(size, 50)
            argv = ["env", *env, "ansible", f"sim[0:{size - 1}]", "-i", str(inv), "-f",
                    str(forks), "-e", f"ansible_port={SIM_PORT}", "-m", "ansible.builtin.raw",
                    "-a", "nft -f /etc/drawbridge/isolate.nft", "-o"]
            runs = []
            for _ in range(2):  # first run opens the ssh masters; the second reuses them
                t0 = time.perf_counter()
                proc = self.lab.run(self.lab.mgmt_ns, argv, check=False, timeout=3600)
                runs.append(time.perf_counter() - t0)
                ok = len(re.findall(r"\| CHANGED \|", proc.stdout))
                if ok != size:
                    raise RuntimeError(f"ansible: {ok}/{size} ok: {proc.stdout[-2000:]}"
                                       f"{proc.stderr[-2000:]}")
            out[str(size)] = {"cold": runs[0], "warm": runs[1], "forks": forks}
            print(f"  ansible -m raw N={size}: {runs[0]:.1f}s cold, {runs[1]:.1f}s warm",
                  file=sys.stderr)
            self.stop_masters(control)
        return out

    @staticmethod
    def stop_masters(control: Path) -> None:
        marker = str(control)
        for pid_dir in Path("/proc").iterdir():
            if not pid_dir.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                cmdline = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                if marker in cmdline and cmdline.startswith("ssh"):
                    os.kill(int(pid_dir.name), 15)

    def stop(self) -> None:
        self.rig.stop_all()
        if self.sim is not None and self.sim.poll() is None:
            self.sim.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.sim.wait(10)


# -- report --------------------------------------------------------------------------------


def per_gateway(status: dict[str, int], empty: dict[str, int], n: int) -> tuple[float, float]:
    """kB of resident memory and threads per gateway, over the empty controller."""
    return ((status["VmRSS"] - empty["VmRSS"]) / n, (status["Threads"] - empty["Threads"]) / n)


def render(r: dict[str, Any], rounds: int) -> str:
    today = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    n, e = r["n"], r["empty"]
    one_kb, one_thr = per_gateway(r["one_status"], e, n)
    two = r["two_status"]
    lines = [
        SECTION, "",
        f"`.venv/bin/python -m bench.replicas` on {today}; {machine()}; "
        "controller replicas on PostgreSQL, lease TTL 6 s, renewed every 2 s. "
        + ("1-min load average {:.1f} before the run, {:.1f} at its end (the run's own "
           "1,000 sessions and Ansible's forks load these 2 CPUs).".format(*r["load"])
           if "load" in r else ""),
        "",
        f"{n} simulated gateways (`drawbridge_lab.simagents`): one process, one real SSH "
        "server (asyncssh) answering every gateway's address like `drawbridge-agent rpc` "
        f"(request ids answered once, a change takes {r['apply_ms']:g} ms). Unlike real "
        "gateways: no nftables and no probes (every change is \"verified\"), one host key, "
        "state in memory, loopback instead of a network, and the gateways' SSH work shares "
        "this machine's 2 CPUs with the controllers, PostgreSQL and the CLI. Controllers: "
        "real `drawbridge-controller serve` processes on a throwaway PostgreSQL, default "
        "settings (64 fan-out threads, polls every 15 s); the CLI the real `drawbridge`. "
        f"Median of {rounds} rounds after a warm-up; each round is verified on every "
        "gateway (and restored, untimed).",
        "",
        "| | one controller | two replicas |",
        "|---|---|---|",
        f"| gateways held | {n} | {r['two_held'][0]} + {r['two_held'][1]} |",
        f"| resident memory (RSS) | {r['one_status']['VmRSS'] / 1024:.0f} MiB "
        f"(empty inventory: {e['VmRSS'] / 1024:.0f} MiB) | "
        f"{two[0]['VmRSS'] / 1024:.0f} + {two[1]['VmRSS'] / 1024:.0f} MiB |",
        f"| memory per gateway | {one_kb:.0f} kB | "
        f"{per_gateway(two[1], e, r['two_held'][1])[0]:.0f} kB (b; a keeps what it "
        "grew to while it held all) |",
        f"| threads | {r['one_status']['Threads']} (empty: {e['Threads']}) | "
        f"{two[0]['Threads']} + {two[1]['Threads']} |",
        f"| threads per gateway | {one_thr:.2f} | "
        f"{per_gateway(two[1], e, r['two_held'][1])[1]:.2f} (b) |",
        f"| all sessions up after start | {r['one_connect_seconds']:.1f} s | "
        f"leases split in {r['split_seconds']:.1f} s |",
        f"| `drawbridge isolate --all`, CLI wall time | {median(r['one']['wall']):.2f} s | "
        f"{median(r['two_via_a']['wall']):.2f} s (via a), "
        f"{median(r['two_via_b']['wall']):.2f} s (via b) |",
        f"| of which the controller (accept to last result) | "
        f"{median(r['one']['controller']):.2f} s | "
        f"{median(r['two_via_a']['controller']):.2f} s, "
        f"{median(r['two_via_b']['controller']):.2f} s |",
        "",
        f"Takeover: replica b (holding {r['killed_held']} gateways) SIGKILLed; at the same "
        "moment `drawbridge isolate --all` sent to replica a:",
        "",
        f"- every lease of b held by a after {r['takeover']['leases']:.1f} s "
        "(bound: TTL + renew interval = 8 s);",
        f"- every gateway answered a's session after {r['takeover']['sessions']:.1f} s "
        "(the SSH handshakes, Python on both ends on 2 CPUs, are the bound here);",
        f"- the `isolate --all` finished, all {n} verified, after "
        f"{r['takeover']['isolate_all']:.1f} s;",
        f"- audit chain verified: {'yes' if r['audit_ok'] else 'NO'}; changes applied: "
        f"{r['applied_total']}, a command applied twice on a gateway: "
        f"{r['applied_twice']} times.",
        "",
        "Side by side with Ansible (`ansible -m raw -a 'nft -f ...'` on the same simulated "
        "gateways: its fastest mode, no Python on the target, ssh ControlPersist; forks = "
        "min(N, 50); \"warm\" reuses the ssh masters of the first run) and Drawbridge "
        "(one controller, `isolate --group` of the same N, CLI wall time):",
        "",
        "| N | drawbridge | Ansible raw, first run | Ansible raw, warm | speed-up (warm) |",
        "|---|---|---|---|---|",
    ]
    ours = {k: median(v["wall"]) for k, v in r["one_sizes"].items()}
    ours[str(n)] = median(r["one"]["wall"])
    for size, a in r.get("ansible", {}).items():
        d = ours.get(size)
        lines.append(f"| {size} | {d:.2f} s | {a['cold']:.1f} s | {a['warm']:.1f} s | "
                     f"{a['warm'] / d:.1f}x |" if d else
                     f"| {size} | | {a['cold']:.1f} s | {a['warm']:.1f} s | |")
    lines += [
        "",
        "How to read it: one paramiko transport thread per session is the controller's "
        "cost per gateway (about 100 kB and one thread); replicas share the fleet's "
        "sessions and the failover, not this machine's 2 CPUs, so two replicas on one "
        "box are no faster than one (on two hosts each would carry half). At small N the "
        "CLI's own start (Python imports, `ip netns exec`: about 1 s) and a controller "
        "busy with 1,000 sessions and their polls dominate; Ansible's cost grows with "
        "every host (an ssh process and a fork each).",
        ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gateways", type=int, default=1000)
    ap.add_argument("--ansible-sizes", default="10,100,1000",
                    type=lambda s: [int(x) for x in s.split(",") if x])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--apply-ms", type=float, default=20.0)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--render", type=Path, help="only rewrite the section from this JSON")
    args = ap.parse_args(argv)
    if args.render:
        text = render(json.loads(args.render.read_text()), args.rounds)
        print(text)
        if not args.no_write:
            write_section(SECTION, text.removeprefix(SECTION))
        return
    if os.geteuid() != 0:
        sys.exit("needs root (namespaces)")
    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    try:
        with PostgresServer.start() as pg, Lab.create(gateways=1, services=False) as lab:
            bench = Bench(lab, work, pg, args.gateways, args.apply_ms)
            try:
                try:
                    result = bench.run(args.rounds)
                except Exception:
                    for r in bench.rig.replicas:
                        print(f"--- {r.replica_id}\n{r.log_text()[-4000:]}", file=sys.stderr)
                    raise
                if args.json:
                    args.json.write_text(json.dumps(result, indent=2))
                sizes = [s for s in args.ansible_sizes if s <= args.gateways]
                if sizes and shutil.which("ansible"):
                    result["ansible"] = bench.ansible(sizes)
                if args.json:
                    args.json.write_text(json.dumps(result, indent=2))
            finally:
                bench.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["load"] = [load_before, os.getloadavg()[0]]
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    text = render(result, args.rounds)
    print(text)
    if not args.no_write:
        write_section(SECTION, text.removeprefix(SECTION))


if __name__ == "__main__":
    main()
