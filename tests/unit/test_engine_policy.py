"""Management hostnames: resolved outside the lock, last answers kept, never a stalled request."""

from __future__ import annotations

import ipaddress
import threading
import time
from pathlib import Path

from agent.config import IPNetwork
from agent.engine import Engine
from agent.requests import IsolateRequest
from agent.resolve import ManagementHosts
from agent.state import DesiredState
from tests.unit.conftest import make_config
from tests.unit.fakes import RecordingNft, no_reference

HOST = "controller.example.net"
ANSWER = (ipaddress.ip_network("10.99.5.5/32"), ipaddress.ip_network("fd99::5/128"))


def test_the_last_answer_survives_a_dns_outage_and_a_restart(tmp_path: Path) -> None:
    answers: list[tuple[IPNetwork, ...] | None] = [ANSWER, None]

    def lookup(host: str) -> tuple[IPNetwork, ...]:
        assert host == HOST
        answer = answers.pop(0)
        if answer is None:
            raise OSError(-2, "Name or service not known")
        return answer

    cfg = make_config(tmp_path, management=[{"host": HOST, "proto": "tcp", "ports": [22]}])
    hosts = ManagementHosts([HOST], state_dir=cfg.state_dir, lookup=lookup)
    engine = Engine(cfg, nft=RecordingNft(), hosts=hosts, references=no_reference)  # type: ignore[arg-type]
    for _ in range(2):  # second round: DNS fails, the previous answer is used
        hosts.refresh()
        policy = engine.policy_for(DesiredState(profile="full"))
        assert policy is not None
        assert [str(e.net) for e in policy.sets["mgmt4"]] == ["10.99.5.5/32"]
        assert [str(e.net) for e in policy.sets["mgmt6"]] == ["fd99::5/128"]
    assert "Name or service not known" in hosts.failures()[HOST]
    # a restart during the outage: the answer comes from disk
    again = ManagementHosts([HOST], state_dir=cfg.state_dir, lookup=lookup)
    assert again.answers() == {HOST: ANSWER}


def test_a_hanging_resolver_never_holds_up_isolation(tmp_path: Path) -> None:
    release = threading.Event()

    def lookup(host: str) -> tuple[IPNetwork, ...]:
        release.wait(30)  # a resolver that isolation cut off
        return ANSWER

    nft = RecordingNft()
    cfg = make_config(tmp_path, management=[{"host": "nowhere.invalid", "proto": "tcp",
                                              "ports": [22]}])
    hosts = ManagementHosts(["nowhere.invalid"], lookup=lookup, timeout=0.2)
    engine = Engine(cfg, nft=nft, hosts=hosts, references=no_reference)  # type: ignore[arg-type]
    started = time.monotonic()
    hosts.refresh()  # the daemon's job, never under the lock
    engine.isolate(IsolateRequest(reason="drill"))
    assert time.monotonic() - started < 2
    assert "apply" in nft.calls, "isolation must happen without the hostname"
    assert engine.status().unresolved == (
        "management host nowhere.invalid: no answer within 0.2s; never resolved: left out",)
    release.set()
    hosts.close()
