"""The probes an operator configures: what each checks, from where to where, and what
it should find in each state. Targets are IP literals, never names.
"""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from agent.config_fields import HOSTNAME_RE, FrozenModel, Name

ProbeType = Literal["icmp", "tcp", "tcp-syn", "dns"]
Expectation = Literal["reachable", "unreachable", "any"]
DEFAULT_DNS_QUERY = "example.com"


def parse_probe_target(probe_type: str, value: str) -> tuple[str, int | None]:
    """A probe target as (address, port). Targets are IP literals, never names: a probe
    must not depend on DNS, which isolation cuts off.

    icmp: ``198.51.100.10`` or ``2001:db8::10``; tcp and tcp-syn: ``198.51.100.10:443``
    or ``[2001:db8::10]:443``; dns: an address, with an optional port (default 53).
    """
    text = value.strip()
    host, port_text = text, ""
    if text.startswith("["):
        inner, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{value!r}: write an IPv6 target as '[2001:db8::1]:443'")
        host, port_text = inner, rest[1:]
        if rest and not port_text:
            raise ValueError(f"{value!r} ends with ':' but has no port")
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        if not port_text:
            raise ValueError(f"{value!r} ends with ':' but has no port")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"{value!r}: {host!r} is not an IPv4/IPv6 address (probe targets are addresses, "
            "not names, so that probing never depends on DNS)"
        ) from None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        raise ValueError(f"{value!r}: scoped (link-local %zone) addresses are not supported")
    port: int | None = None
    if port_text:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"{value!r}: port {port_text!r} is not a number in 1-65535")
        port = int(port_text)
    if probe_type == "icmp" and port is not None:
        raise ValueError(f"{value!r}: icmp targets have no port; give just the address")
    if probe_type in ("tcp", "tcp-syn") and port is None:
        example = f"[{address}]:443" if address.version == 6 else f"{address}:443"
        raise ValueError(f"{value!r}: {probe_type} targets need a port, e.g. {example!r}")
    if probe_type == "dns" and port is None:
        port = 53
    return str(address), port


class ProbeExpect(FrozenModel):
    """What a probe should find in each state: `any` means "not checked in this state"."""

    open: Expectation = "any"
    isolated: Expectation = "any"

    def for_state(self, isolated: bool) -> Expectation:
        return self.isolated if isolated else self.open


class ProbeConfig(FrozenModel):
    """One probe, run from this gateway: after every change and on every sweep."""

    name: Name
    type: ProbeType
    target: str
    timeout: float = Field(default=1.0, gt=0, le=30)
    expect: ProbeExpect = ProbeExpect()
    query: str | None = None  # dns only: the name asked for (default example.com, type A)

    @field_validator("target")
    @classmethod
    def _target(cls, value: str, info: ValidationInfo) -> str:
        probe_type = info.data.get("type")
        if probe_type is None:  # the type itself is wrong; that error is reported
            return value
        parse_probe_target(probe_type, value)
        return value

    @field_validator("query")
    @classmethod
    def _query(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return value
        if info.data.get("type", "dns") != "dns":
            raise ValueError("only dns probes take a query; remove it")
        if not HOSTNAME_RE.fullmatch(value):
            raise ValueError(f"{value!r} is not a valid DNS name")
        return value

    @property
    def address(self) -> str:
        return parse_probe_target(self.type, self.target)[0]

    @property
    def port(self) -> int | None:
        return parse_probe_target(self.type, self.target)[1]

    @property
    def dns_query(self) -> str:
        return self.query or DEFAULT_DNS_QUERY

