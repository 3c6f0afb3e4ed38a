"""Commit-confirmed and config reload, with the real agent (and the real controller).

A change nobody confirms is rolled back by the agent at its deadline, never to open;
a reload takes a new config in one transaction or refuses it and keeps the old; a
reload that cuts the controller off is rolled back, and the controller gets back in.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from drawbridge_lab import Lab
from drawbridge_lab.fleet import FleetRig, GatewayRig
from tests.lab.agent_rig import AgentRig, wait_for

pytestmark = pytest.mark.lab


def journal(state_dir: Path) -> list[dict[str, Any]]:
    path = state_dir / "journal.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def outside(rig: AgentRig) -> bool:
    return rig.lab.tcp_ok(rig.gw.internal_ns, rig.lab.outside_addr4, 443)


def test_an_unconfirmed_restore_is_isolated_again_and_a_confirmed_one_stays(
        rig: AgentRig) -> None:
    rig.start_daemon()
    rig.cli("isolate", "--profile", "full", "--reason", "precaution")
    answer = json.loads(rig.cli("restore", "--reason", "try the lines", "--confirm-within",
                                "5s", "--json").stdout)
    assert answer["state"] == "open" and answer["provisional"]["back_to_profile"] == "full"
    assert outside(rig)
    wait_for(lambda: rig.status()["state"] == "isolated", 15,
             "the agent to isolate again what nobody confirmed")
    assert rig.status()["profile"] == "full" and not outside(rig)
    assert journal(rig.state_dir)[-1]["action"] == "rollback"

    rig.cli("restore", "--reason", "now for real", "--confirm-within", "5s")
    rig.cli("confirm", "--reason", "the lines work")
    time.sleep(7)
    assert rig.status()["state"] == "open" and rig.status()["provisional"] is None
    assert outside(rig)


def test_an_unconfirmed_isolate_of_an_open_gateway_stays_isolated(rig: AgentRig) -> None:
    rig.start_daemon()
    rig.cli("isolate", "--reason", "precaution", "--confirm-within", "5s")
    wait_for(lambda: rig.status()["provisional"] is None, 15, "the deadline")
    status = rig.status()
    assert status["state"] == "isolated" and "kept" in status["unconfirmed"]
    assert not outside(rig)


def test_an_unconfirmed_exception_is_revoked(rig: AgentRig) -> None:
    rig.start_daemon()
    rig.cli("isolate", "--profile", "full", "--reason", "precaution")
    rig.cli("allow", "--cidr", f"{rig.lab.outside_addr4}/32", "--proto", "tcp", "--port",
            "443", "--for", "1h", "--reason", "partner", "--confirm-within", "5s")
    assert outside(rig)
    wait_for(lambda: not rig.status()["exceptions"], 15, "the exception to be revoked")
    assert not outside(rig) and rig.status()["state"] == "isolated"


def test_a_deadline_needs_the_daemon(rig: AgentRig) -> None:
    proc = rig.cli("isolate", "--reason", "x", "--confirm-within", "60s", check=False)
    assert proc.returncode == 2 and "needs the agent daemon" in proc.stderr
    assert not rig.has_table()


def _digest(rig: AgentRig) -> str:
    return str(rig.status()["config_digest"])


def test_reload_takes_a_new_config_or_refuses_it_without_a_gap(rig: AgentRig) -> None:
    daemon = rig.start_daemon()
    rig.cli("isolate", "--profile", "casefiles", "--reason", "stage 1")
    first = _digest(rig)
    good = rig.config_path.read_text() + (
        '\n[profiles.mail]\nallow = [{ cidr = "198.51.100.25/32", proto = "tcp", '
        'ports = [25] }]\n')
    rig.config_path.write_text(good)
    assert rig.cli("config", "check").returncode == 0
    os.kill(daemon.pid, signal.SIGHUP)
    wait_for(lambda: _digest(rig) != first, 10, "the new config to be taken")
    assert [e["result"] for e in journal(rig.state_dir) if e["action"] == "reload"] == \
        ["applied"]
    rig.cli("isolate", "--profile", "mail", "--reason", "stage 2")  # the new profile exists
    second = _digest(rig)

    before = rig.rules_as_meant()
    rig.config_path.write_text(good.replace('internal_interfaces = ["inside", "inside2"]',
                                            'internal_interfaces = ["lo"]'))
    check = rig.cli("config", "check", check=False)
    assert check.returncode == 2 and "internal_interfaces" in check.stderr
    os.kill(daemon.pid, signal.SIGHUP)
    wait_for(lambda: any(e["action"] == "reload" and e["result"] == "refused"
                         for e in journal(rig.state_dir)), 10, "the reload to be refused")
    assert _digest(rig) == second and rig.rules_as_meant() == before
    assert rig.status()["profile"] == "mail" and daemon.poll() is None


# -- through the controller ---------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetRig]:
    with Lab.create(gateways=1) as lab:
        rig = FleetRig(lab, tmp_path_factory.mktemp("confirm"), probes=False,
                       reconcile_interval=0.5)
        try:
            rig.start()
            rig.write_controller_config(poll_interval=1.0)
            rig.make_tokens()
            rig.start_controller()
            rig.add_gateways()
            yield rig
        finally:
            rig.stop()


def _reachable(fleet: FleetRig) -> bool | None:
    views = fleet.cli_json("status", "--refresh", role="viewer")
    value = views[0]["reachable"]
    return None if value is None else bool(value)


def _reload(gw: GatewayRig, config: str) -> None:
    gw.config.write_text(config)
    assert gw.agent is not None
    os.kill(gw.agent.pid, signal.SIGHUP)


def test_a_reload_that_cuts_the_controller_off_is_rolled_back(fleet: FleetRig) -> None:
    gw = fleet.gateways[0]
    fleet.cli("isolate", "gw0", "--profile", "full", "--reason", "precaution",
              role="operator")
    original = gw.config.read_text()
    confirmed = original.replace("[metrics]", "[confirm]\nreload = 8\n\n[metrics]", 1)
    # a mistyped management network: the controller's SSH is cut by the reload itself
    _reload(gw, confirmed.replace('cidr = "10.99.0.0/24"', 'cidr = "10.98.0.0/24"'))
    wait_for(lambda: _reachable(fleet) is False, 20, "the controller to be cut off")
    wait_for(lambda: any(e["action"] == "rollback" for e in journal(gw.state_dir)), 30,
             "the agent to roll the unconfirmed reload back")
    wait_for(lambda: _reachable(fleet) is True, 30, "the controller to get back in")

    # a reload that keeps the controller in is confirmed by the controller, and stays
    _reload(gw, confirmed.replace("[metrics]", '[profiles.mail]\nallow = [{ cidr = '
                                  '"198.51.100.25/32", proto = "tcp", ports = [25] }]\n\n'
                                  "[metrics]", 1))
    wait_for(lambda: any(e["action"] == "confirm" and e["result"] == "confirmed"
                         for e in journal(gw.state_dir)), 30, "the controller to confirm")
    time.sleep(10)  # past the deadline
    reloads = [e for e in journal(gw.state_dir) if e["action"] in ("reload", "rollback")]
    assert reloads[-1]["action"] == "reload", reloads[-3:]
    assert fleet.cli("isolate", "gw0", "--profile", "mail", "--reason", "stage 2",
                     role="operator").returncode == 0
    fleet.cli("restore", "gw0", "--reason", "over")
