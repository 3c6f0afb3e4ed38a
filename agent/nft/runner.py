"""The only place that runs `nft`: apply scripts atomically, read our table back.

Scripts go in on stdin, so no file is left half-written and nothing is passed
through a shell. nft errors become NftError with nft's own explanation.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from typing import Any

from agent.errors import NftError
from agent.nft.facts import Facts, facts_from_json
from agent.nft.render import FAMILY, TABLE

_MISSING_TABLE_HINTS = ("No such file or directory", "does not exist")


@dataclass(frozen=True)
class Nft:
    binary: str = "nft"
    timeout: float = 120.0

    def _run(self, args: list[str], script: str | None = None) -> str:
        try:
            proc = subprocess.run(
                [self.binary, *args], input=script, capture_output=True, text=True,
                timeout=self.timeout, check=False,
            )
        except FileNotFoundError:
            raise NftError(f"nft not found ({self.binary!r}); install the nftables package") \
                from None
        except subprocess.TimeoutExpired:
            raise NftError(f"nft did not finish within {self.timeout:.0f}s") from None
        if proc.returncode != 0:
            raise NftError(_explain(proc.stderr) or f"nft exited with {proc.returncode}")
        return proc.stdout

    def check(self, script: str) -> None:
        """Dry run: the kernel validates the transaction and commits nothing."""
        self._run(["-c", "-f", "-"], script)

    def apply_file(self, path: str) -> None:
        """One atomic transaction: all of it is committed, or none of it. A complete file,
        not a pipe: a truncated script could be valid and commit half of a change."""
        self._run(["-f", path])

    def read_table(self, *, elements: bool = True) -> Facts:
        """Our table as facts. `elements=False` is the terse read (no set contents): what
        drift checks use between full comparisons, since listing 100k elements takes
        seconds."""
        try:
            out = self._run(["-j", *([] if elements else ["-t"]), "list", "table", FAMILY, TABLE])
        except NftError as exc:
            if any(hint in str(exc) for hint in _MISSING_TABLE_HINTS):
                return Facts(present=False)
            raise
        return facts_from_json(_parse(out), with_elements=elements)

    def counters(self) -> dict[str, tuple[int, int]]:
        """Named counters of our table (cheap: no set elements listed); {} if no table."""
        try:
            out = self._run(["-j", "list", "counters", "table", FAMILY, TABLE])
        except NftError as exc:
            if any(hint in str(exc) for hint in _MISSING_TABLE_HINTS):
                return {}
            raise
        return dict(facts_from_json(_parse(out)).counters)

    def list_ruleset_text(self, *args: str) -> str:
        return self._run(["list", *args] if args else ["list", "ruleset"])


def _parse(out: str) -> dict[str, Any]:
    try:
        doc = json.loads(out)
    except json.JSONDecodeError as exc:
        raise NftError(f"nft returned unreadable JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise NftError("nft returned JSON that is not an object")
    return doc


def _explain(stderr: str) -> str:
    """nft's error text, without the long echo of the script around the caret."""
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error:" in ln]
    return "; ".join(errors[:3]) if errors else "\n".join(lines[-3:])
