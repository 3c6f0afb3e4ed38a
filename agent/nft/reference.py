"""What the kernel holds for exactly our script, learnt in a scratch network namespace.

Drift detection must compare each rule's *expression*, not its comment: a rule
replaced in place (`nft replace rule ... accept comment "drop"`) keeps its comment.
The expected expressions are not derived by hand from the script (nft's JSON
spelling of an expression is its own business and changes between versions):
the skeleton (our table without set elements) is applied in a throwaway network
namespace, read back as JSON there, and that listing is the reference the live
table must match. Applying it there is also the dry check: the same kernel
accepted exactly this structure.

The scratch namespace exists only for the two `nft` calls (`unshare --net`), is
never connected to anything and disappears with them. A reference depends only
on the skeleton text, so it is learnt once per structure per process.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable

from agent.errors import NftError
from agent.nft.facts import Facts, facts_from_json
from agent.nft.render import FAMILY, TABLE

SCRATCH_TIMEOUT = 30.0
# apply the skeleton, then list it from a second nft process: a listing in the same
# invocation is answered from nft's cache, not from the kernel
_SCRIPT = f'nft -f "$1" && nft -j list table {FAMILY} {TABLE}'

Learner = Callable[[str], Facts]


def learn_in_scratch_namespace(skeleton: str) -> Facts:
    """Apply `skeleton` in a new, empty network namespace and read it back."""
    try:
        proc = subprocess.run(
            ["unshare", "--net", "sh", "-c", _SCRIPT, "drawbridge-reference", "/dev/stdin"],
            input=skeleton, capture_output=True, text=True, timeout=SCRATCH_TIMEOUT,
            check=False,
        )
    except FileNotFoundError as exc:
        raise NftError(f"cannot check the ruleset: {exc.filename} not found "
                       "(needs util-linux `unshare` and nftables `nft`)") from None
    except subprocess.TimeoutExpired:
        raise NftError(f"checking the ruleset took over {SCRATCH_TIMEOUT:.0f}s") from None
    if proc.returncode != 0:
        errors = [ln for ln in proc.stderr.splitlines() if "Error" in ln or "unshare" in ln]
        raise NftError("nft refused the ruleset structure: "
                       + ("; ".join(errors[:3]) or proc.stderr.strip()[-500:]))
    try:
        document = json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise NftError(f"nft returned unreadable JSON: {exc}") from None
    return facts_from_json(document, with_elements=False)


class References:
    """Reference facts per skeleton, learnt on first use (see module docstring)."""

    def __init__(self, learner: Learner = learn_in_scratch_namespace, capacity: int = 32) -> None:
        self._learner = learner
        self._capacity = capacity
        self._known: dict[str, Facts] = {}

    def __call__(self, skeleton: str) -> Facts:
        known = self._known.get(skeleton)
        if known is None:
            known = self._learner(skeleton)
            if len(self._known) >= self._capacity:
                self._known.pop(next(iter(self._known)))
            self._known[skeleton] = known
        return known
