"""Paths around our forward chain: flowtables and packet redirection in other tables.

A flowtable (`flow add @ft`, OpenWrt fw4's default offload) moves an established
connection to a fast path at the ingress hook: its packets never reach our forward
chain again, so isolation would not cut it. `fwd to` and `dup to` in a netdev or
inet ingress chain send packets out before any filtering. Drawbridge never edits
other tables; it finds these paths (`bypasses`), reports the state unverified
while they exist (unless the operator declared offload a choice), and tears down
the connections already offloaded, so that their next packet is judged by our
rules (`cut_offloaded`).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator, Mapping
from typing import Any

from agent.nft.render import FAMILY, TABLE

_REDIRECTS = ("fwd", "dup")


def _statements(expr: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(expr, list):
        for item in expr:
            yield from _statements(item)
    elif isinstance(expr, dict):
        for key, value in expr.items():
            yield key, value
            yield from _statements(value)


def bypasses(ruleset: Mapping[str, Any]) -> list[str]:
    """Every flowtable, and every rule of another table that offloads or redirects
    packets, as sentences (pure: `ruleset` is `nft -j -t list ruleset`)."""
    found: list[str] = []
    for item in ruleset.get("nftables", []):
        if "flowtable" in item:
            ft = item["flowtable"]
            where = f"table {ft.get('family')} {ft.get('table')}"
            devices = ft.get("dev", [])
            devs = ", ".join(devices) if isinstance(devices, list) else str(devices)
            found.append(f"flowtable {ft.get('name')} in {where} (devices: {devs or 'none'})")
        elif "rule" in item:
            rule = item["rule"]
            if rule.get("family") == FAMILY and rule.get("table") == TABLE:
                continue  # our own table is compared rule by rule
            where = f"table {rule.get('family')} {rule.get('table')} chain {rule.get('chain')}"
            for key, value in _statements(rule.get("expr", [])):
                if key == "flow" and isinstance(value, dict) and value.get("op") == "add":
                    found.append(f"{where} offloads connections to {value.get('flowtable')}")
                elif key in _REDIRECTS and isinstance(value, dict):
                    found.append(f"{where} redirects packets ({key})")
    return found


def cut_offloaded(timeout: float = 10.0) -> str | None:
    """Delete the conntrack entries of offloaded connections, which tears down their
    fast path; their next packet goes through our chains (a connection that is still
    allowed is picked up again). Returns a problem sentence, or None if done."""
    tool = shutil.which("conntrack")
    if tool is None:
        return ("cannot cut offloaded connections: the `conntrack` tool is not installed "
                "(Debian package conntrack)")
    try:
        proc = subprocess.run([tool, "-D", "--status", "OFFLOAD"], capture_output=True,
                              text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return f"cutting offloaded connections took over {timeout:.0f}s"
    # exit 1 with "0 flow entries" just means there was nothing to delete
    if proc.returncode not in (0, 1):
        return f"cutting offloaded connections failed: {proc.stderr.strip()[-300:]}"
    return None
