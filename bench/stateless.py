"""The baseline of issue 7: the table as Drawbridge 0.1 rendered it (stateless replies).

A frozen copy of the 0.1 rules (agent/nft/render.py at commit 6a95530), fed with the
same policy sets, so that apply time and forwarding cost are compared in the same
run against exactly what the stateful table replaced. Replies were matched by the
mirrored tuple alone (no conntrack), no anti-spoofing chain, no `live` set.
Benchmark use only: this table lets an allowed peer's port 443 reach everything.
"""

from __future__ import annotations

from agent.nft.render import FAMILY, TABLE, elements_text
from agent.nft.rules import CHAIN_PRIORITY, COUNTERS
from agent.policy import Policy

_L3 = {4: "ip", 6: "ip6"}
_ADDR = {4: "ipv4_addr", 6: "ipv6_addr"}
_ND = "nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit, nd-router-advert"
TUPLE = "meta l4proto . th"


def _rules(policy: Policy) -> dict[str, list[str]]:
    chains: dict[str, list[str]] = {"input": ['iif "lo" accept'], "forward": [],
                                    "output": ['oif "lo" accept']}
    for chain in ("input", "output"):
        chains[chain].append(f"icmpv6 type {{ {_ND} }} ip6 hoplimit 255 accept")
    for fam, ip in _L3.items():
        internal = f"@internal{fam}"
        chains["input"].append(f"{ip} saddr . {TUPLE} dport @mgmt{fam} accept")
        chains["output"].append(f"{ip} daddr . {TUPLE} sport @mgmt{fam} accept")
        for kind in ("exc", "allow"):
            out_set, in_set = f"@{kind}_out{fam}", f"@{kind}_in{fam}"
            chains["output"] += [f"{ip} daddr . {TUPLE} dport {out_set} accept",
                                 f"{ip} daddr . {TUPLE} sport {in_set} accept"]
            chains["input"] += [f"{ip} saddr . {TUPLE} sport {out_set} accept",
                                f"{ip} saddr . {TUPLE} dport {in_set} accept"]
            chains["forward"] += [
                f"{ip} saddr {internal} {ip} daddr . {TUPLE} dport {out_set} accept",
                f"{ip} daddr {internal} {ip} saddr . {TUPLE} sport {out_set} accept",
                f"{ip} daddr {internal} {ip} saddr . {TUPLE} dport {in_set} accept",
                f"{ip} saddr {internal} {ip} daddr . {TUPLE} sport {in_set} accept"]
    if policy.mode == "internet":
        for fam, ip in _L3.items():
            chains["input"].append(f"{ip} saddr @internal{fam} accept")
            chains["output"].append(f"{ip} daddr @internal{fam} accept")
            chains["forward"].append(f"{ip} saddr @internal{fam} {ip} daddr @internal{fam} "
                                     "accept")
    for chain, counter in COUNTERS.items():
        chains[chain].append(f'counter name "{counter}" drop')
    return chains


def render_stateless(policy: Policy) -> str:
    out = [f"table {FAMILY} {TABLE}\n", f"delete table {FAMILY} {TABLE}\n",
           f"table {FAMILY} {TABLE} {{\n"]
    out.extend(f"\tcounter {name} {{ }}\n" for name in COUNTERS.values())
    for fam in (4, 6):
        nets = ",\n\t\t\t".join(str(n) for n in policy.internal if n.version == fam)
        body = f"\t\ttype {_ADDR[fam]}; flags interval;\n"
        if nets:
            body += "\t\telements = {\n\t\t\t" + nets + "\n\t\t}\n"
        out.append(f"\tset internal{fam} {{\n{body}\t}}\n")
    for name, elements in policy.sets.items():
        flags = "interval,timeout" if name.startswith("exc") else "interval"
        body = f"\t\ttype {_ADDR[int(name[-1])]} . inet_proto . inet_service; flags {flags};\n"
        if elements:
            body += "\t\telements = {\n\t\t\t" + elements_text(elements) + "\n\t\t}\n"
        out.append(f"\tset {name} {{\n{body}\t}}\n")
    for chain, rules in _rules(policy).items():
        out.append(f"\tchain {chain} {{\n\t\ttype filter hook {chain} priority "
                   f"{CHAIN_PRIORITY}; policy drop;\n")
        out.extend(f"\t\t{rule}\n" for rule in rules)
        out.append("\t}\n")
    out.append("}\n")
    return "".join(out)
