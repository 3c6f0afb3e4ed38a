"""Probe configuration: good targets parse, bad ones are refused at load naming the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.config import load_config, parse_probe_target
from agent.errors import ConfigError
from tests.unit.conftest import make_config


@pytest.mark.parametrize(
    ("kind", "target", "parsed"),
    [
        ("icmp", "198.51.100.10", ("198.51.100.10", None)),
        ("icmp", "2001:db8::10", ("2001:db8::10", None)),
        ("icmp", "2001:DB8:0:0::10", ("2001:db8::10", None)),
        ("tcp", "198.51.100.10:443", ("198.51.100.10", 443)),
        ("tcp", "[2001:db8::10]:443", ("2001:db8::10", 443)),
        ("tcp-syn", "[::1]:22", ("::1", 22)),
        ("dns", "192.0.2.53", ("192.0.2.53", 53)),
        ("dns", "192.0.2.53:5353", ("192.0.2.53", 5353)),
        ("dns", "2001:db8::53", ("2001:db8::53", 53)),
        ("dns", "[2001:db8::53]:5353", ("2001:db8::53", 5353)),
    ],
)
def test_targets_parse(kind: str, target: str, parsed: tuple[str, int | None]) -> None:
    assert parse_probe_target(kind, target) == parsed


def probe(**fields: Any) -> dict[str, Any]:
    return {"name": "p1", "type": "tcp", "target": "198.51.100.10:443", **fields}


@pytest.mark.parametrize(
    ("fields", "fragments"),
    [
        ({"type": "udp"}, ["probes[0].type", "'icmp', 'tcp', 'tcp-syn' or 'dns'"]),
        ({"type": "tcp", "target": "198.51.100.10"}, ["probes[0].target", "need a port"]),
        ({"type": "tcp-syn", "target": "[2001:db8::1]"}, ["probes[0].target", "need a port"]),
        ({"type": "icmp", "target": "198.51.100.10:80"}, ["probes[0].target", "no port"]),
        ({"type": "tcp", "target": "www.example.net:443"},
         ["probes[0].target", "not an IPv4/IPv6 address"]),
        ({"type": "tcp", "target": "198.51.100.10:0"}, ["probes[0].target", "1-65535"]),
        ({"type": "tcp", "target": "198.51.100.10:70000"}, ["probes[0].target", "1-65535"]),
        ({"type": "tcp", "target": "198.51.100.10:"}, ["probes[0].target", "no port"]),
        ({"type": "tcp", "target": "2001:db8::1:443"}, ["probes[0].target", "need a port"]),
        ({"type": "tcp", "target": "[2001:db8::1]443"}, ["probes[0].target", "[2001:db8::1]:443"]),
        ({"type": "tcp", "target": "[fe80::1%eth0]:22"}, ["probes[0].target", "scoped"]),
        ({"type": "icmp", "target": "10.0.0.0/8"}, ["probes[0].target", "not an IPv4/IPv6"]),
        ({"timeout": -1}, ["probes[0].timeout", "greater than 0"]),
        ({"timeout": 0}, ["probes[0].timeout", "greater than 0"]),
        ({"timeout": 300}, ["probes[0].timeout", "less than or equal to 30"]),
        ({"name": "has space"}, ["probes[0].name", "not a valid name"]),
        ({"expect": {"isolated": "closed"}}, ["probes[0].expect.isolated"]),
        ({"expect": {"sometimes": "reachable"}}, ["probes[0].expect.sometimes"]),
        ({"query": "example.com"}, ["probes[0].query", "only dns probes"]),
        ({"type": "dns", "target": "192.0.2.53", "query": "bad name!"},
         ["probes[0].query", "not a valid DNS name"]),
        ({"colour": "red"}, ["probes[0].colour", "Extra inputs"]),
    ],
)
def test_bad_probe_rejected_naming_the_field(fields: dict[str, Any],
                                             fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        make_config(probes=[probe(**fields)])
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message


def test_unknown_type_does_not_also_blame_the_target() -> None:
    with pytest.raises(ConfigError) as info:
        make_config(probes=[probe(type="http", target="whatever")])
    assert "probes[0].type" in str(info.value)
    assert "probes[0].target" not in str(info.value)


def test_second_probe_is_named_by_index() -> None:
    with pytest.raises(ConfigError, match=r"probes\[1\]\.target"):
        make_config(probes=[probe(), probe(name="p2", target="nowhere")])


def test_probe_interval_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="probe_interval"):
        make_config(probe_interval=0)


def test_probe_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text("""
gateway = "gw-ams-1"
internal_networks = ["10.20.0.0/16"]
internal_interfaces = ["inside"]
probe_interval = 30
[[probes]]
name = "outside-dns6"
type = "dns"
target = "[2001:db8::53]:53"
query = "example.net"
timeout = 0.5
expect = { open = "reachable", isolated = "unreachable" }
[[probes]]
name = "outside-web"
type = "tcp-syn"
target = "198.51.100.10:443"
""")
    cfg = load_config(path)
    dns, web = cfg.probes
    assert (dns.address, dns.port, dns.dns_query, dns.timeout) == \
        ("2001:db8::53", 53, "example.net", 0.5)
    assert dns.expect.for_state(isolated=True) == "unreachable"
    assert dns.expect.for_state(isolated=False) == "reachable"
    assert web.expect.for_state(isolated=True) == "any"
    assert web.dns_query == "example.com"
    assert cfg.probe_interval == 30


def test_bad_probe_in_toml_names_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text("""
gateway = "gw-ams-1"
internal_networks = ["10.20.0.0/16"]
internal_interfaces = ["inside"]
[[probes]]
name = "web"
type = "tcp"
target = "198.51.100.10"
timeout = -2
""")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    assert "probes[0].target" in message
    assert "probes[0].timeout" in message
