"""The lab's layout: names of namespaces and interfaces, and what builds them.

Pure: the lab (:mod:`drawbridge_lab.topology`) feeds these lines to ``ip -batch``
and to ``nsctl sysctl``. The addresses are in :mod:`drawbridge_lab.addressing`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from . import addressing as plan

# Interface names inside the namespaces (identical in every gateway namespace).
GW_INSIDE_IF = "inside"
GW_INSIDE2_IF = "inside2"
GW_OUTSIDE_IF = "outside"
GW_MGMT_IF = "mgmt"
HOST_IF = "eth0"
BRIDGE_IF = "br0"


@dataclasses.dataclass(frozen=True, slots=True)
class Gateway(plan.GatewayAddresses):
    """One gateway namespace with its two internal hosts (addresses: see addressing)."""

    name: str  # "gw0": the role, without the run prefix
    ns: str
    internal_ns: str
    internal2_ns: str
    inside_if: str = GW_INSIDE_IF
    inside2_if: str = GW_INSIDE2_IF
    outside_if: str = GW_OUTSIDE_IF
    mgmt_if: str = GW_MGMT_IF


def name_gateways(prefix: str, count: int) -> tuple[Gateway, ...]:
    """Gateways ``gw0 .. gw{count-1}`` of run prefix ``prefix``, with their addresses."""
    return tuple(
        Gateway(
            **{
                f.name: getattr(plan.gateway_addresses(i), f.name)
                for f in dataclasses.fields(plan.GatewayAddresses)
            },
            name=f"gw{i}",
            ns=f"{prefix}gw{i}",
            internal_ns=f"{prefix}int{i}",
            internal2_ns=f"{prefix}int{i}b",
        )
        for i in range(count)
    )


def sysctls(
    gateways: Sequence[Gateway], outside_ns: str, mgmt_ns: str
) -> dict[str, dict[str, str]]:
    """The sysctls of every namespace (gateways and the internet route, hosts do not)."""
    base = {
        "net/ipv6/conf/all/accept_dad": "0",
        "net/ipv6/conf/default/accept_dad": "0",
        "net/ipv4/conf/all/rp_filter": "0",
        "net/ipv4/conf/default/rp_filter": "0",
    }
    router = {
        **base,
        "net/ipv4/ip_forward": "1",
        "net/ipv6/conf/all/forwarding": "1",
    }
    host = {**base, "net/ipv4/ip_forward": "0", "net/ipv6/conf/all/forwarding": "0"}
    out: dict[str, dict[str, str]] = {}
    for gw in gateways:
        out[gw.ns] = router
        out[gw.internal_ns] = host
        out[gw.internal2_ns] = host
    # The internet routes between sites, without ICMP redirects on its bridge.
    out[outside_ns] = {
        **router,
        "net/ipv4/conf/all/send_redirects": "0",
        "net/ipv4/conf/default/send_redirects": "0",
    }
    out[mgmt_ns] = host
    return out


def veth_links(gateways: Sequence[Gateway], outside_ns: str, mgmt_ns: str) -> list[str]:
    """veth pairs, created directly inside the namespaces.

    Every end gets an ifindex unique in the lab: the kernel treats a veth
    carrier change as urgent only when the two ends' ifindexes differ, and
    in fresh namespaces both ends would otherwise be ifindex 2, delaying
    IPv6 readiness by up to a second.
    """
    lines = []
    index = 10
    for gw in gateways:
        for dev, peer, peer_ns in (
            (GW_INSIDE_IF, HOST_IF, gw.internal_ns),
            (GW_INSIDE2_IF, HOST_IF, gw.internal2_ns),
            (GW_OUTSIDE_IF, gw.name, outside_ns),
            (GW_MGMT_IF, gw.name, mgmt_ns),
        ):
            lines.append(
                f"link add {dev} index {index} netns {gw.ns} type veth"
                f" peer name {peer} index {index + 1} netns {peer_ns}"
            )
            index += 2
    return lines


def ip_config(gateways: Sequence[Gateway], outside_ns: str, mgmt_ns: str) -> dict[str, list[str]]:
    """``ip -batch`` lines per namespace (addresses, links up, routes)."""

    def iface(dev: str, addr4: str, addr6: str, plen6: int = 64) -> list[str]:
        return [
            f"addr add {addr4}/24 dev {dev}",
            f"addr add {addr6}/{plen6} dev {dev} nodad",
            f"link set {dev} up",
        ]

    cfg: dict[str, list[str]] = {}
    for gw in gateways:
        cfg[gw.ns] = [
            "link set lo up",
            *iface(GW_INSIDE_IF, gw.inside_addr4, gw.inside_addr6),
            *iface(GW_INSIDE2_IF, gw.inside2_addr4, gw.inside2_addr6),
            *iface(GW_OUTSIDE_IF, gw.outside_addr4, gw.outside_addr6),
            *iface(GW_MGMT_IF, gw.mgmt_addr4, gw.mgmt_addr6),
            f"route add default via {plan.OUTSIDE_HOST4}",
            f"route add ::/0 via {plan.OUTSIDE_HOST6}",
        ]
        for ns, a4, a6, gw4, gw6 in (
            (gw.internal_ns, gw.internal_host4, gw.internal_host6,
             gw.inside_addr4, gw.inside_addr6),
            (gw.internal2_ns, gw.internal2_host4, gw.internal2_host6,
             gw.inside2_addr4, gw.inside2_addr6),
        ):  # fmt: skip
            cfg[ns] = [
                "link set lo up",
                *iface(HOST_IF, a4, a6),
                f"route add default via {gw4}",
                f"route add ::/0 via {gw6}",
            ]
    for ns, a4, a6 in (
        (outside_ns, plan.OUTSIDE_HOST4, plan.OUTSIDE_HOST6),
        (mgmt_ns, plan.MGMT_HOST4, plan.MGMT_HOST6),
    ):
        lines = ["link set lo up"]
        if len(gateways) > 1:
            lines.append(f"link add {BRIDGE_IF} type bridge stp_state 0 mcast_snooping 0")
            for gw in gateways:
                lines += [f"link set {gw.name} master {BRIDGE_IF}", f"link set {gw.name} up"]
            lines += iface(BRIDGE_IF, a4, a6)
        else:
            lines += iface(gateways[0].name, a4, a6)
        cfg[ns] = lines
    for gw in gateways:  # the internet knows the way back to each site (no NAT)
        net4, net6 = gw.internal_networks
        cfg[outside_ns] += [
            f"route add {net4} via {gw.outside_addr4}",
            f"route add {net6} via {gw.outside_addr6}",
        ]
    return cfg
