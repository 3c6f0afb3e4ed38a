"""Exceptions are exact and governed; infrastructure flows stay open, narrowly.

Through the agent's own CLI (break-glass), with real packets: what may not be
opened is refused and changes nothing; what is opened is exactly its flow, is
listed, extended and revoked in the kernel at once, and the table's counters
survive (an exception is a set-element change, not a table replacement).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from drawbridge_lab import Lab
from drawbridge_lab.flows import MGMT_PORT
from tests.lab.agent_rig import AgentRig

pytestmark = pytest.mark.lab

LIMITS = """
[exceptions]
widest_prefix_v4 = 16
widest_prefix_v6 = 48
max_seconds = 86400
"""


def infra(lab: Lab) -> str:
    return f"""
[[infrastructure]]
name = "syslog"
proto = "udp"
peers = ["{lab.outside_addr4}/32", "{lab.outside_addr6}/128"]
remote_ports = [5353]
"""


@pytest.fixture
def xrig(lab: Lab, tmp_path: Path) -> AgentRig:
    lab.start_services(lab.gateways[0].ns, tcp=[MGMT_PORT])
    return AgentRig(lab, lab.gateways[0], tmp_path, extra_config=LIMITS + infra(lab))


def snapshot(rig: AgentRig) -> tuple[str, bytes | None, str]:
    journal = rig.state_dir / "journal.jsonl"
    return (rig.rules_as_meant(), rig.state_bytes(),
            journal.read_text() if journal.exists() else "")


def refused(rig: AgentRig, *args: str, match: str) -> None:
    before = snapshot(rig)
    proc = rig.cli(*args, check=False)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert re.search(match, proc.stderr), proc.stderr
    assert snapshot(rig) == before, f"{args} changed something"


def dropped_forward(rig: AgentRig) -> int:
    listing = rig.nft("list", "counter", "inet", "drawbridge", "dropped_forward")
    found = re.search(r"packets (\d+)", listing)
    assert found, listing
    return int(found.group(1))


def allow(rig: AgentRig, *args: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(rig.cli("allow", *args, "--json").stdout)
    return result


def test_exceptions_are_refused_while_open_too_wide_portless_or_overlapping(
        xrig: AgentRig) -> None:
    rig, lab = xrig, xrig.lab
    p4 = f"{lab.outside_addr4}/32"
    refused(rig, "allow", "--cidr", p4, "--proto", "tcp", "--port", "443", "--for", "1h",
            "--reason", "pre-staged", match="gateway is open")
    rig.cli("isolate", "--profile", "full", "--reason", "precaution")
    for cidr, match in (("0.0.0.0/0", "whole internet"), ("::/0", "whole internet"),
                        ("198.0.0.0/8", "wider than this gateway allows"),
                        ("2001:db8::/32", "wider than this gateway allows")):
        refused(rig, "allow", "--cidr", cidr, "--proto", "tcp", "--port", "443", "--for", "1h",
                "--reason", "too wide", match=match)
    refused(rig, "allow", "--cidr", p4, "--proto", "tcp", "--for", "1h", "--reason", "x",
            match="explicit ports")
    refused(rig, "allow", "--cidr", p4, "--proto", "tcp", "--port", "443", "--for", "2d",
            "--reason", "x", match="at most 86400s")
    allow(rig, "--cidr", p4, "--proto", "tcp", "--port", "443", "--for", "1h",
          "--reason", "emergency flow")
    refused(rig, "allow", "--cidr", f"{lab.outside_subnet4}", "--proto", "tcp", "--port",
            "400-500", "--for", "1h", "--reason", "overlaps", match="overlaps live exception")
    refused(rig, "allow", "revoke", "0123456789ab", "--reason", "x", match="no live exception")


def test_allow_list_extend_revoke_in_the_kernel_with_counters_kept(xrig: AgentRig) -> None:
    rig, lab, gw = xrig, xrig.lab, xrig.gw
    rig.start_daemon()
    rig.cli("isolate", "--profile", "full", "--reason", "precaution")
    assert not lab.tcp_ok(gw.internal_ns, lab.outside_addr4, 443)  # counted as dropped
    drops = dropped_forward(rig)
    assert drops > 0

    change = allow(rig, "--cidr", f"{lab.outside_addr4}/32", "--proto", "tcp", "--port", "443",
                   "--for", "1h", "--reason", "case files for the court")
    assert change["in_sync"] and change["verification"]["status"] == "verified"
    assert dropped_forward(rig) >= drops, "an exception must not reset the counters"
    stream = lab.open_stream(gw.internal_ns, lab.outside_addr4, 443)
    assert stream.roundtrip()
    # exactly its flow: direction out only, that port only, that family only
    assert not lab.tcp_ok(lab.outside_ns, gw.internal_host4, 80)
    assert not lab.tcp_ok(gw.internal_ns, lab.outside_addr4, 80)
    assert not lab.tcp_ok(gw.internal_ns, lab.outside_addr6, 443)

    listed = json.loads(rig.cli("allow", "list", "--json").stdout)["exceptions"]
    assert len(listed) == 1
    exc = listed[0]
    assert exc["flow"]["direction"] == "out" and 3500 < exc["remaining_seconds"] <= 3600

    rig.cli("allow", "extend", exc["id"], "--for", "20h", "--reason", "the hearing moved")
    kernel = rig.nft("list", "set", "inet", "drawbridge", "exc_out4")
    assert re.search(r"tcp \. 443 timeout (19h5\d|20h)", kernel), kernel
    assert stream.roundtrip(), "extending must not interrupt the flow"
    [extended] = json.loads(rig.cli("allow", "list", "--json").stdout)["exceptions"]
    assert extended["remaining_seconds"] > 19 * 3600

    rig.cli("allow", "revoke", exc["id"], "--reason", "done")
    assert not stream.roundtrip(timeout=1.5), "a revoked flow must stop at once"
    assert not lab.tcp_ok(gw.internal_ns, lab.outside_addr4, 443)
    assert "elements" not in rig.nft("list", "set", "inet", "drawbridge", "exc_out4")
    assert json.loads(rig.cli("allow", "list", "--json").stdout)["exceptions"] == []
    actions = [json.loads(line)["action"] for line in
               (rig.state_dir / "journal.jsonl").read_text().splitlines()]
    assert [a for a in actions if a in ("allow", "extend", "revoke")] == \
        ["allow", "extend", "revoke"]
    assert rig.status()["in_sync"]
    stream.close()


def test_infrastructure_flows_stay_open_for_the_gateway_only(xrig: AgentRig) -> None:
    rig, lab, gw = xrig, xrig.lab, xrig.gw
    rig.cli("isolate", "--profile", "full", "--reason", "precaution")
    for addr in (lab.outside_addr4, lab.outside_addr6):
        assert lab.udp_ok(gw.ns, addr, 5353), "the gateway's own syslog flow stays open"
        assert not lab.udp_ok(gw.ns, addr, 53), "only the configured remote port"
        assert not lab.udp_ok(gw.internal_ns, addr, 5353), "not for hosts behind it"
        assert not lab.tcp_ok(gw.ns, addr, 443)
