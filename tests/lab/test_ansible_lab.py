"""deploy/ansible installs the agent on a fresh lab gateway, over SSH, with ansible-playbook.

The "gateway" is a lab namespace with its own sshd; its filesystem is this machine's,
so every path of the role points into the test's temp dir, and services are left to
the test (no systemd in a namespace): it reloads sshd the way the role's handler would
(SIGHUP) and runs the agent the way the installed unit would (its ExecStart). Ansible
logs in as root from an admin address (10.99.0.20); the controller from 10.99.0.10.
Then the real controller pins the fingerprint the role printed and isolates and
restores the gateway, checked with real packets.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from drawbridge_lab import Lab
from drawbridge_lab.fleet import OUTSIDE_PORT, FleetRig, fingerprint, keygen, wait_for
from drawbridge_lab.topology import Gateway
from tests.conftest import ROOT
from tests.install.venvs import NOT_ON_A_GATEWAY, installed
from tests.install.wheelhouse import subset

pytestmark = [pytest.mark.lab, pytest.mark.timeout(600)]

PLAYBOOK = ROOT / "deploy" / "ansible" / "drawbridge-agent.yml"
ADMIN_ADDR = "10.99.0.20"  # the administrator's workstation, in the management namespace
RECAP = re.compile(r"^(?P<host>\S+)\s*:\s*ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+"
                   r"unreachable=(?P<unreachable>\d+)\s+failed=(?P<failed>\d+)", re.M)


@dataclass
class Site:
    """The test's stand-ins for the gateway's /opt, /etc and /var/lib, and its sshd."""

    lab: Lab
    gw: Gateway
    dir: Path
    fleet: FleetRig
    sshd: subprocess.Popen[bytes] | None = None
    agent: subprocess.Popen[bytes] | None = None

    def path(self, name: str) -> Path:
        return self.dir / name

    @property
    def host_key(self) -> Path:
        return self.path("ssh_host_ed25519_key")

    @property
    def admin_key(self) -> Path:
        return self.path("admin_key")


def role_vars(site: Site, wheels: Path, **overrides: Any) -> dict[str, Any]:
    lab, gw = site.lab, site.gw
    values: dict[str, Any] = {
        "drawbridge_agent_wheelhouse": str(wheels),
        "drawbridge_agent_wheelhouse_dest": str(site.path("opt/wheelhouse")),
        "drawbridge_agent_venv": str(site.path("opt/venv")),
        "drawbridge_agent_os_packages": [],
        "drawbridge_agent_config_dir": str(site.path("etc/drawbridge")),
        "drawbridge_agent_state_dir": str(site.path("var/lib/drawbridge")),
        "drawbridge_agent_units_dir": str(site.path("etc/systemd/system")),
        "drawbridge_agent_manage_services": False,
        "drawbridge_agent_gateway": gw.name,
        "drawbridge_agent_internal_networks": list(gw.internal_networks),
        "drawbridge_agent_internal_interfaces": [gw.inside_if, gw.inside2_if],
        "drawbridge_agent_management": [
            {"cidr": lab.mgmt_subnet4, "proto": "tcp", "ports": [22], "interface": gw.mgmt_if},
            {"cidr": lab.mgmt_subnet6, "proto": "tcp", "ports": [22], "interface": gw.mgmt_if},
        ],
        "drawbridge_agent_profiles": {"casefiles": {
            "description": "case files first", "base": "internet",
            "allow": [{"cidr": f"{lab.outside_addr4}/32", "proto": "tcp", "ports": [80]}]}},
        "drawbridge_agent_probes": [{
            "name": "outside-web", "type": "tcp-syn", "target": f"{lab.outside_addr4}:443",
            "timeout": 0.5, "expect": {"open": "reachable", "isolated": "unreachable"}}],
        "drawbridge_agent_metrics_listen": "127.0.0.1:9630",
        "drawbridge_agent_reconcile_interval": 2,
        "drawbridge_agent_controller_key": site.fleet.key.with_suffix(".pub").read_text().strip(),
        "drawbridge_agent_controller_from": [site.lab.mgmt_addr4],
        "drawbridge_agent_authorized_keys": str(site.path("root/.ssh/authorized_keys")),
        "drawbridge_agent_sshd_dropin_dir": str(site.path("etc/ssh/sshd_config.d")),
        "drawbridge_agent_sshd_config": str(site.path("sshd/sshd_config")),
        "drawbridge_agent_host_key": str(site.host_key),
        "drawbridge_agent_register_address": gw.mgmt_addr4,
        "drawbridge_agent_register_key_path": str(site.fleet.key),
        "drawbridge_agent_register_groups": ["lab"],
    }
    return {**values, **overrides}


def run_playbook(site: Site, wheels: Path, run: int, *, source: str = ADMIN_ADDR,
                 succeed: bool = True, **overrides: Any) -> tuple[dict[str, int], str]:
    """ansible-playbook from `source` in the management namespace: the gateway's PLAY RECAP
    and the log. `succeed`: assert that the play succeeded."""
    gw = site.gw
    host = {
        "ansible_host": gw.mgmt_addr4,
        "ansible_user": "root",
        "ansible_python_interpreter": "/usr/bin/python3",
        "ansible_ssh_private_key_file": str(site.admin_key),
        "ansible_ssh_common_args": (
            f"-o UserKnownHostsFile={site.path('known_hosts')} -o StrictHostKeyChecking=yes "
            f"-o IdentitiesOnly=yes -o BindAddress={source}"),
        **role_vars(site, wheels, **overrides),
    }
    inventory = site.path(f"inventory-{run}.json")  # JSON is YAML: the yaml plugin reads it
    inventory.write_text(json.dumps({"gateways": {"hosts": {gw.name: host}}}))
    # a fresh, short control-socket dir per run: no run reuses a connection that was
    # authenticated before sshd read the drop-in
    control_dir = tempfile.mkdtemp(prefix="dba-cp-")
    env = {
        "ANSIBLE_CONFIG": str(site.path("ansible.cfg")),
        "ANSIBLE_HOME": str(site.path("ansible-home")),
        "ANSIBLE_LOCAL_TEMP": str(site.path("ansible-local")),
        "ANSIBLE_REMOTE_TEMP": str(site.path("ansible-remote")),
        "ANSIBLE_SSH_CONTROL_PATH_DIR": control_dir,
        "ANSIBLE_SSH_ARGS": "-o ControlMaster=auto -o ControlPersist=10s",
        "ANSIBLE_PIPELINING": "true",
        "ANSIBLE_NOCOLOR": "true",
        "ANSIBLE_RETRY_FILES_ENABLED": "false",
    }
    started = time.monotonic()
    proc = site.lab.run(site.lab.mgmt_ns, [
        "env", *(f"{k}={v}" for k, v in env.items()),
        "ansible-playbook", "-i", str(inventory), str(PLAYBOOK)],
        check=False, timeout=300, input="")  # Ansible wants a blocking stdin of its own
    shutil.rmtree(control_dir, ignore_errors=True)
    log = proc.stdout + proc.stderr + f"\n[run {run}: {time.monotonic() - started:.1f} s]\n"
    site.path(f"ansible-{run}.log").write_text(log)
    recap = {m["host"]: m for m in RECAP.finditer(proc.stdout)}.get(gw.name)
    assert recap is not None, f"ansible-playbook run {run}:\n{log[-6000:]}"
    assert not succeed or proc.returncode == 0, f"ansible-playbook run {run}:\n{log[-6000:]}"
    return {k: int(v) for k, v in recap.groupdict().items() if k != "host"}, log


def reload_sshd(site: Site) -> None:
    """What the role's handler asks systemd for: sshd reads its config (and the drop-in) again."""
    assert site.sshd is not None
    os.kill(site.sshd.pid, signal.SIGHUP)
    time.sleep(0.3)  # sshd re-executes itself; then it greets again
    wait_for(lambda: site.lab.banner_ok(site.lab.mgmt_ns, site.gw.mgmt_addr4, 22, "SSH-"),
             10, "sshd after SIGHUP")


def start_agent_like_the_unit(site: Site) -> list[str]:
    unit = site.path("etc/systemd/system/drawbridge-agent.service").read_text()
    exec_start = next(line.split("=", 1)[1] for line in unit.splitlines()
                      if line.startswith("ExecStart="))
    argv = shlex.split(exec_start)
    with open(site.path("agent.log"), "ab") as log:
        site.agent = site.lab.popen(site.gw.ns, argv, stdout=log, stderr=log)
    sock = site.path("var/lib/drawbridge/agent.sock")
    wait_for(sock.exists, 60, "the agent's socket")
    return argv


def admin_ssh(site: Site, bind: str) -> subprocess.CompletedProcess[str]:
    return site.lab.run(site.lab.mgmt_ns, [
        "ssh", "-i", str(site.admin_key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
        "-o", f"UserKnownHostsFile={site.path('known_hosts')}", "-o", f"BindAddress={bind}",
        f"root@{site.gw.mgmt_addr4}", "echo", "shell"], check=False, timeout=30)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    with Lab.create(gateways=1) as lab:
        gw = lab.gateways[0]
        (tmp_path / "fleet").mkdir()
        fleet = FleetRig(lab, tmp_path / "fleet", probes=True)
        built = Site(lab, gw, tmp_path, fleet)
        try:
            # the admin workstation's address next to the controller's
            lab.run(lab.mgmt_ns, ["ip", "addr", "add", f"{ADMIN_ADDR}/24", "dev", gw.name])
            keygen(built.host_key, f"{gw.name}-host")
            keygen(built.admin_key, "admin")
            built.path("ansible.cfg").write_text("")
            host_pub = built.host_key.with_suffix(".pub").read_text().split()
            built.path("known_hosts").write_text(f"{gw.mgmt_addr4} {host_pub[0]} {host_pub[1]}\n")
            # before Drawbridge: the gateway's sshd and the administrator's own key
            keys = built.path("root/.ssh/authorized_keys")
            keys.parent.mkdir(parents=True)
            keys.write_text(built.admin_key.with_suffix(".pub").read_text())
            built.sshd = lab.start_sshd(
                gw.ns, gw.mgmt_addr4, 22, host_key_path=built.host_key,
                authorized_keys_path=keys, workdir=built.path("sshd"),
                include_dir=built.path("etc/ssh/sshd_config.d"))
            yield built
        finally:
            fleet.stop()


def test_ansible_installs_the_agent_and_the_controller_drives_it(
        site: Site, wheelhouse: Path) -> None:
    lab, gw, fleet = site.lab, site.gw, site.fleet
    wheels = site.path("wheels")
    subset(wheelhouse, ["drawbridge"], wheels)  # what a gateway gets: the agent's wheels
    assert lab.tcp_ok(gw.internal_ns, lab.outside_addr4, OUTSIDE_PORT)

    # -- Ansible logging in as root from the controller's address would lock itself out
    # with the drop-in: the role stops before it changes anything
    refused, log = run_playbook(site, wheels, 0, source=lab.mgmt_addr4, succeed=False)
    assert (refused["changed"], refused["failed"]) == (0, 1), refused
    assert "would lock itself out" in log, log[-3000:]
    assert not site.path("opt").exists() and not site.path("etc/ssh").exists()

    # -- first run: installs everything and prints the fingerprint to pin
    first, log = run_playbook(site, wheels, 1)
    assert first["failed"] == 0 and first["changed"] > 0, first
    printed = re.findall(r"host key (SHA256:[A-Za-z0-9+/]+)", log)
    assert printed and printed[0] == fingerprint(site.host_key.with_suffix(".pub")), log[-3000:]

    venv = site.path("opt/venv")
    dists = installed(venv / "bin")
    assert "drawbridge" in dists and not dists & NOT_ON_A_GATEWAY, dists
    keys = site.path("root/.ssh/authorized_keys").read_text().splitlines()
    assert keys[0] == site.admin_key.with_suffix(".pub").read_text().strip()  # kept as it was
    assert keys[1] == (
        f'restrict,from="{lab.mgmt_addr4}",command="{venv}/bin/drawbridge-agent --config '
        f'{site.path("etc/drawbridge/agent.toml")} rpc" '
        + fleet.key.with_suffix(".pub").read_text().strip())

    # -- the handler's reload; then root from the controller's address gets no shell, the
    # administrator still does (and Ansible, below)
    reload_sshd(site)
    refused_shell = admin_ssh(site, lab.mgmt_addr4)
    assert (refused_shell.returncode, refused_shell.stdout) == (255, ""), refused_shell.stderr
    # what sshd says (the client may only see the connection drop)
    assert f"ROOT LOGIN REFUSED FROM {lab.mgmt_addr4}" in site.path("sshd/sshd.log").read_text()
    assert admin_ssh(site, ADMIN_ADDR).stdout.strip() == "shell"

    argv = start_agent_like_the_unit(site)
    assert argv[0] == f"{venv}/bin/drawbridge-agent"

    # -- the controller pins the printed fingerprint, isolates and restores
    fleet.write_controller_config(poll_interval=1.0)
    fleet.make_tokens()
    fleet.start_controller()
    added = fleet.cli("gateway", "add", gw.name, "--address", gw.mgmt_addr4, "--user", "root",
                      "--key", str(fleet.key), "--host-key", printed[0], "--group", "lab",
                      "--reason", "installed with ansible")
    assert added.returncode == 0, added.stdout + added.stderr
    isolated = fleet.cli("isolate", gw.name, "--reason", "ansible lab drill")
    assert isolated.returncode == 0, isolated.stdout + isolated.stderr + fleet.controller_log()
    assert not lab.tcp_ok(gw.internal_ns, lab.outside_addr4, OUTSIDE_PORT)
    assert lab.tcp_ok(gw.internal_ns, gw.inside_addr4, 8443)  # the gateway stays reachable
    restored = fleet.cli("restore", gw.name, "--reason", "drill over")
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert lab.tcp_ok(gw.internal_ns, lab.outside_addr4, OUTSIDE_PORT)

    # -- second run, through the reloaded sshd, now also registering: nothing to do (the
    # controller already pins this very key)
    register = {"drawbridge_agent_register": True,
                "drawbridge_agent_controller_token": fleet.tokens["admin"]}
    second, _ = run_playbook(site, wheels, 2, **register)
    assert (second["changed"], second["failed"]) == (0, 0), second

    # -- a gateway the controller does not know is added with the key the role read
    removed = fleet.cli("gateway", "remove", gw.name, "--reason", "re-register with ansible")
    assert removed.returncode == 0, removed.stdout + removed.stderr
    third, _ = run_playbook(site, wheels, 3, **register)
    assert (third["changed"], third["failed"]) == (1, 0), third
    listed = fleet.cli_json("gateway", "list")
    assert [(g["name"], g["host_key"], g["groups"]) for g in listed] == \
        [(gw.name, printed[0], ["lab"])]
