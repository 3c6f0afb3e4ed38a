"""Agent configuration: the TOML file an operator writes, validated with precise errors.

Every value that later reaches nftables is parsed into a typed object here
(networks, ports, protocol keywords), so nothing an operator or a remote caller
types is ever pasted into a ruleset as text.

This module is the whole (AgentConfig) and the reading of the file; the parts are
modules of their own, and their names are importable from here too: the typed fields
(agent/config_fields.py), profiles and flows (agent/config_policy.py), probes
(agent/config_probes.py).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from agent.config_fields import (
    HOSTNAME_RE,
    IFNAME_RE,
    NAME_RE,
    FrozenModel,
    IfName,
    Name,
    Network,
    PortRange,
    check_ports_fit_proto,
    parse_ifname,
    parse_listen,
    parse_name,
    parse_network,
    parse_port_range,
)
from agent.config_policy import (
    BUILTIN_PROFILES,
    PORTLESS_PROTOS,
    RESERVED_PROFILE_NAMES,
    ConfirmDefaults,
    ExceptionLimits,
    FlowRule,
    InfraFlow,
    InfraProto,
    ManagementEntry,
    Profile,
)
from agent.config_probes import (
    DEFAULT_DNS_QUERY,
    Expectation,
    ProbeConfig,
    ProbeExpect,
    ProbeType,
    parse_probe_target,
)
from agent.digest import config_digest
from agent.errors import ConfigError
from agent.nettypes import IPNetwork
from agent.wire import DEFAULT_STATE_DIR

__all__ = [
    "BUILTIN_PROFILES",
    "DEFAULT_DNS_QUERY",
    "HOSTNAME_RE",
    "IFNAME_RE",
    "NAME_RE",
    "PORTLESS_PROTOS",
    "RESERVED_PROFILE_NAMES",
    "AgentConfig",
    "ConfirmDefaults",
    "ExceptionLimits",
    "Expectation",
    "FlowRule",
    "IPNetwork",
    "IfName",
    "InfraFlow",
    "InfraProto",
    "ManagementEntry",
    "MetricsConfig",
    "Name",
    "Network",
    "PortRange",
    "ProbeConfig",
    "ProbeExpect",
    "ProbeType",
    "Profile",
    "check_ports_fit_proto",
    "format_validation_error",
    "load_config",
    "load_config_and_digest",
    "parse_config",
    "parse_ifname",
    "parse_listen",
    "parse_name",
    "parse_network",
    "parse_port_range",
    "parse_probe_target",
    "read_toml",
]


class MetricsConfig(FrozenModel):
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


class AgentConfig(FrozenModel):
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
