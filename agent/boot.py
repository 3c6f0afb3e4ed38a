"""`drawbridge-agent boot`: the isolation in force before a reboot, back before any link.

Run from a oneshot unit ordered before network-pre.target, so no interface is up
yet: a rebooted isolated gateway must not forward one packet the isolation
forbids. It must be fast and depend on as little as possible:

1. the desired state (state.json, read as plain JSON) says open: nothing to do;
2. the ruleset saved at the last full apply (boot.nft, without exceptions) was made
   for this profile and exactly this config file: apply it as it is (no profile
   compilation, no config validation), then the live exceptions with the time they
   have left (an exception that expired during the reboot stays closed);
3. otherwise the config is loaded and the profile compiled (slow for huge allowlists,
   but correct), through the engine, which saves a new boot.nft;
4. the config cannot be read: the saved ruleset anyway (closed, without exceptions),
   or, with none saved, a table that drops everything forwarded (the gateway itself
   stays reachable on its console and management for repair).

The daemon starts after it and takes over (drift repair, exceptions, probes).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.boot_files import BOOT_META, BOOT_RULESET
from agent.digest import config_digest
from agent.errors import ConfigError, DrawbridgeError, StateError
from agent.nettypes import IPNetwork
from agent.relay import state_dir_of

STATE_FORMAT = 2  # agent.state.STATE_FORMAT (not imported: that module loads pydantic)
FORWARD_ONLY = """table inet drawbridge
delete table inet drawbridge
table inet drawbridge {
	chain forward {
		type filter hook forward priority -10; policy drop;
	}
}
"""


@dataclass(frozen=True)
class _Flow:
    """An exception's flow as exception_elements needs it, read from state.json."""

    cidr: IPNetwork
    proto: str
    ports: tuple[tuple[int, int], ...]
    direction: str


def _digest(path: Path) -> str | None:
    try:
        return config_digest(path.read_bytes())
    except OSError:
        return None


def _say(message: str) -> None:
    print(f"drawbridge-agent boot: {message}", file=sys.stderr, flush=True)


def _load_state(state_dir: Path) -> dict[str, Any]:
    path = state_dir / "state.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise StateError(f"{path} is unreadable: {exc}") from None
    if not isinstance(data, dict):
        raise StateError(f"{path} is corrupt: not a JSON object")
    if not isinstance(data.get("format", 1), int) or data.get("format", 1) > STATE_FORMAT:
        raise StateError(f"{path} was written by a newer agent; the kernel is left as it is")
    return data


def _exception_changes(state: dict[str, Any], now: float) -> list[Any]:
    import ipaddress

    from agent.policy import exception_elements

    changes: list[Any] = []
    for exc in state.get("exceptions", []):
        left = math.ceil(float(exc["expires_at"]) - now)
        if left <= 0:
            continue
        f = exc["flow"]
        flow = _Flow(ipaddress.ip_network(f["cidr"]), f["proto"],
                     tuple((int(lo), int(hi)) for lo, hi in f.get("ports", ())),
                     f.get("direction", "out"))
        for name, elements in exception_elements(flow, left).items():  # type: ignore[arg-type]
            changes.extend((name, el) for el in elements)
    return changes


def boot(config_path: Path) -> int:
    from agent.nft.render import render_element_change
    from agent.nft.runner import Nft

    state_dir = state_dir_of(config_path)
    try:
        state = _load_state(state_dir)
    except StateError as exc:
        _say(str(exc))
        return 4
    profile = state.get("profile")
    if profile is None:
        _say("the gateway is open: nothing to apply")
        return 0
    nft = Nft()
    saved, meta = state_dir / BOOT_RULESET, state_dir / BOOT_META
    digest = _digest(config_path)
    try:
        made_for = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        made_for = {}
    try:
        if saved.exists() and made_for.get("profile") == profile \
                and digest is not None and made_for.get("config_digest") == digest:
            nft.apply_file(str(saved))
            changes = _exception_changes(state, time.time())
            if changes:
                nft.apply_text(render_element_change(add=changes))
            _say(f"isolated ({profile}) from the saved ruleset, {len(changes)} exception "
                 "element(s)")
            return 0
        return _boot_from_config(config_path, saved, profile)
    except DrawbridgeError as exc:
        _say(f"could not apply the isolation: {exc}")
        return 3


def _boot_from_config(config_path: Path, saved: Path, profile: str) -> int:
    from agent.config import load_config_and_digest
    from agent.engine import Engine
    from agent.nft.runner import Nft

    try:
        config, digest = load_config_and_digest(config_path)
    except ConfigError as exc:
        nft = Nft()
        if saved.exists():
            nft.apply_file(str(saved))
            _say(f"config unreadable ({exc}); the last saved ruleset of {profile!r} is in "
                 "force, without exceptions")
        else:
            nft.apply_text(FORWARD_ONLY)
            _say(f"config unreadable ({exc}) and no saved ruleset: everything forwarded is "
                 "dropped until the config is fixed")
        return 1
    Engine(config, config_digest=digest).reconcile()
    _say(f"isolated ({profile}) from the config")
    return 0


def main(config_path: Path) -> int:
    return boot(config_path)
