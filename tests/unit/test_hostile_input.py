"""Hostile input never reaches nft: it is refused by validation, and whatever is
accepted renders into a ruleset made only of typed tokens."""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from agent.config import NAME_RE, parse_network
from agent.errors import ConfigError
from agent.nft.render import ALL_COUNTERS, render
from agent.nft.rules import rules_for
from agent.policy import build_policy
from agent.requests import AllowRequest, IsolateRequest, RestoreRequest
from agent.text import BIDI_CONTROLS
from tests.unit.conftest import BASE, make_config

METACHARS = ['"', "'", ";", "`", "$(", "|", "&", "\n", "\r", "{", "}", "\\", "#", "\x00", " "]
hostile_text = st.one_of(
    st.text(min_size=1, max_size=80),
    st.builds(lambda a, m, b: a + m + b, st.text(max_size=20), st.sampled_from(METACHARS),
              st.text(max_size=20)),
)
# Everything a rendered ruleset may contain: keywords, typed values, our own punctuation.
SAFE_RULESET = re.compile(r'^[A-Za-z0-9_.:/,{}"; \t\n@=!*-]*$')


@given(hostile_text)
def test_cidr_parser_accepts_only_networks(text: str) -> None:
    try:
        net = parse_network(text)
    except ValueError:
        return
    assert net == ipaddress.ip_network(text.strip())
    assert re.fullmatch(r"[0-9a-f.:]+/\d+", str(net))


@given(hostile_text)
def test_names_outside_the_alphabet_are_refused(name: str) -> None:
    ok = NAME_RE.fullmatch(name) is not None
    try:
        IsolateRequest(profile=name, reason="drill")
    except ValidationError as exc:
        assert not ok
        assert "profile" in str(exc)
        return
    assert ok


@given(st.sampled_from(METACHARS), st.text(max_size=10))
def test_hostile_profile_names_in_config_are_refused(meta: str, tail: str) -> None:
    with pytest.raises(ConfigError, match="profiles"):
        make_config(profiles={f"evil{meta}{tail}": {"allow": []}})


@given(hostile_text)
def test_reasons_with_control_characters_are_refused(reason: str) -> None:
    bad = not reason.strip() or len(reason) > 500 or any(
        unicodedata.category(c) == "Cc" or c in BIDI_CONTROLS for c in reason)
    try:
        RestoreRequest(reason=reason)
    except ValidationError:
        assert bad
        return
    assert not bad


@given(hostile_text, hostile_text)
def test_allow_with_hostile_cidr_or_proto_is_refused(cidr: str, proto: str) -> None:
    args: dict[str, Any] = {"cidr": cidr, "proto": proto, "duration_seconds": 60,
                            "reason": "x"}
    with pytest.raises(ValidationError):
        AllowRequest.model_validate(args)


ipv4_nets = st.builds(lambda a, p: ipaddress.ip_network((a, p), strict=False),
                      st.integers(0, 2**32 - 1), st.integers(0, 32))
ipv6_nets = st.builds(lambda a, p: ipaddress.ip_network((a, p), strict=False),
                      st.integers(0, 2**128 - 1), st.integers(0, 128))
flows = st.fixed_dictionaries({
    "cidr": st.one_of(ipv4_nets, ipv6_nets).map(str),
    "proto": st.sampled_from(["tcp", "udp"]),
    "ports": st.lists(st.integers(1, 65535), max_size=3),
    "direction": st.sampled_from(["in", "out", "both"]),
})


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=60)
@given(st.lists(flows, max_size=8), st.lists(st.one_of(ipv4_nets, ipv6_nets).map(str),
                                             min_size=1, max_size=5))
def test_any_valid_policy_renders_only_safe_tokens(allow: list[dict[str, Any]],
                                                   internal: list[str]) -> None:
    cfg = make_config(internal_networks=internal, profiles={"p": {"allow": allow}})
    script = render(build_policy(cfg, "p", now=0.0))
    assert SAFE_RULESET.fullmatch(script)
    # quotes appear only around our own constant comments and counter names, and the
    # interface names of the config (which the config checked against a strict pattern)
    comments = {r.comment for r in rules_for(build_policy(cfg, "p", now=0.0))}
    assert all(re.fullmatch(r"[a-z0-9-]+", c) for c in comments)
    assert set(re.findall(r'"([^"]*)"', script)) <= {
        "lo", *ALL_COUNTERS, *comments, *cfg.internal_interfaces}


@given(hostile_text)
def test_hostile_interface_names_are_refused(name: str) -> None:
    from agent.config import IFNAME_RE

    if IFNAME_RE.fullmatch(name):
        return
    with pytest.raises(ConfigError, match="internal_interfaces"):
        make_config(internal_interfaces=[name])


def test_gateway_name_never_reaches_the_ruleset() -> None:
    script = render(build_policy(make_config(gateway="gw-zz-9"), "internet", now=0.0))
    assert "gw-zz-9" not in script
    assert BASE["gateway"] not in script


@pytest.mark.parametrize("char", ["\u0085", "\u009b", "\u202e", "\u2066", "\u200f", "\x1b",
                                  "\n", "\x7f", "\u061c"])
def test_control_and_bidi_characters_are_refused_everywhere(char: str) -> None:
    """C1 controls (U+0085 splits a CSV line, U+009B is an 8-bit terminal escape) and bidi
    overrides (a log line that reads differently from what it says), on the agent and the
    controller alike, in every free-text field."""
    from controller.schemas import ProbeBody, TokenCreateBody

    text = f"all clear{char}from the CSIRT"
    with pytest.raises(ValidationError, match="control or bidi"):
        IsolateRequest(reason=text)
    with pytest.raises(ValidationError, match="control or bidi"):
        RestoreRequest(reason=text)
    with pytest.raises(ConfigError, match="control or bidi"):
        make_config(profiles={"p": {"description": text}})
    with pytest.raises(ValidationError, match="control or bidi"):
        ProbeBody(targets={"all": True}, reason=text)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="control or bidi"):
        TokenCreateBody(user="u", role="viewer", reason="x", description=text)
    assert IsolateRequest(reason="naïve café — 東京 ✓").reason == "naïve café — 東京 ✓"
