"""Crafted packets sent from one namespace, and what arrived in others.

::

    with listening(lab, [gw.internal_ns, gw.ns]) as arrived:
        send_packets(lab, lab.outside_ns, [bytes(pkt) for pkt in crafted])
    arrived[gw.internal_ns]  # the markers that were delivered there

The packets are built by the caller (scapy, in the test process) and sent as they
are by `rawwire.py send` in the source namespace; `rawwire.py listen` in every
target namespace records the markers of what its stack received (see rawwire.py).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .stream import LineReader
from .topology import PY, Lab, LabError

RAWWIRE = str(Path(__file__).with_name("rawwire.py"))
SETTLE_SECONDS = 0.5  # after the last packet: forwarding and delivery are sub-millisecond


def new_marker() -> str:
    """A marker to put in a crafted packet's payload (what `rawwire.py` looks for)."""
    return "DBX" + secrets.token_hex(4)


def send_packets(lab: Lab, ns: str, packets: Sequence[bytes], *, dev: str | None = None) -> None:
    """Send crafted packets from `ns` as they are (dev: for link-local destinations)."""
    if packets:
        lab.run(ns, [*PY, RAWWIRE, "send", *(["--dev", dev] if dev else []),
                     *(p.hex() for p in packets)], timeout=60)


@contextlib.contextmanager
def listening(lab: Lab, namespaces: Sequence[str]) -> Iterator[dict[str, set[str]]]:
    """Record markers arriving in `namespaces` while the block runs; the dict is filled
    when the block ends."""
    procs: dict[str, subprocess.Popen[Any]] = {}
    arrived: dict[str, set[str]] = {}
    try:
        for ns in namespaces:
            proc = lab.popen(ns, [*PY, RAWWIRE, "listen"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            assert proc.stdout is not None
            if LineReader(proc.stdout.fileno()).readline(10.0) != "READY":
                raise LabError(f"rawwire listener in {ns} did not start")
            procs[ns] = proc
        yield arrived
        time.sleep(SETTLE_SECONDS)
    finally:
        for ns, proc in procs.items():
            assert proc.stdin is not None
            out, err = proc.communicate(input=b"", timeout=30)
            if proc.returncode != 0:
                raise LabError(f"rawwire listener in {ns} failed: {err.decode()[-500:]}")
            arrived[ns] = set(json.loads(out.decode().split("\n")[-2]))


class PathMtu:
    """A connected UDP socket in `ns` towards (addr, port) with path MTU discovery on;
    `port` is its source port, `result()` ends it and returns the path MTU the kernel
    then holds (lowered by an ICMP "too big" that arrived about this flow)."""

    def __init__(self, lab: Lab, ns: str, addr: str, port: int) -> None:
        self._proc = lab.popen(ns, [*PY, RAWWIRE, "pmtu", addr, str(port)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self._proc.stdout is not None
        line = LineReader(self._proc.stdout.fileno()).readline(10.0)
        if not line or not line.isdigit():
            raise LabError(f"rawwire pmtu in {ns} did not start: {line!r}")
        self.port = int(line)

    def result(self) -> int:
        out, _ = self._proc.communicate(input=b"", timeout=10)
        return int(out.decode().split()[-1])


def blast(lab: Lab, ns: str, packets: Sequence[bytes], seconds: float) -> subprocess.Popen[Any]:
    """Send `packets` from `ns` over and over for `seconds`, in the background."""
    return lab.popen(ns, [*PY, RAWWIRE, "blast", str(seconds), *(p.hex() for p in packets)],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
