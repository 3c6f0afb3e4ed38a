"""Crafted packets in, what arrived out (standard library only, runnable by path).

Run inside a namespace (``ip netns exec NS python rawwire.py ...``)::

    rawwire.py listen             print READY, then record every packet delivered to
                                  this namespace's own stack (raw sockets: TCP, UDP,
                                  ICMP, ICMPv6; IPv4 and IPv6) that carries a marker
                                  (``DBX`` + 8 hex digits); at end of stdin print the
                                  markers seen, as a JSON list
    rawwire.py send [--dev IF] HEX...
                                  send each packet (a whole IPv4 or IPv6 packet, hex)
                                  as it is, twice, through a raw socket: the kernel
                                  routes it and adds nothing, spoofed source included
                                  (--dev: the interface of link-local destinations)
    rawwire.py blast SECONDS HEX...
                                  send the packets over and over (every 5 ms) for SECONDS
                                  (no error stops it: links may be down a while)
    rawwire.py pmtu ADDR PORT     a connected UDP socket with path MTU discovery on:
                                  send one datagram, print its source port, and at end
                                  of stdin print the path MTU the kernel now holds for it
                                  (an ICMP "too big" that arrived lowers it)

Raw sockets receive a copy of a packet only once it is delivered locally, after
the netfilter input hook (and after reassembly): what they see is what *arrived*,
not what was on the wire. Spoofed packets never see replies, so arrival is the
only honest measure.
"""

from __future__ import annotations

import json
import re
import select
import socket
import sys
import threading
import time

MARKER = re.compile(rb"DBX[0-9a-f]{8}")
PROTOCOLS = (socket.IPPROTO_TCP, socket.IPPROTO_UDP)
IPPROTO_ICMPV6 = 58
# <linux/in.h>, <linux/in6.h>: not all exported by Python's socket module
IP_MTU_DISCOVER, IP_MTU, IPV6_MTU_DISCOVER, IPV6_MTU, PMTUDISC_DO = 10, 14, 23, 24, 2


def _sockets() -> list[socket.socket]:
    socks = [socket.socket(socket.AF_INET, socket.SOCK_RAW, p)
             for p in (*PROTOCOLS, socket.IPPROTO_ICMP)]
    socks += [socket.socket(socket.AF_INET6, socket.SOCK_RAW, p)
              for p in (*PROTOCOLS, IPPROTO_ICMPV6)]
    for s in socks:
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    return socks


def listen() -> int:
    socks = _sockets()
    seen: set[str] = set()
    done = threading.Event()

    def wait_for_eof() -> None:
        sys.stdin.read()
        done.set()

    threading.Thread(target=wait_for_eof, daemon=True).start()
    print("READY", flush=True)
    while not done.is_set():
        ready, _, _ = select.select(socks, [], [], 0.05)
        for s in ready:
            while True:
                try:
                    data = s.recv(65535)
                except BlockingIOError:
                    break
                seen.update(m.decode() for m in MARKER.findall(data))
    # what is still queued arrived before the end too
    for s in socks:
        while True:
            try:
                seen.update(m.decode() for m in MARKER.findall(s.recv(65535)))
            except BlockingIOError:
                break
    print(json.dumps(sorted(seen)), flush=True)
    return 0


def send(packets: list[bytes], dev: str | None = None) -> int:
    v4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    v6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
    scope = socket.if_nametoindex(dev) if dev else 0
    for _ in range(2):  # the first packet to a new neighbour may wait for ARP/NDP
        for packet in packets:
            if packet[0] >> 4 == 4:
                dst = socket.inet_ntop(socket.AF_INET, packet[16:20])
                v4.sendto(packet, (dst, 0))
            else:
                dst = socket.inet_ntop(socket.AF_INET6, packet[24:40])
                v6.sendto(packet, (dst, 0, 0, scope))
        time.sleep(0.2)
    return 0


def blast(seconds: float, packets: list[bytes]) -> int:
    v4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    v6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for packet in packets:
            try:
                if packet[0] >> 4 == 4:
                    v4.sendto(packet, (socket.inet_ntop(socket.AF_INET, packet[16:20]), 0))
                else:
                    v6.sendto(packet, (socket.inet_ntop(socket.AF_INET6, packet[24:40]), 0))
            except OSError:
                pass  # a link that is down, a route that is not there yet
        time.sleep(0.005)
    return 0


def pmtu(addr: str, port: int) -> int:
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        level, discover, mtu_opt = ((socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_MTU)
                                    if fam == socket.AF_INET else
                                    (socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_MTU))
        s.setsockopt(level, discover, PMTUDISC_DO)
        s.connect((addr, port))
        s.send(b"pmtu")
        print(s.getsockname()[1], flush=True)
        sys.stdin.read()
        print(s.getsockopt(level, mtu_opt), flush=True)
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["listen"]:
        return listen()
    if argv[:1] == ["send"]:
        args, dev = argv[1:], None
        if args[:1] == ["--dev"]:
            dev, args = args[1], args[2:]
        return send([bytes.fromhex(h) for h in args], dev)
    if argv[:1] == ["blast"] and len(argv) >= 3:
        return blast(float(argv[1]), [bytes.fromhex(h) for h in argv[2:]])
    if argv[:1] == ["pmtu"] and len(argv) == 3:
        return pmtu(argv[1], int(argv[2]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
