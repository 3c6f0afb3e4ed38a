"""Runs inside a namespace: many reachability checks at once, results as JSON.

    ip netns exec NS python flowcheck.py '[{"id": "a", "kind": "tcp", "addr": "...", "port": 80}]'

tcp: connect and get one line echoed; udp: one datagram echoed; icmp: one echo
reply (ping). Every check has the same short timeout and they run concurrently,
so a phase with many blocked flows costs one timeout, not one per flow.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

TIMEOUT = 1.0


def _family(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def tcp(addr: str, port: int) -> bool:
    try:
        with socket.create_connection((addr, port), timeout=TIMEOUT) as s:
            s.sendall(b"drawbridge\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(64)
                if not chunk:
                    break
                data += chunk
            return data == b"drawbridge\n"
    except OSError:
        return False


def udp(addr: str, port: int) -> bool:
    with socket.socket(_family(addr), socket.SOCK_DGRAM) as s:
        s.settimeout(TIMEOUT)
        try:
            s.sendto(b"drawbridge", (addr, port))
            data, _ = s.recvfrom(64)
        except OSError:
            return False
        return data == b"drawbridge"


def icmp(addr: str, port: int) -> bool:
    del port
    proc = subprocess.run(
        ["ping", "-nq", "-c", "1", "-W", str(int(TIMEOUT)), addr],
        capture_output=True,
        check=False,
        timeout=TIMEOUT + 5,
    )
    return proc.returncode == 0


def main() -> None:
    checks: list[dict[str, Any]] = json.loads(sys.argv[1])
    kinds = {"tcp": tcp, "udp": udp, "icmp": icmp}
    with ThreadPoolExecutor(max_workers=max(1, len(checks))) as pool:
        futures = {
            c["id"]: pool.submit(kinds[c["kind"]], c["addr"], int(c.get("port", 0))) for c in checks
        }
        print(json.dumps({cid: f.result() for cid, f in futures.items()}))


if __name__ == "__main__":
    main()
