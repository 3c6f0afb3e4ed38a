"""A rebooted isolated gateway forwards nothing the isolation forbids, from the first packet.

The reboot is simulated where it matters: the kernel forgets our table and the
gateway's links are down; the boot path runs (as its unit would, before
network-pre.target), then the links come up while packets flow at the gateway
from the outside and the inside. A control run without the boot path shows the
window it closes (so this test can fail).
"""

from __future__ import annotations

import subprocess
import time

import pytest

from drawbridge_lab.wire import blast, listening
from tests.lab.agent_rig import AGENT, AgentRig
from tests.lab.attacks import Catalog

pytestmark = pytest.mark.lab


def _reboot_window(rig: AgentRig, *, boot: bool) -> tuple[set[str], set[str], str]:
    """Kernel table gone, links down; traffic starts; [boot path]; links come up.
    Returns the markers that arrived inside and outside, and the boot path's output."""
    lab, gw = rig.lab, rig.gw
    links = [gw.inside_if, gw.inside2_if, gw.outside_if, gw.mgmt_if]
    rig.nft("delete", "table", "inet", "drawbridge")
    for link in links:
        lab.run(gw.ns, ["ip", "link", "set", link, "down"])
    cat = Catalog(lab, gw, 4)
    cat.add("outside to inside", lab.outside_ns, gw.internal_ns,
            cat.udp(lab.outside_addr4, gw.internal_host4, 40000, 5353))
    cat.add("inside to outside", gw.internal_ns, lab.outside_ns,
            cat.udp(gw.internal_host4, lab.outside_addr4, 40001, 53))
    output = ""
    with listening(lab, [gw.internal_ns, lab.outside_ns]) as arrived:
        senders = [blast(lab, c.src_ns, c.packets, 6.0) for c in cat.cases]
        time.sleep(0.5)  # the traffic is already there when the links come up
        if boot:
            proc = lab.run(gw.ns, [AGENT, "-c", str(rig.config_path), "boot"], check=False)
            output = proc.stdout + proc.stderr
            assert proc.returncode == 0, output
        for link in links:
            lab.run(gw.ns, ["ip", "link", "set", link, "up"])
        # routes through a link that went down are gone: the boot's network config
        # would put them back, with the isolation already in force
        lab.run(gw.ns, ["ip", "route", "replace", "default", "via", lab.outside_addr4])
        time.sleep(2.0)
        for sender in senders:
            sender.wait(10)
    inside, outside = (arrived[gw.internal_ns], arrived[lab.outside_ns])
    return ({m for m in inside if m == cat.cases[0].marker},
            {m for m in outside if m == cat.cases[1].marker}, output)


def test_a_rebooted_isolated_gateway_forwards_nothing_from_the_first_packet(
        rig: AgentRig) -> None:
    rig.cli("isolate", "--profile", "internet", "--reason", "precaution")
    # control: without the boot path the links come up into an open gateway
    inside, outside, _ = _reboot_window(rig, boot=False)
    assert inside and outside, "the control found no open window: the test proves nothing"

    rig.cli("isolate", "--profile", "internet", "--reason", "precaution again")
    inside, outside, output = _reboot_window(rig, boot=True)
    assert not inside and not outside, "a packet crossed during the reboot"
    assert "from the saved ruleset" in output, output
    # and what the isolation keeps open works at once
    assert rig.lab.tcp_ok(rig.lab.mgmt_ns, rig.gw.mgmt_addr4, 22)
    assert rig.lab.udp_ok(rig.gw.internal_ns, rig.gw.inside_addr4, 5353)
    assert rig.status()["in_sync"]


def test_the_boot_path_without_a_usable_config_still_closes(rig: AgentRig) -> None:
    rig.cli("isolate", "--profile", "casefiles", "--reason", "stage 1")
    rig.nft("delete", "table", "inet", "drawbridge")
    good = rig.config_path.read_text()
    # the config changed since the last apply: the boot compiles it (slow path)
    rig.config_path.write_text(good + "\n# an edit\n")
    proc = rig.lab.run(rig.gw.ns, [AGENT, "-c", str(rig.config_path), "boot"], check=False)
    assert proc.returncode == 0 and "from the config" in proc.stderr, proc.stderr
    assert rig.has_table() and rig.status()["in_sync"]
    # the config is broken: the last saved ruleset, closed, without exceptions
    rig.nft("delete", "table", "inet", "drawbridge")
    rig.config_path.write_text(good.replace("internal_networks", "internal_netwerks"))
    proc = rig.lab.run(rig.gw.ns, [AGENT, "-c", str(rig.config_path), "boot"], check=False)
    assert proc.returncode == 1 and "last saved ruleset" in proc.stderr, proc.stderr
    assert rig.has_table()
    assert not rig.lab.tcp_ok(rig.gw.internal_ns, rig.lab.outside_addr4, 80)
    # broken config and nothing saved: everything forwarded is dropped
    rig.nft("delete", "table", "inet", "drawbridge")
    (rig.state_dir / "boot.nft").unlink()
    proc = rig.lab.run(rig.gw.ns, [AGENT, "-c", str(rig.config_path), "boot"], check=False)
    assert proc.returncode == 1 and "everything forwarded is dropped" in proc.stderr
    assert not rig.lab.tcp_ok(rig.gw.internal_ns, rig.lab.outside_addr4, 443)


def test_an_open_gateway_boots_open(rig: AgentRig) -> None:
    proc = subprocess.run(["ip", "netns", "exec", rig.gw.ns, AGENT, "-c",
                           str(rig.config_path), "boot"], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0 and "open" in proc.stderr
    assert not rig.has_table()
