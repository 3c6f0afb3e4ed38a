"""Traffic probes of the namespace lab (standard library only, runnable by path).

Run inside a namespace (``ip netns exec NS python probe.py ...``)::

    probe.py tcp ADDR PORT [--timeout S]         connect, send one line, expect it echoed
    probe.py udp ADDR PORT [--timeout S]         send one datagram, expect it echoed
    probe.py banner ADDR PORT PREFIX [--timeout S]  connect, expect data starting with PREFIX
    probe.py stream ADDR PORT [--timeout S]      keep one TCP connection open (see below)

Exit status 0 means success, 1 failure (reason on stderr), 2 usage error.

``stream`` prints ``CONNECTED LOCALPORT`` (or ``FAILED reason`` and exits 1), then reads
commands ``TOKEN TIMEOUT`` on stdin; for each it sends ``TOKEN\\n`` over the
connection and prints ``OK TOKEN`` once that line came back within TIMEOUT
seconds, else ``FAIL TOKEN reason``. End of stdin closes the connection.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from collections.abc import Sequence


def _family(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _token() -> bytes:
    return b"drawbridge-probe-" + os.urandom(6).hex().encode()


def connect(addr: str, port: int, timeout: float) -> socket.socket:
    s = socket.socket(_family(addr), socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((addr, port))
    except BaseException:
        s.close()
        raise
    return s


def read_until(s: socket.socket, want: bytes, deadline: float, buf: bytearray) -> bool:
    """Read into ``buf`` until a line equal to ``want`` is complete; drop other lines."""
    while True:
        while b"\n" in buf:
            line, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            if line == want:
                return True
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        s.settimeout(left)
        data = s.recv(65536)
        if not data:
            raise ConnectionError("connection closed by peer")
        buf += data


def probe_tcp(addr: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with connect(addr, port, timeout) as s:
        token = _token()
        s.sendall(token + b"\n")
        read_until(s, token, deadline, bytearray())


def probe_udp(addr: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with socket.socket(_family(addr), socket.SOCK_DGRAM) as s:
        s.connect((addr, port))
        token = _token()
        tries = 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("timed out")
            s.send(token)
            tries += 1
            # Resend once half-way: a first datagram may wait for neighbour resolution.
            s.settimeout(min(left, timeout / 2) if tries == 1 else left)
            try:
                while True:
                    if s.recv(65536) == token:
                        return
            except TimeoutError:
                continue


def probe_banner(addr: str, port: int, prefix: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with connect(addr, port, timeout) as s:
        data = b""
        want = prefix.encode()
        while len(data) < len(want):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("timed out")
            s.settimeout(left)
            chunk = s.recv(4096)
            if not chunk:
                raise ConnectionError("connection closed by peer")
            data += chunk
        if not data.startswith(want):
            raise ConnectionError(f"unexpected banner {data[:40]!r}")


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def probe_stream(addr: str, port: int, timeout: float) -> int:
    try:
        s = connect(addr, port, timeout)
    except OSError as exc:
        _say(f"FAILED {exc!r}")
        return 1
    _say(f"CONNECTED {s.getsockname()[1]}")
    buf = bytearray()
    broken: str | None = None
    with s:
        while raw := sys.stdin.readline():
            parts = raw.split()
            if len(parts) != 2:
                _say("FAIL ? bad command")
                continue
            token, wait = parts[0], float(parts[1])
            if broken is not None:
                _say(f"FAIL {token} {broken}")
                continue
            try:
                s.sendall(token.encode() + b"\n")
                read_until(s, token.encode(), time.monotonic() + wait, buf)
            except TimeoutError:
                _say(f"FAIL {token} timeout")
                continue
            except OSError as exc:
                broken = type(exc).__name__
                _say(f"FAIL {token} {broken}")
                continue
            _say(f"OK {token}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="drawbridge_lab.probe")
    parser.add_argument("mode", choices=["tcp", "udp", "banner", "stream"])
    parser.add_argument("addr")
    parser.add_argument("port", type=int)
    parser.add_argument("prefix", nargs="?", default="SSH-")
    parser.add_argument("--timeout", type=float, default=1.0)
    args = parser.parse_args(argv)
    if args.mode == "stream":
        return probe_stream(args.addr, args.port, args.timeout)
    try:
        if args.mode == "tcp":
            probe_tcp(args.addr, args.port, args.timeout)
        elif args.mode == "udp":
            probe_udp(args.addr, args.port, args.timeout)
        else:
            probe_banner(args.addr, args.port, args.prefix, args.timeout)
    except OSError as exc:  # TimeoutError and ConnectionError are OSErrors
        sys.stderr.write(f"{args.mode} {args.addr} {args.port}: {exc!r}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
