"""Facts about our table, read back through the nftables JSON API, compared with intent.

`facts_from_json` parses `nft -j list table inet drawbridge`. The live table is
compared with two things:

- the **reference** (see reference.py): what the kernel holds for our skeleton,
  learnt in a scratch namespace. Chains, every rule's expression (and comment, and
  order), set types and flags, counters: any change that alters what the table
  matches is drift, whatever its comment says;
- the **policy**: the elements every set must hold (`expected_elements`).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.nft.render import ALL_COUNTERS, TABLE, claimed
from agent.nft.rules import LIVE_SET, set_name
from agent.policy import FlowElement, Policy

_PROTO_NUMBERS = {"tcp": 6, "udp": 17, "icmp": 1, "ipv6-icmp": 58}
# expected elements this close to expiry may already be gone from the kernel
EXPIRY_SLACK_SECONDS = 2
# sets whose contents the kernel writes at run time: never compared element by element
DYNAMIC_SETS = frozenset({LIVE_SET})

FlowKey = tuple[str, int, int, int]  # network, protocol number, low port, high port
ElementKey = FlowKey | tuple[str, str] | str  # flow, (interface, network), network or name
RuleFact = tuple[str, str, str]  # chain, comment, expression as canonical JSON


@dataclass(frozen=True)
class Facts:
    present: bool
    chains: frozenset[str] = frozenset()  # canonical JSON of each chain (name, hook, ...)
    rules: tuple[RuleFact, ...] = ()  # in order
    sets: Mapping[str, frozenset[ElementKey]] = field(default_factory=dict)
    set_types: Mapping[str, str] = field(default_factory=dict)  # name -> canonical JSON
    counters: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    others: tuple[str, ...] = ()  # anything else in our table (flowtables, maps, ...)
    with_elements: bool = True  # False: a terse read-back, set contents not listed


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _network(value: Any) -> str:
    """nft's text for an address element as 'addr/len'. Kept as text: parsing 100k
    networks costs seconds; `compare` normalises only the keys that differ."""
    if isinstance(value, str):
        return f"{value}/{128 if ':' in value else 32}"
    if "prefix" in value:
        prefix = value["prefix"]
        return f"{prefix['addr']}/{prefix['len']}"
    if "range" in value:  # an address range that is no prefix: never rendered by us
        low, high = value["range"]
        return f"{low}-{high}"
    raise ValueError(f"unexpected address element {value!r}")


def _ports(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, dict) and "range" in value:
        low, high = value["range"]
        return (int(low), int(high))
    raise ValueError(f"unexpected port element {value!r}")


def element_key(elem: Any, type_: Any) -> ElementKey:
    if isinstance(elem, dict) and "elem" in elem:  # element with timeout/expires
        elem = elem["elem"]["val"]
    if isinstance(elem, dict) and "concat" in elem:
        parts = elem["concat"]
        if len(parts) == 2:  # ifname . address
            return (str(parts[0]), _network(parts[1]))
        addr, proto, port = parts
        number = proto if isinstance(proto, int) else _PROTO_NUMBERS[proto]
        low, high = _ports(port)
        return (_network(addr), number, low, high)
    if type_ == "ifname":
        return str(elem)
    return _network(elem)


def _set_facts(s: Mapping[str, Any]) -> tuple[frozenset[ElementKey], str]:
    meta = {k: v for k, v in s.items() if k not in ("elem", "handle", "family", "table")}
    if s["name"] in DYNAMIC_SETS:
        return frozenset(), _canon(meta)
    return frozenset(element_key(e, s.get("type")) for e in s.get("elem", [])), _canon(meta)


def facts_from_json(document: Mapping[str, Any], *, with_elements: bool = True) -> Facts:
    chains: set[str] = set()
    rules: list[RuleFact] = []
    sets: dict[str, frozenset[ElementKey]] = {}
    set_types: dict[str, str] = {}
    counters: dict[str, tuple[int, int]] = {}
    others: list[str] = []
    present = False
    for item in document.get("nftables", []):
        kind, body = next(iter(item.items()))
        if kind == "metainfo":
            continue
        if kind == "table":
            present = present or body.get("name") == TABLE
        elif kind == "chain":
            chains.add(_canon({k: v for k, v in body.items()
                               if k not in ("handle", "family", "table")}))
        elif kind == "rule":
            rules.append((body["chain"], body.get("comment", ""), _canon(body.get("expr", []))))
        elif kind == "set":
            sets[body["name"]], set_types[body["name"]] = _set_facts(body)
        elif kind == "counter":
            counters[body["name"]] = (int(body.get("packets", 0)), int(body.get("bytes", 0)))
        else:
            others.append(f"{kind} {body.get('name', '?')}")
    return Facts(present, frozenset(chains), tuple(rules), sets, set_types, counters,
                 tuple(others), with_elements)


def flow_key(el: FlowElement) -> FlowKey:
    proto = "ipv6-icmp" if el.proto == "icmp" and el.family == 6 else el.proto
    return (str(el.net), _PROTO_NUMBERS[proto], el.ports[0], el.ports[1])


def canonical(key: ElementKey) -> ElementKey:
    def net(text: str) -> str:
        try:
            return str(ipaddress.ip_network(text))
        except ValueError:
            return text

    if isinstance(key, str):
        return net(key)
    if len(key) == 2:
        return (key[0], net(str(key[1])))
    return (net(str(key[0])), *key[1:])


def _set_difference(expected: frozenset[Any], found: frozenset[Any]) -> tuple[set[Any], set[Any]]:
    missing, extra = set(expected - found), set(found - expected)
    if missing and extra:  # spelling may differ (e.g. ::ffff:1.2.3.4): compare canonically
        missing_c = {canonical(k) for k in missing}
        extra_c = {canonical(k) for k in extra}
        missing, extra = missing_c - extra_c, extra_c - missing_c
    return missing, extra


def expected_elements(policy: Policy, names: Collection[str] | None = None
                      ) -> dict[str, frozenset[ElementKey]]:
    """What every set of ours (or just the sets in `names`) must hold for `policy`, the
    dynamic `live` set aside. Reading back only the exception sets after an element
    change must not cost a canonical form of every allowlist element: `names`."""
    spoof = policy.antispoof
    sets: dict[str, frozenset[ElementKey]] = {}

    def put(name: str, elements: Iterable[ElementKey]) -> None:
        if names is None or name in names:  # a generator left unread costs nothing
            sets[name] = frozenset(elements)

    put("internal_ifs", spoof.interfaces)
    for fam in (4, 6):
        put(set_name("internal", fam), (str(n) for n in policy.internal if n.version == fam))
        put(set_name("mgmt_pin", fam), ((i, str(n)) for i, n in spoof.pins if n.version == fam))
        put(set_name("claimed", fam), (str(n) for n in claimed(policy, fam)))
        put(set_name("mgmt_rpf", fam),
            (str(n) for n in spoof.reverse_path if n.version == fam))
    for name, elements in policy.sets.items():
        put(name, (flow_key(el) for el in elements))
    return sets


def _fading(policy: Policy) -> frozenset[FlowKey]:
    """Exception elements that may legitimately have expired by the time we look."""
    return frozenset(
        flow_key(el) for el in policy.timed_elements()
        if el.timeout is not None and el.timeout <= EXPIRY_SLACK_SECONDS
    )


def compare(policy: Policy | None, live: Facts, reference: Facts | None = None) -> list[str]:
    """Differences between intent and the kernel, each a sentence; empty means in sync.
    `policy=None` means the gateway should be open (no table). `reference` is what the
    kernel held for our skeleton (reference.py); without it only elements are compared."""
    if policy is None:
        return ["table inet drawbridge exists but the gateway should be open"] if live.present \
            else []
    if not live.present:
        return ["table inet drawbridge is missing"]
    problems = [] if reference is None else structure_differences(reference, live)
    fading = _fading(policy)
    for name, expected in expected_elements(policy, live.sets.keys()).items():
        found = live.sets.get(name)
        if found is None or not live.with_elements:
            continue  # a missing set is a structure difference
        missing, extra = _set_difference(expected, found)
        missing -= fading
        if missing or extra:
            problems.append(f"set {name}: {len(missing)} elements missing, {len(extra)} unexpected"
                            + _sample("missing", missing) + _sample("unexpected", extra))
    return problems


def structure_differences(want: Facts, live: Facts) -> list[str]:
    """Chains, rules (expression, comment, order), sets' types, counters, other objects."""
    problems: list[str] = []
    if live.chains != want.chains:
        problems.append("chains differ: expected " + ", ".join(sorted(want.chains - live.chains))
                        + "; found " + ", ".join(sorted(live.chains - want.chains)))
    if live.rules != want.rules:
        problems.append(f"rules differ: expected {len(want.rules)} rules, found {len(live.rules)}"
                        + _first_rule_difference(want.rules, live.rules))
    for name in sorted(set(want.set_types) | set(live.set_types)):
        if name not in live.set_types:
            problems.append(f"set {name} is missing")
        elif name not in want.set_types:
            problems.append(f"unexpected set {name}")
        elif live.set_types[name] != want.set_types[name]:
            problems.append(f"set {name} changed: {live.set_types[name]}")
    missing_counters = sorted(set(ALL_COUNTERS) - set(live.counters))
    if missing_counters:
        problems.append(f"counters missing: {', '.join(missing_counters)}")
    if live.others != want.others:
        problems.append(f"unexpected objects in our table: {', '.join(live.others)}")
    return problems


def _first_rule_difference(want: Iterable[RuleFact], got: Iterable[RuleFact]) -> str:
    position: dict[str, int] = {}
    for w, g in zip(want, got, strict=False):
        index = position[w[0]] = position.get(w[0], -1) + 1
        if w != g:
            what = "its match or verdict" if w[:2] == g[:2] else f"comment {g[1]!r}"
            return (f" (first difference: rule {index} of chain {w[0]}, meant {w[1]!r}, "
                    f"now {what} differs)")
    return ""


def _sample(label: str, keys: set[Any]) -> str:
    if not keys:
        return ""
    shown = sorted(map(str, keys))[:3]
    return f"; {label} e.g. {', '.join(shown)}"
