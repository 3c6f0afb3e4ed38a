"""Facts about our table, read back through the nftables JSON API, compared with intent.

`facts_from_json` parses `nft -j list table inet drawbridge`; `expected_facts`
derives the same shape from a Policy. Comparing the two is how the agent proves
that what the kernel holds is what was meant, and how it notices drift.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.nft.render import CHAIN_PRIORITY, COUNTERS, TABLE, rules_for, set_name
from agent.policy import FlowElement, Policy

_PROTO_NUMBERS = {"tcp": 6, "udp": 17, "icmp": 1, "ipv6-icmp": 58}
# expected elements this close to expiry may already be gone from the kernel
EXPIRY_SLACK_SECONDS = 2

ElementKey = tuple[str, int, int, int]  # network, protocol number, low port, high port


@dataclass(frozen=True)
class Facts:
    present: bool
    chains: frozenset[tuple[str, str, int, str]] = frozenset()  # name, hook, prio, policy
    rules: tuple[tuple[str, str], ...] = ()  # (chain, comment) in order
    sets: Mapping[str, frozenset[ElementKey | str]] = field(default_factory=dict)
    counters: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    with_elements: bool = True  # False: a terse read-back, set contents not listed


def _network(value: Any) -> str:
    """nft's text for an address element as 'addr/len'. Kept as text: parsing 100k
    networks costs seconds; `compare` normalises only the keys that differ."""
    if isinstance(value, str):
        return f"{value}/{128 if ':' in value else 32}"
    if "prefix" in value:
        prefix = value["prefix"]
        return f"{prefix['addr']}/{prefix['len']}"
    raise ValueError(f"unexpected address element {value!r}")


def _ports(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, dict) and "range" in value:
        low, high = value["range"]
        return (int(low), int(high))
    raise ValueError(f"unexpected port element {value!r}")


def _element_key(elem: Any) -> ElementKey | str:
    if isinstance(elem, dict) and "elem" in elem:  # element with timeout/expires
        elem = elem["elem"]["val"]
    if isinstance(elem, dict) and "concat" in elem:
        addr, proto, port = elem["concat"]
        number = proto if isinstance(proto, int) else _PROTO_NUMBERS[proto]
        low, high = _ports(port)
        return (_network(addr), number, low, high)
    return _network(elem)


def facts_from_json(document: Mapping[str, Any], *, with_elements: bool = True) -> Facts:
    chains: set[tuple[str, str, int, str]] = set()
    rules: list[tuple[str, str]] = []
    sets: dict[str, frozenset[ElementKey | str]] = {}
    counters: dict[str, tuple[int, int]] = {}
    present = False
    for item in document.get("nftables", []):
        if "table" in item:
            present = present or item["table"].get("name") == TABLE
        elif "chain" in item:
            c = item["chain"]
            chains.add((c["name"], c.get("hook", ""), int(c.get("prio", 0)), c.get("policy", "")))
        elif "rule" in item:
            r = item["rule"]
            rules.append((r["chain"], r.get("comment", "")))
        elif "set" in item:
            s = item["set"]
            sets[s["name"]] = frozenset(_element_key(e) for e in s.get("elem", []))
        elif "counter" in item:
            c = item["counter"]
            counters[c["name"]] = (int(c.get("packets", 0)), int(c.get("bytes", 0)))
    return Facts(present, frozenset(chains), tuple(rules), sets, counters, with_elements)


def _flow_key(el: FlowElement) -> ElementKey:
    proto = "ipv6-icmp" if el.proto == "icmp" and el.family == 6 else el.proto
    return (str(el.net), _PROTO_NUMBERS[proto], el.ports[0], el.ports[1])


def _canonical(key: ElementKey | str) -> ElementKey | str:
    def net(text: str) -> str:
        return str(ipaddress.ip_network(text))

    return net(key) if isinstance(key, str) else (net(key[0]), *key[1:])


def _set_difference(expected: frozenset[Any], found: frozenset[Any]) -> tuple[set[Any], set[Any]]:
    missing, extra = set(expected - found), set(found - expected)
    if missing and extra:  # spelling may differ (e.g. ::ffff:1.2.3.4): compare canonically
        missing_c = {_canonical(k) for k in missing}
        extra_c = {_canonical(k) for k in extra}
        missing, extra = missing_c - extra_c, extra_c - missing_c
    return missing, extra


def expected_facts(policy: Policy) -> Facts:
    chains = frozenset((name, name, CHAIN_PRIORITY, "drop") for name in COUNTERS)
    rules = tuple((r.chain, r.comment) for r in rules_for(policy))
    sets: dict[str, frozenset[ElementKey | str]] = {
        set_name("internal", fam): frozenset(str(n) for n in policy.internal if n.version == fam)
        for fam in (4, 6)
    }
    for name, elements in policy.sets.items():
        sets[name] = frozenset(_flow_key(el) for el in elements)
    return Facts(True, chains, rules, sets)


def _fading(policy: Policy) -> frozenset[ElementKey]:
    """Exception elements that may legitimately have expired by the time we look."""
    return frozenset(
        _flow_key(el) for el in policy.timed_elements()
        if el.timeout is not None and el.timeout <= EXPIRY_SLACK_SECONDS
    )


def compare(policy: Policy | None, live: Facts) -> list[str]:
    """Differences between intent and the kernel, each a sentence; empty means in sync.
    `policy=None` means the gateway should be open (no table)."""
    if policy is None:
        return ["table inet drawbridge exists but the gateway should be open"] if live.present \
            else []
    if not live.present:
        return ["table inet drawbridge is missing"]
    want = expected_facts(policy)
    problems: list[str] = []
    if live.chains != want.chains:
        problems.append(
            f"chains differ: expected {sorted(want.chains)}, found {sorted(live.chains)}")
    if live.rules != want.rules:
        problems.append(f"rules differ: expected {len(want.rules)} rules, found {len(live.rules)}"
                        + _first_rule_difference(want.rules, live.rules))
    fading = _fading(policy)
    for name, expected in want.sets.items():
        found = live.sets.get(name)
        if found is None:
            problems.append(f"set {name} is missing")
            continue
        if not live.with_elements:
            continue
        missing, extra = _set_difference(expected, found)
        missing -= fading
        if missing or extra:
            problems.append(f"set {name}: {len(missing)} elements missing, {len(extra)} unexpected"
                            + _sample("missing", missing) + _sample("unexpected", extra))
    for name in sorted(set(live.sets) - set(want.sets)):
        problems.append(f"unexpected set {name}")
    return problems


def _first_rule_difference(want: Iterable[tuple[str, str]], got: Iterable[tuple[str, str]]) -> str:
    for index, (w, g) in enumerate(zip(want, got, strict=False)):
        if w != g:
            return f" (first difference at rule {index}: expected {w}, found {g})"
    return ""


def _sample(label: str, keys: set[Any]) -> str:
    if not keys:
        return ""
    shown = sorted(map(str, keys))[:3]
    return f"; {label} e.g. {', '.join(shown)}"
