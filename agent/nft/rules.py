"""The rules of table `inet drawbridge`, as nft text: pure, deterministic.

What the rules promise (and the adversarial lab suite checks with crafted packets):

- **Allowed flows are stateful and exact.** A packet of an allowed flow passes in the
  direction the flow was opened (`ct direction original`, matched on its destination
  tuple) and its replies pass only as replies of that connection (`ct direction
  reply`, matched on the reply's own mirrored tuple, which is the original tuple of
  the connection). A packet *claiming* to come from an allowed port is an original
  packet of a new connection to conntrack and matches nothing. There is no blanket
  `ct state established accept`: a session opened before isolation keeps working
  only if its original tuple is allowed now, on the next packet.
- **ICMP errors related to an allowed connection pass** (path MTU discovery): every
  packet accepted as part of an allowed flow records its connection id in the
  dynamic set `live`, and an ICMP error passes when conntrack relates it to a
  connection in that set. Other ICMP does not pass, and ICMP flows are echo only.
- **Sources are believed only where they live** (chain `prerouting`, before
  conntrack sees the packet): internal networks on the internal interfaces only,
  nothing else there; pinned management sources on their interface; other
  management sources by a strict reverse-path check. Spoofed packets are counted.
  Set `claimed{4,6}` holds what may only come from a known place (internal networks
  and pinned management networks).
- **Management and infrastructure flows never depend on conntrack**: they are
  matched statelessly by their configured tuples, in every state.

Fragments never reach these rules: conntrack, which the rules use, reassembles them
first, so `th dport` of a first fragment or an IPv6 packet with extension headers is
the real transport header (`meta l4proto` and `th` skip extension headers).

Rule comments are constants of this module, never operator text.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.config import InfraFlow
    from agent.nettypes import IPNetwork
    from agent.policy import Policy

CHAIN_PRIORITY = -10  # before the usual filter chains, so drop counters see every packet
ANTISPOOF_PRIORITY = -300  # raw: before conntrack (-200), so spoofed packets leave no entry
COUNTERS = {"input": "dropped_input", "output": "dropped_output", "forward": "dropped_forward"}
SPOOFED_COUNTER = "spoofed"
FILTER_CHAINS = ("input", "forward", "output")
LIVE_SET = "live"  # connection ids of allowed flows: what related ICMP errors are bound to
ACCEPT_CHAIN = "allowed"
L3 = {4: "ip", 6: "ip6"}
_ICMP = {4: "icmp", 6: "icmpv6"}
_ICMP_ERRORS = {4: "destination-unreachable, time-exceeded, parameter-problem",
                6: "destination-unreachable, packet-too-big, time-exceeded, parameter-problem"}
_ND = "nd-neighbor-solicit, nd-neighbor-advert"
_MLD = "mld-listener-query, mld-listener-report, mld-listener-done, mld2-listener-report"
_UNROUTABLE = {4: "0.0.0.0, 169.254.0.0/16", 6: "::, fe80::/10"}
_RAW_PROTO = {"vrrp": 112, "ospf": 89, "gre": 47, "esp": 50, "ah": 51}
_PORTS = "meta l4proto { tcp, udp }"


@dataclass(frozen=True)
class Rule:
    chain: str
    text: str
    comment: str


def set_name(kind: str, family: int) -> str:
    return f"{kind}{family}"


def _antispoof() -> list[Rule]:
    """Where sources are believed (chain prerouting, before conntrack). The common case
    leaves first: an internal source on an internal interface costs two lookups."""
    drop = f'counter name "{SPOOFED_COUNTER}" drop'
    rules = [Rule("prerouting", 'iif "lo" accept', "loopback"),
             Rule("prerouting", "iifname @internal_ifs jump from_inside", "from-inside")]
    for fam, ip in L3.items():
        rules += [
            Rule("from_inside", f"{ip} saddr @internal{fam} accept", f"internal{fam}"),
            # a management station pinned to an internal interface may have any address
            Rule("from_inside", f"iifname . {ip} saddr @mgmt_pin{fam} accept",
                 f"mgmt-pinned{fam}"),
        ]
    for fam, ip in L3.items():
        # unspecified and link-local sources never cross a router (DHCP, NDP, DAD)
        unroutable = Rule("prerouting", f"{ip} saddr {{ {_UNROUTABLE[fam]} }} accept",
                          f"link{fam}")
        rules += [unroutable, Rule("from_inside", unroutable.text, unroutable.comment)]
    rules.append(Rule("from_inside", drop, "spoofed-outside"))
    for fam, ip in L3.items():
        rules += [
            Rule("prerouting", f"iifname . {ip} saddr @mgmt_pin{fam} accept",
                 f"mgmt-pinned{fam}"),
            # internal networks and pinned management live elsewhere than here
            Rule("prerouting", f"{ip} saddr @claimed{fam} {drop}", f"spoofed{fam}"),
            Rule("prerouting", f"{ip} saddr @mgmt_rpf{fam} fib saddr . iif oif missing {drop}",
                 f"spoofed-mgmt-rpf{fam}"),
        ]
    # a local address arriving from a wire is forged (the kernel refuses it for IPv4,
    # not for IPv6)
    rules.append(Rule("prerouting", f"meta nfproto ipv6 fib saddr type local {drop}",
                      "spoofed-local6"))
    return rules


def _neighbour_rules() -> list[Rule]:
    """IPv6 needs NDP for every flow (management included): neighbour solicitations and
    adverts with hop limit 255 (never routed); router adverts only from upstream, router
    solicitations only from the internal side; MLD is link-local too."""
    nd = "ip6 hoplimit 255"
    return [
        Rule("input", f"icmpv6 type {{ {_ND} }} {nd} accept", "ndp"),
        Rule("input", f"iifname != @internal_ifs icmpv6 type nd-router-advert {nd} "
             "ip6 saddr fe80::/10 accept", "ndp-ra"),
        Rule("input", f"iifname @internal_ifs icmpv6 type nd-router-solicit {nd} accept",
             "ndp-rs"),
        Rule("input", f"icmpv6 type {{ {_MLD} }} ip6 hoplimit 1 ip6 saddr fe80::/10 accept",
             "mld"),
        Rule("output", f"icmpv6 type {{ {_ND} }} {nd} accept", "ndp"),
        Rule("output", f"oifname @internal_ifs icmpv6 type nd-router-advert {nd} accept",
             "ndp-ra"),
        Rule("output", f"oifname != @internal_ifs icmpv6 type nd-router-solicit {nd} accept",
             "ndp-rs"),
        Rule("output", f"icmpv6 type {{ {_MLD} }} ip6 hoplimit 1 accept", "mld"),
    ]


def _management(fam: int) -> list[Rule]:
    ip, tag = L3[fam], f"mgmt{fam}"
    return [
        Rule("input", f"{ip} saddr . meta l4proto . th dport @{tag} goto {ACCEPT_CHAIN}", tag),
        Rule("output", f"{ip} daddr . meta l4proto . th sport @{tag} goto {ACCEPT_CHAIN}", tag),
    ]


def _nets(nets: Iterable[IPNetwork]) -> str:
    return ", ".join(map(str, nets))


def _ports(ports: tuple[tuple[int, int], ...]) -> str:
    return ", ".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ports)


def _infra_rules(flow: InfraFlow) -> list[Rule]:
    """One infrastructure flow as stateless rules: the gateway's local ports <-> the
    peers' remote ports, on the named interface if any. Towards a link-scope
    destination (broadcast, link-local multicast) only on that interface."""
    if flow.proto in _RAW_PROTO:
        proto = f"meta l4proto {_RAW_PROTO[flow.proto]}"
    elif flow.proto == "icmp":
        proto = "meta l4proto { icmp, ipv6-icmp }"
    else:
        proto = f"meta l4proto {flow.proto}"

    def ports(local: str, remote: str) -> str:
        out = ""
        if flow.local_ports:
            out += f" th {local} {{ {_ports(flow.local_ports)} }}"
        if flow.remote_ports:
            out += f" th {remote} {{ {_ports(flow.remote_ports)} }}"
        return out

    in_if = f'iifname "{flow.interface}" ' if flow.interface else ""
    out_if = f'oifname "{flow.interface}" ' if flow.interface else ""
    inbound, outbound = proto + ports("dport", "sport"), proto + ports("sport", "dport")
    rules: list[Rule] = []
    if not flow.peers:
        rules += [Rule("input", f"{in_if}{inbound} goto {ACCEPT_CHAIN}", "infra"),
                  Rule("output", f"{out_if}{outbound} goto {ACCEPT_CHAIN}", "infra")]
        return rules
    for fam, ip in L3.items():
        peers = [n for n in flow.peers if n.version == fam]
        if not peers:
            continue
        rules += [
            Rule("input", f"{in_if}{ip} saddr {{ {_nets(peers)} }} {inbound} "
                 f"goto {ACCEPT_CHAIN}", "infra"),
            Rule("output", f"{out_if}{ip} daddr {{ {_nets(peers)} }} {outbound} "
                 f"goto {ACCEPT_CHAIN}", "infra"),
        ]
        if flow.interface:
            scope = "255.255.255.255, 224.0.0.0/24" if fam == 4 else "ff02::/16"
            rules.append(Rule("output", f"{out_if}{ip} daddr {{ {scope} }} {outbound} "
                              f"goto {ACCEPT_CHAIN}", "infra"))
    return rules


def _related(chain: str) -> list[Rule]:
    return [Rule(chain, f"ct state related {_ICMP[fam]} type {{ {_ICMP_ERRORS[fam]} }} "
                 f"ct id @{LIVE_SET} accept", f"related{fam}") for fam in L3]


def _stateful(kind: str, fam: int) -> list[Rule]:
    """Accept rules for one kind of allowed flow (allow: profile, exc: exceptions).

    `{kind}_out` elements are remote destinations the inside (or the gateway) may open
    connections to; `{kind}_in` are remote sources that may open connections to the
    inside. Originals are matched on their destination tuple, replies on their own
    source tuple (= the connection's original destination) and only as replies."""
    ip, internal = L3[fam], f"@{set_name('internal', fam)}"
    out_set, in_set = f"@{kind}_out{fam}", f"@{kind}_in{fam}"
    tag, go = f"{kind}{fam}", f"goto {ACCEPT_CHAIN}"
    echo, echo_reply = f"{_ICMP[fam]} type echo-request", f"{_ICMP[fam]} type echo-reply"
    orig, reply = "ct direction original", "ct direction reply"
    daddr_dport = f"{ip} daddr . meta l4proto . th dport"
    saddr_sport = f"{ip} saddr . meta l4proto . th sport"
    saddr_dport = f"{ip} saddr . meta l4proto . th dport"
    daddr_sport = f"{ip} daddr . meta l4proto . th sport"
    rules: list[Rule] = []
    # ICMP elements are `net . icmp . 0-65535`: only the rule decides which types (echo)
    for guard, suffix in ((_PORTS, ""), (None, "-icmp")):
        o = f"{_PORTS} {orig}" if guard else f"{echo} {orig}"
        r = f"{_PORTS} {reply}" if guard else f"{echo_reply} {reply}"
        rules += [
            # the gateway itself talks to an allowed outside service
            Rule("output", f"{o} {daddr_dport} {out_set} {go}", f"{tag}-out{suffix}"),
            Rule("input", f"{r} {saddr_sport} {out_set} {go}", f"{tag}-out-reply{suffix}"),
            # an allowed outside peer opens a connection to the gateway's own service
            Rule("input", f"{o} {saddr_dport} {in_set} {go}", f"{tag}-in{suffix}"),
            Rule("output", f"{r} {daddr_sport} {in_set} {go}", f"{tag}-in-reply{suffix}"),
            # the same for internal hosts behind the gateway
            Rule("forward", f"{o} {ip} saddr {internal} {daddr_dport} {out_set} {go}",
                 f"{tag}-out{suffix}"),
            Rule("forward", f"{r} {ip} daddr {internal} {saddr_sport} {out_set} {go}",
                 f"{tag}-out-reply{suffix}"),
            Rule("forward", f"{o} {ip} daddr {internal} {saddr_dport} {in_set} {go}",
                 f"{tag}-in{suffix}"),
            Rule("forward", f"{r} {ip} saddr {internal} {daddr_sport} {in_set} {go}",
                 f"{tag}-in-reply{suffix}"),
        ]
    return rules


def _internal(fam: int) -> list[Rule]:
    """`internet` mode: the inside keeps talking to the gateway and to itself. Internal
    sources are believed because the prerouting chain only lets them in from the
    internal interfaces."""
    ip, internal, tag = L3[fam], f"@{set_name('internal', fam)}", f"internal{fam}"
    return [
        Rule("input", f"{ip} saddr {internal} accept", tag),
        Rule("output", f"{ip} daddr {internal} accept", tag),
        Rule("forward", f"{ip} saddr {internal} {ip} daddr {internal} accept", tag),
    ]


CHAIN_ORDER = ("prerouting", "from_inside", ACCEPT_CHAIN, *FILTER_CHAINS)


def rules_for(policy: Policy) -> list[Rule]:
    """Every rule of the table, in chain order (stable within a chain)."""
    rules = [*_antispoof(),
             Rule(ACCEPT_CHAIN, f"add @{LIVE_SET} {{ ct id }}", "live"),
             # a separate rule: a full `live` set fails the add, never the accept
             Rule(ACCEPT_CHAIN, "accept", "allowed"),
             Rule("input", 'iif "lo" accept', "loopback"),
             Rule("output", 'oif "lo" accept', "loopback"),
             *_neighbour_rules()]
    for fam in L3:
        rules += _management(fam)
    for flow in policy.infra:
        rules += _infra_rules(flow)
    for chain in FILTER_CHAINS:
        rules += _related(chain)
    for kind in ("exc", "allow"):
        for fam in L3:
            rules += _stateful(kind, fam)
    if policy.mode == "internet":
        for fam in L3:
            rules += _internal(fam)
    for chain, counter in COUNTERS.items():
        rules.append(Rule(chain, f'counter name "{counter}" drop', "drop"))
    return sorted(rules, key=lambda r: CHAIN_ORDER.index(r.chain))
