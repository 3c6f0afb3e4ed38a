"""Fan-out and links: bounded parallelism, per-gateway results, serialisation, reconnects."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from controller.config import SshSettings
from controller.errors import AgentError, TransportError
from controller.fleet import Fleet, classify
from controller.inventory import Gateway
from controller.transport.link import Backoff, GatewayLink, LinkRegistry
from tests.unit.test_controller_support import KEY_A, KEY_B, FakeFleet

SETTINGS = SshSettings(backoff_initial=0.05, backoff_max=1.0)


def gateways(names: list[str]) -> list[Gateway]:
    return [Gateway(name=n, host=f"10.99.0.{100 + i}", key_path="/k", host_key=KEY_A)
            for i, n in enumerate(names)]


def make(names: list[str], parallelism: int = 8) -> tuple[FakeFleet, Fleet, list[Gateway]]:
    fake = FakeFleet(names)
    links = LinkRegistry(SETTINGS, session_factory=fake.factory)
    return fake, Fleet(links, parallelism=parallelism), gateways(names)


def args(gw: Gateway) -> dict[str, Any]:
    return {"profile": "internet", "reason": "r", "actor": "a"}


def test_one_result_per_gateway_in_order_and_failures_stay_local() -> None:
    fake, fleet, gws = make(["a", "b", "c", "d"])
    fake.agents["b"].up = False
    fake.agents["c"].host_key = KEY_B
    fake.agents["d"].fail["isolate"] = ("nft_error", "nft refused")
    results = fleet.run(gws, "isolate", args)
    assert [r.gateway for r in results] == ["a", "b", "c", "d"]
    assert [r.outcome for r in results] == ["verified", "unreachable", "refused", "failed"]
    assert results[0].ok and not any(r.ok for r in results[1:])
    assert results[2].error_code == "host_key_mismatch"
    assert results[3].error_code == "nft_error"
    assert fake.agents["c"].auth_attempts == 0  # refused before authentication
    assert fake.agents["c"].calls == []
    fleet.shutdown()


def test_parallel_but_bounded() -> None:
    fake, fleet, gws = make([f"g{i}" for i in range(12)], parallelism=4)
    for agent in fake.agents.values():
        agent.delay = 0.1
    started = time.monotonic()
    results = fleet.run(gws, "isolate", args)
    elapsed = time.monotonic() - started
    assert all(r.ok for r in results)
    assert elapsed < 0.12 * 12 / 2  # parallel ...
    assert elapsed >= 0.1 * 3 * 0.9  # ... at most 4 at a time: 3 waves
    fleet.shutdown()


def test_progress_callback_sees_every_result() -> None:
    _fake, fleet, gws = make(["a", "b", "c"])
    seen: list[str] = []
    fleet.run(gws, "restore", args, on_result=lambda r: seen.append(r.gateway))
    assert sorted(seen) == ["a", "b", "c"]
    fleet.shutdown()


def test_same_gateway_commands_are_serialised_last_accepted_wins() -> None:
    fake, fleet, gws = make(["a"], parallelism=8)
    agent = fake.agents["a"]
    agent.delay = 0.02
    order: list[str] = []
    lock = threading.Lock()

    def run(op: str, profile: str | None) -> None:
        def a(gw: Gateway) -> dict[str, Any]:
            return {"profile": profile, "reason": op, "actor": "x"} if profile else \
                {"reason": op, "actor": "x"}
        fleet.run(gws, op, a)
        with lock:
            order.append(op)

    threads = []
    for i in range(6):
        op, profile = ("isolate", "full") if i % 2 == 0 else ("restore", None)
        t = threading.Thread(target=run, args=(op, profile))
        t.start()
        threads.append(t)
        time.sleep(0.005)  # accept in a known order
    for t in threads:
        t.join(10)
    assert agent.max_active == 1  # never two at once on one gateway
    assert [op for op, _ in agent.calls if op != "ping"] == \
        ["isolate", "restore"] * 3
    assert agent.state == "open"  # the last accepted command: restore
    fleet.shutdown()


def test_background_work_runs_beside_commands_and_never_delays_them() -> None:
    """A slow poll (status) of a gateway and a command to it at the same time: the
    command does not wait for the poll (it has a lane of its own, and no turn)."""
    fake, fleet, gws = make(["a", "b"])
    fake.agents["a"].status_delay = 1.0
    polled: list[Any] = []
    poller = threading.Thread(target=lambda: polled.extend(fleet.map_background(
        gws, lambda gw, lk: lk.call("status", {}, lane="poll")["state"])))
    poller.start()
    time.sleep(0.2)  # the poll of "a" is in its slow status now
    started = time.perf_counter()
    res = fleet.run(gws[:1], "isolate", args)
    took = time.perf_counter() - started
    assert res[0].outcome == "verified" and took < 0.5, took
    poller.join(5)
    assert polled[1] == "open" and polled[0] in ("open", "isolated")
    fleet.shutdown()


def test_classify_outcomes() -> None:
    base = {"action": "isolate", "gateway": "g", "state": "isolated", "profile": "internet",
            "in_sync": True, "verification": {"status": "verified"}, "generation": 3}
    assert classify("g", "isolate", base, 0.1).outcome == "verified"
    unverified = {**base, "verification": {"status": "unverified", "failing": ["web"]}}
    r = classify("g", "isolate", unverified, 0.1)
    assert (r.outcome, r.ok, r.failing) == ("unverified", False, ["web"])
    drift = {**base, "in_sync": False, "problems": ["chain input missing"]}
    assert "chain input missing" in classify("g", "isolate", drift, 0.1).message
    noted = {**base, "verification": {"status": "unknown"}, "note": "gateway is open"}
    assert classify("g", "allow", noted, 0).outcome == "applied"
    assert classify("g", "isolate", {"junk": 1}, 0).error_code == "protocol_error"
    assert classify("g", "probe", {"probes": []}, 0).outcome == "applied"
    assert classify("g", "probe", {"probes": [{"name": "p", "ok": False}]}, 0).failing == ["p"]


# -- links -------------------------------------------------------------------------------


def test_backoff_doubles_to_a_ceiling() -> None:
    b = Backoff(1.0, 8.0, jitter=lambda: 1.0)
    assert [b.failed(0.0) for _ in range(5)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert not b.ready(7.9) and b.ready(8.0)
    b.succeeded()
    assert b.ready(0.0) and b.failures == 0


def test_link_keeps_one_session_and_reconnects_once_for_idempotent_ops() -> None:
    fake = FakeFleet(["a"])
    link = GatewayLink(gateways(["a"])[0], SETTINGS, session_factory=fake.factory)
    link.call("status", {})
    link.call("status", {})
    assert fake.agents["a"].connects == 1
    fake.agents["a"].epoch += 1  # sshd restarted: the kept session is dead ...
    fake.agents["a"].unnoticed = True  # ... which shows only when it is used
    assert link.call("isolate", {"profile": "internet"})["state"] == "isolated"
    assert fake.agents["a"].connects == 2


def test_link_does_not_resend_allow_on_a_dead_session() -> None:
    fake = FakeFleet(["a"])
    link = GatewayLink(gateways(["a"])[0], SETTINGS, session_factory=fake.factory)
    link.call("status", {})
    fake.agents["a"].epoch += 1
    fake.agents["a"].unnoticed = True
    with pytest.raises(TransportError, match="ended"):
        link.call("allow", {"cidr": "192.0.2.0/24"})
    assert not any(op == "allow" for op, _ in fake.agents["a"].calls)


def test_link_respects_backoff_only_when_asked() -> None:
    fake = FakeFleet(["a"])
    now = [100.0]
    link = GatewayLink(gateways(["a"])[0], SETTINGS, session_factory=fake.factory,
                       clock=lambda: now[0])
    fake.agents["a"].up = False
    with pytest.raises(TransportError, match="refused"):
        link.call("status", {}, respect_backoff=True)
    fake.agents["a"].up = True
    with pytest.raises(TransportError, match="next attempt"):
        link.call("status", {}, respect_backoff=True)  # a poll waits its turn
    assert link.call("status", {})["state"] == "open"  # an engineer's command does not
    assert link.backoff.failures == 0


def test_agent_errors_keep_the_session() -> None:
    fake = FakeFleet(["a"])
    fake.agents["a"].fail["isolate"] = ("config_error", "unknown profile 'x'")
    link = GatewayLink(gateways(["a"])[0], SETTINGS, session_factory=fake.factory)
    with pytest.raises(AgentError, match="unknown profile"):
        link.call("isolate", {"profile": "x"})
    assert link.connected


def test_changed_connection_settings_close_the_kept_session() -> None:
    """`gateway update` on another replica reaches this one through the inventory: a
    session opened with the old address or key must not carry on; a first-use pin must
    not cost a reconnect."""
    fake = FakeFleet(["a"])
    links = LinkRegistry(SETTINGS, session_factory=fake.factory)
    tofu = Gateway(name="a", host="10.99.0.100", key_path="/k", trust_on_first_use=True)
    links.get(tofu).call("status", {})
    pinned = tofu.model_copy(update={"host_key": KEY_A})
    links.get(pinned).call("status", {})
    assert fake.agents["a"].connects == 1
    links.get(pinned.model_copy(update={"port": 2222})).call("status", {})
    assert fake.agents["a"].connects == 2
    repinned = pinned.model_copy(update={"port": 2222, "host_key": KEY_B})
    fake.agents["a"].host_key = KEY_B  # reinstalled: the operator pinned its new key
    links.get(repinned).call("status", {})
    assert fake.agents["a"].connects == 3
