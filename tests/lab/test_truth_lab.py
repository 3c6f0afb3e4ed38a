"""The read-back tells the truth: rule expressions, and paths around our chains.

A rule replaced in place keeps its comment; only its expression says what it
does. A flowtable in another table carries established connections past the
forward hook, a `fwd` in a netdev table sends packets out before any IP hook.
Each must be noticed within one reconcile interval and reported; our own table
is repaired, offloaded connections are cut.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from drawbridge_lab.wire import listening, send_packets
from tests.lab.agent_rig import AgentRig, wait_for
from tests.lab.attacks import Catalog

pytestmark = pytest.mark.lab

OFFLOAD_TABLE = """
table inet fw4 {{
    flowtable ft {{
        hook ingress priority 0
        devices = {{ {devices} }}
    }}
    chain forward {{ type filter hook forward priority 0; policy accept;
        meta l4proto tcp ct state established flow add @ft
    }}
}}
"""


def _journal(rig: AgentRig) -> list[dict[str, object]]:
    return [json.loads(line) for line in (rig.state_dir / "journal.jsonl").read_text().splitlines()]


def test_a_rule_replaced_in_place_is_drift_and_repaired(rig: AgentRig) -> None:
    lab, gw = rig.lab, rig.gw
    rig.start_daemon()
    rig.cli("isolate", "--profile", "full", "--reason", "precaution")
    listing = rig.nft("-a", "list", "chain", "inet", "drawbridge", "forward")
    handle = re.findall(r'comment "drop" # handle (\d+)', listing)[0]
    # the vandal keeps the comment: a comparison of comments would call this in sync
    rig.nft("replace", "rule", "inet", "drawbridge", "forward", "handle", handle,
            "accept", "comment", '"drop"')
    wait_for(lambda: any(e["action"] == "repair" for e in _journal(rig)), 5,
             "the replaced rule to be repaired")
    repair = next(e for e in _journal(rig) if e["action"] == "repair")
    assert any("rule" in p and "forward" in p and "match or verdict" in p
               for p in repair["drift"]), repair  # type: ignore[union-attr]
    assert "accept comment \"drop\"" not in rig.nft("list", "chain", "inet", "drawbridge",
                                                   "forward")
    assert not lab.tcp_ok(gw.internal_ns, lab.outside_addr4, 443)
    assert rig.status()["in_sync"]


def _offloaded(rig: AgentRig) -> int:
    proc = rig.lab.run(rig.gw.ns, ["conntrack", "-L", "--status", "OFFLOAD"], check=False)
    return len([ln for ln in proc.stdout.splitlines() if "OFFLOAD" in ln])


def _flowtables_unsupported() -> str | None:
    """This kernel's reason not to have flowtables (CONFIG_NF_FLOW_TABLE), or None."""
    proc = subprocess.run(["unshare", "--net", "nft", "-f", "-"], capture_output=True,
                          text=True, check=False,
                          input="table inet t {\n flowtable f {\n hook ingress priority 0\n"
                                " devices = { lo }\n }\n}\n")
    return None if proc.returncode == 0 else proc.stderr.strip()


def test_a_flowtable_cannot_carry_a_session_past_isolation(rig: AgentRig) -> None:
    reason = _flowtables_unsupported()
    if reason:
        pytest.skip(f"this kernel has no nftables flowtables ({reason}); offload detection "
                    "is covered by tests/unit/test_offload.py, the redirect bypass below")
    lab, gw = rig.lab, rig.gw
    devices = f'"{gw.inside_if}", "{gw.outside_if}"'
    lab.run(gw.ns, ["nft", "-f", "-"], input=OFFLOAD_TABLE.format(devices=devices))
    stream = lab.open_stream(gw.internal_ns, lab.outside_addr4, 443)
    assert stream.roundtrip() and stream.roundtrip()
    wait_for(lambda: _offloaded(rig) > 0, 5, "the session to be offloaded to the flowtable")

    result = rig.cli("isolate", "--profile", "internet", "--reason", "cut", "--json",
                     check=False)
    change = json.loads(result.stdout)
    assert result.returncode == 6  # applied, but not verified: something goes around us
    assert change["verification"]["status"] == "unverified"
    assert any("flowtable ft in table inet fw4" in b for b in change["bypass"])
    # the offloaded session was torn down: its packets meet our forward chain again
    assert not stream.roundtrip(timeout=1.5)
    assert _offloaded(rig) == 0
    stream.close()


REDIRECT_TABLE = """
table netdev shortcut {{
    chain in {{ type filter hook ingress device "{inside}" priority 0; policy accept;
        ip daddr {outside} fwd ip to {outside} device "{out_if}"
    }}
}}
"""


def test_a_redirect_around_the_table_is_noticed_within_one_interval(rig: AgentRig) -> None:
    lab, gw = rig.lab, rig.gw
    rig.start_daemon()
    rig.cli("isolate", "--profile", "internet", "--reason", "precaution")
    table = REDIRECT_TABLE.format(inside=gw.inside_if, outside=lab.outside_addr4,
                                  out_if=gw.outside_if)
    lab.run(gw.ns, ["nft", "-f", "-"], input=table)
    # the path is real: an internal host's packet reaches the outside past our chains
    cat = Catalog(lab, gw, 4)
    cat.add("through the shortcut", gw.internal_ns, lab.outside_ns,
            cat.udp(cat.a.I, cat.a.P, 40000, 53), expect=True)
    with listening(lab, [lab.outside_ns]) as arrived:
        send_packets(lab, gw.internal_ns, cat.cases[0].packets)
    assert cat.cases[0].marker in arrived[lab.outside_ns]

    took = wait_for(lambda: any(e["action"] == "bypass" and e["result"] == "found"
                                for e in _journal(rig)), 5, "the redirect to be noticed")
    assert took < 0.5 + 1.0  # one reconcile interval, plus the time a check takes
    status = rig.status()
    assert status["verification"]["status"] == "unverified"
    assert any("table netdev shortcut chain in redirects packets (fwd)" in b
               for b in status["bypass"])
    # our own table is untouched by this (no repair), and so is the other one
    assert not any(e["action"] == "repair" for e in _journal(rig))
    assert "fwd ip to" in rig.nft("list", "table", "netdev", "shortcut")
    lab.run(gw.ns, ["nft", "delete", "table", "netdev", "shortcut"])
    wait_for(lambda: any(e["action"] == "bypass" and e["result"] == "gone"
                         for e in _journal(rig)), 5, "the redirect's removal to be noticed")


def test_conntrack_tool_is_there() -> None:
    """The agent's offload remedy needs conntrack(8) (the Makefile installs it)."""
    assert subprocess.run(["conntrack", "--version"], capture_output=True,
                          check=False).returncode == 0
