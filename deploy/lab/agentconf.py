"""The part of a lab gateway's agent.toml that every lab user shares.

Internal networks live on the gateway's two inside interfaces; the management
network is pinned to the `mgmt` interface (anti-spoofing), in IPv4 and IPv6.
Callers append their own profiles, probes and infrastructure flows.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .topology import Gateway, Lab


def agent_toml(lab: Lab, gw: Gateway, state_dir: Path, *, reconcile_interval: float = 1.0,
               mgmt_ports: Sequence[int] = (22, 9630), metrics_listen: str | None = None,
               full_check_interval: float | None = None,
               pinned: Sequence[int] = (4, 6), **top: float) -> str:
    """`pinned`: the address families whose management network is pinned to the `mgmt`
    interface; the others are checked by reverse path. `top`: more top-level keys
    (e.g. probe_interval=1.0)."""
    nets = ", ".join(f'"{n}"' for n in gw.internal_networks)
    ports = ", ".join(str(p) for p in mgmt_ports)
    metrics = (f'listen = "{metrics_listen}"' if metrics_listen is not None
               else "enabled = false")
    full = (f"full_check_interval = {full_check_interval}\n"
            if full_check_interval is not None else "")
    full += "".join(f"{key} = {value}\n" for key, value in top.items())
    text = f"""
gateway = "{gw.name}"
internal_networks = [{nets}]
internal_interfaces = ["{gw.inside_if}", "{gw.inside2_if}"]
state_dir = "{state_dir}"
reconcile_interval = {reconcile_interval}
{full}
[metrics]
{metrics}
"""
    for fam, subnet in ((4, lab.mgmt_subnet4), (6, lab.mgmt_subnet6)):
        interface = f'\ninterface = "{gw.mgmt_if}"' if fam in pinned else ""
        text += f"""
[[management]]
cidr = "{subnet}"
proto = "tcp"
ports = [{ports}]{interface}
"""
    return text
