"""The shipped example configs stay valid (the README points operators at them)."""

from __future__ import annotations

from pathlib import Path

from agent.config import load_config

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "examples"


def test_agent_example_loads() -> None:
    cfg = load_config(EXAMPLES / "agent.toml")
    assert cfg.gateway == "gw-ams-1"
    assert {"casefiles", "mail"} <= set(cfg.profiles)
    assert any(m.host for m in cfg.management)
