"""Packets an attacker would send at an isolated gateway, built with scapy.

Every case carries a unique marker in its payload and names the namespace where
its arrival is counted (rawwire.py: what the stack there received, after the
firewall). `expect=False` cases must never arrive; `expect=True` cases are
legitimate traffic that the same rules must let through (so that a table that
drops everything cannot pass the suite).

Roles, per address family: P is the chain partner (the outside host, the only
remote allowed by the `partner` profile and the exception), X another outside
host, R a router on the path, I and J the internal hosts behind the gateway (on
two internal subnets), M the management host.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, TCPerror, fragment
from scapy.layers.inet6 import (
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6ND_NS,
    ICMPv6ND_RA,
    ICMPv6ND_RS,
    ICMPv6PacketTooBig,
    IPerror6,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    fragment6,
)
from scapy.packet import Packet, Raw

from drawbridge_lab.topology import Gateway, Lab
from drawbridge_lab.wire import new_marker


@dataclass(frozen=True)
class Case:
    name: str
    src_ns: str
    dst_ns: str
    packets: tuple[bytes, ...]
    marker: str
    expect: bool = False
    dev: str | None = None  # outgoing interface, for link-local destinations


@dataclass
class Addresses:
    P: str
    X: str
    R: str
    I: str  # noqa: E741 - the role's name
    J: str
    G_out: str
    G_in: str
    G_mgmt: str
    M: str

    @classmethod
    def of(cls, lab: Lab, gw: Gateway, fam: int) -> Addresses:
        if fam == 4:
            return cls(lab.outside_addr4, "198.51.100.66", "198.51.100.1", gw.internal_host4,
                       gw.internal2_host4, gw.outside_addr4, gw.inside_addr4, gw.mgmt_addr4,
                       lab.mgmt_addr4)
        return cls(lab.outside_addr6, "2001:db8:100::66", "2001:db8:100::1", gw.internal_host6,
                   gw.internal2_host6, gw.outside_addr6, gw.inside_addr6, gw.mgmt_addr6,
                   lab.mgmt_addr6)


def ip(fam: int, src: str, dst: str, hlim: int = 64) -> Packet:
    return IP(src=src, dst=dst, ttl=hlim) if fam == 4 else IPv6(src=src, dst=dst, hlim=hlim)


def echo(fam: int, reply: bool = False) -> Packet:
    if fam == 4:
        return ICMP(type=0 if reply else 8, id=0x4242, seq=1)
    return (ICMPv6EchoReply if reply else ICMPv6EchoRequest)(id=0x4242, seq=1)


@dataclass
class Catalog:
    """Builds the cases of one state and family; `add` keeps them in order."""

    lab: Lab
    gw: Gateway
    fam: int
    cases: list[Case] = field(default_factory=list)

    @property
    def a(self) -> Addresses:
        return Addresses.of(self.lab, self.gw, self.fam)

    def add(self, name: str, src_ns: str, dst_ns: str,
            build: Callable[[bytes], Packet | list[Packet]], *, expect: bool = False,
            dev: str | None = None) -> None:
        marker = new_marker()
        built = build(marker.encode())
        packets = built if isinstance(built, list) else [built]
        self.cases.append(Case(f"IPv{self.fam} {name}", src_ns, dst_ns,
                               tuple(bytes(p) for p in packets), marker, expect, dev))

    # -- building blocks --------------------------------------------------------------

    def tcp(self, src: str, dst: str, sport: int, dport: int, flags: str = "S",
            hlim: int = 64) -> Callable[[bytes], Packet]:
        return lambda m: ip(self.fam, src, dst, hlim) / TCP(sport=sport, dport=dport,
                                                            flags=flags, seq=1000) / Raw(m)

    def udp(self, src: str, dst: str, sport: int, dport: int) -> Callable[[bytes], Packet]:
        return lambda m: ip(self.fam, src, dst) / UDP(sport=sport, dport=dport) / Raw(m)

    def ping(self, src: str, dst: str, reply: bool = False) -> Callable[[bytes], Packet]:
        return lambda m: ip(self.fam, src, dst) / echo(self.fam, reply) / Raw(m)

    def fragmented_syn(self, src: str, dst: str, sport: int,
                       dport: int) -> Callable[[bytes], list[Packet]]:
        """A SYN whose transport header is cut after 8 bytes (ports, sequence number)."""
        def build(m: bytes) -> list[Packet]:
            pkt = ip(self.fam, src, dst) / TCP(sport=sport, dport=dport, flags="S") / Raw(m * 4)
            if self.fam == 4:
                return list(fragment(pkt, fragsize=8))
            pkt = IPv6(src=src, dst=dst) / IPv6ExtHdrFragment(id=0x5151) / pkt[TCP]
            return list(fragment6(pkt, 80))
        return build

    def orphan_fragment(self, src: str, dst: str) -> Callable[[bytes], Packet]:
        """A non-first fragment alone (no header to judge, nothing to reassemble)."""
        def build(m: bytes) -> Packet:
            if self.fam == 4:
                return IP(src=src, dst=dst, proto=6, frag=3, flags=0, id=0x6161) / Raw(m * 4)
            return (IPv6(src=src, dst=dst) / IPv6ExtHdrFragment(nh=6, offset=3, m=0, id=0x6161)
                    / Raw(m * 4))
        return build

    def ext_headers(self, src: str, dst: str, sport: int, dport: int,
                    routing: bool = False) -> Callable[[bytes], Packet]:
        """Extension headers in front of the transport header (IPv6 only)."""
        def build(m: bytes) -> Packet:
            chain = IPv6(src=src, dst=dst) / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()
            if routing:
                chain = chain / IPv6ExtHdrRouting(type=0, segleft=0, addresses=[dst])
            return chain / TCP(sport=sport, dport=dport, flags="S") / Raw(m)
        return build

    def too_big(self, src: str, dst: str, conn: tuple[str, str, int, int],
                proto: str = "tcp") -> Callable[[bytes], Packet]:
        """A path-MTU ICMP error about connection (src, dst, sport, dport) as sent by it."""
        csrc, cdst, sport, dport = conn

        def build(m: bytes) -> Packet:
            inner_l4 = TCPerror(sport=sport, dport=dport, flags="PA", seq=1) \
                if proto == "tcp" else UDP(sport=sport, dport=dport)
            if self.fam == 4:
                return (IP(src=src, dst=dst) / ICMP(type=3, code=4, nexthopmtu=1280)
                        / IPerror(src=csrc, dst=cdst, flags="DF") / inner_l4 / Raw(m))
            return (IPv6(src=src, dst=dst) / ICMPv6PacketTooBig(mtu=1280)
                    / IPerror6(src=csrc, dst=cdst) / inner_l4 / Raw(m))
        return build


def nd_cases(cat: Catalog, gw_ll_out: str, gw_ll_in: str, peer_ll: str) -> None:
    """Neighbour discovery is link-local: router adverts only from upstream, router
    solicitations only from the inside, nothing that has crossed a router."""
    lab, gw = cat.lab, cat.gw

    def ra(src: str, dst: str) -> Callable[[bytes], Packet]:
        return lambda m: IPv6(src=src, dst=dst, hlim=255) / ICMPv6ND_RA() / Raw(m)

    def rs(src: str, dst: str) -> Callable[[bytes], Packet]:
        return lambda m: IPv6(src=src, dst=dst, hlim=255) / ICMPv6ND_RS() / Raw(m)

    cat.add("router advert from upstream (legit)", lab.outside_ns, gw.ns,
            ra(peer_ll, gw_ll_out), expect=True, dev=gw.name)
    cat.add("rogue router advert from an internal host", gw.internal_ns, gw.ns,
            ra("fe80::bad", gw_ll_in), dev="eth0")
    cat.add("router solicitation from the inside (legit)", gw.internal_ns, gw.ns,
            rs("fe80::10", gw_ll_in), expect=True, dev="eth0")
    cat.add("router solicitation from upstream", lab.outside_ns, gw.ns,
            rs(peer_ll, gw_ll_out), dev=gw.name)
    cat.add("neighbour solicitation that crossed a router (hop limit 64)", lab.outside_ns,
            gw.ns, lambda m: IPv6(src=cat.a.X, dst=cat.a.G_out, hlim=64)
            / ICMPv6ND_NS(tgt=cat.a.G_out) / Raw(m))
