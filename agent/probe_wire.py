"""Probe packets: what a probe sends and how an answer is recognised.

Builders and parsers are pure (bytes in, bytes/values out) and use scapy, imported here
lazily. Parsers return None for anything that is not an answer to one of our probes.

Scapy lays out every packet sent (once per kind; each probe patches ids, ports
and checksum into a copy) and dissects ICMP errors and DNS replies; the fields
of the common answers (echo reply, SYN-ACK, RST) are read in place. Scapy is
imported on the first sweep (``load_scapy``), never at module import, so CLI
start-up stays fast.
"""

from __future__ import annotations

import functools
import gc
import logging
import socket
import struct
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class EchoReply:
    src: str
    ident: int
    seq: int


@dataclass(frozen=True, slots=True)
class TcpAnswer:
    src: str
    sport: int
    dport: int
    ack: int
    flags: int


@dataclass(frozen=True, slots=True)
class IcmpError:
    """An ICMP error about a packet we sent (`inner_*` come from the quoted packet)."""

    reporter: str
    type: int
    code: int
    inner_dst: str
    inner_proto: int  # 1/58 icmp, 6 tcp
    inner_a: int  # tcp: sport, icmp: ident
    inner_b: int  # tcp: dport, icmp: seq

    def text(self) -> str:
        return f"icmp {self.type}/{self.code} from {self.reporter}"


Answer = EchoReply | TcpAnswer | IcmpError
TCP_SYN, TCP_RST, TCP_ACK = 0x02, 0x04, 0x10


def _quiet_scapy() -> None:
    logging.getLogger("scapy.runtime").setLevel(logging.ERROR)
    logging.getLogger("scapy.loading").setLevel(logging.ERROR)


@functools.cache
def load_scapy() -> None:
    """Import the scapy layers the probes use (about half a second, once per process).
    A sweep calls this before its first packet, so no probe's time includes it.

    Scapy loads Wireshark's MAC vendor table and the Bluetooth company ids at import
    (about 11 MB in a daemon whose budget is 80); IP probes never look at either, so
    they are emptied once here."""
    _quiet_scapy()
    import scapy.data
    import scapy.layers.dns
    import scapy.layers.inet
    import scapy.layers.inet6

    scapy.data.MANUFDB.d.clear()
    scapy.data.BLUETOOTH_CORE_COMPANY_IDENTIFIERS.clear()
    gc.collect()


ECHO_PAYLOAD = b"drawbridge-probe"


@functools.cache
def _template(kind: str) -> bytes:
    """Scapy lays each kind of packet out once per process; a probe copies the template
    and patches its ids, ports and checksum (a scapy build costs ~0.5-1 ms, too slow to
    do 256 times before a sweep can start)."""
    _quiet_scapy()
    from scapy.layers.inet import ICMP, IP, TCP
    from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6

    if kind == "echo4":
        return bytes(ICMP(type=8, id=0, seq=0) / ECHO_PAYLOAD)
    if kind == "echo6":
        return bytes(IPv6(src="::1", dst="::1")
                     / ICMPv6EchoRequest(id=0, seq=0, data=ECHO_PAYLOAD))[40:]
    if kind == "syn":
        return bytes(IP(src="127.0.0.1", dst="127.0.0.1")
                     / TCP(sport=0, dport=0, flags="S", seq=0, window=64240,
                           options=[("MSS", 1460)]))[20:]
    raise ValueError(kind)


def _pseudo_header(family: int, src: str, dst: str, proto: int, length: int) -> bytes:
    if family == socket.AF_INET:
        return (socket.inet_pton(family, src) + socket.inet_pton(family, dst)
                + struct.pack("!BBH", 0, proto, length))
    return (socket.inet_pton(family, src) + socket.inet_pton(family, dst)
            + struct.pack("!I3xB", length, proto))


def _with_checksum(msg: bytearray, offset: int, pseudo: bytes = b"") -> bytes:
    from scapy.utils import checksum

    struct.pack_into("!H", msg, offset, 0)
    struct.pack_into("!H", msg, offset, checksum(pseudo + bytes(msg)))
    return bytes(msg)


def build_echo(family: int, src: str, dst: str, ident: int, seq: int) -> bytes:
    """An ICMP/ICMPv6 echo request message, without the IP header (the kernel adds it)."""
    msg = bytearray(_template("echo4" if family == socket.AF_INET else "echo6"))
    struct.pack_into("!HH", msg, 4, ident, seq)
    if family == socket.AF_INET:
        return _with_checksum(msg, 2)
    return _with_checksum(msg, 2, _pseudo_header(family, src, dst, 58, len(msg)))


def build_syn(family: int, src: str, dst: str, sport: int, dport: int, seq: int) -> bytes:
    """A TCP SYN segment with its checksum, without the IP header."""
    seg = bytearray(_template("syn"))
    struct.pack_into("!HHI", seg, 0, sport, dport, seq)
    return _with_checksum(seg, 16, _pseudo_header(family, src, dst, 6, len(seg)))


@functools.lru_cache(maxsize=256)
def _dns_template(qname: str) -> bytes:
    _quiet_scapy()
    from scapy.layers.dns import DNS, DNSQR

    return bytes(DNS(id=0, rd=1, qd=DNSQR(qname=qname, qtype="A")))


def build_dns_query(txid: int, qname: str) -> bytes:
    """A DNS query (type A, recursion desired) with id `txid`."""
    query = bytearray(_dns_template(qname))
    struct.pack_into("!H", query, 0, txid)
    return bytes(query)


def parse_dns_reply(data: bytes, txid: int) -> str | None:
    """`answer rcode=N` when `data` is a DNS message with our id, else None."""
    _quiet_scapy()
    from scapy.layers.dns import DNS

    if len(data) < 12 or struct.unpack("!H", data[:2])[0] != txid:
        return None
    try:
        msg = DNS(data)
    except Exception:  # a malformed datagram is not an answer
        return None
    return f"answer rcode={int(msg.rcode)}"


def _inner_transport(proto: int, inner: Any) -> tuple[int, int] | None:
    from scapy.layers.inet import ICMPerror, TCPerror

    if proto == 6 and inner.haslayer(TCPerror):
        t = inner[TCPerror]
        return int(t.sport), int(t.dport)
    if proto == 1 and inner.haslayer(ICMPerror):
        i = inner[ICMPerror]
        return int(i.id), int(i.seq)
    return None


def parse_icmp4(packet: bytes) -> Answer | None:
    """An IPv4 packet (with header) read from a raw ICMP socket."""
    if len(packet) < 28 or packet[0] >> 4 != 4:
        return None
    ihl = (packet[0] & 0x0F) * 4
    icmp_type = packet[ihl] if len(packet) > ihl else -1
    if icmp_type not in (0, 3, 11):
        return None  # echo requests, redirects, ...: not answers
    if icmp_type == 0:  # the common case, read in place (fixed offsets)
        ident, seq = struct.unpack_from("!HH", packet, ihl + 4)
        return EchoReply(src=socket.inet_ntop(socket.AF_INET, packet[12:16]), ident=ident,
                         seq=seq)
    _quiet_scapy()
    from scapy.layers.inet import ICMP, IP, IPerror

    try:
        pkt = IP(packet)
    except Exception:
        return None
    if not pkt.haslayer(ICMP):
        return None
    icmp = pkt[ICMP]
    if not pkt.haslayer(IPerror):
        return None
    inner = pkt[IPerror]
    ports = _inner_transport(int(inner.proto), inner)
    if ports is None:
        return None
    return IcmpError(reporter=str(pkt.src), type=int(icmp.type), code=int(icmp.code),
                     inner_dst=str(inner.dst), inner_proto=int(inner.proto),
                     inner_a=ports[0], inner_b=ports[1])


def parse_icmp6(message: bytes, src: str) -> Answer | None:
    """An ICMPv6 message (no IPv6 header: raw IPv6 sockets strip it) from `src`."""
    if len(message) < 8 or message[0] not in (1, 3, 129):
        return None
    if message[0] == 129:  # echo reply, read in place
        ident, seq = struct.unpack_from("!HH", message, 4)
        return EchoReply(src=src, ident=ident, seq=seq)
    _quiet_scapy()
    from scapy.layers.inet import TCPerror
    from scapy.layers.inet6 import (
        ICMPv6DestUnreach,
        ICMPv6EchoRequest,
        ICMPv6TimeExceeded,
        IPerror6,
    )

    cls = ICMPv6DestUnreach if message[0] == 1 else ICMPv6TimeExceeded
    try:
        pkt = cls(message)
    except Exception:
        return None
    if not pkt.haslayer(IPerror6):
        return None
    inner = pkt[IPerror6]
    if int(inner.nh) == 6 and inner.haslayer(TCPerror):
        ports = (int(inner[TCPerror].sport), int(inner[TCPerror].dport))
        proto = 6
    elif int(inner.nh) == 58 and inner.haslayer(ICMPv6EchoRequest):
        ports = (int(inner[ICMPv6EchoRequest].id), int(inner[ICMPv6EchoRequest].seq))
        proto = 58
    else:
        return None
    return IcmpError(reporter=src, type=message[0], code=message[1], inner_dst=str(inner.dst),
                     inner_proto=proto, inner_a=ports[0], inner_b=ports[1])


def tcp_ports(segment: bytes) -> tuple[int, int] | None:
    """(sport, dport) of a TCP segment: the cheap pre-filter before dissecting it."""
    if len(segment) < 20:
        return None
    sport, dport = struct.unpack("!HH", segment[:4])
    return int(sport), int(dport)


def parse_tcp(segment: bytes, src: str) -> TcpAnswer | None:
    """Ports, acknowledgement number and flags of a TCP segment (fixed offsets)."""
    if len(segment) < 20:
        return None
    sport, dport, _seq, ack, _off, flags = struct.unpack_from("!HHIIBB", segment)
    return TcpAnswer(src=src, sport=sport, dport=dport, ack=ack, flags=flags)


def classify_tcp(answer: TcpAnswer, seq: int) -> str | None:
    """`open` for a SYN-ACK, `closed` for a RST answering our SYN, else None."""
    if answer.ack != (seq + 1) & 0xFFFFFFFF:
        return None
    if answer.flags & TCP_RST:
        return "closed"
    if answer.flags & TCP_SYN and answer.flags & TCP_ACK:
        return "open"
    return None

