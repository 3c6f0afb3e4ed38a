"""Policy to an nftables script for table `inet drawbridge`: pure, deterministic.

Why text and not the JSON API for apply: with 100k set elements `nft -j -f`
took about 1.5x as long as `nft -f` of the same ruleset here, and apply time is
what isolation is measured by. Safety does not come from quoting: every token
below is produced from a typed value (an `ipaddress` network, an int, a
protocol from a fixed list) or is a constant of this module. No operator text
(names, reasons) is ever part of the ruleset. The live ruleset is read back
through the JSON API (see facts.py).

The script replaces the table in one transaction: `table; delete table;
table {...}` is atomic in the kernel, so a reader sees the old table or the
new one, never a mix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from agent.policy import FlowElement, Policy

TABLE = "drawbridge"
FAMILY = "inet"
CHAIN_PRIORITY = -10  # before the usual filter chains, so drop counters see every packet
COUNTERS = {"input": "dropped_input", "output": "dropped_output", "forward": "dropped_forward"}
_L3 = {4: "ip", 6: "ip6"}
_ADDR = {4: "ipv4_addr", 6: "ipv6_addr"}
_PROTO = {(4, "tcp"): "tcp", (6, "tcp"): "tcp", (4, "udp"): "udp", (6, "udp"): "udp",
          (4, "icmp"): "icmp", (6, "icmp"): "ipv6-icmp"}
_ND_TYPES = "nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit, nd-router-advert"
FLOW_TUPLE = "meta l4proto . th"


@dataclass(frozen=True)
class Rule:
    chain: str
    text: str
    comment: str


def set_name(kind: str, family: int) -> str:
    return f"{kind}{family}"


def _timed(kind: str) -> bool:
    return kind.startswith("exc")


def _flow_rules(family: int) -> list[Rule]:
    """Accept rules for flow sets. Reply traffic is matched statelessly by the mirrored
    tuple: there is deliberately no `ct state established accept` (isolation must cut
    sessions that are already open)."""
    ip = _L3[family]
    internal = f"@{set_name('internal', family)}"
    rules = [
        Rule("input", f"{ip} saddr . {FLOW_TUPLE} dport @mgmt{family} accept", f"mgmt{family}"),
        Rule("output", f"{ip} daddr . {FLOW_TUPLE} sport @mgmt{family} accept", f"mgmt{family}"),
    ]
    for kind in ("exc", "allow"):
        out_set, in_set = f"@{kind}_out{family}", f"@{kind}_in{family}"
        tag = f"{kind}{family}"
        rules += [
            # the gateway itself talking to an allowed outside service, and the replies
            Rule("output", f"{ip} daddr . {FLOW_TUPLE} dport {out_set} accept", f"{tag}-out"),
            Rule("input", f"{ip} saddr . {FLOW_TUPLE} sport {out_set} accept", f"{tag}-out-reply"),
            # an allowed outside peer reaching the gateway's own service, and the replies
            Rule("input", f"{ip} saddr . {FLOW_TUPLE} dport {in_set} accept", f"{tag}-in"),
            Rule("output", f"{ip} daddr . {FLOW_TUPLE} sport {in_set} accept", f"{tag}-in-reply"),
            # the same for internal hosts behind the gateway
            Rule("forward", f"{ip} saddr {internal} {ip} daddr . {FLOW_TUPLE} dport {out_set} "
                 "accept", f"{tag}-out"),
            Rule("forward", f"{ip} daddr {internal} {ip} saddr . {FLOW_TUPLE} sport {out_set} "
                 "accept", f"{tag}-out-reply"),
            Rule("forward", f"{ip} daddr {internal} {ip} saddr . {FLOW_TUPLE} dport {in_set} "
                 "accept", f"{tag}-in"),
            Rule("forward", f"{ip} saddr {internal} {ip} daddr . {FLOW_TUPLE} sport {in_set} "
                 "accept", f"{tag}-in-reply"),
        ]
    return rules


def _internal_rules(family: int) -> list[Rule]:
    ip = _L3[family]
    internal = f"@{set_name('internal', family)}"
    tag = f"internal{family}"
    return [
        Rule("input", f"{ip} saddr {internal} accept", tag),
        Rule("output", f"{ip} daddr {internal} accept", tag),
        Rule("forward", f"{ip} saddr {internal} {ip} daddr {internal} accept", tag),
    ]


def rules_for(policy: Policy) -> list[Rule]:
    """Every rule of the table, in chain order; comments are this module's constants."""
    rules = [
        Rule("input", 'iif "lo" accept', "loopback"),
        Rule("output", 'oif "lo" accept', "loopback"),
    ]
    # Neighbour discovery is link-local only (hop limit 255) and carries no data, but
    # without it no IPv6 flow (management included) survives the neighbour cache expiring.
    for chain in ("input", "output"):
        rules.append(Rule(chain, f"icmpv6 type {{ {_ND_TYPES} }} ip6 hoplimit 255 accept", "ndp"))
    for family in (4, 6):
        rules += _flow_rules(family)
    if policy.mode == "internet":
        for family in (4, 6):
            rules += _internal_rules(family)
    for chain, counter in COUNTERS.items():
        rules.append(Rule(chain, f'counter name "{counter}" drop', "drop"))
    order = {"input": 0, "forward": 1, "output": 2}
    return sorted(rules, key=lambda r: order[r.chain])  # stable: keeps order within a chain


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


def render(policy: Policy, *, with_elements: bool = True,
           element_text: Callable[[tuple[FlowElement, ...]], str] = elements_text) -> str:
    """The nft script that replaces our table; `with_elements=False` gives the cheap
    skeleton used for the dry check. Drop counters start at zero on every replace
    (reading them first costs a full table dump on large sets); Prometheus treats
    that as an ordinary counter reset."""
    out = [f"table {FAMILY} {TABLE}\n", f"delete table {FAMILY} {TABLE}\n",
           f"table {FAMILY} {TABLE} {{\n"]
    out.extend(f"\tcounter {name} {{ }}\n" for name in COUNTERS.values())
    for family in (4, 6):
        nets = ",\n\t\t\t".join(str(n) for n in policy.internal if n.version == family)
        out.append(_set_block(set_name("internal", family), _ADDR[family], "interval",
                              nets if with_elements else ""))
    for name, elements in policy.sets.items():
        addr = _ADDR[int(name[-1])]
        flags = "interval,timeout" if _timed(name) else "interval"
        items = element_text(elements) if with_elements else ""
        out.append(_set_block(name, f"{addr} . inet_proto . inet_service", flags, items))
    rules = rules_for(policy)
    for chain in ("input", "forward", "output"):
        out.append(f"\tchain {chain} {{\n\t\ttype filter hook {chain} priority "
                   f"{CHAIN_PRIORITY}; policy drop;\n")
        out.extend(f'\t\t{r.text} comment "{r.comment}"\n' for r in rules if r.chain == chain)
        out.append("\t}\n")
    out.append("}\n")
    return "".join(out)


def render_delete() -> str:
    """Restore: remove our table (and only ours); a no-op if it is already gone."""
    return f"table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n"


def render_add_elements(elements: Iterable[tuple[str, FlowElement]]) -> str:
    """Add elements to sets of the live table without replacing it (counters survive)."""
    lines = [f"add element {FAMILY} {TABLE} {name} {{ {_element(el)} }}\n"
             for name, el in elements]
    return "".join(lines)
