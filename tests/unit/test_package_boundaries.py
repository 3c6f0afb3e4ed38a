"""What the controller may import from the agent: only its pure shared modules.

The controller host installs drawbridge[controller]; it must never need scapy (the
agent's probes) nor import the agent's runtime (engine, nftables, daemon, probes).
"""

from __future__ import annotations

import json
import subprocess
import sys

# pure: validation of what users type (config, requests, free text), the wire's framing
SHARED_AGENT_MODULES = {"agent", "agent.config", "agent.config_fields", "agent.config_policy",
                        "agent.config_probes", "agent.errors", "agent.requests",
                        "agent.digest", "agent.durations", "agent.nettypes", "agent.text",
                        "agent.version",
                        "agent.wire"}

# Import every controller module with scapy made unimportable; report the agent modules loaded.
PROBE = """
import importlib, json, pkgutil, sys
sys.modules["scapy"] = None  # any `import scapy...` now raises ImportError
import controller
for info in pkgutil.walk_packages(controller.__path__, "controller."):
    importlib.import_module(info.name)
print(json.dumps(sorted(m for m in sys.modules if m == "agent" or m.startswith("agent."))))
"""


def test_controller_imports_no_scapy_and_only_shared_agent_modules() -> None:
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    loaded = set(json.loads(proc.stdout))
    assert loaded <= SHARED_AGENT_MODULES, f"controller imports {loaded - SHARED_AGENT_MODULES}"
