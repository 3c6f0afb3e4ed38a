"""The only place that talks to nftables: apply scripts atomically, read our table back.

nft errors become NftError with nft's own explanation (the line it refused),
without the long echo of the script around it.
"""

from __future__ import annotations

import json
from typing import Any

from agent.errors import NftError
from agent.nft.facts import Facts, canonical, element_key, facts_from_json
from agent.nft.libnft import OUTPUT_JSON, OUTPUT_TERSE, LibNft
from agent.nft.render import FAMILY, TABLE

_MISSING_TABLE_HINTS = ("No such file or directory", "does not exist")


class Nft:
    def __init__(self, lib: LibNft | None = None) -> None:
        self._lib = lib or LibNft()

    def _run(self, *, command: str | None = None, filename: str | None = None,
             flags: int = 0, dry_run: bool = False) -> str:
        rc, out, err = self._lib.run(command=command, filename=filename, flags=flags,
                                     dry_run=dry_run)
        if rc != 0:
            raise NftError(_explain(err) or f"nft failed with status {rc}")
        return out

    def check(self, script: str) -> None:
        """Dry run: the kernel validates the transaction and commits nothing."""
        self._run(command=script, dry_run=True)

    def apply_file(self, path: str) -> None:
        """One atomic transaction: all of it is committed, or none of it. A complete file,
        not a stream: a truncated script could be valid and commit half of a change."""
        self._run(filename=path)

    def apply_text(self, script: str) -> None:
        """A small script (element changes) as one transaction, from memory."""
        self._run(command=script)

    def _list(self, what: str, flags: int) -> Facts | None:
        try:
            out = self._run(command=f"list {what} {FAMILY} {TABLE}", flags=flags)
        except NftError as exc:
            if any(hint in str(exc) for hint in _MISSING_TABLE_HINTS):
                return None
            raise
        return facts_from_json(_parse(out), with_elements=not flags & OUTPUT_TERSE)

    def read_table(self, *, elements: bool = True) -> Facts:
        """Our table as facts. `elements=False` is the terse read (no set contents): what
        drift checks use between full comparisons, since listing 100k elements takes
        seconds. It lists the terse *ruleset* and keeps our table: nft 1.0.6 fetches
        every set element for `list table -t` (about 0.5 s at 100k) but not for
        `list ruleset -t` (milliseconds)."""
        if elements:
            return self._list("table", OUTPUT_JSON) or Facts(present=False)
        ours = [item for item in self.read_ruleset().get("nftables", []) if _ours(item)]
        return facts_from_json({"nftables": ours}, with_elements=False)

    def expiries(self, names: list[str]) -> dict[tuple[str, Any], int]:
        """Seconds left of each timed element of these sets, by (set, element key)."""
        out: dict[tuple[str, Any], int] = {}
        for name in names:
            doc = _parse(self._run(command=f"list set {FAMILY} {TABLE} {name}",
                                   flags=OUTPUT_JSON))
            for item in doc.get("nftables", []):
                for elem in item.get("set", {}).get("elem", []):
                    if isinstance(elem, dict) and "elem" in elem:
                        key = canonical(element_key(elem, None))
                        out[(name, key)] = int(elem["elem"].get("expires", 0))
        return out

    def read_sets(self, names: list[str]) -> Facts:
        """Just these sets of our table, with their elements (small sets: the
        exceptions, read back after an element change)."""
        items: list[Any] = [{"table": {"family": FAMILY, "name": TABLE}}]
        for name in names:
            facts = self._run(command=f"list set {FAMILY} {TABLE} {name}", flags=OUTPUT_JSON)
            items += [i for i in _parse(facts).get("nftables", []) if "set" in i]
        return facts_from_json({"nftables": items})

    def read_ruleset(self) -> dict[str, Any]:
        """Every table of this network namespace, terse (no set contents): what
        bypass detection reads (see offload.py)."""
        return _parse(self._run(command="list ruleset", flags=OUTPUT_JSON | OUTPUT_TERSE))

    def counters(self) -> dict[str, tuple[int, int]]:
        """Named counters of our table; {} if there is no table."""
        facts = self._list("counters table", OUTPUT_JSON | OUTPUT_TERSE)
        return dict(facts.counters) if facts else {}

    def list_text(self, what: str = "ruleset") -> str:
        return self._run(command=f"list {what}")


def _ours(item: dict[str, Any]) -> bool:
    body: Any = next(iter(item.values()), {})
    if not isinstance(body, dict) or body.get("family") != FAMILY:
        return False
    return (body.get("name") if "table" in item else body.get("table")) == TABLE


def _parse(out: str) -> dict[str, Any]:
    try:
        doc = json.loads(out)
    except json.JSONDecodeError as exc:
        raise NftError(f"nft returned unreadable JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise NftError("nft returned JSON that is not an object")
    return doc


def _explain(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error:" in ln]
    return "; ".join(errors[:3]) if errors else "\n".join(lines[-3:])
