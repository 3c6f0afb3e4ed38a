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
from typing import Literal

from agent.config import AgentConfig, FlowRule, IPNetwork, ManagementEntry, Proto

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


@dataclass(frozen=True)
class ExceptionSpec:
    """A time-limited flow, as the policy needs it (the state file keeps the rest)."""

    flow: FlowRule
    expires_at: float


FLOW_KINDS = ("mgmt", "allow_out", "allow_in", "exc_out", "exc_in")
FlowSets = dict[str, tuple[FlowElement, ...]]


@dataclass(frozen=True)
class Policy:
    """`sets` maps flow set names (mgmt4, allow_out6, exc_in4, ...) to their elements."""

    profile: str
    mode: Mode
    internal: tuple[IPNetwork, ...]
    sets: FlowSets

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
        else:
            assert entry.host is not None
            nets = resolved[entry.host]
        out.extend(_flow_elements(nets, entry.proto, entry.ports))
    return _merge(out)


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
    live = [
        (exc.flow, remaining_seconds(exc.expires_at, now))
        for exc in exceptions
        if remaining_seconds(exc.expires_at, now) > 0
    ]
    exc_out, exc_in = _directed(live)
    return Policy(
        profile=profile_name,
        mode=compiled.mode,
        internal=collapse_networks(config.internal_networks),
        sets={
            **by_family("mgmt", management_elements(config.management, resolved_hosts or {})),
            **compiled.sets,  # the same tuples every time: the renderer memoises their text
            **by_family("exc_out", exc_out),
            **by_family("exc_in", exc_in),
        },
    )
