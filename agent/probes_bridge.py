"""Wiring between the engine and the probes (verification after every change)."""

from __future__ import annotations

from typing import Any

from agent.config import AgentConfig
from agent.engine import Verifier, readback_only
from agent.rpc import ProbeHandler


def verifier_for(config: AgentConfig) -> Verifier:
    del config
    return readback_only


def probe_handler(config: AgentConfig) -> ProbeHandler | None:
    del config
    return None


__all__ = ["Any", "probe_handler", "verifier_for"]
