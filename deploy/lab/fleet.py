"""A Drawbridge fleet in the namespace lab: per gateway an agent daemon and an sshd whose
authorized_keys restricts the controller's key to the agent's forced command; a
controller (`drawbridge-controller serve`) and the engineer CLI in the management
namespace. Used by the demo, the controller lab tests and bench/fleet.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drawbridge_lab import Lab
from drawbridge_lab.agentconf import agent_toml
from drawbridge_lab.topology import Gateway

BIN = Path(sys.executable).parent
AGENT = str(BIN / "drawbridge-agent")
CONTROLLER = str(BIN / "drawbridge-controller")
CLI = str(BIN / "drawbridge")
API_URL = "http://127.0.0.1:8630"
OUTSIDE_PORT = 443
CASEFILES_PORT = 80


def keygen(path: Path, comment: str = "drawbridge-lab") -> Path:
    """A fresh ed25519 key pair (path and path.pub)."""
    for p in (path, path.with_suffix(".pub")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment,
                    "-f", str(path)], check=True)
    return path


def fingerprint(pub: Path) -> str:
    out = subprocess.run(["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True,
                         check=True).stdout
    return out.split()[1]


METRICS_PORT = 9630


def agent_config(gw: Gateway, lab: Lab, state_dir: Path, *, probes: bool,
                 reconcile_interval: float, metrics: bool = False) -> str:
    # metrics: on the management address, scraped from the management network
    listen = f"{gw.mgmt_addr4}:{METRICS_PORT}" if metrics else None
    text = agent_toml(lab, gw, state_dir, reconcile_interval=reconcile_interval,
                      mgmt_ports=(22, METRICS_PORT) if metrics else (22,),
                      metrics_listen=listen) + f"""
# case files come back first: their service (tcp/80 at the outside host) reopens while
# the probe keeps proving that the rest of the outside (tcp/443) stays cut
[profiles.casefiles]
allow = [{{ cidr = "{lab.outside_addr4}/32", proto = "tcp", ports = [{CASEFILES_PORT}] }}]
"""
    if probes:
        text += f"""
[[probes]]
name = "outside-web"
type = "tcp-syn"
target = "{lab.outside_addr4}:{OUTSIDE_PORT}"
timeout = 0.5
expect = {{ open = "reachable", isolated = "unreachable" }}
"""
    return text


@dataclass
class GatewayRig:
    gw: Gateway
    dir: Path
    agent: subprocess.Popen[bytes] | None = None
    sshd: subprocess.Popen[bytes] | None = None
    host_key: Path = field(init=False)
    # > 0: the forced command answers `status` this many seconds late (drawbridge_lab.slowrpc)
    status_delay: float = 0.0

    def __post_init__(self) -> None:
        self.host_key = self.dir / "ssh_host_ed25519_key"

    @property
    def config(self) -> Path:
        return self.dir / "agent.toml"

    @property
    def state_dir(self) -> Path:
        return self.dir / "state"

    @property
    def status_log(self) -> Path:
        return self.dir / "status.log"


class FleetRig:
    def __init__(self, lab: Lab, workdir: Path, *, probes: bool = True,
                 reconcile_interval: float = 2.0, ansible_key: bool = False,
                 metrics: bool = False) -> None:
        self.lab = lab
        self.metrics = metrics
        self.workdir = workdir
        self.probes = probes
        self.reconcile_interval = reconcile_interval
        self.gateways = [GatewayRig(gw, workdir / gw.name) for gw in lab.gateways]
        self.key = keygen(workdir / "controller_key", "drawbridge-controller")
        self.ansible_key = keygen(workdir / "ansible_key", "bench-ansible") \
            if ansible_key else None
        self.controller: subprocess.Popen[bytes] | None = None
        self.controller_dir = workdir / "controller"
        self.tokens: dict[str, str] = {}
        self.database_url = ""  # empty: SQLite in the controller's state dir

    # -- gateways ---------------------------------------------------------------------------

    def authorized_keys(self, rig: GatewayRig) -> str:
        pub = self.key.with_suffix(".pub").read_text().strip()
        command = f"{AGENT} -c {rig.config} rpc"
        if rig.status_delay:
            command = (f"{sys.executable} -m drawbridge_lab.slowrpc --delay {rig.status_delay} "
                       f"--log {rig.status_log} -- {command}")
        lines = [f'restrict,command="{command}" {pub}']
        if self.ansible_key is not None:  # the benchmark's unrestricted comparison key
            lines.append(self.ansible_key.with_suffix(".pub").read_text().strip())
        return "\n".join(lines) + "\n"

    def prepare(self, rig: GatewayRig) -> None:
        rig.dir.mkdir(parents=True, exist_ok=True)
        rig.config.write_text(agent_config(rig.gw, self.lab, rig.state_dir, probes=self.probes,
                                           reconcile_interval=self.reconcile_interval,
                                           metrics=self.metrics))
        (rig.dir / "authorized_keys").write_text(self.authorized_keys(rig))
        keygen(rig.host_key, f"{rig.gw.name}-host")

    def start_agent(self, rig: GatewayRig) -> None:
        with open(rig.dir / "agent.log", "ab") as log:
            rig.agent = self.lab.popen(rig.gw.ns, [AGENT, "-c", str(rig.config), "run"],
                                       stdout=log, stderr=log)

    def start_sshd(self, rig: GatewayRig) -> None:
        rig.sshd = self.lab.start_sshd(
            rig.gw.ns, rig.gw.mgmt_addr4, 22, host_key_path=rig.host_key,
            authorized_keys_path=rig.dir / "authorized_keys", workdir=rig.dir / "sshd")

    def cut_mgmt_link(self, rig: GatewayRig, *, up: bool = False) -> None:
        """Take the gateway's management interface down (or up again), inside its own
        namespace: like a pulled cable, no RST, no FIN; the host is not touched."""
        self.lab.run(rig.gw.ns, ["ip", "link", "set", "dev", rig.gw.mgmt_if,
                                 "up" if up else "down"])

    def stop_sshd(self, rig: GatewayRig) -> None:
        """Like the gateway's sshd going away: the listener and its open sessions."""
        if rig.sshd is None:
            return
        pid = rig.sshd.pid
        children = _descendants(pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)
        rig.sshd.wait(10)
        rig.sshd = None

    def start(self, *, parallel: int = 8) -> None:
        """Keys, configs, agents and sshds for every gateway; wait for the agents."""
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            list(pool.map(self.prepare, self.gateways))
            # sshd first: the agents' start-up (Python imports) loads the machine, and
            # start_sshd gives each sshd a few seconds to greet
            list(pool.map(self.start_sshd, self.gateways))
        for rig in self.gateways:
            self.start_agent(rig)
        deadline = time.monotonic() + 60
        for rig in self.gateways:
            while not (rig.state_dir / "agent.sock").exists():
                if time.monotonic() > deadline:
                    raise AssertionError(f"agent on {rig.gw.name} did not start: "
                                         + (rig.dir / "agent.log").read_text()[-2000:])
                time.sleep(0.05)

    # -- controller -------------------------------------------------------------------------

    @property
    def controller_config(self) -> Path:
        return self.controller_dir / "controller.toml"

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.controller_dir / 'state' / 'controller.db'}"

    def write_controller_config(self, *, poll_interval: float = 2.0,
                                parallelism: int = 64, poll: bool = True,
                                database_url: str = "",
                                ssh: dict[str, float | int | str] | None = None,
                                extra_toml: str = "") -> None:
        """`database_url`: e.g. a drawbridge_lab.postgres server's (default SQLite);
        `ssh`: keys of the [ssh] table to set or override; `extra_toml`: more tables
        (e.g. "[plans]\nprobe_interval_seconds = 1")."""
        self.controller_dir.mkdir(parents=True, exist_ok=True)
        self.database_url = database_url
        ssh_keys = {"connect_timeout": 5, "request_timeout": 120, "backoff_initial": 0.5,
                    "backoff_max": 2, **(ssh or {})}
        ssh_table = "\n".join(f"{k} = {json.dumps(v)}" for k, v in ssh_keys.items())
        self.controller_config.write_text(f"""
state_dir = "{self.controller_dir / 'state'}"
database_url = "{database_url}"
log_level = "info"

[api]
listen = "127.0.0.1:8630"

# request_timeout is generous: in the lab every gateway's agent process starts on the
# same two CPUs
[ssh]
{ssh_table}

[fleet]
parallelism = {parallelism}

[poll]
enabled = {"true" if poll else "false"}
interval_seconds = {poll_interval}
{extra_toml}
""")

    def server_cli(self, *args: str) -> str:
        proc = subprocess.run([CONTROLLER, "-c", str(self.controller_config), *args],
                              capture_output=True, text=True, check=True, timeout=60)
        return proc.stdout.strip()

    def make_tokens(self) -> None:
        """The admin token the documented way (on the host); the others in-process."""
        from controller.auth import Role
        from controller.config import load_config
        from controller.service import Controller

        self.tokens["admin"] = self.server_cli("token", "create", "--user", "admin-lab",
                                               "--role", "admin")
        ctl = Controller(load_config(self.controller_config)).open()
        try:
            for role in (Role.viewer, Role.operator):
                self.tokens[role.name] = ctl.create_token(
                    user=f"{role.name}-lab", role=role, created_by="lab", reason="lab tokens")
        finally:
            ctl.close()

    def start_controller(self, timeout: float = 30.0) -> None:
        with open(self.controller_dir / "controller.log", "ab") as log:
            self.controller = self.lab.popen(
                self.lab.mgmt_ns, [CONTROLLER, "-c", str(self.controller_config), "serve"],
                stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.controller.poll() is not None:
                raise AssertionError("controller exited: " + self.controller_log()[-3000:])
            probe = self.lab.run(self.lab.mgmt_ns, [
                sys.executable, "-I", "-S", "-c",
                "import urllib.request,sys;"
                f"urllib.request.urlopen('{API_URL}/v1/health', timeout=1)"], check=False)
            if probe.returncode == 0:
                return
            time.sleep(0.2)
        raise AssertionError("controller did not answer: " + self.controller_log()[-3000:])

    def stop_controller(self) -> None:
        if self.controller is not None and self.controller.poll() is None:
            os.killpg(self.controller.pid, signal.SIGTERM)
            try:
                self.controller.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.controller.pid, signal.SIGKILL)
                self.controller.wait(5)
        self.controller = None

    def kill_controller(self) -> None:
        """SIGKILL the controller: no clean stop (like a crash, or a power cut of its
        process); the next start_controller() finds what it left."""
        if self.controller is not None and self.controller.poll() is None:
            os.killpg(self.controller.pid, signal.SIGKILL)
            self.controller.wait(10)
        self.controller = None

    def controller_log(self) -> str:
        path = self.controller_dir / "controller.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def cli(self, *args: str, role: str | None = "admin",
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = [f"DRAWBRIDGE_URL={API_URL}", "COLUMNS=250"]
        if role is not None:
            env.append(f"DRAWBRIDGE_TOKEN={self.tokens[role]}")
        return self.lab.run(self.lab.mgmt_ns, ["env", *env, CLI, *args], check=False,
                            timeout=timeout)

    def cli_json(self, *args: str, role: str = "admin") -> Any:
        proc = self.cli(*args, "--json", role=role)
        try:
            return json.loads(proc.stdout)
        except json.JSONDecodeError:
            raise AssertionError(f"drawbridge {' '.join(args)} exited {proc.returncode}: "
                                 f"{proc.stdout}\n{proc.stderr}") from None

    def add_gateways(self, rigs: Sequence[GatewayRig] | None = None) -> None:
        for rig in rigs or self.gateways:
            proc = self.cli("gateway", "add", rig.gw.name, "--address", rig.gw.mgmt_addr4,
                            "--user", "root", "--key", str(self.key), "--host-key",
                            fingerprint(rig.host_key.with_suffix(".pub")), "--group",
                            "lab", "--reason", "lab fleet")
            assert proc.returncode == 0, proc.stdout + proc.stderr

    def stop(self) -> None:
        self.stop_controller()
        for rig in self.gateways:
            self.stop_sshd(rig)
            if rig.agent is not None and rig.agent.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(rig.agent.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    rig.agent.wait(10)


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (sshd's per-connection children and their sessions)."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True,
                         check=False).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2:
            children.setdefault(int(parts[1]), []).append(int(parts[0]))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def wait_for(cond: Callable[[], bool], timeout: float, what: str, step: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
