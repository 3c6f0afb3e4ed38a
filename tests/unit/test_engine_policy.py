"""Engine policy assembly: management hostnames are resolved before any rule is built."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from agent.config import IPNetwork
from agent.engine import Engine
from agent.errors import InputError
from agent.state import DesiredState
from tests.unit.conftest import make_config
from tests.unit.fakes import RecordingNft, no_reference


def test_management_hosts_resolve_and_the_last_answer_survives_a_dns_outage(
        tmp_path: Path) -> None:
    answers: list[tuple[IPNetwork, ...] | None] = [
        (ipaddress.ip_network("10.99.5.5/32"), ipaddress.ip_network("fd99::5/128")), None]

    def resolver(host: str) -> tuple[IPNetwork, ...]:
        assert host == "controller.example.net"
        answer = answers.pop(0)
        if answer is None:
            raise InputError("management host 'controller.example.net' does not resolve")
        return answer

    cfg = make_config(tmp_path, management=[
        {"host": "controller.example.net", "proto": "tcp", "ports": [22]}])
    engine = Engine(cfg, nft=RecordingNft(), resolver=resolver, references=no_reference)  # type: ignore[arg-type]
    for _ in range(2):  # second round: DNS fails, the previous answer is used
        policy = engine.policy_for(DesiredState(profile="full"))
        assert policy is not None
        assert [str(e.net) for e in policy.sets["mgmt4"]] == ["10.99.5.5/32"]
        assert [str(e.net) for e in policy.sets["mgmt6"]] == ["fd99::5/128"]


def test_unresolvable_management_host_refuses_before_anything_is_applied(
        tmp_path: Path) -> None:
    def resolver(host: str) -> tuple[IPNetwork, ...]:
        raise InputError(f"management host {host!r} does not resolve")

    nft = RecordingNft()
    cfg = make_config(tmp_path, management=[{"host": "nowhere.invalid", "proto": "tcp"}])
    engine = Engine(cfg, nft=nft, resolver=resolver, references=no_reference)  # type: ignore[arg-type]
    from agent.requests import IsolateRequest

    with pytest.raises(InputError, match="does not resolve"):
        engine.isolate(IsolateRequest(reason="drill"))
    assert nft.calls == []
    assert not (tmp_path / "state" / "state.json").exists()
