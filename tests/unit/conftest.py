from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentConfig, parse_config

BASE: dict[str, Any] = {
    "gateway": "gw-ams-1",
    "internal_networks": ["10.20.0.0/16", "fd20::/48"],
    "internal_interfaces": ["inside", "inside2"],
    "management": [
        {"cidr": "10.99.0.0/24", "proto": "tcp", "ports": [22, 9630]},
        {"cidr": "fd99::/64", "proto": "tcp", "ports": [22]},
    ],
    "profiles": {
        "casefiles": {"allow": [
            {"cidr": "203.0.113.0/24", "proto": "tcp", "ports": [443], "direction": "out"},
            {"cidr": "2001:db8:5::/48", "proto": "udp", "ports": ["5000-5010"], "direction": "in"},
        ]},
    },
}


def make_config(tmp_path: Path | None = None, **overrides: Any) -> AgentConfig:
    data = {**BASE, **overrides}
    if tmp_path is not None:
        data.setdefault("state_dir", str(tmp_path / "state"))
    return parse_config(data)


@pytest.fixture
def config(tmp_path: Path) -> AgentConfig:
    return make_config(tmp_path)
