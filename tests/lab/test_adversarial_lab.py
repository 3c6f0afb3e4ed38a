"""Isolation against an attacker: crafted packets counted where they arrive.

For `internet`, `full` and `partner` (a profile with out and in allows, plus an
active exception), in IPv4 and IPv6, an attacker on the outside and on the
inside sends what would get through a stateless or interface-blind table:
source-port tricks, spoofed internal, management and local sources, fragments,
IPv6 extension headers, bare ACK/RST/FIN, ICMP and ICMPv6, forged path-MTU
errors, rogue router adverts. None may arrive. The same run proves that the
allowed flows work in both directions (set-up, data, replies, path-MTU errors
about real allowed connections), so a table that drops everything fails it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from drawbridge_lab import Lab
from drawbridge_lab.agentconf import agent_toml
from drawbridge_lab.flows import MGMT_PORT
from drawbridge_lab.wire import PathMtu, listening, send_packets
from tests.lab.agent_rig import AgentRig
from tests.lab.attacks import Case, Catalog, nd_cases

pytestmark = pytest.mark.lab

FAMILIES = (4, 6)


def partner_profile(lab: Lab) -> str:
    lines = []
    for addr in (f"{lab.outside_addr4}/32", f"{lab.outside_addr6}/128"):
        lines += [
            f'{{ cidr = "{addr}", proto = "tcp", ports = [443], direction = "out" }}',
            f'{{ cidr = "{addr}", proto = "udp", ports = [53], direction = "out" }}',
            f'{{ cidr = "{addr}", proto = "icmp", direction = "out" }}',
            f'{{ cidr = "{addr}", proto = "tcp", ports = [80], direction = "in" }}',
        ]
    return ('\n[profiles.partner]\nbase = "full"\nallow = [\n  '
            + ",\n  ".join(lines) + "\n]\n")


class AdversaryRig(AgentRig):
    """v4 management pinned to its interface, v6 management checked by reverse path."""

    def __post_init__(self) -> None:
        self.state_dir = self.workdir / "state"
        self.config_path = self.workdir / "agent.toml"
        self.config_path.write_text(
            agent_toml(self.lab, self.gw, self.state_dir, mgmt_ports=(MGMT_PORT, 9630),
                       pinned=(4,), reconcile_interval=0.5) + partner_profile(self.lab))


# Like most gateways (NAT, a stateful filter of the admin's), this one tracks connections
# whether or not Drawbridge's table exists: sessions opened before isolation have
# conntrack entries, which is what an attacker would try to ride on.
ADMIN_TABLE = """
table inet admin_stateful {
    chain forward { type filter hook forward priority 10; policy accept;
        ct state invalid counter comment "the admin's own accounting"
    }
}
"""


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdversaryRig]:
    with Lab.create(gateways=1) as lab:
        gw = lab.gateways[0]
        lab.start_services(gw.ns, tcp=[MGMT_PORT])
        lab.run(gw.ns, ["nft", "-f", "-"], input=ADMIN_TABLE)
        yield AdversaryRig(lab, gw, Path(tmp_path_factory.mktemp("adversary")))


def link_local(lab: Lab, ns: str, dev: str) -> str:
    out = lab.run(ns, ["ip", "-6", "addr", "show", "dev", dev, "scope", "link"]).stdout
    found = re.search(r"inet6 (fe80::[0-9a-f:]+)/64", out)
    assert found, out
    return found.group(1)


def common_attacks(cat: Catalog, rig: AgentRig) -> None:
    """What must never arrive in any isolated state."""
    lab, gw, a = rig.lab, rig.gw, cat.a
    out_ns, in_ns, in2_ns = lab.outside_ns, gw.internal_ns, gw.internal2_ns
    # source-port tricks: "replies" from the partner's allowed ports, to anything
    cat.add("tcp syn from partner:443 to internal:22", out_ns, in_ns, cat.tcp(a.P, a.I, 443, 22))
    cat.add("tcp syn from partner:443 to internal:80 (not in internet/full)", out_ns, in2_ns,
            cat.tcp(a.P, a.J, 443, 8080))
    cat.add("udp from partner:53 to internal:5353", out_ns, in_ns, cat.udp(a.P, a.I, 53, 5353))
    cat.add("tcp syn from partner:443 to gateway sshd", out_ns, gw.ns,
            cat.tcp(a.P, a.G_out, 443, MGMT_PORT))
    cat.add("tcp syn from partner:443 to gateway vpn", out_ns, gw.ns,
            cat.tcp(a.P, a.G_out, 443, 8443))
    cat.add("udp from partner:53 to gateway", out_ns, gw.ns, cat.udp(a.P, a.G_out, 53, 5353))
    # connection-less TCP flags
    for flags in ("A", "R", "F", "FA", "SA", "PA"):
        cat.add(f"bare tcp {flags} from partner:443 to internal", out_ns, in_ns,
                cat.tcp(a.P, a.I, 443, 33333, flags))
        cat.add(f"bare tcp {flags} to the gateway", out_ns, gw.ns,
                cat.tcp(a.X, a.G_out, 443, MGMT_PORT, flags))
    # spoofed sources from the outside
    cat.add("spoofed internal source hopping between internal subnets", out_ns, in_ns,
            cat.tcp(a.J, a.I, 40000, 80))
    cat.add("spoofed internal source to the gateway (udp)", out_ns, gw.ns,
            cat.udp(a.I, a.G_in, 5353, 5353))
    cat.add("spoofed internal source to the gateway's outside address", out_ns, gw.ns,
            cat.tcp(a.I, a.G_out, 40001, 8443))
    cat.add("spoofed management source to sshd on the outside address", out_ns, gw.ns,
            cat.tcp(a.M, a.G_out, 40002, MGMT_PORT))
    cat.add("spoofed management source, udp", out_ns, gw.ns, cat.udp(a.M, a.G_out, 40003, 5353))
    cat.add("spoofed local source (the gateway's own inside address)", out_ns, in_ns,
            cat.tcp(a.G_in, a.I, 40004, 80))
    # spoofed sources from the inside
    cat.add("internal host spoofing the partner to the gateway", in_ns, gw.ns,
            cat.tcp(a.P, a.G_in, 443, 8443))
    cat.add("internal host spoofing the partner to the other subnet", in_ns, in2_ns,
            cat.tcp(a.P, a.J, 443, 80))
    cat.add("internal host spoofing management to the gateway", in_ns, gw.ns,
            cat.tcp(a.M, a.G_in, 40005, MGMT_PORT))
    # fragments
    cat.add("fragmented syn from partner:443 to internal:22", out_ns, in_ns,
            cat.fragmented_syn(a.P, a.I, 443, 22))
    cat.add("orphan non-first fragment to internal", out_ns, in_ns, cat.orphan_fragment(a.P, a.I))
    cat.add("orphan non-first fragment to the gateway", out_ns, gw.ns,
            cat.orphan_fragment(a.P, a.G_out))
    # ICMP from the outside
    cat.add("echo request to internal", out_ns, in_ns, cat.ping(a.P, a.I))
    cat.add("unsolicited echo reply to internal", out_ns, in_ns, cat.ping(a.P, a.I, reply=True))
    cat.add("echo request to the gateway", out_ns, gw.ns, cat.ping(a.X, a.G_out))
    cat.add("forged path-MTU error about no connection", out_ns, in_ns,
            cat.too_big(a.R, a.I, (a.I, a.P, 41000, 443)))
    if cat.fam == 6:
        cat.add("hop-by-hop + destination options in front of a syn to internal:22", out_ns,
                in_ns, cat.ext_headers(a.P, a.I, 443, 22))
        cat.add("routing header in front of a syn to internal:22", out_ns, in_ns,
                cat.ext_headers(a.P, a.I, 443, 22, routing=True))
        nd_cases(cat, link_local(lab, gw.ns, gw.outside_if),
                 link_local(lab, gw.ns, gw.inside_if), link_local(lab, out_ns, gw.name))


def partner_attacks(cat: Catalog, rig: AgentRig, before: dict[str, int]) -> None:
    """The flows of `partner` and the exception are open: the rest of the partner is not."""
    lab, gw, a = rig.lab, rig.gw, cat.a
    out_ns, in_ns = lab.outside_ns, gw.internal_ns
    cat.add("udp from the exception's port 5353 to internal", out_ns, in_ns,
            cat.udp(a.P, a.I, 5353, 9999))
    cat.add("internal host from the in-allowed port 80 to the partner", in_ns, out_ns,
            cat.tcp(a.I, a.P, 80, 8443))
    cat.add("internal host from port 53 to the partner (looks like a reply)", in_ns, out_ns,
            cat.udp(a.I, a.P, 53, 9999))
    cat.add("gateway reached from the partner on a port only open to internal hosts", out_ns,
            gw.ns, cat.tcp(a.P, a.G_out, 40010, 443))
    cat.add("path-MTU error about a connection opened before isolation, not allowed now",
            out_ns, in_ns, cat.too_big(a.R, a.I, (a.I, a.P, before["old"], 8443)))
    if cat.fam == 6:
        cat.add("extension headers in front of an allowed syn to internal:80 (legit)", out_ns,
                in_ns, cat.ext_headers(a.P, a.I, 40011, 80), expect=True)
    cat.add("fragmented syn to the in-allowed port (legit)", out_ns, in_ns,
            cat.fragmented_syn(a.P, a.I, 40012, 80), expect=True)
    cat.add("path-MTU error about an allowed connection (legit)", out_ns, in_ns,
            cat.too_big(a.R, a.I, (a.I, a.P, before["allowed"], 443)), expect=True)
    cat.add("path-MTU error about an allowed udp flow (legit)", out_ns, in_ns,
            cat.too_big(a.R, a.I, (a.I, a.P, before["udp"], 53), proto="udp"), expect=True)


def run_cases(rig: AgentRig, cases: list[Case]) -> list[str]:
    """Send every case from its source; the names of the cases whose outcome is wrong."""
    targets = sorted({c.dst_ns for c in cases})
    with listening(rig.lab, targets) as arrived:
        groups: dict[tuple[str, str | None], list[bytes]] = {}
        for case in cases:
            groups.setdefault((case.src_ns, case.dev), []).extend(case.packets)
        for (src, dev), packets in groups.items():
            send_packets(rig.lab, src, packets, dev=dev)
    wrong = []
    for case in cases:
        got = case.marker in arrived[case.dst_ns]
        if got != case.expect:
            wrong.append(f"{case.name}: {'arrived' if got else 'did not arrive'}")
    return wrong


def isolate(rig: AgentRig, profile: str) -> None:
    rig.cli("restore", "--reason", "reset between states")
    rig.cli("isolate", "--profile", profile, "--reason", f"adversarial suite: {profile}")


@pytest.mark.parametrize("profile", ["internet", "full"])
@pytest.mark.parametrize("fam", FAMILIES)
def test_nothing_crafted_gets_through_internet_and_full(rig: AgentRig, profile: str,
                                                        fam: int) -> None:
    isolate(rig, profile)
    cat = Catalog(rig.lab, rig.gw, fam)
    common_attacks(cat, rig)
    assert run_cases(rig, cat.cases) == []
    a, lab, gw = cat.a, rig.lab, rig.gw
    # legitimate flows of these states still work (so a drop-everything table fails)
    assert lab.tcp_ok(lab.mgmt_ns, a.G_mgmt, MGMT_PORT)
    inside = lab.tcp_ok(gw.internal_ns, a.J, 80) and lab.udp_ok(gw.internal_ns, a.G_in, 5353)
    assert inside == (profile == "internet")


@pytest.mark.parametrize("fam", FAMILIES)
def test_partner_flows_are_exact_in_both_directions(rig: AgentRig, fam: int) -> None:
    lab, gw = rig.lab, rig.gw
    rig.cli("restore", "--reason", "open before the incident")
    cat = Catalog(lab, gw, fam)
    a = cat.a
    # sessions opened while the gateway was open: one allowed afterwards, one not
    allowed = lab.open_stream(gw.internal_ns, a.P, 443)
    old = lab.open_stream(gw.internal_ns, a.P, 8443)
    assert allowed.roundtrip() and old.roundtrip()
    rig.cli("isolate", "--profile", "partner", "--reason", "adversarial suite: partner")
    rig.cli("allow", "--cidr", a.P, "--proto", "udp", "--port", "5353", "--for", "1h",
            "--reason", "emergency flow with the chain partner")
    assert allowed.roundtrip(), "an allowed session opened before isolation must go on"
    assert not old.roundtrip(timeout=1.5), "a session not allowed now must stop at once"

    udp = PathMtu(lab, gw.internal_ns, a.P, 53)  # an allowed flow; its path MTU: 1500
    common_attacks(cat, rig)
    partner_attacks(cat, rig, {"allowed": allowed.local_port, "old": old.local_port,
                               "udp": udp.port})
    assert run_cases(rig, cat.cases) == []
    # the legitimate "too big" error did what it is for: the sender's path MTU dropped
    assert udp.result() == 1280

    # the allowed flows, both directions, set-up, data and replies
    assert lab.tcp_ok(gw.internal_ns, a.P, 443)           # out: internal -> partner
    assert lab.tcp_ok(gw.ns, a.P, 443)                     # out: the gateway itself
    assert lab.udp_ok(gw.internal_ns, a.P, 53)             # out: the resolver flow
    assert lab.udp_ok(gw.internal_ns, a.P, 5353)           # out: the exception
    assert lab.ping_ok(gw.internal_ns, a.P)                # out: icmp echo
    assert lab.tcp_ok(lab.outside_ns, a.I, 80)             # in: partner -> internal
    assert lab.tcp_ok(lab.mgmt_ns, a.G_mgmt, MGMT_PORT)    # management
    # ... and nothing next to them
    assert not lab.tcp_ok(gw.internal_ns, a.P, 80)
    assert not lab.udp_ok(lab.outside_ns, a.I, 5353)
    assert not lab.ping_ok(lab.outside_ns, a.I)
    assert not lab.tcp_ok(gw.internal_ns, a.J, 80)         # full: no internal routing
    allowed.close()
    old.close()


def test_spoofed_packets_are_counted(rig: AgentRig) -> None:
    isolate(rig, "full")
    before = _spoofed(rig)
    cat = Catalog(rig.lab, rig.gw, 4)
    a = cat.a
    cat.add("spoofed management source", rig.lab.outside_ns, rig.gw.ns,
            cat.tcp(a.M, a.G_out, 40020, MGMT_PORT))
    assert run_cases(rig, cat.cases) == []
    assert _spoofed(rig) >= before + 2  # rawwire sends every packet twice


def _spoofed(rig: AgentRig) -> int:
    listing = rig.nft("list", "counter", "inet", "drawbridge", "spoofed")
    found = re.search(r"packets (\d+)", listing)
    assert found, listing
    return int(found.group(1))
