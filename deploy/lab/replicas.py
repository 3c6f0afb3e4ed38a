"""Several controller replicas (`drawbridge-controller serve` processes) in the lab's
management namespace, on one PostgreSQL database, over a FleetRig's gateways.

Each replica has its own state dir, replica id and API port (8630, 8631, ...); they
share the database, the audit key file and the checkpoint key file, as real replicas
do. Used by the replica
lab test and bench/replicas.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from drawbridge_lab import Lab
from drawbridge_lab.fleet import CLI, CONTROLLER, FleetRig, fingerprint

BASE_PORT = 8630


@dataclass
class ReplicaProc:
    replica_id: str
    dir: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def config(self) -> Path:
        return self.dir / "controller.toml"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.dir / "controller.log"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class ReplicaRig:
    def __init__(self, lab: Lab, workdir: Path, database_url: str, *, count: int = 2,
                 fleet: FleetRig | None = None) -> None:
        """`fleet`: the lab gateways (agents, sshd) these replicas drive, if any (a
        benchmark may drive simulated ones: drawbridge_lab.simagents)."""
        if not database_url:
            raise ValueError("replicas need a PostgreSQL database_url")
        self.fleet = fleet
        self.lab = lab
        self.database_url = database_url
        base = workdir
        self.audit_key = base / "audit.key"
        self.checkpoint_key = base / "checkpoint.key"
        self.replicas = [ReplicaProc(f"replica-{chr(ord('a') + i)}", base / f"r{i}",
                                     BASE_PORT + i) for i in range(count)]
        self.tokens: dict[str, str] = {}

    def write_configs(self, *, poll_interval: float = 2.0, parallelism: int = 64,
                      extra: str = "", ssh: dict[str, Any] | None = None) -> None:
        ssh_keys = {"connect_timeout": 5, "request_timeout": 120, "backoff_initial": 0.5,
                    "backoff_max": 2, **(ssh or {})}
        ssh_table = "\n".join(f"{k} = {json.dumps(v)}" for k, v in ssh_keys.items())
        for r in self.replicas:
            r.dir.mkdir(parents=True, exist_ok=True)
            r.config.write_text(f"""
state_dir = "{r.dir / 'state'}"
database_url = "{self.database_url}"
audit_key_file = "{self.audit_key}"
replica_id = "{r.replica_id}"
log_level = "info"

[api]
listen = "127.0.0.1:{r.port}"

[ssh]
{ssh_table}

[fleet]
parallelism = {parallelism}

[poll]
interval_seconds = {poll_interval}

[audit]
checkpoint_key_file = "{self.checkpoint_key}"
{extra}
""")

    def server_cli(self, i: int, *args: str) -> str:
        proc = subprocess.run([CONTROLLER, "-c", str(self.replicas[i].config), *args],
                              capture_output=True, text=True, check=True, timeout=60)
        return proc.stdout.strip()

    def make_tokens(self) -> None:
        """Tokens the documented way (on a controller host); any replica accepts them."""
        for role in ("admin", "operator", "viewer"):
            self.tokens[role] = self.server_cli(0, "token", "create", "--user",
                                                f"{role}-lab", "--role", role)

    def start(self, i: int, timeout: float = 60.0) -> None:
        r = self.replicas[i]
        with open(r.log, "ab") as log:
            r.proc = self.lab.popen(self.lab.mgmt_ns, [CONTROLLER, "-c", str(r.config), "serve"],
                                    stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if r.proc.poll() is not None:
                raise AssertionError(f"{r.replica_id} exited: " + r.log_text()[-3000:])
            probe = self.lab.run(self.lab.mgmt_ns, [
                sys.executable, "-I", "-S", "-c",
                "import urllib.request;"
                f"urllib.request.urlopen('{r.url}/v1/health', timeout=1)"], check=False)
            if probe.returncode == 0:
                return
            time.sleep(0.2)
        raise AssertionError(f"{r.replica_id} did not answer: " + r.log_text()[-3000:])

    def start_all(self) -> None:
        for i in range(len(self.replicas)):
            self.start(i)

    def kill(self, i: int) -> None:
        """SIGKILL: no clean stop, leases left to run out."""
        r = self.replicas[i]
        if r.proc is not None and r.proc.poll() is None:
            os.killpg(r.proc.pid, signal.SIGKILL)
            r.proc.wait(10)
        r.proc = None

    def stop(self, i: int) -> None:
        r = self.replicas[i]
        if r.proc is not None and r.proc.poll() is None:
            os.killpg(r.proc.pid, signal.SIGTERM)
            try:
                r.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(r.proc.pid, signal.SIGKILL)
                r.proc.wait(5)
        r.proc = None

    def stop_all(self) -> None:
        for i in range(len(self.replicas)):
            self.stop(i)

    def proc_status(self, i: int) -> dict[str, int]:
        """The replica process's resident memory (kB) and threads, from /proc."""
        r = self.replicas[i]
        assert r.proc is not None
        out: dict[str, int] = {}
        for line in Path(f"/proc/{r.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "Threads"):
                out[key] = int(value.split()[0])
        return out

    def cli(self, i: int, *args: str, role: str = "admin",
            timeout: float = 180) -> subprocess.CompletedProcess[str]:
        env = [f"DRAWBRIDGE_URL={self.replicas[i].url}", "COLUMNS=250",
               f"DRAWBRIDGE_TOKEN={self.tokens[role]}"]
        return self.lab.run(self.lab.mgmt_ns, ["env", *env, CLI, *args], check=False,
                            timeout=timeout)

    def cli_json(self, i: int, *args: str, role: str = "admin", expect: int | None = 0,
                 timeout: float = 180) -> Any:
        proc = self.cli(i, *args, "--json", role=role, timeout=timeout)
        if expect is not None and proc.returncode != expect:
            raise AssertionError(f"drawbridge {' '.join(args)} via {self.replicas[i].replica_id}"
                                 f" exited {proc.returncode}: {proc.stdout[-3000:]}\n"
                                 f"{proc.stderr[-2000:]}")
        return json.loads(proc.stdout)

    def add_gateways(self, i: int = 0) -> None:
        assert self.fleet is not None
        for rig in self.fleet.gateways:
            proc = self.cli(i, "gateway", "add", rig.gw.name, "--address", rig.gw.mgmt_addr4,
                            "--user", "root", "--key", str(self.fleet.key), "--host-key",
                            fingerprint(rig.host_key.with_suffix(".pub")), "--group", "lab",
                            "--reason", "lab fleet")
            assert proc.returncode == 0, proc.stdout + proc.stderr

    # -- what the database says -----------------------------------------------------------

    def query(self, statement: str, **params: Any) -> list[sa.Row[Any]]:
        engine = sa.create_engine(self.database_url)
        try:
            with engine.begin() as conn:
                return list(conn.execute(sa.text(statement), params).fetchall())
        finally:
            engine.dispose()

    def owners(self) -> dict[str, str | None]:
        """gateway -> the replica holding its lease now (None: nobody)."""
        rows = self.query("SELECT gateway, owner, expires_at > EXTRACT(EPOCH FROM "
                          "clock_timestamp()) AS live FROM gateway_leases")
        return {r.gateway: (r.owner if r.live else None) for r in rows}

    def held_by(self, replica_id: str) -> list[str]:
        return sorted(g for g, o in self.owners().items() if o == replica_id)


def journal_request_ids(state_dir: Path, ops: Sequence[str] = ("isolate", "restore")
                        ) -> list[str]:
    """The request ids of a gateway's journalled changes (the agent's journal), in order."""
    path = state_dir / "journal.jsonl"
    out = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("action") in ops and entry.get("request_id"):
            out.append(str(entry["request_id"]))
    return out
