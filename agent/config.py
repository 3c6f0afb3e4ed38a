"""Agent configuration: the TOML file an operator writes, validated with precise errors.

Every value that later reaches nftables is parsed into a typed object here
(networks, ports, protocol keywords), so nothing an operator or a remote caller
types is ever pasted into a ruleset as text.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from agent.digest import config_digest
from agent.errors import ConfigError
from agent.nettypes import Direction, IPNetwork, Proto
from agent.text import FreeText
from agent.wire import DEFAULT_STATE_DIR

BUILTIN_PROFILES = ("internet", "full")
RESERVED_PROFILE_NAMES = (*BUILTIN_PROFILES, "open")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
# Linux interface names: at most 15 bytes; a trailing '*' matches a family (vlan*, ppp*).
IFNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,14}$|^[A-Za-z0-9][A-Za-z0-9._@-]{0,13}\*$")
HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                         r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")


def parse_network(value: object) -> IPNetwork:
    """A CIDR (or bare address) as a network; host bits set is an error, not a silent fix."""
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a CIDR string such as '10.0.0.0/8', got {type(value).__name__}")
    text = value.strip()
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a valid IPv4/IPv6 CIDR ({exc})") from None


def parse_listen(value: str) -> tuple[str, int]:
    """'0.0.0.0:9630' or '[::]:9630' as (host, port); the host must be an IP address."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT (e.g. '0.0.0.0:9630' or '[::]:9630')")
    bare = host.strip("[]")
    try:
        ipaddress.ip_address(bare)
    except ValueError:
        raise ValueError(f"{host!r} in {value!r} is not an IP address") from None
    return bare, int(port)


def parse_name(value: object) -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a valid name: use 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def parse_ifname(value: object) -> str:
    if not isinstance(value, str) or not IFNAME_RE.fullmatch(value):
        raise ValueError(
            f"{value!r} is not an interface name: 1-15 letters, digits, '.', '_', '@' or '-' "
            "(a trailing '*' matches every interface starting with the rest)"
        )
    return value


def parse_port_range(value: object) -> tuple[int, int]:
    """A port (443) or an inclusive range ('8000-8100') as (low, high)."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a port")
    if isinstance(value, int):
        low = high = value
    elif isinstance(value, str) and re.fullmatch(r"\d{1,5}(-\d{1,5})?", value):
        lo_text, _, hi_text = value.partition("-")
        low, high = int(lo_text), int(hi_text or lo_text)
    elif isinstance(value, list | tuple) and len(value) == 2:
        low, high = parse_port_range(value[0])[0], parse_port_range(value[1])[0]
    else:
        raise ValueError(f"{value!r} is not a port number or a range like '8000-8100'")
    if not (1 <= low <= high <= 65535):
        raise ValueError(f"port {value!r} is outside 1-65535 or its range is reversed")
    return (low, high)


Network = Annotated[IPNetwork, BeforeValidator(parse_network)]
Name = Annotated[str, BeforeValidator(parse_name)]
PortRange = Annotated[tuple[int, int], BeforeValidator(parse_port_range)]
IfName = Annotated[str, BeforeValidator(parse_ifname)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def check_ports_fit_proto(proto: str, ports: tuple[tuple[int, int], ...]) -> None:
    if proto == "icmp" and ports:
        raise ValueError("icmp has no ports: remove 'ports' or use proto tcp/udp")


class FlowRule(_Model):
    """A flow a profile or exception lets through: remote CIDR, protocol, ports, direction."""

    cidr: Network
    proto: Proto
    ports: tuple[PortRange, ...] = ()
    direction: Direction = "out"

    @model_validator(mode="after")
    def _check(self) -> FlowRule:
        check_ports_fit_proto(self.proto, self.ports)
        return self


class ManagementEntry(_Model):
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


class InfraFlow(_Model):
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


class ExceptionLimits(_Model):
    """What `allow` may open on this gateway, whoever asks (the controller narrows it
    further per role). 0.0.0.0/0 and ::/0 are always refused."""

    widest_prefix_v4: int = Field(default=8, ge=1, le=32)
    widest_prefix_v6: int = Field(default=32, ge=1, le=128)
    max_seconds: int = Field(default=30 * 24 * 3600, ge=60, le=365 * 24 * 3600)


class ConfirmDefaults(_Model):
    """Commit-confirmed deadlines (seconds) applied when a request names none; unset: a
    change is final at once unless its request asks (`--confirm-within`)."""

    isolate: int | None = Field(default=None, ge=5, le=86400)
    restore: int | None = Field(default=None, ge=5, le=86400)
    allow: int | None = Field(default=None, ge=5, le=86400)
    reload: int | None = Field(default=None, ge=5, le=86400)


class Profile(_Model):
    """A named profile: a built-in base plus flows it leaves open to named outside networks."""

    base: Literal["internet", "full"] = "internet"
    allow: tuple[FlowRule, ...] = ()
    description: FreeText = ""


class MetricsConfig(_Model):
    """Where `drawbridge-agent run` serves Prometheus metrics (`/metrics`)."""

    listen: str = "0.0.0.0:9630"
    enabled: bool = True

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        parse_listen(value)
        return value

    @property
    def host(self) -> str:
        return parse_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return parse_listen(self.listen)[1]


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


class ProbeExpect(_Model):
    """What a probe should find in each state: `any` means "not checked in this state"."""

    open: Expectation = "any"
    isolated: Expectation = "any"

    def for_state(self, isolated: bool) -> Expectation:
        return self.isolated if isolated else self.open


class ProbeConfig(_Model):
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


class AgentConfig(_Model):
    gateway: Name
    internal_networks: tuple[Network, ...] = Field(min_length=1)
    # where the internal networks live: their addresses are believed there and only there
    internal_interfaces: tuple[IfName, ...] = Field(min_length=1)
    state_dir: Path = DEFAULT_STATE_DIR
    reconcile_interval: float = Field(default=5.0, gt=0, le=3600)
    # between full checks, drift checks compare structure only (chains, rules, sets)
    full_check_interval: float = Field(default=60.0, ge=0, le=86400)
    probe_interval: float = Field(default=15.0, gt=0, le=86400)  # seconds between sweeps
    # management `host =` entries: looked up on this schedule, outside the lock
    resolve_interval: float = Field(default=60.0, gt=0, le=86400)
    resolve_timeout: float = Field(default=2.0, gt=0, le=30)
    metrics: MetricsConfig = MetricsConfig()
    management: tuple[ManagementEntry, ...] = ()
    infrastructure: tuple[InfraFlow, ...] = ()
    profiles: dict[Name, Profile] = Field(default_factory=dict)
    probes: tuple[ProbeConfig, ...] = ()
    exceptions: ExceptionLimits = ExceptionLimits()
    confirm: ConfirmDefaults = ConfirmDefaults()
    # A flowtable of another table (e.g. OpenWrt fw4's offload) carries established
    # connections past our forward chain: reported as unverified unless the operator
    # declares it a choice here. Offloaded connections are torn down on every change.
    allow_flow_offload: bool = False

    @field_validator("profiles")
    @classmethod
    def _profile_names(cls, value: dict[str, Profile]) -> dict[str, Profile]:
        for name in value:
            if name in RESERVED_PROFILE_NAMES:
                raise ValueError(f"profile name {name!r} is built in; choose another name")
        return value

    @field_validator("internal_interfaces")
    @classmethod
    def _interfaces(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if "lo" in value:
            raise ValueError("'lo' is not an internal interface (loopback is always open)")
        if len(set(value)) != len(value):
            raise ValueError("an interface is listed twice")
        return value

    @field_validator("infrastructure")
    @classmethod
    def _infra_names(cls, value: tuple[InfraFlow, ...]) -> tuple[InfraFlow, ...]:
        names = [f.name for f in value]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate infrastructure flow names: {', '.join(dupes)}")
        return value

    @field_validator("probes")
    @classmethod
    def _probe_names(cls, value: tuple[ProbeConfig, ...]) -> tuple[ProbeConfig, ...]:
        names = [p.name for p in value]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate probe names: {', '.join(dupes)}")
        return value

    @model_validator(mode="after")
    def _pins_outside_internal(self) -> AgentConfig:
        """A management network inside the internal networks but pinned to another
        interface would be believed from the inside too (internal sources are): refuse."""
        inside = set(self.internal_interfaces)
        for i, entry in enumerate(self.management):
            if entry.cidr is None or entry.interface is None or entry.interface in inside:
                continue
            for net in self.internal_networks:
                if net.version == entry.cidr.version and net.overlaps(entry.cidr):
                    raise ValueError(
                        f"management[{i}]: {entry.cidr} lies in internal network {net} but is "
                        f"pinned to {entry.interface!r}; pin it to an internal interface or "
                        "leave out 'interface'")
        return self

    def profile_names(self) -> list[str]:
        return [*BUILTIN_PROFILES, *self.profiles]

    def profile(self, name: str) -> Profile:
        """The profile called `name`; built-ins are plain bases with no extra flows."""
        if name in BUILTIN_PROFILES:
            return Profile(base=name)
        try:
            return self.profiles[name]
        except KeyError:
            known = ", ".join(self.profile_names())
            raise ConfigError(f"unknown profile {name!r}; known profiles: {known}") from None


def _location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.startswith(("function-", "tagged-union")):
            continue
        else:
            out += f".{part}" if out else part
    return out or "(top level)"


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for err in exc.errors():
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"  {_location(err['loc'])}: {msg}")
    return "\n".join(lines)


def parse_config(data: dict[str, Any], source: str = "<config>") -> AgentConfig:
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None


def _toml(raw: bytes, path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def read_toml(path: Path) -> dict[str, Any]:
    """A TOML file as a dict; unreadable or malformed files become a ConfigError."""
    return _toml(_read(path), path)


def load_config(path: Path) -> AgentConfig:
    return parse_config(read_toml(path), str(path))


def load_config_and_digest(path: Path) -> tuple[AgentConfig, str]:
    """The config and the digest of exactly the bytes it was read from."""
    raw = _read(path)
    return parse_config(_toml(raw, path), str(path)), config_digest(raw)
