"""deploy/ansible without a gateway: the playbook parses, every role variable is declared,
defaulted and named in the example inventory, and the templates render what deploy/
documents (the unit, the sshd drop-in) and what the agent accepts (agent.toml).

The install itself runs in the lab: tests/lab/test_ansible_lab.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from agent.config import parse_config
from tests.conftest import ROOT

ANSIBLE = ROOT / "deploy" / "ansible"
ROLE = ANSIBLE / "roles" / "drawbridge_agent"
INVENTORY = ANSIBLE / "inventory.example.yml"
REQUIRED = {"drawbridge_agent_internal_networks", "drawbridge_agent_internal_interfaces",
            "drawbridge_agent_controller_key"}
VAR = re.compile(r"^\s*#?\s*(drawbridge_agent_[a-z0-9_]+):", re.M)


@pytest.fixture(scope="module", autouse=True)
def ansible_playbook() -> str:
    path = shutil.which("ansible-playbook")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("ansible-playbook is missing (make deps installs ansible-core)")
        pytest.skip("ansible-playbook not installed (make deps installs ansible-core)")
    return path


def variables(path: Path) -> set[str]:
    return set(VAR.findall(path.read_text()))


def test_playbook_syntax() -> None:
    # stdin: Ansible refuses a non-blocking one, and tests run before may have left
    # pytest's stdin so
    proc = subprocess.run(["ansible-playbook", "--syntax-check", "-i", str(INVENTORY),
                           str(ANSIBLE / "drawbridge-agent.yml")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_variable_is_declared_defaulted_and_in_the_example() -> None:
    declared = variables(ROLE / "meta" / "argument_specs.yml")
    defaulted = {v for v in variables(ROLE / "defaults" / "main.yml") if v not in REQUIRED}
    assert declared == defaulted | REQUIRED
    assert declared - variables(INVENTORY) == set()
    readme = (ANSIBLE / "README.md").read_text()
    assert "drawbridge_agent_wheelhouse" in readme and "ansible-playbook" in readme


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rendered")
    proc = subprocess.run(
        ["ansible-playbook", "-i", str(INVENTORY), "-e", f"out_dir={out}",
         str(Path(__file__).with_name("render_role_templates.yml"))],
        capture_output=True, text=True, timeout=120, check=False, stdin=subprocess.DEVNULL,
        env={**os.environ, "ANSIBLE_LOCAL_TEMP": str(out / ".tmp"), "ANSIBLE_NOCOLOR": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


@pytest.mark.parametrize("unit", ["drawbridge-agent.service", "drawbridge-agent-boot.service"])
def test_role_unit_with_defaults_is_deploy_systemd_unit(rendered: Path, unit: str) -> None:
    assert (rendered / unit).read_text() == (ROOT / "deploy" / "systemd" / unit).read_text()


def test_role_sshd_dropin_is_deploy_ssh_example(rendered: Path) -> None:
    ours = [line for line in (rendered / "sshd-drawbridge.conf").read_text().splitlines()
            if line != "# Ansible managed"]
    assert ours == (ROOT / "deploy" / "ssh" / "drawbridge.conf").read_text().splitlines()


def test_role_agent_toml_is_accepted_by_the_agent(rendered: Path) -> None:
    config = parse_config(tomllib.loads((rendered / "agent.toml").read_text()))
    assert config.gateway == "gw-ams-1"
    assert [str(n) for n in config.internal_networks] == ["10.20.0.0/16", "fd20::/48"]
    assert config.internal_interfaces == ("lan0", "vlan*")
    assert [m.interface for m in config.management] == ["mgmt0", None]
    assert [f.name for f in config.infrastructure] == ["dhcp-client", "ntp"]
    assert config.exceptions.max_seconds == 604800
    assert config.profile("casefiles").base == "internet"
    assert [p.name for p in config.probes] == ["outside-web"]
