"""Stand-ins for the I/O edges, for unit tests of pure logic only (the lab runs the real ones)."""

from __future__ import annotations

from agent.nft.facts import Facts


class RecordingNft:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def check(self, script: str) -> None:
        self.calls.append("check")

    def apply_file(self, path: str) -> None:
        self.calls.append("apply")

    def read_table(self, *, elements: bool = True) -> Facts:
        self.calls.append("read" if elements else "read-terse")
        return Facts(present=False)

    def counters(self) -> dict[str, tuple[int, int]]:
        return {}
