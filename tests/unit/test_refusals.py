"""Refused requests are aggregated: the first per source and window at once, the rest as
one summary with a count; a flood of bad tokens leaves O(1) records (both stores)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from controller.api import create_app
from controller.audit import AuditEvent, HistoryQuery
from controller.errors import AuditTampered
from controller.refusals import OVERFLOW_SOURCE, Refusal, RefusalAggregator
from controller.service import Controller
from tests.unit.test_controller_support import FakeFleet, make_controller


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def refusal(source: str = "10.0.0.1", user: str | None = None, request: str = "GET /v1/x",
            code: str = "unauthorized") -> Refusal:
    return Refusal(source=source, user=user, action="auth.refused", request=request,
                   code=code, message="no")


def aggregator(max_sources: int = 100) -> tuple[RefusalAggregator, list[AuditEvent], Clock]:
    written: list[AuditEvent] = []
    clock = Clock()
    return RefusalAggregator(written.append, window_seconds=60, max_sources=max_sources,
                             clock=clock), written, clock


def test_first_of_a_window_at_once_the_rest_counted_then_summarised() -> None:
    agg, written, clock = aggregator()
    assert agg.refused(refusal())
    assert [e.action for e in written] == ["auth.refused"]
    assert written[0].detail["source"] == "10.0.0.1" and written[0].actor == "anonymous"
    for i in range(5):
        clock.now += 1
        assert not agg.refused(refusal(request=f"GET /v1/{i % 2}", code="forbidden"))
    assert len(written) == 1 and agg.suppressed == 5
    assert agg.flush() == 0  # the window is still open
    clock.now += 60
    assert agg.flush() == 1
    summary = written[-1]
    assert summary.action == "refusal.summary" and summary.detail["count"] == 5
    assert summary.detail["codes"] == {"forbidden": 5}
    assert summary.detail["requests"] == {"GET /v1/0": 3, "GET /v1/1": 2}
    assert agg.refused(refusal())  # a new window: written at once again


def test_sources_and_users_have_windows_of_their_own() -> None:
    agg, written, _ = aggregator()
    for r in (refusal(), refusal(source="10.0.0.2"), refusal(user="olga"), refusal()):
        agg.refused(r)
    assert [(e.actor, e.detail["source"]) for e in written] == [
        ("anonymous", "10.0.0.1"), ("anonymous", "10.0.0.2"), ("olga", "10.0.0.1")]


def test_too_many_sources_share_one_bucket() -> None:
    agg, written, clock = aggregator(max_sources=3)
    for i in range(50):
        agg.refused(refusal(source=f"10.0.1.{i}"))
    clock.now += 61
    agg.flush()
    assert len(written) == 5  # three sources, the shared bucket's first, its summary
    assert written[-1].detail["source"] == OVERFLOW_SOURCE
    assert written[-1].detail["count"] == 46


def test_a_write_refused_by_a_tamper_alarm_is_counted_not_raised() -> None:
    def refuse(event: AuditEvent) -> None:
        raise AuditTampered("alarm")

    agg = RefusalAggregator(refuse, window_seconds=60, max_sources=10)
    assert agg.refused(refusal())


@pytest.fixture
def served(tmp_path: Path, db_url: str) -> Iterator[tuple[Controller, TestClient]]:
    ctl = make_controller(tmp_path, FakeFleet(["gw0"]), db_url=db_url)
    with TestClient(create_app(ctl)) as client:
        yield ctl, client
    ctl.close()


def test_a_thousand_bad_tokens_leave_two_records_with_the_count(
        served: tuple[Controller, TestClient]) -> None:
    ctl, client = served
    before = ctl.audit.last_seq()
    for i in range(1000):
        token = f"dbt_{i:012x}_" + "x" * 43 if i % 2 else "garbage"
        resp = client.get("/v1/status", headers={"Authorization": f"Bearer {token}"})
        assert resp.status_code == 401
    assert ctl.audit.last_seq() - before == 1  # the first, at once
    ctl.refusals.flush(everything=True)
    records = ctl.history(HistoryQuery(since=0))[-2:]
    assert [r.action for r in records] == ["auth.refused", "refusal.summary"]
    assert records[1].detail["count"] == 999
    assert records[1].detail["requests"] == {"GET /v1/status": 999}
    assert ctl.audit.last_seq() - before == 2
    text = client.get("/metrics").text
    assert 'drawbridge_controller_refusals_total{reason="unauthorized"} 1000.0' in text
    assert "drawbridge_controller_refusals_aggregated_total 999.0" in text
