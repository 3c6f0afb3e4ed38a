"""Probes: prove, from this host, what is reachable and what is not.

Four kinds, IPv4 and IPv6 alike:

- ``icmp``: an echo request; ``reachable`` when the target's echo reply comes back.
- ``tcp-syn``: one SYN; ``open`` (SYN-ACK), ``closed`` (RST) or ``filtered`` (no
  answer, or an ICMP error). Open and closed are both ``reachable``: the target
  answered, so packets crossed every firewall on the way in both directions.
- ``tcp``: a plain connect; ``connected`` or ``refused`` are ``reachable``, a
  timeout or an unreachable error is not.
- ``dns``: a DNS query over UDP; any reply carrying the query's id (or the
  target's "port unreachable") is ``reachable``.

The coarse ``outcome`` (reachable / unreachable / error) is what expectations
are written against; ``detail`` says what exactly came back. "Reachable" is
about the path, not the service: while isolated, a RST from an outside host is
as much a leak as a completed handshake.

How: a sweep is one loop over non-blocking sockets. Every probe is sent up
front, answers are matched as they arrive, and each probe has its own
deadline, so a silent target never holds up another probe; a sweep takes about
as long as its longest timeout. ICMP echo and TCP SYN use raw IP sockets (not
packet sockets): they go out through the kernel's routing and the netfilter
output hook, and answers are read after the input hook, so a probe sees what
this host's firewall really lets through. (A packet-socket capture would see
replies that nftables is about to drop, and would send past the output chain;
it would also need its own routing table, stale inside a network namespace.)

Scapy lays out every packet sent (once per kind; each probe patches ids, ports
and checksum into a copy) and dissects ICMP errors and DNS replies; the fields
of the common answers (echo reply, SYN-ACK, RST) are read in place. Scapy is
imported on the first sweep, never at module import, so CLI start-up stays fast.
"""

from __future__ import annotations

import argparse
import errno
import functools
import gc
import heapq
import json
import logging
import os
import secrets
import selectors
import socket
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from agent.config import DEFAULT_DNS_QUERY, ProbeConfig, ProbeType, parse_probe_target

Outcome = Literal["reachable", "unreachable", "error"]
REACHABLE: Outcome = "reachable"
UNREACHABLE: Outcome = "unreachable"
ERROR: Outcome = "error"

MAX_IN_FLIGHT_SOCKETS = 512  # tcp/dns probes each hold a socket; raw probes share four
RAW_RCVBUF = 4 * 1024 * 1024
SEND_BATCH = 64  # drain answers after this many raw sends, so a big sweep never overflows
IPV6_CHECKSUM = getattr(socket, "IPV6_CHECKSUM", 7)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
# errors that mean "this host refuses to send it / has no way there": unreachable
_LOCAL_BLOCK = {errno.EPERM: "blocked-locally", errno.EACCES: "blocked-locally"}
_NO_PATH = {errno.ENETUNREACH: "no-route", errno.EHOSTUNREACH: "host-unreachable",
            errno.EADDRNOTAVAIL: "no-source-address", errno.ENETDOWN: "network-down"}

log = logging.getLogger("drawbridge.probes")


# ---------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class ProbeSpec:
    """What to send: the part of a ProbeConfig the measuring loop needs."""

    type: ProbeType
    address: str
    port: int | None = None
    timeout: float = 1.0
    query: str = DEFAULT_DNS_QUERY

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.address else socket.AF_INET

    @classmethod
    def of(cls, probe: ProbeConfig) -> ProbeSpec:
        address, port = parse_probe_target(probe.type, probe.target)
        return cls(type=probe.type, address=address, port=port, timeout=probe.timeout,
                   query=probe.dns_query)

    @classmethod
    def parse(cls, text: str, timeout: float = 1.0) -> ProbeSpec:
        """``TYPE:TARGET``, e.g. ``tcp-syn:[2001:db8::1]:443`` (command line, benchmarks)."""
        kind, sep, target = text.partition(":")
        if not sep or kind not in ("icmp", "tcp", "tcp-syn", "dns"):
            raise ValueError(f"{text!r} is not TYPE:TARGET with TYPE icmp, tcp, tcp-syn or dns")
        address, port = parse_probe_target(kind, target)
        return cls(type=kind, address=address, port=port, timeout=timeout)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Measurement:
    """What one probe found: the outcome expectations are judged on, and the detail."""

    outcome: Outcome
    detail: str
    duration_seconds: float


@dataclass(frozen=True, slots=True)
class ProbeResult:
    name: str
    type: str
    target: str
    outcome: Outcome
    detail: str
    expected: str
    ok: bool
    duration_seconds: float
    checked_at: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        return (f"{self.name}: expected {self.expected}, got {self.outcome} ({self.detail}) "
                f"in {self.duration_seconds * 1000:.0f} ms")


def judge(outcome: Outcome, expected: str) -> bool:
    """Does what a probe found agree with what it should find? `any` is never checked."""
    return expected == "any" or outcome == expected


def run_probes(
    probes: Sequence[ProbeConfig],
    *,
    isolated: bool,
    measure_fn: Callable[[Sequence[ProbeSpec]], list[Measurement]] | None = None,
    clock: Callable[[], float] = time.time,
) -> list[ProbeResult]:
    """Run `probes` concurrently and judge each against its expectation for the state."""
    if not probes:
        return []
    checked_at = clock()
    measurements = (measure_fn or measure)([ProbeSpec.of(p) for p in probes])
    results = []
    for probe, m in zip(probes, measurements, strict=True):
        expected = probe.expect.for_state(isolated)
        results.append(ProbeResult(
            name=probe.name, type=probe.type, target=probe.target, outcome=m.outcome,
            detail=m.detail, expected=expected, ok=judge(m.outcome, expected),
            duration_seconds=round(m.duration_seconds, 6), checked_at=checked_at,
        ))
    return results


# ---------------------------------------------------------------------------- packets
# Builders and parsers are pure (bytes in, bytes/values out) and use scapy, imported here
# lazily. Parsers return None for anything that is not an answer to one of our probes.


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


_scapy_loaded = False


def load_scapy() -> None:
    """Import the scapy layers the probes use (about half a second, once per process).
    A sweep calls this before its first packet, so no probe's time includes it.

    Scapy loads Wireshark's MAC vendor table and the Bluetooth company ids at import
    (about 11 MB in a daemon whose budget is 80); IP probes never look at either, so
    they are emptied once here."""
    global _scapy_loaded
    if _scapy_loaded:
        return
    _quiet_scapy()
    import scapy.data
    import scapy.layers.dns
    import scapy.layers.inet
    import scapy.layers.inet6

    scapy.data.MANUFDB.d.clear()
    scapy.data.BLUETOOTH_CORE_COMPANY_IDENTIFIERS.clear()
    gc.collect()
    _scapy_loaded = True


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


def errno_measurement(err: int, elapsed: float, *, refused_reachable: bool) -> Measurement:
    """What a socket error says about the path (connect / UDP send and receive)."""
    if err == errno.ECONNREFUSED and refused_reachable:
        return Measurement(REACHABLE, "refused", elapsed)
    if err in _LOCAL_BLOCK:
        return Measurement(UNREACHABLE, _LOCAL_BLOCK[err], elapsed)
    if err in _NO_PATH:
        return Measurement(UNREACHABLE, _NO_PATH[err], elapsed)
    if err == errno.ETIMEDOUT:
        return Measurement(UNREACHABLE, "timeout", elapsed)
    return Measurement(ERROR, os.strerror(err), elapsed)


# ---------------------------------------------------------------------------- the loop


@dataclass
class _Slot:
    spec: ProbeSpec
    started: float = 0.0
    deadline: float = 0.0
    result: Measurement | None = None
    sock: socket.socket | None = None
    seq: int = 0  # icmp: echo seq; tcp-syn: our sequence number
    sport: int = 0
    txid: int = 0
    keys: list[tuple[Any, ...]] = field(default_factory=list)


def source_address(family: int, dst: str) -> str:
    """The address this host would send from to `dst` (kernel routing; nothing is sent)."""
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((dst, 9))
        return str(s.getsockname()[0])


class _Sweep:
    """One round of probes over one selector; see the module docstring."""

    def __init__(self, specs: Sequence[ProbeSpec], clock: Callable[[], float]) -> None:
        self.slots = [_Slot(spec) for spec in specs]
        self.clock = clock
        self.sel = selectors.DefaultSelector()
        self.raw: dict[tuple[int, int], socket.socket] = {}
        self.ident = secrets.randbelow(0xFFFF) + 1
        self.echo: dict[tuple[Any, ...], int] = {}  # (addr, ident, seq) -> slot
        self.syn: dict[tuple[Any, ...], int] = {}  # (addr, dport, sport) -> slot
        self.sources: dict[str, str] = {}
        self.heap: list[tuple[float, int]] = []
        self.open_sockets = 0
        self.queue: list[int] = []

    # -- bookkeeping -----------------------------------------------------------------

    def _finish(self, i: int, outcome: Outcome, detail: str) -> None:
        slot = self.slots[i]
        if slot.result is not None:
            return
        slot.result = Measurement(outcome, detail, max(0.0, self.clock() - slot.started))
        for key in slot.keys:
            self.echo.pop(key, None)
            self.syn.pop(key, None)
        if slot.sock is not None:
            self.sel.unregister(slot.sock)
            slot.sock.close()
            slot.sock = None
            self.open_sockets -= 1

    def _finish_with(self, i: int, m: Measurement) -> None:
        self._finish(i, m.outcome, m.detail)

    def _begin(self, i: int) -> None:
        slot = self.slots[i]
        slot.started = self.clock()
        slot.deadline = slot.started + slot.spec.timeout
        heapq.heappush(self.heap, (slot.deadline, i))

    def _raw_socket(self, family: int, proto: int) -> socket.socket:
        key = (family, proto)
        if key not in self.raw:
            s = socket.socket(family, socket.SOCK_RAW, proto)
            try:
                try:
                    s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RAW_RCVBUF)  # root only
                except OSError:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RAW_RCVBUF)
                if family == socket.AF_INET6 and proto == socket.IPPROTO_TCP:
                    s.setsockopt(socket.IPPROTO_IPV6, IPV6_CHECKSUM, 16)  # kernel computes it
            except OSError:
                s.close()
                raise
            self.raw[key] = s
            self.sel.register(s, selectors.EVENT_READ, ("raw", family, proto))
        return self.raw[key]

    def _source(self, family: int, dst: str) -> str:
        if dst not in self.sources:
            self.sources[dst] = source_address(family, dst)
        return self.sources[dst]

    # -- starting probes ---------------------------------------------------------------

    def _prepare_raw(self, i: int) -> tuple[socket.socket, bytes] | None:
        """Source address, packet and socket of a raw probe. Building packets (scapy) is
        the slow part, so it happens for every probe before the first one is sent."""
        slot, spec = self.slots[i], self.slots[i].spec
        family = spec.family
        icmp_proto = socket.IPPROTO_ICMP if family == socket.AF_INET else socket.IPPROTO_ICMPV6
        try:
            icmp_sock = self._raw_socket(family, icmp_proto)  # also hears errors about SYNs
            tcp_sock = (self._raw_socket(family, socket.IPPROTO_TCP)
                        if spec.type == "tcp-syn" else None)
        except OSError as exc:
            # Not being allowed to probe proves nothing about the path: an error, never
            # "unreachable" (which could verify an isolation nobody checked).
            self._begin(i)
            self._finish(i, ERROR, f"raw socket: {exc.strerror or exc} (needs root or "
                         "CAP_NET_RAW)")
            return None
        try:
            src = self._source(family, spec.address)
        except OSError as exc:
            self._begin(i)
            self._fail_os(i, exc)
            return None
        if tcp_sock is None:
            slot.seq = i & 0xFFFF
            return icmp_sock, build_echo(family, src, spec.address, self.ident, slot.seq)
        assert spec.port is not None
        slot.seq = secrets.randbits(32)
        slot.sport = 32768 + secrets.randbelow(28000)
        return tcp_sock, build_syn(family, src, spec.address, slot.sport, spec.port, slot.seq)

    def _send_raw(self, i: int, sock: socket.socket, packet: bytes) -> None:
        slot, spec = self.slots[i], self.slots[i].spec
        key: tuple[Any, ...]
        if spec.type == "icmp":
            key = (spec.address, self.ident, slot.seq)
            self.echo[key] = i
        else:
            key = (spec.address, spec.port, slot.sport)
            self.syn[key] = i
        slot.keys.append(key)
        self._begin(i)
        try:
            sock.sendto(packet, (spec.address, 0))
        except OSError as exc:
            self._fail_os(i, exc)

    def _fail_os(self, i: int, exc: OSError) -> None:
        err = exc.errno or 0
        if err in _LOCAL_BLOCK or err in _NO_PATH:
            self._finish_with(i, errno_measurement(err, 0.0, refused_reachable=False))
        else:
            self._finish(i, ERROR, f"{type(exc).__name__}: {exc.strerror or exc}")

    def _start_socket(self, i: int) -> None:
        slot, spec = self.slots[i], self.slots[i].spec
        assert spec.port is not None
        kind = socket.SOCK_STREAM if spec.type == "tcp" else socket.SOCK_DGRAM
        self._begin(i)
        try:
            sock = socket.socket(spec.family, kind)
        except OSError as exc:
            self._finish(i, ERROR, f"socket: {exc.strerror or exc}")
            return
        sock.setblocking(False)
        slot.sock = sock
        self.open_sockets += 1
        try:
            if spec.type == "tcp":
                err = sock.connect_ex((spec.address, spec.port))
                self.sel.register(sock, selectors.EVENT_WRITE, ("tcp", i))
                if err not in (0, errno.EINPROGRESS):
                    self._finish_with(i, errno_measurement(err, 0.0, refused_reachable=True))
            else:
                self.sel.register(sock, selectors.EVENT_READ, ("dns", i))
                sock.connect((spec.address, spec.port))
                slot.txid = secrets.randbelow(0xFFFF) + 1
                sock.send(build_dns_query(slot.txid, spec.query))
        except OSError as exc:
            err = exc.errno or 0
            if err == errno.ECONNREFUSED:
                self._finish(i, REACHABLE, "refused")
            else:
                self._fail_os(i, exc)

    def _start_queued(self) -> None:
        while self.queue and self.open_sockets < MAX_IN_FLIGHT_SOCKETS:
            self._start_socket(self.queue.pop())

    # -- answers -------------------------------------------------------------------------

    def _drain(self, family: int, proto: int) -> None:
        sock = self.raw[(family, proto)]
        while True:
            try:
                data, addr = sock.recvfrom(65535, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("raw socket receive error: %s", exc)
                return
            src = str(addr[0]).split("%")[0]
            if proto == socket.IPPROTO_TCP:
                self._on_tcp(family, data, src)
            else:
                answer = (parse_icmp4(data) if family == socket.AF_INET
                          else parse_icmp6(data, src))
                if answer is not None:
                    self._on_icmp(answer)

    def _on_tcp(self, family: int, data: bytes, src: str) -> None:
        segment = data[(data[0] & 0x0F) * 4:] if family == socket.AF_INET else data
        ports = tcp_ports(segment)
        if ports is None:
            return
        i = self.syn.get((src, ports[0], ports[1]))
        if i is None:
            return
        answer = parse_tcp(segment, src)
        state = None if answer is None else classify_tcp(answer, self.slots[i].seq)
        if state is not None:
            self._finish(i, REACHABLE, state)

    def _on_icmp(self, answer: Answer) -> None:
        if isinstance(answer, EchoReply):
            i = self.echo.get((answer.src, answer.ident, answer.seq))
            if i is not None:
                self._finish(i, REACHABLE, "echo-reply")
        elif isinstance(answer, IcmpError):
            if answer.inner_proto == 6:
                i = self.syn.get((answer.inner_dst, answer.inner_b, answer.inner_a))
                if i is not None:
                    self._finish(i, UNREACHABLE, f"filtered ({answer.text()})")
            else:
                i = self.echo.get((answer.inner_dst, answer.inner_a, answer.inner_b))
                if i is not None:
                    self._finish(i, UNREACHABLE, answer.text())

    def _on_tcp_connect(self, i: int) -> None:
        sock = self.slots[i].sock
        assert sock is not None
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err == 0:
            self._finish(i, REACHABLE, "connected")
        else:
            self._finish_with(i, errno_measurement(err, 0.0, refused_reachable=True))

    def _on_dns(self, i: int) -> None:
        slot = self.slots[i]
        assert slot.sock is not None
        while slot.sock is not None:
            try:
                data = slot.sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno == errno.ECONNREFUSED:
                    self._finish(i, REACHABLE, "port-unreachable")
                else:
                    self._fail_os(i, exc)
                return
            detail = parse_dns_reply(data, slot.txid)
            if detail is not None:
                self._finish(i, REACHABLE, detail)

    def _dispatch(self, events: list[tuple[selectors.SelectorKey, int]]) -> None:
        for key, _mask in events:
            data = key.data
            if data[0] == "raw":
                self._drain(data[1], data[2])
            elif self.slots[data[1]].result is None:
                if data[0] == "tcp":
                    self._on_tcp_connect(data[1])
                else:
                    self._on_dns(data[1])

    def _expire(self) -> None:
        """Time out probes past their deadline; drop finished ones from the heap."""
        now = self.clock()
        while self.heap and (self.heap[0][0] <= now
                             or self.slots[self.heap[0][1]].result is not None):
            _, i = heapq.heappop(self.heap)
            slot = self.slots[i]
            if slot.result is None:
                detail = {"icmp": "no-reply", "tcp-syn": "filtered", "tcp": "timeout",
                          "dns": "no-reply"}[slot.spec.type]
                self._finish(i, UNREACHABLE, detail)

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> list[Measurement]:
        load_scapy()
        try:
            raw = [i for i, s in enumerate(self.slots) if s.spec.type in ("icmp", "tcp-syn")]
            self.queue = [i for i, s in enumerate(self.slots)
                          if s.spec.type in ("tcp", "dns")][::-1]
            prepared = [(i, p) for i in raw if (p := self._prepare_raw(i)) is not None]
            self._start_queued()
            for n, (i, (sock, packet)) in enumerate(prepared, 1):
                self._send_raw(i, sock, packet)
                if n % SEND_BATCH == 0:
                    self._dispatch(self.sel.select(0))
            while True:
                self._expire()
                self._start_queued()
                if not self.heap:  # every probe started has an answer or timed out
                    break
                wait = max(0.0, self.heap[0][0] - self.clock())
                self._dispatch(self.sel.select(wait))
            return [s.result or Measurement(ERROR, "not run", 0.0) for s in self.slots]
        finally:
            for slot in self.slots:
                if slot.sock is not None:
                    slot.sock.close()
            for s in self.raw.values():
                s.close()
            self.sel.close()


def measure(
    specs: Sequence[ProbeSpec], *, clock: Callable[[], float] = time.monotonic
) -> list[Measurement]:
    """Probe every spec concurrently; results in the same order. Never raises for a
    single probe's failure: that probe's outcome is `error`."""
    if not specs:
        return []
    return _Sweep(specs, clock).run()


# ---------------------------------------------------------------------------- command line


def _sweep_json(targets: Sequence[str], timeout: float) -> dict[str, Any]:
    specs = [ProbeSpec.parse(t, timeout) for t in targets]
    started = time.monotonic()
    found = measure(specs)
    return {"seconds": round(time.monotonic() - started, 6),
            "results": [{"probe": t, **asdict(m)} for t, m in zip(targets, found, strict=True)]}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m agent.probes [--timeout S] [--json] TYPE:TARGET...`` (labs, benchmarks):
    probe from the current network namespace and print what came back. With ``--serve``
    it reads one JSON request per line on stdin (``{"targets": [...], "timeout": 1}``)
    and answers each with one JSON line, paying the start-up (scapy) only once."""
    parser = argparse.ArgumentParser(prog="python -m agent.probes", description=main.__doc__)
    parser.add_argument("targets", nargs="*", help="e.g. icmp:198.51.100.10 "
                        "tcp-syn:[2001:db8::1]:443 tcp:10.0.0.1:22 dns:192.0.2.53")
    parser.add_argument("--timeout", type=float, default=1.0)
    parser.add_argument("--json", action="store_true", help="JSON lines output")
    parser.add_argument("--serve", action="store_true", help="requests on stdin, JSON lines")
    args = parser.parse_args(argv)
    if args.serve:
        load_scapy()
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                req = json.loads(line)
                reply = _sweep_json(req["targets"], float(req.get("timeout", args.timeout)))
            except (ValueError, KeyError, TypeError) as exc:
                reply = {"error": str(exc)}
            print(json.dumps(reply), flush=True)
        return 0
    if not args.targets:
        parser.error("give at least one TYPE:TARGET (or --serve)")
    try:
        specs = [ProbeSpec.parse(t, args.timeout) for t in args.targets]
    except ValueError as exc:
        parser.error(str(exc))
    for text, m in zip(args.targets, measure(specs), strict=True):
        if args.json:
            print(json.dumps({"probe": text, **asdict(m)}))
        else:
            print(f"{text}\t{m.outcome}\t{m.detail}\t{m.duration_seconds * 1000:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
