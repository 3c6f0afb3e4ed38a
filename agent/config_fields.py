"""The typed fields of the agent's configuration: names, interface names, networks,
ports and listen addresses, parsed from what an operator types (with precise errors),
and the frozen model every part of the configuration is built on.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict

from agent.nettypes import IPNetwork

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


class FrozenModel(BaseModel):
    """A part of the configuration: unknown keys are errors; never changed once read."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def check_ports_fit_proto(proto: str, ports: tuple[tuple[int, int], ...]) -> None:
    if proto == "icmp" and ports:
        raise ValueError("icmp has no ports: remove 'ports' or use proto tcp/udp")
