"""Echo server of the namespace lab (standard library only, runnable by path).

    python -m drawbridge_lab.echo --tcp 80,443 --udp 53,5353 [--netns NAME]... [--watch-stdin]

Binds dual-stack (``::`` with IPV6_V6ONLY=0) TCP and UDP sockets on the given
ports in its own network namespace and, for every ``--netns NAME``, also in
the namespace ``/run/netns/NAME`` (one process can serve many namespaces: a
socket stays in the namespace it was created in). TCP connections get every
byte echoed back (so a line comes back as the same line); UDP datagrams are
echoed from the address they were sent to (IPV6_PKTINFO), so a reply to a
gateway's outside address is not sourced from its inside address.

Prints ``READY`` on stdout once every socket listens. With ``--watch-stdin``
it exits when stdin reaches end of file (its owner died), so a crashed test
run does not leave servers behind.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import selectors
import signal
import socket
import sys
from collections.abc import Sequence

CLONE_NEWNET = 0x40000000
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
MAX_DATAGRAM = 65535
MAX_PENDING = 1 << 20


def setns(fd: int) -> None:
    """Move the calling thread into the network namespace open at ``fd``."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def parse_ports(text: str) -> list[int]:
    ports = [int(p) for p in text.split(",") if p.strip()]
    for port in ports:
        if not 0 < port < 65536:
            raise argparse.ArgumentTypeError(f"bad port {port}")
    return ports


def bind_sockets(tcp: Sequence[int], udp: Sequence[int]) -> list[socket.socket]:
    """Create the listening sockets in the calling thread's network namespace."""
    out: list[socket.socket] = []
    for port in tcp:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", port))
        s.listen(128)
        s.setblocking(False)
        out.append(s)
    for port in udp:
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
        s.bind(("::", port))
        s.setblocking(False)
        out.append(s)
    return out


class EchoServer:
    """A single-threaded selector loop over listeners, connections and UDP sockets."""

    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.pending: dict[socket.socket, bytearray] = {}
        self.running = True

    def add_listener(self, s: socket.socket) -> None:
        if s.type == socket.SOCK_STREAM:
            self.sel.register(s, selectors.EVENT_READ, self.accept)
        else:
            self.sel.register(s, selectors.EVENT_READ, self.datagram)

    def watch_stdin(self) -> None:
        self.sel.register(sys.stdin.fileno(), selectors.EVENT_READ, self.stdin_ready)

    def stdin_ready(self, key: selectors.SelectorKey, mask: int) -> None:
        fd = key.fd if isinstance(key.fileobj, int) else key.fileobj.fileno()
        if not os.read(fd, 4096):
            self.running = False

    def accept(self, key: selectors.SelectorKey, mask: int) -> None:
        listener = key.fileobj
        assert isinstance(listener, socket.socket)
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        conn.setblocking(False)
        self.pending[conn] = bytearray()
        self.sel.register(conn, selectors.EVENT_READ, self.conn_ready)

    def close(self, conn: socket.socket) -> None:
        self.sel.unregister(conn)
        self.pending.pop(conn, None)
        conn.close()

    def conn_ready(self, key: selectors.SelectorKey, mask: int) -> None:
        conn = key.fileobj
        assert isinstance(conn, socket.socket)
        buf = self.pending[conn]
        if mask & selectors.EVENT_READ:
            try:
                data = conn.recv(65536)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                self.close(conn)
                return
            if data == b"":
                self.close(conn)
                return
            if data:
                buf += data
        if buf:
            try:
                sent = conn.send(buf)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.close(conn)
                return
            del buf[:sent]
        events = selectors.EVENT_WRITE if buf else selectors.EVENT_READ
        if len(buf) < MAX_PENDING:
            events |= selectors.EVENT_READ
        self.sel.modify(conn, events, self.conn_ready)

    def datagram(self, key: selectors.SelectorKey, mask: int) -> None:
        s = key.fileobj
        assert isinstance(s, socket.socket)
        for _ in range(64):
            try:
                data, anc, _flags, peer = s.recvmsg(MAX_DATAGRAM, socket.CMSG_SPACE(20))
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            reply_anc = []
            for level, kind, payload in anc:
                if level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO and len(payload) >= 16:
                    # Answer from the destination address, any interface.
                    reply_anc.append((level, kind, payload[:16] + b"\0\0\0\0"))
            try:
                s.sendmsg([data], reply_anc, 0, peer)
            except OSError:
                continue

    def serve(self) -> None:
        while self.running:
            for key, mask in self.sel.select(timeout=1.0):
                callback = key.data
                callback(key, mask)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="drawbridge_lab.echo", description=__doc__.split("\n")[0])
    parser.add_argument("--tcp", type=parse_ports, default=[], help="comma-separated TCP ports")
    parser.add_argument("--udp", type=parse_ports, default=[], help="comma-separated UDP ports")
    parser.add_argument(
        "--netns", action="append", default=[], help="also serve in /run/netns/NAME (repeatable)"
    )
    parser.add_argument("--watch-stdin", action="store_true", help="exit when stdin closes")
    args = parser.parse_args(argv)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server = EchoServer()
    for s in bind_sockets(args.tcp, args.udp):
        server.add_listener(s)
    if args.netns:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            for name in args.netns:
                fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
                try:
                    setns(fd)
                finally:
                    os.close(fd)
                for s in bind_sockets(args.tcp, args.udp):
                    server.add_listener(s)
        finally:
            setns(own)  # live in the namespace we were started in
            os.close(own)
    if args.watch_stdin:
        server.watch_stdin()
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    server.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
