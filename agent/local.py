"""The agent's requests answered in this process, without the daemon (break-glass).

The same Dispatcher, engine, validation and lock as the daemon's; what the
daemon would verify with its probes is verified here too.
"""

from __future__ import annotations

from pathlib import Path

from agent.config import load_config_and_digest
from agent.engine import Engine
from agent.probes_bridge import ProbeService, probe_handler, verifier_for
from agent.rpc import Dispatcher


def direct_dispatcher(config_path: Path) -> Dispatcher:
    """Config errors are raised (ConfigError): the caller reports them."""
    config, digest = load_config_and_digest(config_path)
    probes = ProbeService(config.probes)
    engine = Engine(config, verifier=verifier_for(config, probes), config_digest=digest)
    engine.hosts.refresh()  # before any lock is taken: a lookup may hang on a cut resolver
    return Dispatcher(engine, probe=probe_handler(config, probes))
