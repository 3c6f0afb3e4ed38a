"""Isolation behaviour with real namespaces, nftables and agent processes."""

from __future__ import annotations

import json
import re
import signal
import time

import pytest

from tests.lab.agent_rig import AgentRig, wait_for

pytestmark = pytest.mark.lab


def test_established_sessions_stop_carrying_data(rig: AgentRig) -> None:
    lab, gw = rig.lab, rig.gw
    inbound = lab.open_stream(lab.outside_ns, gw.internal_host4, 80)
    outbound = lab.open_stream(gw.internal_ns, lab.outside_addr6, 443)
    assert inbound.roundtrip() and outbound.roundtrip()

    rig.cli("isolate", "--reason", "cut the attacker's session")
    assert not inbound.roundtrip(timeout=1.5)
    assert not outbound.roundtrip(timeout=1.5)
    # and a new connection is refused too
    assert not lab.tcp_ok(lab.outside_ns, gw.internal_host4, 80)


def test_other_tables_are_left_byte_identical(rig: AgentRig) -> None:
    admin = """
table ip admin_nat {
    chain post { type nat hook postrouting priority srcnat; policy accept;
        oifname "out0" ip saddr 10.20.0.0/16 masquerade
    }
}
table inet admin_filter {
    set blocked { type ipv4_addr; flags interval; elements = { 192.0.2.0/24 } }
    chain input { type filter hook input priority 0; policy accept;
        ip saddr @blocked counter drop comment "admin's own rule"
    }
}
"""
    rig.lab.run(rig.gw.ns, ["nft", "-f", "-"], input=admin)
    before = {
        t: rig.nft("list", "table", *t.split()) for t in ("ip admin_nat", "inet admin_filter")
    }
    rig.cli("isolate", "--profile", "full", "--reason", "drill")
    rig.cli("isolate", "--profile", "casefiles", "--reason", "stage 1")
    rig.cli("restore", "--reason", "drill over")
    after = {t: rig.nft("list", "table", *t.split()) for t in before}
    assert after == before
    assert not rig.has_table()


def test_exception_opens_exactly_its_flow_and_expires_without_any_agent(rig: AgentRig) -> None:
    lab, gw = rig.lab, rig.gw
    rig.cli("isolate", "--reason", "precaution")
    assert not lab.tcp_ok(gw.internal_ns, lab.outside_addr4, 443)

    rig.cli(
        "allow",
        "--cidr",
        f"{lab.outside_addr4}/32",
        "--proto",
        "tcp",
        "--port",
        "443",
        "--for",
        "4s",
        "--reason",
        "emergency process with chain partner",
    )
    opened_at = time.monotonic()
    assert rig.daemon is None  # break-glass CLI only: no agent process runs from here on
    assert lab.tcp_ok(gw.internal_ns, lab.outside_addr4, 443)
    assert lab.tcp_ok(gw.ns, lab.outside_addr4, 443)
    # exactly its flow: not another port, protocol, host or family
    assert not lab.tcp_ok(gw.internal_ns, lab.outside_addr4, 80)
    assert not lab.udp_ok(gw.internal_ns, lab.outside_addr4, 53)
    assert not lab.tcp_ok(gw.internal_ns, lab.outside_addr6, 443)
    assert time.monotonic() - opened_at < 4, "checks took too long to observe the open window"

    wait_for(
        lambda: not lab.tcp_ok(gw.internal_ns, lab.outside_addr4, 443, timeout=0.5),
        10,
        "the kernel to expire the exception",
    )
    assert "elements" not in rig.nft("list", "set", "inet", "drawbridge", "exc_out4")
    assert rig.has_table()  # isolation itself stays


def test_drift_is_repaired_within_one_reconcile_interval(rig: AgentRig) -> None:
    rig.start_daemon()
    rig.cli("isolate", "--reason", "precaution")
    table = ("table", "inet", "drawbridge")
    meant = rig.rules_as_meant(table)
    for vandalism in (
        ["delete", "table", "inet", "drawbridge"],
        ["flush", "ruleset"],
        ["delete", "rule", "inet", "drawbridge", "forward", "handle", "{h}"],
        ["add", "element", "inet", "drawbridge", "internal4", "{ 192.0.2.0/24 }"],
    ):
        if "{h}" in vandalism:
            listing = rig.nft("-a", "list", "chain", "inet", "drawbridge", "forward")
            handle = re.findall(r'comment "drop" # handle (\d+)', listing)[0]
            vandalism = [a.replace("{h}", handle) for a in vandalism]
        rig.nft(*vandalism)
        took = wait_for(
            lambda: rig.rules_as_meant(table) == meant,
            5, f"repair after {vandalism}")
        assert took < 0.5 + 0.5  # one reconcile interval, plus the time a repair takes
    assert not rig.lab.tcp_ok(rig.gw.internal_ns, rig.lab.outside_addr4, 443)
    repairs = [e for e in _journal(rig) if e["action"] == "repair"]
    assert len(repairs) >= 4 and all(e["result"] == "applied" for e in repairs)


def test_stopping_or_restarting_the_agent_never_removes_isolation(rig: AgentRig) -> None:
    rig.start_daemon()
    rig.cli("isolate", "--profile", "full", "--reason", "precaution")
    before = rig.rules_as_meant()  # counters and connection ids change with any packet
    rig.stop_daemon(signal.SIGTERM)
    assert rig.rules_as_meant() == before
    rig.start_daemon()
    rig.stop_daemon(signal.SIGKILL)
    assert rig.rules_as_meant() == before
    # "reboot": the kernel forgets everything, the state dir survives
    rig.nft("flush", "ruleset")
    rig.start_daemon()
    wait_for(rig.has_table, 5, "isolation to be re-asserted after a reboot")
    assert rig.status()["profile"] == "full" and rig.status()["in_sync"]


def _journal(rig: AgentRig) -> list[dict[str, object]]:
    return [json.loads(line) for line in (rig.state_dir / "journal.jsonl").read_text().splitlines()]
