"""What the engine asks of nftables: apply a policy, read it back, prove it, find bypasses.

The engine decides what the gateway should hold (and records it); this module
makes the kernel hold it and says how far it does. It keeps the per-process
memory that makes repeated changes cheap: the reference structure per skeleton
(reference.py) and the rendered text of large element tuples (render.TextMemo).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from agent.boot_files import BOOT_META, BOOT_RULESET
from agent.errors import StateError
from agent.nft.facts import EXPIRY_SLACK_SECONDS, Facts, canonical, compare, flow_key
from agent.nft.offload import bypasses, cut_offloaded
from agent.nft.reference import References
from agent.nft.render import (
    ElementChange,
    TextMemo,
    render,
    render_delete,
    render_element_change,
)
from agent.nft.runner import Nft
from agent.policy import Policy
from agent.results import EngineStats, Phases


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(f".tmp.{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StateError(f"cannot write {path}: {exc.strerror}") from None


class Kernel:
    def __init__(self, nft: Nft, work_dir: Path, *, stats: EngineStats,
                 references: Callable[[str], Facts] | None = None) -> None:
        self.nft = nft
        self.work_dir = work_dir  # where complete scripts are written before they apply
        self.stats = stats
        self.on_apply: Callable[[float], None] | None = None
        self._references = references or References()
        self._element_text = TextMemo()

    def apply_file(self, script: str) -> None:
        """One transaction from a complete file (a truncated stream could be valid)."""
        self.work_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix=".apply-", suffix=".nft", dir=self.work_dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(script)
            self.nft.apply_file(path)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)

    def reference(self, policy: Policy) -> Facts:
        """The structure (chains, rules, set types) the kernel holds for `policy`, learnt
        in a scratch namespace before the desired state is written: that is the dry
        check, and the reference every read-back is compared with (reference.py).
        Elements are typed, collapsed values and are not part of it: checking 100k of
        them would double the apply time. Learnt once per structure per process."""
        return self._references(render(policy, with_elements=False))

    def compare(self, policy: Policy | None, *, elements: bool = True) -> list[str]:
        live = self.nft.read_table(elements=elements)
        return compare(policy, live, None if policy is None else self.reference(policy))

    def compare_exception_sets(self, policy: Policy) -> list[str]:
        live = self.nft.read_sets([name for name in policy.sets if name.startswith("exc_")])
        return compare(policy, live)

    def bypasses(self) -> tuple[str, ...]:
        """Paths around our forward chain, as seen now (remembered in the stats)."""
        found = tuple(bypasses(self.nft.read_ruleset()))
        self.stats.bypass = found
        return found

    def cut_bypass(self, isolated: bool) -> tuple[str, ...]:
        """The bypass paths; while isolated, the connections offloaded past our forward
        chain are torn down (their next packet meets our rules)."""
        found = self.bypasses()
        if found and isolated:
            problem = cut_offloaded()
            if problem is not None:
                found = (*found, problem)
        return found

    def converge(self, policy: Policy | None, phases: Phases) -> list[str]:
        """Make the kernel hold `policy` (None: no table); returns the read-back
        differences that remain (empty: the kernel holds exactly what was meant)."""
        self.apply_file(render_delete() if policy is None
                        else render(policy, element_text=self._element_text))
        self.timed_apply(phases)
        problems = self.compare(policy)
        phases.mark("readback")
        return problems

    def save_boot(self, policy: Policy | None, *, config_digest: str) -> None:
        """What the boot path applies after a reboot (boot.py): this policy without its
        exceptions (their time runs on; boot adds the live ones from the state file),
        and what it was made for. Written after every full apply; removed when open."""
        ruleset, meta = self.work_dir / BOOT_RULESET, self.work_dir / BOOT_META
        if policy is None:
            for path in (ruleset, meta):
                path.unlink(missing_ok=True)
            return
        closed = dataclasses.replace(policy, sets={
            name: (() if name.startswith("exc_") else els) for name, els in policy.sets.items()})
        _write_atomically(ruleset, render(closed, element_text=self._element_text))
        _write_atomically(meta, json.dumps({"profile": policy.profile,
                                            "config_digest": config_digest}))

    def timed_apply(self, phases: Phases) -> None:
        elapsed = phases.mark("apply")
        self.stats.last_apply_seconds = elapsed
        if self.on_apply is not None:
            self.on_apply(elapsed)

    def extend_elements(self, old: list[ElementChange], new: list[ElementChange]) -> None:
        """A new lifetime: re-adding an element updates its timeout where the kernel
        supports it (Linux 6.10 and later); elsewhere the element is replaced."""
        self.nft.apply_text(render_element_change(add=new))
        left = self.nft.expiries(sorted({name for name, _ in new}))
        wanted = ((name, canonical(flow_key(el)), (el.timeout or 0)) for name, el in new)
        if any(left.get((name, key), 0) < timeout - EXPIRY_SLACK_SECONDS
               for name, key, timeout in wanted):
            self.nft.apply_text(render_element_change(remove=old, add=new))
