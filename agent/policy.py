"""Profiles to desired rules: pure functions, no I/O.

A `Policy` is everything the renderer needs: which base mode, which networks
are internal, which flows stay open (management, profile allows, exceptions
with their remaining lifetime). Networks are collapsed per (protocol, ports)
so the kernel never sees overlapping intervals.
"""

from __future__ import annotations

import ipaddress
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from agent.nettypes import Direction, IPNetwork, Proto

if TYPE_CHECKING:  # the boot path renders without loading the config's validation
    from agent.config import AgentConfig, FlowRule, InfraFlow, ManagementEntry

Mode = Literal["internet", "full"]
ANY_PORT = (0, 65535)


@dataclass(frozen=True, order=True)
class FlowElement:
    """One set element: remote network . protocol . port range (+ remaining seconds)."""

    net: IPNetwork
    proto: Proto
    ports: tuple[int, int] = ANY_PORT
    timeout: int | None = None

    @property
    def family(self) -> int:
        return self.net.version

    def untimed(self) -> FlowElement:
        return FlowElement(self.net, self.proto, self.ports)


@dataclass(frozen=True)
class ExceptionSpec:
    """A time-limited flow, as the policy needs it (the state file keeps the rest)."""

    flow: FlowRule
    expires_at: float


FLOW_KINDS = ("mgmt", "allow_out", "allow_in", "exc_out", "exc_in")
FlowSets = dict[str, tuple[FlowElement, ...]]


Pin = tuple[str, IPNetwork]  # (interface, network): a source believed on that interface only


@dataclass(frozen=True)
class AntiSpoof:
    """Where source addresses are believed: internal networks on the internal interfaces
    only, pinned management sources on their interface only, the other management
    sources where the route back to them leaves (strict reverse path)."""

    interfaces: tuple[str, ...] = ()
    pins: tuple[Pin, ...] = ()
    reverse_path: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True)
class Policy:
    """`sets` maps flow set names (mgmt4, allow_out6, exc_in4, ...) to their elements."""

    profile: str
    mode: Mode
    internal: tuple[IPNetwork, ...]
    sets: FlowSets
    antispoof: AntiSpoof = AntiSpoof()
    infra: tuple[InfraFlow, ...] = ()

    def element_count(self) -> int:
        return len(self.internal) + sum(map(len, self.sets.values()))

    def timed_elements(self) -> tuple[FlowElement, ...]:
        return tuple(el for name, els in self.sets.items() if name.startswith("exc")
                     for el in els)


def by_family(kind: str, elements: Iterable[FlowElement]) -> FlowSets:
    """Split one kind of flow into its IPv4 and IPv6 sets, e.g. allow_out4 / allow_out6."""
    items = tuple(elements)
    return {f"{kind}{fam}": tuple(el for el in items if el.family == fam) for fam in (4, 6)}


def collapse_networks(nets: Iterable[IPNetwork]) -> tuple[IPNetwork, ...]:
    """Merge overlapping/adjacent networks, per family, in a stable order (v4 first)."""
    v4 = [n for n in nets if isinstance(n, ipaddress.IPv4Network)]
    v6 = [n for n in nets if isinstance(n, ipaddress.IPv6Network)]
    return (*ipaddress.collapse_addresses(v4), *ipaddress.collapse_addresses(v6))


def _flow_elements(
    nets: Iterable[IPNetwork], proto: Proto, ports: Sequence[tuple[int, int]],
    timeout: int | None = None,
) -> list[FlowElement]:
    ranges = list(ports) if ports and proto != "icmp" else [ANY_PORT]
    return [FlowElement(net, proto, rng, timeout) for net in nets for rng in ranges]


def _merge(elements: Iterable[FlowElement]) -> tuple[FlowElement, ...]:
    """Collapse networks that share protocol, ports and timeout; drop exact duplicates."""
    groups: dict[tuple[Proto, tuple[int, int], int | None], list[IPNetwork]] = defaultdict(list)
    for el in elements:
        groups[(el.proto, el.ports, el.timeout)].append(el.net)
    merged = [
        FlowElement(net, proto, ports, timeout)
        for (proto, ports, timeout), nets in groups.items()
        for net in collapse_networks(nets)
    ]
    merged.sort(key=lambda e: (e.family, e.proto, e.ports, e.net.network_address, e.net.prefixlen))
    return tuple(merged)


def management_elements(
    entries: Sequence[ManagementEntry], resolved: dict[str, tuple[IPNetwork, ...]]
) -> tuple[FlowElement, ...]:
    """Management allowlist entries as elements; `resolved` maps each `host` to its addresses."""
    out: list[FlowElement] = []
    for entry in entries:
        nets: tuple[IPNetwork, ...]
        if entry.cidr is not None:
            nets = (entry.cidr,)
        else:  # a host that never resolved is left out (and reported by the engine)
            assert entry.host is not None
            nets = resolved.get(entry.host, ())
        out.extend(_flow_elements(nets, entry.proto, entry.ports))
    return _merge(out)


def management_antispoof(
    config: AgentConfig, resolved: dict[str, tuple[IPNetwork, ...]]
) -> AntiSpoof:
    pins: set[Pin] = set()
    loose: list[IPNetwork] = []
    for entry in config.management:
        nets = (entry.cidr,) if entry.cidr is not None else resolved.get(entry.host or "", ())
        if entry.interface is None:
            loose.extend(nets)
        else:
            pins.update((entry.interface, net) for net in nets)
    by_if: dict[str, list[IPNetwork]] = defaultdict(list)
    for ifname, net in pins:
        by_if[ifname].append(net)
    collapsed = tuple((ifname, net) for ifname in sorted(by_if)
                      for net in collapse_networks(by_if[ifname]))
    return AntiSpoof(interfaces=tuple(config.internal_interfaces), pins=collapsed,
                     reverse_path=collapse_networks(loose))


def merge_ports(ports: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Port ranges sorted, overlapping and adjacent ones joined (443, 400-500 -> 400-500):
    interval set elements of one flow must not overlap."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ports):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return tuple(out)


def _directions(direction: Direction) -> set[str]:
    return {"out", "in"} if direction == "both" else {direction}


def _ranges_overlap(a: Sequence[tuple[int, int]], b: Sequence[tuple[int, int]]) -> bool:
    a, b = a or [ANY_PORT], b or [ANY_PORT]
    return any(lo1 <= hi2 and lo2 <= hi1 for lo1, hi1 in a for lo2, hi2 in b)


def flows_overlap(a: FlowRule, b: FlowRule) -> bool:
    """Whether two flows would put overlapping elements into the same set (the kernel
    refuses that, and one exception must never be revoked by revoking another)."""
    return (a.proto == b.proto and bool(_directions(a.direction) & _directions(b.direction))
            and a.cidr.version == b.cidr.version and a.cidr.overlaps(b.cidr)
            and (a.proto == "icmp" or _ranges_overlap(a.ports, b.ports)))


def exception_elements(flow: FlowRule, timeout: int | None) -> dict[str, tuple[FlowElement, ...]]:
    """The set elements of one exception, by set name: never merged with another
    exception's, so adding, extending or revoking one is a change of its own elements."""
    ports = merge_ports(flow.ports)
    elements = tuple(_flow_elements((flow.cidr,), flow.proto, ports, timeout))
    ways = sorted(_directions(flow.direction))
    return {f"exc_{way}{flow.cidr.version}": elements for way in ways}


def _directed(flows: Iterable[tuple[FlowRule, int | None]]) -> tuple[
        tuple[FlowElement, ...], tuple[FlowElement, ...]]:
    outbound: list[FlowElement] = []
    inbound: list[FlowElement] = []
    for flow, timeout in flows:
        elements = _flow_elements((flow.cidr,), flow.proto, flow.ports, timeout)
        if flow.direction in ("out", "both"):
            outbound.extend(elements)
        if flow.direction in ("in", "both"):
            inbound.extend(elements)
    return _merge(outbound), _merge(inbound)


@dataclass(frozen=True)
class CompiledProfile:
    """The static part of a profile (its allow sets); compiled once per config, since a
    100k-entry allowlist takes seconds to collapse and sort."""

    name: str
    mode: Mode
    sets: FlowSets


def compile_profile(config: AgentConfig, profile_name: str) -> CompiledProfile:
    profile = config.profile(profile_name)
    allow_out, allow_in = _directed((flow, None) for flow in profile.allow)
    return CompiledProfile(profile_name, profile.base,
                           {**by_family("allow_out", allow_out), **by_family("allow_in", allow_in)})


def remaining_seconds(expires_at: float, now: float) -> int:
    return max(0, math.ceil(expires_at - now))


def build_policy(
    config: AgentConfig,
    profile_name: str,
    *,
    exceptions: Sequence[ExceptionSpec] = (),
    resolved_hosts: dict[str, tuple[IPNetwork, ...]] | None = None,
    now: float,
    compiled: CompiledProfile | None = None,
) -> Policy:
    """The desired ruleset for `profile_name`; expired exceptions are left out."""
    if compiled is None or compiled.name != profile_name:
        compiled = compile_profile(config, profile_name)
    exc: dict[str, list[FlowElement]] = {f"exc_{way}{fam}": [] for way in ("out", "in")
                                         for fam in (4, 6)}
    for spec in exceptions:
        left = remaining_seconds(spec.expires_at, now)
        if left > 0:
            for name, elements in exception_elements(spec.flow, left).items():
                exc[name].extend(elements)
    resolved = resolved_hosts or {}
    return Policy(
        profile=profile_name,
        mode=compiled.mode,
        internal=collapse_networks(config.internal_networks),
        sets={
            **by_family("mgmt", management_elements(config.management, resolved)),
            **compiled.sets,  # the same tuples every time: the renderer memoises their text
            **{name: tuple(dict.fromkeys(els)) for name, els in sorted(exc.items())},
        },
        antispoof=management_antispoof(config, resolved),
        infra=config.infrastructure,
    )
