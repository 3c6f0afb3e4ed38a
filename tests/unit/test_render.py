from __future__ import annotations

import ipaddress
import re

import pytest

from agent.config import FlowRule
from agent.nft.facts import Facts, compare, expected_facts
from agent.nft.render import COUNTERS, render, render_delete, rules_for
from agent.policy import ExceptionSpec, build_policy, collapse_networks
from tests.unit.conftest import make_config

NOW = 1_000_000.0


def block(script: str, header: str) -> str:
    return script.split(f"\t{header} {{\n", 1)[1].split("\n\t}\n", 1)[0]


def chain_body(script: str, chain: str) -> list[str]:
    return [ln.strip() for ln in block(script, f"chain {chain}").splitlines() if ln.strip()]


@pytest.mark.parametrize("profile", ["internet", "full", "casefiles"])
def test_every_chain_drops_by_default_and_counts(profile: str) -> None:
    script = render(build_policy(make_config(), profile, now=NOW))
    for chain, counter in COUNTERS.items():
        body = chain_body(script, chain)
        assert body[0] == f"type filter hook {chain} priority -10; policy drop;"
        assert body[-1] == f'counter name "{counter}" drop comment "drop"'
    assert "ct state" not in script  # established sessions must be cut


def test_internet_keeps_internal_flows_full_does_not() -> None:
    cfg = make_config()
    internet = render(build_policy(cfg, "internet", now=NOW))
    full = render(build_policy(cfg, "full", now=NOW))
    assert "ip saddr @internal4 accept" in internet
    assert "ip6 saddr @internal6 ip6 daddr @internal6 accept" in internet
    assert "@internal4 accept" not in full
    assert "ip daddr @internal4 accept" not in full
    # management and loopback stay open in both
    for script in (internet, full):
        assert 'iif "lo" accept' in script
        assert "ip saddr . meta l4proto . th dport @mgmt4 accept" in script
        assert "ip6 daddr . meta l4proto . th sport @mgmt6 accept" in script


def test_sets_carry_ipv4_and_ipv6_elements() -> None:
    script = render(build_policy(make_config(), "casefiles", now=NOW))
    assert "10.20.0.0/16" in script and "fd20::/48" in script
    assert "10.99.0.0/24 . tcp . 22" in script and "10.99.0.0/24 . tcp . 9630" in script
    assert "fd99::/64 . tcp . 22" in script
    assert "203.0.113.0/24 . tcp . 443" in block(script, "set allow_out4")
    in6 = block(script, "set allow_in6")
    assert "2001:db8:5::/48 . udp . 5000-5010" in in6


def test_icmp_flows_use_the_family_protocol() -> None:
    cfg = make_config(profiles={"ping": {"allow": [
        {"cidr": "192.0.2.0/24", "proto": "icmp", "direction": "both"},
        {"cidr": "2001:db8::/32", "proto": "icmp", "direction": "out"}]}})
    script = render(build_policy(cfg, "ping", now=NOW))
    assert "192.0.2.0/24 . icmp . 0-65535" in script
    assert "2001:db8::/32 . ipv6-icmp . 0-65535" in script


def test_exceptions_carry_remaining_lifetime_and_expired_ones_are_left_out() -> None:
    live = ExceptionSpec(FlowRule(cidr="198.51.100.0/24", proto="tcp", ports=[443],
                                  direction="both"), expires_at=NOW + 7200.4)
    dead = ExceptionSpec(FlowRule(cidr="192.0.2.0/24", proto="udp", ports=[53]),
                         expires_at=NOW - 1)
    policy = build_policy(make_config(), "full", exceptions=[live, dead], now=NOW)
    script = render(policy)
    out4, in4 = block(script, "set exc_out4"), block(script, "set exc_in4")
    assert "flags interval,timeout" in out4
    assert "198.51.100.0/24 . tcp . 443 timeout 7201s" in out4
    assert "198.51.100.0/24 . tcp . 443 timeout 7201s" in in4
    assert "192.0.2.0" not in script


def test_overlapping_networks_are_collapsed() -> None:
    cfg = make_config(internal_networks=["10.20.0.0/16", "10.20.5.0/24", "10.21.0.0/16"])
    policy = build_policy(cfg, "internet", now=NOW)
    assert [str(n) for n in policy.internal] == ["10.20.0.0/15"]
    assert collapse_networks([ipaddress.ip_network("fd00::/8"),
                              ipaddress.ip_network("10.0.0.0/8")])[0].version == 4


def test_skeleton_has_structure_but_no_elements() -> None:
    policy = build_policy(make_config(), "casefiles", now=NOW)
    skeleton = render(policy, with_elements=False)
    assert "elements" not in skeleton
    assert chain_body(skeleton, "forward") == chain_body(render(policy), "forward")


def test_drop_counters_are_declared() -> None:
    script = render(build_policy(make_config(), "internet", now=NOW))
    for name in COUNTERS.values():
        assert f"\tcounter {name} {{ }}\n" in script


def test_replace_is_one_atomic_script_and_restore_touches_only_our_table() -> None:
    script = render(build_policy(make_config(), "internet", now=NOW))
    assert script.startswith("table inet drawbridge\ndelete table inet drawbridge\n")
    assert re.findall(r"^(?:table|delete table) (\S+ \S+)", script, re.M) == \
        ["inet drawbridge"] * 3
    assert render_delete() == "table inet drawbridge\ndelete table inet drawbridge\n"


def test_rule_comments_are_unique_per_chain() -> None:
    rules = rules_for(build_policy(make_config(), "internet", now=NOW))
    seen = [(r.chain, r.comment) for r in rules]
    assert len(seen) == len(set(seen))


def test_compare_reports_missing_extra_and_open_state() -> None:
    policy = build_policy(make_config(), "internet", now=NOW)
    assert compare(policy, Facts(present=False)) == ["table inet drawbridge is missing"]
    assert compare(None, Facts(present=False)) == []
    assert "should be open" in compare(None, Facts(present=True))[0]
    want = expected_facts(policy)
    assert compare(policy, want) == []
    tampered = Facts(True, want.chains, want.rules[:-1], want.sets)
    assert "rules differ" in compare(policy, tampered)[0]
    sets = dict(want.sets)
    sets["internal4"] = frozenset({"10.20.0.0/16", "0.0.0.0/0"})
    problems = compare(policy, Facts(True, want.chains, want.rules, sets))
    assert problems == ["set internal4: 0 elements missing, 1 unexpected; unexpected e.g. "
                        "0.0.0.0/0"]


def test_exception_about_to_expire_is_not_drift() -> None:
    spec = ExceptionSpec(FlowRule(cidr="198.51.100.0/24", proto="tcp", ports=[443]),
                         expires_at=NOW + 1)
    policy = build_policy(make_config(), "internet", exceptions=[spec], now=NOW)
    want = expected_facts(policy)
    sets = {**want.sets, "exc_out4": frozenset()}
    assert compare(policy, Facts(True, want.chains, want.rules, sets)) == []
