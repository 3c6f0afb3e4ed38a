from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import load_config, parse_config
from agent.errors import ConfigError
from tests.unit.conftest import BASE, make_config


def test_design_example_loads(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(
        """
gateway = "gw-ams-1"
internal_networks = ["10.20.0.0/16", "fd20::/48"]
internal_interfaces = ["inside"]
state_dir = "/var/lib/drawbridge"
[metrics]
listen = "0.0.0.0:9630"
[[management]]
cidr = "10.99.0.0/24"
proto = "tcp"
ports = [22, 9630]
[profiles.casefiles]
allow = [{ cidr = "203.0.113.0/24", proto = "tcp", ports = [443], direction = "out" }]
[[probes]]
name = "outside-web"
type = "tcp"
target = "198.51.100.10:443"
expect = { open = "reachable", isolated = "unreachable" }
"""
    )
    cfg = load_config(path)
    assert cfg.gateway == "gw-ams-1"
    assert [str(n) for n in cfg.internal_networks] == ["10.20.0.0/16", "fd20::/48"]
    assert cfg.management[0].ports == ((22, 22), (9630, 9630))
    assert cfg.profile_names() == ["internet", "full", "casefiles"]
    assert cfg.metrics.port == 9630


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ({"internal_networks": ["10.20.0.0/33"]}, "internal_networks[0]"),
        ({"internal_networks": ["10.20.0.1/16"]}, "host bits set"),
        ({"internal_networks": []}, "internal_networks"),
        ({"gateway": "gw; rm -rf /"}, "gateway"),
        ({"management": [{"cidr": "10.99.0.0/24", "proto": "sctp"}]}, "management[0].proto"),
        ({"management": [{"cidr": "10.99.0.0/24", "proto": "tcp", "ports": [70000]}]},
         "management[0].ports[0]"),
        ({"management": [{"proto": "tcp", "ports": [22]}]}, "exactly one of 'cidr' or 'host'"),
        ({"management": [{"host": "bad host;", "proto": "tcp"}]}, "not a valid hostname"),
        ({"management": [{"cidr": "10.99.0.0/24", "proto": "icmp", "ports": [1]}]},
         "icmp has no ports"),
        ({"profiles": {"full": {"allow": []}}}, "built in"),
        ({"profiles": {"x y": {"allow": []}}}, "not a valid name"),
        ({"profiles": {"p": {"allow": [{"cidr": "1.2.3.0/24", "proto": "tcp",
                                        "direction": "sideways"}]}}}, "direction"),
        ({"metrics": {"listen": "nowhere"}}, "metrics.listen"),
        ({"reconcile_interval": -1}, "reconcile_interval"),
        ({"unknown_key": 1}, "unknown_key"),
        ({"probes": [{"name": "p", "type": "carrier-pigeon", "target": "1.2.3.4"}]},
         "probes[0].type"),
        ({"probes": [{"name": "p", "type": "tcp", "target": "1.2.3.4:80", "timeout": -1}]},
         "probes[0].timeout"),
    ],
)
def test_bad_config_names_the_field(override: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({**BASE, **override}, "agent.toml")
    assert fragment in str(err.value)
    assert str(err.value).startswith("agent.toml: invalid configuration")


def test_unreadable_and_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("gateway = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_unknown_profile_lists_the_known_ones() -> None:
    cfg = make_config()
    with pytest.raises(ConfigError, match="known profiles: internet, full, casefiles"):
        cfg.profile("nope")


def test_port_ranges() -> None:
    cfg = make_config(profiles={"p": {"allow": [
        {"cidr": "1.2.3.0/24", "proto": "tcp", "ports": ["8000-8100", 443]}]}})
    assert cfg.profiles["p"].allow[0].ports == ((8000, 8100), (443, 443))
    with pytest.raises(ConfigError, match="reversed"):
        make_config(profiles={"p": {"allow": [
            {"cidr": "1.2.3.0/24", "proto": "tcp", "ports": ["9000-8000"]}]}})


def test_a_pinned_management_network_inside_the_internal_networks_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"management\[0\]: 10.20.5.0/24 lies in internal"):
        make_config(management=[{"cidr": "10.20.5.0/24", "proto": "tcp", "ports": [22],
                                 "interface": "mgmt"}])
    # pinned to an internal interface, or not pinned at all: fine
    make_config(management=[{"cidr": "10.20.5.0/24", "proto": "tcp", "ports": [22],
                             "interface": "inside"}])
    make_config(management=[{"cidr": "10.20.5.0/24", "proto": "tcp", "ports": [22]}])
