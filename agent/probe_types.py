"""The probes' value types: what to probe (``ProbeSpec``) and what one probe found
(``Measurement``, whose coarse ``Outcome`` expectations are written against), and what a
socket error says about the path (``errno_measurement``).

A leaf module (the standard library and agent.config only: no sockets opened, no
scapy), so that the sweep (agent.probe_sweep) and the public face (agent.probes) share
these without importing each other.
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from agent.config import DEFAULT_DNS_QUERY, ProbeConfig, ProbeType, parse_probe_target

Outcome = Literal["reachable", "unreachable", "error"]
REACHABLE: Outcome = "reachable"
UNREACHABLE: Outcome = "unreachable"
ERROR: Outcome = "error"
# errors that mean "this host refuses to send it / has no way there": unreachable
LOCAL_BLOCK = MappingProxyType({errno.EPERM: "blocked-locally",
                                 errno.EACCES: "blocked-locally"})
NO_PATH = MappingProxyType({errno.ENETUNREACH: "no-route", errno.EHOSTUNREACH: "host-unreachable",
                            errno.EADDRNOTAVAIL: "no-source-address",
                            errno.ENETDOWN: "network-down"})


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


def errno_measurement(err: int, elapsed: float, *, refused_reachable: bool) -> Measurement:
    """What a socket error says about the path (connect / UDP send and receive)."""
    if err == errno.ECONNREFUSED and refused_reachable:
        return Measurement(REACHABLE, "refused", elapsed)
    if err in LOCAL_BLOCK:
        return Measurement(UNREACHABLE, LOCAL_BLOCK[err], elapsed)
    if err in NO_PATH:
        return Measurement(UNREACHABLE, NO_PATH[err], elapsed)
    if err == errno.ETIMEDOUT:
        return Measurement(UNREACHABLE, "timeout", elapsed)
    return Measurement(ERROR, os.strerror(err), elapsed)
