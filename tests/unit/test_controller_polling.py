"""Polls: terse, on their own lane, never in a command's way, never overwriting what a
command learnt meanwhile; and the liveness rule they and commands share."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.schemas import Targets
from controller.service import Controller
from controller.transport.liveness import AlivePolicy, Heartbeat
from tests.unit.test_controller_support import OPERATOR, FakeFleet, make_controller


@pytest.fixture
def fleet() -> FakeFleet:
    return FakeFleet(["gw0", "gw1"])


@pytest.fixture
def ctl(tmp_path: Path, fleet: FakeFleet, db_url: str) -> Iterator[Controller]:
    controller = make_controller(tmp_path, fleet, db_url=db_url)
    yield controller
    controller.close()


def test_polls_ask_for_the_terse_status_on_the_poll_lane(ctl: Controller,
                                                         fleet: FakeFleet) -> None:
    assert ctl.poll_once() == {"gw0": True, "gw1": True}
    statuses = [args for op, args in fleet.agents["gw0"].calls if op == "status"]
    assert statuses == [{"elements": False}]
    link = ctl.links.peek("gw0")
    session = link._session if link is not None else None
    assert getattr(session, "lanes", None) == ["poll"]


def test_an_older_agent_gets_the_plain_status(ctl: Controller, fleet: FakeFleet) -> None:
    fleet.agents["gw1"].plain_status_only = True
    assert ctl.poll_once() == {"gw0": True, "gw1": True}
    assert ctl.poll_once() == {"gw0": True, "gw1": True}
    statuses = [args for op, args in fleet.agents["gw1"].calls if op == "status"]
    assert statuses == [{"elements": False}, {}, {}]  # asked once, remembered
    assert {v.name: v.reachable for v in ctl.views()} == {"gw0": True, "gw1": True}


def test_a_command_during_a_slow_poll_neither_waits_nor_gets_overwritten(
        ctl: Controller, fleet: FakeFleet) -> None:
    ctl.poll_once()
    fleet.agents["gw0"].status_delay = 1.5  # reads "open", answers 1.5 s later
    poll = threading.Thread(target=ctl.poll_once)
    poll.start()
    time.sleep(0.3)
    started = time.perf_counter()
    res = ctl.isolate(OPERATOR, Targets(gateways=("gw0",)), profile="internet",
                      reason="during a poll", ticket=None)
    took = time.perf_counter() - started
    assert res.ok and took < 0.5, took
    poll.join(10)
    view = {v.name: v for v in ctl.views()}["gw0"]
    assert (view.state, view.profile) == ("isolated", "internet")  # not the stale "open"
    fleet.agents["gw0"].status_delay = 0
    ctl.poll_once()  # the next poll agrees
    assert {v.name: v for v in ctl.views()}["gw0"].state == "isolated"


def test_alive_policy() -> None:
    p = AlivePolicy(interval=2.0, count_max=3)
    assert p.dead_after == 8.0
    assert not p.due(1.9, last_heard=0.0, last_probe=float("-inf"))
    assert p.due(2.0, last_heard=0.0, last_probe=float("-inf"))
    assert not p.due(3.0, last_heard=0.0, last_probe=2.0)  # asked a second ago
    assert not p.dead(7.9, unanswered=3, last_probe=6.0)  # the last one still has time
    assert p.dead(8.0, unanswered=3, last_probe=6.0)
    assert not p.dead(100.0, unanswered=2, last_probe=6.0)


def test_heartbeat_dead_only_after_count_max_unanswered_questions() -> None:
    now = [0.0]
    asked: list[threading.Event] = []

    def probe() -> threading.Event:
        asked.append(threading.Event())
        return asked[-1]

    hb = Heartbeat(AlivePolicy(1.0, 2), probe, clock=lambda: now[0])
    timeline = []
    for step in range(40):
        now[0] = step * 0.1
        if hb.check():
            timeline.append(now[0])
            break
    assert len(asked) == 2 and timeline == [pytest.approx(3.0)]

    now[0], asked[:] = 10.0, []
    hb = Heartbeat(AlivePolicy(1.0, 2), probe, clock=lambda: now[0])
    for step in range(100):  # a peer that answers every question: never dead
        now[0] = 10.0 + step * 0.1
        assert not hb.check()
        if asked:
            asked[-1].set()
    assert len(asked) >= 8
