"""The sweep: measure many probes at once, from this host, over non-blocking sockets.

A sweep is one loop over non-blocking sockets. Every probe is sent up
front, answers are matched as they arrive, and each probe has its own
deadline, so a silent target never holds up another probe; a sweep takes about
as long as its longest timeout. ICMP echo and TCP SYN use raw IP sockets (not
packet sockets): they go out through the kernel's routing and the netfilter
output hook, and answers are read after the input hook, so a probe sees what
this host's firewall really lets through. (A packet-socket capture would see
replies that nftables is about to drop, and would send past the output chain;
it would also need its own routing table, stale inside a network namespace.)

Packets are laid out and answers parsed by agent.probe_wire; what a socket error says
about the path is agent.probe_types.errno_measurement.
"""

from __future__ import annotations

import errno
import heapq
import logging
import secrets
import selectors
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.probe_types import (
    ERROR,
    LOCAL_BLOCK,
    NO_PATH,
    REACHABLE,
    UNREACHABLE,
    Measurement,
    Outcome,
    ProbeSpec,
    errno_measurement,
)
from agent.probe_wire import (
    Answer,
    EchoReply,
    IcmpError,
    build_dns_query,
    build_echo,
    build_syn,
    classify_tcp,
    load_scapy,
    parse_dns_reply,
    parse_icmp4,
    parse_icmp6,
    parse_tcp,
    tcp_ports,
)

MAX_IN_FLIGHT_SOCKETS = 512  # tcp/dns probes each hold a socket; raw probes share four
RAW_RCVBUF = 4 * 1024 * 1024
SEND_BATCH = 64  # drain answers after this many raw sends, so a big sweep never overflows
IPV6_CHECKSUM = getattr(socket, "IPV6_CHECKSUM", 7)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
log = logging.getLogger("drawbridge.probes")


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
        if err in LOCAL_BLOCK or err in NO_PATH:
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
