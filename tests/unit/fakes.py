"""Stand-ins for the I/O edges, for unit tests of pure logic only (the lab runs the real ones)."""

from __future__ import annotations

from typing import Any

from agent.nft.facts import Facts


class RecordingNft:
    """A kernel that accepts everything and holds nothing (read-back: no table)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def check(self, script: str) -> None:
        self.calls.append("check")

    def apply_file(self, path: str) -> None:
        self.calls.append("apply")

    def apply_text(self, script: str) -> None:
        self.calls.append("apply")

    def read_table(self, *, elements: bool = True) -> Facts:
        self.calls.append("read" if elements else "read-terse")
        return Facts(present=False)

    def read_sets(self, names: list[str]) -> Facts:
        return Facts(present=False)

    def read_ruleset(self) -> dict[str, Any]:
        return {"nftables": []}

    def counters(self) -> dict[str, tuple[int, int]]:
        return {}


def no_reference(skeleton: str) -> Facts:
    """The engine's reference learner without a scratch namespace: structure unchecked."""
    del skeleton
    return Facts(present=True)
