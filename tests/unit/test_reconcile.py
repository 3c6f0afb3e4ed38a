"""The controller's story against the gateways' journals: the rules (pure) and the whole
cross-check against in-memory agents that journal like the real one (both stores)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.audit import AuditRecord, HistoryQuery
from controller.reconcile import reconcile
from controller.reconcile_rules import Order, SentCheckpoint, compare, orders_for
from controller.schemas import Targets
from controller.service import Controller
from tests.storage import raw_sql
from tests.unit.test_controller_support import (
    ADMIN,
    OPERATOR,
    FakeFleet,
    make_controller,
)
from tests.unit.web_records import rec as record

ALL = Targets(all=True)


def entry(action: str, request_id: str | None, result: str = "applied", *,
          at: float = 100.0, audit: str | None = None, **kw: Any) -> dict[str, Any]:
    return {"time": at, "action": action, "result": result, "request_id": request_id,
            "audit": audit, "verification": "verified", "actor": "alice", "reason": "r",
            **kw}


def order(cid: str, op: str = "isolate", outcome: str | None = "verified",
          at: float = 50.0) -> Order:
    return Order(command_id=cid, op=op, at=at, seq=1, actor="alice", hashes={"h" * 64},
                 outcome=outcome)


def kinds(diffs: list[Any]) -> list[str]:
    return [d.kind for d in diffs]


def test_orders_are_read_from_requested_and_result_records() -> None:
    records: list[AuditRecord] = [
        record(1, 1, "isolate", "requested", ["gw0", "gw1"], command_id="c1",
               detail={"op": "isolate"}),
        record(2, 2, "isolate", "partial", ["gw0", "gw1"], command_id="c1", detail={
            "op": "isolate", "results": [{"gateway": "gw0", "outcome": "verified"},
                                         {"gateway": "gw1", "outcome": "unreachable"}]}),
        record(3, 3, "probe", "requested", ["gw0"], command_id="c2", detail={"op": "probe"}),
        record(4, 4, "restore", "requested", ["gw0"], command_id="c3",
               detail={"op": "restore"}),
    ]
    orders = orders_for("gw0", records)
    assert sorted(orders) == ["c1", "c3"]
    assert (orders["c1"].outcome, orders["c3"].outcome) == ("verified", None)
    assert orders_for("gw1", records)["c1"].outcome == "unreachable"


def test_agreement_and_every_kind_of_difference() -> None:
    h = "h" * 64
    orders = {"c1": order("c1"), "c2": order("c2", "restore"), "c3": order("c3"),
              "c4": order("c4", outcome="unreachable"), "c5": order("c5", outcome="failed"),
              "c6": order("c6")}
    entries = [
        entry("isolate", "c1", audit=h),
        entry("restore", "c2", "failed", audit=h, error="nft refused"),  # differs
        entry("isolate", "cli-0123abcd", actor="root@gw0", reason="break-glass"),  # unordered
        entry("isolate", "c4", audit=h),  # the controller thought it never arrived
        entry("repair", None),  # the agent's own loop: not an order
        entry("isolate", "c6", audit="f" * 64),  # not the controller's record
        entry("isolate", "c1", "noop", audit=h, at=200.0),  # a replay-free repeat: noop
    ]
    diffs = compare("gw0", orders, entries, window_start=0.0)
    assert sorted(kinds(diffs)) == sorted(["outcome_differs", "unordered", "missing",
                                           "outcome_differs", "audit_differs"])
    by_kind = {(d.kind, d.command_id): d for d in diffs}
    assert "root@gw0" in by_kind[("unordered", "cli-0123abcd")].message
    assert "its own CLI" in by_kind[("unordered", "cli-0123abcd")].message
    assert "never arrived" in by_kind[("missing", "c3")].message
    assert "verified" in by_kind[("outcome_differs", "c2")].message
    assert "unreachable" in by_kind[("outcome_differs", "c4")].message
    # in agreement: c1 (also its noop repeat); c5 failed before the agent journaled it
    assert not compare("gw0", {"c1": order("c1")}, [entry("isolate", "c1", audit=h)],
                       window_start=0.0)


def test_the_window_and_checkpoints() -> None:
    entries = [entry("isolate", "old", at=10.0),
               entry("checkpoint", "c9-1", "recorded", at=150.0, seq=5, head_hash="a" * 64),
               entry("checkpoint", "c9-2", "recorded", at=160.0, seq=6, head_hash="b" * 64)]
    sent = [SentCheckpoint(5, "a" * 64, 150.0, True), SentCheckpoint(6, "b" * 64, 160.0, True),
            SentCheckpoint(7, "c" * 64, 170.0, True), SentCheckpoint(8, "d" * 64, 180.0, False)]
    diffs = compare("gw0", {}, entries, window_start=100.0, sent=sent,
                    chain={5: "a" * 64, 6: "e" * 64})
    assert [(d.kind, d.seq) for d in diffs] == [("checkpoint_differs", 6),
                                                ("checkpoint_missing", 7)]
    gone = compare("gw0", {}, entries, window_start=100.0, chain={5: None, 6: "b" * 64})
    assert [(d.kind, d.seq) for d in gone] == [("checkpoint_differs", 5)]
    assert "no longer has" in gone[0].message
    forged = compare("gw0", {}, entries, window_start=100.0, chain={5: "a" * 64},
                     bad_signatures=[5])
    assert "forged" in forged[0].message


@pytest.fixture
def fake_fleet() -> FakeFleet:
    return FakeFleet(["gw0", "gw1"])


@pytest.fixture
def ctl(tmp_path: Path, fake_fleet: FakeFleet, db_url: str) -> Iterator[Controller]:
    c = make_controller(tmp_path, fake_fleet, db_url=db_url)
    c.isolate(OPERATOR, ALL, profile="internet", reason="incident", ticket="INC-1")
    c.allow(OPERATOR, Targets(gateways=("gw0",)), flow={
        "cidr": "203.0.113.0/24", "proto": "tcp", "ports": [443], "direction": "out",
        "duration_seconds": 600}, reason="partner", ticket=None)
    c.restore(ADMIN, ALL, reason="clear", ticket=None)
    c.checkpoints.wait()
    yield c
    c.close()


def by_gateway(ctl: Controller, since: float | None = None) -> dict[str, Any]:
    report = reconcile(ctl, ctl.inventory.all(), since)
    return {g.gateway: g for g in report.gateways}


def test_the_controller_and_the_gateways_agree(ctl: Controller,
                                               fake_fleet: FakeFleet) -> None:
    report = reconcile(ctl, ctl.inventory.all(), None)
    assert report.ok, report
    gw0 = report.gateways[0]
    assert (gw0.orders, gw0.checkpoints) == (3, 2)
    requested = ctl.history(HistoryQuery(action="isolate"))[0]
    isolate = next(e for e in fake_fleet.agents["gw0"].journal if e["action"] == "isolate")
    assert (isolate["request_id"], isolate["audit"]) == (requested.command_id, requested.hash)


def test_break_glass_on_the_console_is_a_change_nobody_ordered(
        ctl: Controller, fake_fleet: FakeFleet) -> None:
    fake_fleet.agents["gw1"].local_change("full")
    found = by_gateway(ctl)
    assert found["gw0"].ok and not found["gw1"].ok
    [diff] = found["gw1"].differences
    assert diff.kind == "unordered" and "root@console" in diff.message


def test_a_lost_journal_entry_and_a_differing_outcome_are_named(
        ctl: Controller, fake_fleet: FakeFleet) -> None:
    journal = fake_fleet.agents["gw0"].journal
    restore = next(e for e in journal if e["action"] == "restore")
    journal.remove(restore)
    isolate = next(e for e in journal if e["action"] == "isolate")
    isolate["result"], isolate["error"] = "failed", "nft: table busy"
    cp = next(e for e in journal if e["action"] == "checkpoint")
    journal.remove(cp)
    found = by_gateway(ctl)["gw0"]
    assert sorted(kinds(found.differences)) == ["checkpoint_missing", "missing",
                                                "outcome_differs"]
    # --since leaves out what came before
    later = by_gateway(ctl, since=restore["time"] + 0.001)["gw0"]
    assert later.ok, later


def test_a_rewritten_chain_shows_in_the_gateways_checkpoints(
        ctl: Controller, fake_fleet: FakeFleet, db_url: str) -> None:
    cp = next(e for e in fake_fleet.agents["gw1"].journal if e["action"] == "checkpoint")
    raw_sql(db_url, "UPDATE audit_log SET hash = :h WHERE seq = :s", h="0" * 64, s=cp["seq"])
    diffs = by_gateway(ctl)["gw1"].differences
    assert any(d.kind == "checkpoint_differs" and d.seq == cp["seq"] for d in diffs)


def test_an_unreachable_gateway_is_not_agreement(ctl: Controller,
                                                 fake_fleet: FakeFleet) -> None:
    fake_fleet.agents["gw1"].up = False
    report = reconcile(ctl, ctl.inventory.all(), None)
    assert not report.ok
    gw1 = report.gateways[1]
    assert not gw1.reachable and "cannot read the journal" in (gw1.error or "")
