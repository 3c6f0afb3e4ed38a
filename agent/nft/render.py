"""Policy to an nftables script for table `inet drawbridge`: pure, deterministic.

Why text and not the JSON API for apply: with 100k set elements `nft -j -f`
took about 1.5x as long as `nft -f` of the same ruleset here, and apply time is
what isolation is measured by. Safety does not come from quoting: every token
below is produced from a typed value (an `ipaddress` network, an int, a
protocol from a fixed list, an interface name checked against a strict
pattern) or is a constant. No operator text (names, reasons) is ever part of
the ruleset. The live ruleset is read back through the JSON API (see facts.py);
what the rules mean is explained in rules.py.

The script replaces the table in one transaction: `table; delete table;
table {...}` is atomic in the kernel, so a reader sees the old table or the
new one, never a mix. Exceptions are added, extended and revoked as element
changes of the live table (render_element_change), which keeps the counters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from agent.nft.rules import (
    ACCEPT_CHAIN,
    ANTISPOOF_PRIORITY,
    CHAIN_PRIORITY,
    COUNTERS,
    FILTER_CHAINS,
    LIVE_SET,
    SPOOFED_COUNTER,
    rules_for,
    set_name,
)
from agent.policy import FlowElement, collapse_networks

if TYPE_CHECKING:
    from agent.nettypes import IPNetwork
    from agent.policy import Policy

TABLE = "drawbridge"
FAMILY = "inet"
ALL_COUNTERS = (*COUNTERS.values(), SPOOFED_COUNTER)
_ADDR = {4: "ipv4_addr", 6: "ipv6_addr"}
_PROTO = {(4, "tcp"): "tcp", (6, "tcp"): "tcp", (4, "udp"): "udp", (6, "udp"): "udp",
          (4, "icmp"): "icmp", (6, "icmp"): "ipv6-icmp"}
# connection ids of allowed flows (see rules.py); entries age out, `add` never refreshes
LIVE_TIMEOUT = "10m"
LIVE_SIZE = 65536
CHAIN_NAMES = ("prerouting", "from_inside", ACCEPT_CHAIN, *FILTER_CHAINS)


def _timed(kind: str) -> bool:
    return kind.startswith("exc")


def _element(el: FlowElement) -> str:
    lo, hi = el.ports
    port = str(lo) if lo == hi else f"{lo}-{hi}"
    text = f"{el.net} . {_PROTO[(el.family, el.proto)]} . {port}"
    return text if el.timeout is None else f"{text} timeout {el.timeout}s"


def elements_text(elements: tuple[FlowElement, ...]) -> str:
    return ",\n\t\t\t".join(map(_element, elements))


class TextMemo:
    """Remembers the rendered text of element tuples by identity. A compiled profile
    hands the same tuple to every policy, so a 100k-entry allowlist is formatted once
    (hashing it for an ordinary cache would itself cost O(n) per apply)."""

    def __init__(self, capacity: int = 16) -> None:
        self.capacity = capacity
        self._memo: dict[int, tuple[tuple[FlowElement, ...], str]] = {}

    def __call__(self, elements: tuple[FlowElement, ...]) -> str:
        hit = self._memo.get(id(elements))
        if hit is not None and hit[0] is elements:
            return hit[1]
        text = elements_text(elements)
        if len(self._memo) >= self.capacity:
            self._memo.pop(next(iter(self._memo)))
        self._memo[id(elements)] = (elements, text)  # holding the tuple pins its id
        return text


def _set_block(name: str, type_: str, flags: str, items: str) -> str:
    body = f"\t\ttype {type_}; flags {flags};\n"
    if items:
        body += "\t\telements = {\n\t\t\t" + items + "\n\t\t}\n"
    return f"\tset {name} {{\n{body}\t}}\n"


def _join(items: Iterable[str]) -> str:
    return ",\n\t\t\t".join(items)


def _address_sets(policy: Policy, with_elements: bool) -> list[str]:
    """Internal networks, internal interfaces and where management sources are believed."""
    spoof = policy.antispoof
    blocks = [_set_block("internal_ifs", "ifname", "interval",
                         _join(f'"{name}"' for name in spoof.interfaces) if with_elements else "")]
    for fam in (4, 6):
        addr = _ADDR[fam]
        pins = [(ifname, net) for ifname, net in spoof.pins if net.version == fam]
        content = {
            set_name("internal", fam): _join(str(n) for n in policy.internal if n.version == fam),
            set_name("claimed", fam): _join(map(str, claimed(policy, fam))),
            set_name("mgmt_rpf", fam): _join(str(n) for n in spoof.reverse_path
                                             if n.version == fam),
        }
        for name, items in content.items():
            blocks.append(_set_block(name, addr, "interval", items if with_elements else ""))
        blocks.append(_set_block(set_name("mgmt_pin", fam), f"ifname . {addr}", "interval",
                                 _join(f'"{i}" . {n}' for i, n in pins) if with_elements else ""))
    return blocks


def claimed(policy: Policy, fam: int) -> tuple[IPNetwork, ...]:
    """Sources believed on particular interfaces only: internal and pinned management."""
    return collapse_networks([*(n for n in policy.internal if n.version == fam),
                              *(n for _, n in policy.antispoof.pins if n.version == fam)])


def _chain(name: str, rules: Iterable[str]) -> str:
    if name == "prerouting":
        head = (f"\t\ttype filter hook prerouting priority {ANTISPOOF_PRIORITY}; "
                "policy accept;\n")
    elif name in FILTER_CHAINS:
        head = f"\t\ttype filter hook {name} priority {CHAIN_PRIORITY}; policy drop;\n"
    else:
        head = ""
    return f"\tchain {name} {{\n{head}" + "".join(rules) + "\t}\n"


def render(policy: Policy, *, with_elements: bool = True,
           element_text: Callable[[tuple[FlowElement, ...]], str] = elements_text) -> str:
    """The nft script that replaces our table; `with_elements=False` gives the skeleton
    (structure only) that is checked and learnt once per process. Drop counters start
    at zero on every replace (reading them first costs a full table dump on large
    sets); Prometheus treats that as an ordinary counter reset."""
    out = [f"table {FAMILY} {TABLE}\n", f"delete table {FAMILY} {TABLE}\n",
           f"table {FAMILY} {TABLE} {{\n"]
    out.extend(f"\tcounter {name} {{ }}\n" for name in ALL_COUNTERS)
    out.extend(_address_sets(policy, with_elements))
    for name, elements in policy.sets.items():
        addr = _ADDR[int(name[-1])]
        flags = "interval,timeout" if _timed(name) else "interval"
        items = element_text(elements) if with_elements else ""
        out.append(_set_block(name, f"{addr} . inet_proto . inet_service", flags, items))
    out.append(f"\tset {LIVE_SET} {{\n\t\ttypeof ct id; size {LIVE_SIZE}; "
               f"flags dynamic,timeout; timeout {LIVE_TIMEOUT};\n\t}}\n")
    rules = rules_for(policy)
    for chain in CHAIN_NAMES:
        out.append(_chain(chain, (f'\t\t{r.text} comment "{r.comment}"\n'
                                  for r in rules if r.chain == chain)))
    out.append("}\n")
    return "".join(out)


def render_delete() -> str:
    """Restore: remove our table (and only ours); a no-op if it is already gone."""
    return f"table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n"


ElementChange = tuple[str, FlowElement]  # (set name, element)


def render_element_change(*, add: Iterable[ElementChange] = (),
                          remove: Iterable[ElementChange] = (), forget_live: bool = False) -> str:
    """Change elements of the live table in one transaction, keeping the counters.

    An element is removed by adding it first (a no-op when it is there) and then
    deleting it: nft 1.0.6 has no `destroy`, and an exception's element may already
    have expired in the kernel; the transaction must not fail for that.
    `forget_live` empties the connection ids of allowed flows, so ICMP errors related
    to a connection that is no longer allowed stop passing at once (connections still
    allowed re-register on their next packet)."""
    lines: list[str] = []
    for name, el in remove:
        key = _element(el.untimed())
        lines.append(f"add element {FAMILY} {TABLE} {name} {{ {key} timeout 1s }}\n")
        lines.append(f"delete element {FAMILY} {TABLE} {name} {{ {key} }}\n")
    lines.extend(f"add element {FAMILY} {TABLE} {name} {{ {_element(el)} }}\n"
                 for name, el in add)
    if forget_live:
        lines.append(f"flush set {FAMILY} {TABLE} {LIVE_SET}\n")
    return "".join(lines)
