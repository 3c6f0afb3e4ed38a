"""Deterministic address plan of the Drawbridge namespace lab.

Every address is a pure function of the gateway index ``i`` (0 <= i < MAX_GATEWAYS)::

    gateway i, internal network    10.(20+i).0.0/16          fd20:i::/48
      int{i}   (internal host)     10.(20+i).1.10/24         fd20:i:0:1::10/64
      int{i}b  (2nd internal host) 10.(20+i).2.10/24         fd20:i:0:2::10/64
      gw{i} "inside"  (to int{i})  10.(20+i).1.1/24          fd20:i:0:1::1/64
      gw{i} "inside2" (to int{i}b) 10.(20+i).2.1/24          fd20:i:0:2::1/64
      gw{i} "outside"              198.51.100.(100+i)/24     2001:db8:100::(100+i in hex)/64
      gw{i} "mgmt"                 10.99.0.(100+i)/24        fd99::(100+i in hex)/64
    outside host ("the internet")  198.51.100.10/24          2001:db8:100::10/64
    mgmt host (controller, Prom.)  10.99.0.10/24             fd99::10/64

Each site is an IPv6 /48 whose subnets use the fourth group (the subnet ID),
so both /64s lie inside the /48 (``fd20:i:1::/64`` would not: a /48 fixes three
groups). In the IPv6 prefixes ``i`` is written in decimal digits (gateway 12
owns ``fd20:12::/48``); any group of decimal digits is a valid IPv6 group. Gateway 0
owns ``10.20.0.0/16`` and ``fd20::/48``, the example of docs/design.md. The second
internal octet stops at 10.98, below the management network 10.99, hence
``MAX_GATEWAYS = 79``.

Addresses are returned in canonical (compressed) text form, as ``ipaddress``
prints them, so they compare equal to what tools and the kernel print.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

MAX_GATEWAYS = 79

OUTSIDE_SUBNET4 = "198.51.100.0/24"
OUTSIDE_SUBNET6 = "2001:db8:100::/64"
OUTSIDE_HOST4 = "198.51.100.10"
OUTSIDE_HOST6 = "2001:db8:100::10"

MGMT_SUBNET4 = "10.99.0.0/24"
MGMT_SUBNET6 = "fd99::/64"
MGMT_HOST4 = "10.99.0.10"
MGMT_HOST6 = "fd99::10"


def _v4(text: str) -> str:
    return str(ipaddress.IPv4Address(text))


def _v6(text: str) -> str:
    return str(ipaddress.IPv6Address(text))


def _net(text: str) -> str:
    return str(ipaddress.ip_network(text))


@dataclass(frozen=True, slots=True)
class GatewayAddresses:
    """All addresses that belong to gateway ``index`` (see the module docstring)."""

    index: int
    internal_networks: tuple[str, str]
    internal_subnet4: str
    internal_subnet6: str
    internal2_subnet4: str
    internal2_subnet6: str
    internal_host4: str
    internal_host6: str
    internal2_host4: str
    internal2_host6: str
    inside_addr4: str
    inside_addr6: str
    inside2_addr4: str
    inside2_addr6: str
    outside_addr4: str
    outside_addr6: str
    mgmt_addr4: str
    mgmt_addr6: str


def gateway_addresses(index: int) -> GatewayAddresses:
    """Return the address plan of gateway ``index``; ValueError outside the plan."""
    if not 0 <= index < MAX_GATEWAYS:
        raise ValueError(f"gateway index {index} outside 0..{MAX_GATEWAYS - 1}")
    o = 20 + index
    g = str(index)  # decimal digits used as one IPv6 group
    host = 100 + index
    return GatewayAddresses(
        index=index,
        internal_networks=(_net(f"10.{o}.0.0/16"), _net(f"fd20:{g}::/48")),
        internal_subnet4=_net(f"10.{o}.1.0/24"),
        internal_subnet6=_net(f"fd20:{g}:0:1::/64"),
        internal2_subnet4=_net(f"10.{o}.2.0/24"),
        internal2_subnet6=_net(f"fd20:{g}:0:2::/64"),
        internal_host4=_v4(f"10.{o}.1.10"),
        internal_host6=_v6(f"fd20:{g}:0:1::10"),
        internal2_host4=_v4(f"10.{o}.2.10"),
        internal2_host6=_v6(f"fd20:{g}:0:2::10"),
        inside_addr4=_v4(f"10.{o}.1.1"),
        inside_addr6=_v6(f"fd20:{g}:0:1::1"),
        inside2_addr4=_v4(f"10.{o}.2.1"),
        inside2_addr6=_v6(f"fd20:{g}:0:2::1"),
        outside_addr4=_v4(f"198.51.100.{host}"),
        outside_addr6=_v6(f"2001:db8:100::{host:x}"),
        mgmt_addr4=_v4(f"10.99.0.{host}"),
        mgmt_addr6=_v6(f"fd99::{host:x}"),
    )
