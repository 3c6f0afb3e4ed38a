from __future__ import annotations

import ipaddress
import re

import pytest

from agent.config import FlowRule
from agent.nft.facts import Facts, compare, expected_elements, structure_differences
from agent.nft.render import ALL_COUNTERS, render, render_delete, render_element_change
from agent.nft.rules import COUNTERS, rules_for
from agent.policy import ExceptionSpec, FlowElement, build_policy, collapse_networks
from tests.unit.conftest import make_config

NOW = 1_000_000.0


def block(script: str, header: str) -> str:
    return script.split(f"\t{header} {{\n", 1)[1].split("\n\t}\n", 1)[0]


def chain_body(script: str, chain: str) -> list[str]:
    return [ln.strip() for ln in block(script, f"chain {chain}").splitlines() if ln.strip()]


@pytest.mark.parametrize("profile", ["internet", "full", "casefiles"])
def test_every_filter_chain_drops_by_default_and_counts(profile: str) -> None:
    script = render(build_policy(make_config(), profile, now=NOW))
    for chain, counter in COUNTERS.items():
        body = chain_body(script, chain)
        assert body[0] == f"type filter hook {chain} priority -10; policy drop;"
        assert body[-1] == f'counter name "{counter}" drop comment "drop"'
    # no blanket pass for sessions opened before isolation
    assert "ct state established" not in script
    assert "ct state { established" not in script


def test_replies_pass_only_as_replies_of_an_allowed_connection() -> None:
    script = render(build_policy(make_config(), "casefiles", now=NOW))
    forward = chain_body(script, "forward")
    # every rule that reads a source port from the wire is bound to conntrack's reply
    # direction, and every rule keyed on a destination port to the original direction
    for line in forward + chain_body(script, "input") + chain_body(script, "output"):
        if "@allow_" in line or "@exc_" in line:
            if "th sport" in line:
                assert "ct direction reply" in line, line
            else:
                assert "ct direction original" in line, line
    assert any("ip saddr . meta l4proto . th sport @allow_out4" in ln and "ip daddr @internal4"
               in ln for ln in forward)


def test_icmp_flows_are_echo_only_and_errors_are_bound_to_live_connections() -> None:
    cfg = make_config(profiles={"ping": {"allow": [
        {"cidr": "192.0.2.0/24", "proto": "icmp", "direction": "out"}]}})
    script = render(build_policy(cfg, "ping", now=NOW))
    assert "192.0.2.0/24 . icmp . 0-65535" in block(script, "set allow_out4")
    icmp_rules = [ln for ln in chain_body(script, "forward") if "@allow_out4" in ln
                  and "icmp" in ln]
    assert icmp_rules and all("echo" in ln for ln in icmp_rules)
    assert all("ct id @live" in ln for ln in chain_body(script, "forward")
               if "ct state related" in ln)
    assert "packet-too-big" in script and "destination-unreachable" in script


def test_prerouting_believes_addresses_only_on_their_interfaces() -> None:
    cfg = make_config(management=[
        {"cidr": "10.99.0.0/24", "proto": "tcp", "ports": [22], "interface": "mgmt"},
        {"cidr": "fd99::/64", "proto": "tcp", "ports": [22]}])
    script = render(build_policy(cfg, "full", now=NOW))
    pre = chain_body(script, "prerouting")
    assert pre[0] == "type filter hook prerouting priority -300; policy accept;"
    assert '"inside",\n\t\t\t"inside2"' in block(script, "set internal_ifs")
    assert '"mgmt" . 10.99.0.0/24' in block(script, "set mgmt_pin4")
    assert "fd99::/64" in block(script, "set mgmt_rpf6")
    assert any("fib saddr . iif oif missing" in ln and "@mgmt_rpf6" in ln for ln in pre)
    # from an internal interface: internal sources (or a pinned station) only
    inside = chain_body(script, "from_inside")
    assert inside[-1] == 'counter name "spoofed" drop comment "spoofed-outside"'
    assert 'iifname @internal_ifs jump from_inside comment "from-inside"' in pre
    # from anywhere else: nothing that claims to be internal or pinned elsewhere
    assert "10.20.0.0/16" in block(script, "set claimed4")
    assert "10.99.0.0/24" in block(script, "set claimed4")
    assert any("ip6 saddr @claimed6" in ln and 'counter name "spoofed" drop' in ln
               for ln in pre)


def test_infrastructure_flows_are_stateless_and_narrow() -> None:
    cfg = make_config(infrastructure=[
        {"name": "ntp", "proto": "udp", "peers": ["192.0.2.123/32"], "remote_ports": [123]},
        {"name": "dhcp", "proto": "udp", "interface": "wan0", "local_ports": [68],
         "remote_ports": [67]},
        {"name": "vrrp", "proto": "vrrp", "interface": "inside", "peers": ["10.20.0.3/32"]}])
    script = render(build_policy(cfg, "full", now=NOW))
    infra = [ln for ln in chain_body(script, "input") + chain_body(script, "output")
             if 'comment "infra"' in ln]
    assert 'ip saddr { 192.0.2.123/32 } meta l4proto udp th sport { 123 } goto allowed ' \
           'comment "infra"' in infra
    assert 'iifname "wan0" meta l4proto udp th dport { 68 } th sport { 67 } goto allowed ' \
           'comment "infra"' in infra
    assert any("meta l4proto 112" in ln and "10.20.0.3/32" in ln for ln in infra)
    assert any("224.0.0.0/24" in ln and 'oifname "inside"' in ln for ln in infra)
    assert not any("ct " in ln for ln in infra)


def test_exceptions_are_their_own_elements_with_remaining_lifetime() -> None:
    live = ExceptionSpec(FlowRule(cidr="198.51.100.0/24", proto="tcp", ports=[443, (400, 500)],
                                  direction="both"), expires_at=NOW + 7200.4)
    near = ExceptionSpec(FlowRule(cidr="198.51.101.0/24", proto="tcp", ports=[443]),
                         expires_at=NOW + 7200.4)
    dead = ExceptionSpec(FlowRule(cidr="192.0.2.0/24", proto="udp", ports=[53]),
                         expires_at=NOW - 1)
    policy = build_policy(make_config(), "full", exceptions=[live, near, dead], now=NOW)
    script = render(policy)
    out4, in4 = block(script, "set exc_out4"), block(script, "set exc_in4")
    assert "flags interval,timeout" in out4
    # ports of one exception are merged (no overlapping elements), networks of two
    # adjacent exceptions are not (each stays revocable on its own)
    assert "198.51.100.0/24 . tcp . 400-500 timeout 7201s" in out4
    assert "198.51.100.0/24 . tcp . 400-500 timeout 7201s" in in4
    assert "198.51.101.0/24 . tcp . 443 timeout 7201s" in out4
    assert "198.51.100.0/23" not in script
    assert "192.0.2.0" not in script


def test_element_changes_keep_the_table_and_tolerate_expired_elements() -> None:
    el = FlowElement(ipaddress.ip_network("198.51.100.0/24"), "tcp", (443, 443), 60)
    script = render_element_change(add=[("exc_out4", el)], remove=[("exc_in4", el)],
                                   forget_live=True)
    assert "delete table" not in script
    assert script.splitlines() == [
        "add element inet drawbridge exc_in4 { 198.51.100.0/24 . tcp . 443 timeout 1s }",
        "delete element inet drawbridge exc_in4 { 198.51.100.0/24 . tcp . 443 }",
        "add element inet drawbridge exc_out4 { 198.51.100.0/24 . tcp . 443 timeout 60s }",
        "flush set inet drawbridge live",
    ]


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


def test_counters_are_declared() -> None:
    script = render(build_policy(make_config(), "internet", now=NOW))
    for name in ALL_COUNTERS:
        assert f"\tcounter {name} {{ }}\n" in script


def test_replace_is_one_atomic_script_and_restore_touches_only_our_table() -> None:
    script = render(build_policy(make_config(), "internet", now=NOW))
    assert script.startswith("table inet drawbridge\ndelete table inet drawbridge\n")
    assert re.findall(r"^(?:table|delete table) (\S+ \S+)", script, re.M) == \
        ["inet drawbridge"] * 3
    assert render_delete() == "table inet drawbridge\ndelete table inet drawbridge\n"


def test_rule_comments_are_unique_per_chain_except_infrastructure() -> None:
    rules = rules_for(build_policy(make_config(), "internet", now=NOW))
    seen = [(r.chain, r.comment) for r in rules if r.comment != "infra"]
    assert len(seen) == len(set(seen))


def _reference() -> Facts:
    rules = (("input", "loopback", '[{"accept":null}]'),
             ("forward", "drop", '[{"counter":"x"},{"drop":null}]'))
    return Facts(True, frozenset({'{"name":"input"}'}), rules, {},
                 {"internal4": '{"type":"ipv4_addr"}'}, dict.fromkeys(ALL_COUNTERS, (0, 0)))


def _live(policy_sets: dict[str, frozenset[object]], **changes: object) -> Facts:
    ref = _reference()
    fields = {"present": True, "chains": ref.chains, "rules": ref.rules, "sets": policy_sets,
              "set_types": ref.set_types, "counters": ref.counters, **changes}
    return Facts(**fields)  # type: ignore[arg-type]


def test_compare_reports_missing_extra_and_open_state() -> None:
    policy = build_policy(make_config(), "internet", now=NOW)
    assert compare(policy, Facts(present=False)) == ["table inet drawbridge is missing"]
    assert compare(None, Facts(present=False)) == []
    assert "should be open" in compare(None, Facts(present=True))[0]
    want: dict[str, frozenset[object]] = dict(expected_elements(policy))
    assert compare(policy, _live(want), _reference()) == []
    sets = {**want, "internal4": frozenset({"10.20.0.0/16", "0.0.0.0/0"})}
    assert compare(policy, _live(sets), _reference()) == [
        "set internal4: 0 elements missing, 1 unexpected; unexpected e.g. 0.0.0.0/0"]



def test_expected_elements_of_named_sets_are_the_same_as_in_the_whole() -> None:
    """The exception sets' read-back asks only for those sets; what it gets must be
    what the whole computation says about them."""
    policy = build_policy(make_config(), "internet", now=NOW)
    whole = expected_elements(policy)
    names = {"internal4", "exc_out4", "mgmt_pin6", "no_such_set"}
    assert expected_elements(policy, names) == {n: whole[n] for n in names if n in whole}
    assert "internal4" in whole and len(whole) > len(names)

def test_a_rule_replaced_in_place_with_its_comment_kept_is_drift() -> None:
    ref = _reference()
    replaced = (ref.rules[0], ("forward", "drop", '[{"counter":"x"},{"accept":null}]'))
    problems = structure_differences(ref, _live({}, rules=replaced))
    assert len(problems) == 1
    assert "rule 0 of chain forward" in problems[0] and "match or verdict" in problems[0]
    assert structure_differences(ref, _live({}, others=("flowtable ft",))) == [
        "unexpected objects in our table: flowtable ft"]
    assert "counters missing" in structure_differences(ref, _live({}, counters={}))[0]


def test_exception_about_to_expire_is_not_drift() -> None:
    spec = ExceptionSpec(FlowRule(cidr="198.51.100.0/24", proto="tcp", ports=[443]),
                         expires_at=NOW + 1)
    policy = build_policy(make_config(), "internet", exceptions=[spec], now=NOW)
    sets: dict[str, frozenset[object]] = {**expected_elements(policy), "exc_out4": frozenset()}
    assert compare(policy, _live(sets), _reference()) == []
