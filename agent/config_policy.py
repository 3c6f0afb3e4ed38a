"""What the agent's policy is made of, as configured: profiles and the flows they let
through, management and infrastructure flows (open in every state), the limits of
exceptions, the commit-confirmed defaults.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from agent.config_fields import (
    HOSTNAME_RE,
    FrozenModel,
    IfName,
    Name,
    Network,
    PortRange,
    check_ports_fit_proto,
)
from agent.nettypes import Direction, Proto
from agent.text import FreeText

BUILTIN_PROFILES = ("internet", "full")
RESERVED_PROFILE_NAMES = (*BUILTIN_PROFILES, "open")

class FlowRule(FrozenModel):
    """A flow a profile or exception lets through: remote CIDR, protocol, ports, direction."""

    cidr: Network
    proto: Proto
    ports: tuple[PortRange, ...] = ()
    direction: Direction = "out"

    @model_validator(mode="after")
    def _check(self) -> FlowRule:
        check_ports_fit_proto(self.proto, self.ports)
        return self


class ManagementEntry(FrozenModel):
    """A flow that stays open in every state (controller SSH, metrics scrape).

    `interface` pins the source to the interface it lives on (anti-spoofing);
    without it a strict reverse-path check decides (the route back to the
    source must leave through the interface the packet came in on)."""

    cidr: Network | None = None
    host: str | None = None
    proto: Proto = "tcp"
    ports: tuple[PortRange, ...] = ()
    interface: IfName | None = None

    @field_validator("host")
    @classmethod
    def _host(cls, value: str | None) -> str | None:
        if value is not None and not HOSTNAME_RE.fullmatch(value):
            raise ValueError(f"{value!r} is not a valid hostname")
        return value

    @model_validator(mode="after")
    def _check(self) -> ManagementEntry:
        if (self.cidr is None) == (self.host is None):
            raise ValueError("give exactly one of 'cidr' or 'host'")
        check_ports_fit_proto(self.proto, self.ports)
        return self


InfraProto = Literal["tcp", "udp", "icmp", "vrrp", "ospf", "gre", "esp", "ah"]
PORTLESS_PROTOS = ("icmp", "vrrp", "ospf", "gre", "esp", "ah")


class InfraFlow(FrozenModel):
    """A flow the gateway itself depends on (DHCP, VRRP, BGP, NTP, syslog, ...), open in
    every state like management: stateless, between the gateway's `local_ports` and the
    `peers`' `remote_ports` (empty: any port). Without peers it needs an `interface`
    and then matches any neighbour on that link (DHCP, VRRP)."""

    name: Name
    proto: InfraProto
    peers: tuple[Network, ...] = ()
    interface: IfName | None = None
    local_ports: tuple[PortRange, ...] = ()
    remote_ports: tuple[PortRange, ...] = ()
    description: FreeText = ""

    @model_validator(mode="after")
    def _check(self) -> InfraFlow:
        if not self.peers and self.interface is None:
            raise ValueError("name the 'peers' (addresses) or the 'interface' this flow uses: "
                             "an infrastructure flow to anyone anywhere is not narrow")
        if self.proto in PORTLESS_PROTOS and (self.local_ports or self.remote_ports):
            raise ValueError(f"{self.proto} has no ports: remove local_ports/remote_ports")
        for net in self.peers:
            if net.prefixlen == 0:
                raise ValueError(f"peer {net} is the whole internet; name the peers")
        return self


class ExceptionLimits(FrozenModel):
    """What `allow` may open on this gateway, whoever asks (the controller narrows it
    further per role). 0.0.0.0/0 and ::/0 are always refused."""

    widest_prefix_v4: int = Field(default=8, ge=1, le=32)
    widest_prefix_v6: int = Field(default=32, ge=1, le=128)
    max_seconds: int = Field(default=30 * 24 * 3600, ge=60, le=365 * 24 * 3600)


class ConfirmDefaults(FrozenModel):
    """Commit-confirmed deadlines (seconds) applied when a request names none; unset: a
    change is final at once unless its request asks (`--confirm-within`)."""

    isolate: int | None = Field(default=None, ge=5, le=86400)
    restore: int | None = Field(default=None, ge=5, le=86400)
    allow: int | None = Field(default=None, ge=5, le=86400)
    reload: int | None = Field(default=None, ge=5, le=86400)


class Profile(FrozenModel):
    """A named profile: a built-in base plus flows it leaves open to named outside networks."""

    base: Literal["internet", "full"] = "internet"
    allow: tuple[FlowRule, ...] = ()
    description: FreeText = ""

