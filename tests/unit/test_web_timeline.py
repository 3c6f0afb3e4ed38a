"""The timeline from audit records (pure): lanes, intervals, marks, exceptions; its layout."""

from __future__ import annotations

import pytest

from controller.web.svg import layout, ticks
from controller.web.timeline import Condition, Window, build_timeline, conditions_at
from tests.unit.web_records import T0, allow_args, drill, rec, results

W = Window(T0, T0 + 1800)


def spans(lane) -> list[tuple[float, float, str]]:  # type: ignore[no-untyped-def]
    return [(s.start - T0, s.end - T0, s.condition.kind) for s in lane.segments]


def test_lanes_intervals_and_marks_of_a_drill() -> None:
    tl = build_timeline(drill(), ["gw0", "gw1", "gw2"], W)
    gw0, gw1, gw2 = tl.lanes
    assert [lane.gateway for lane in tl.lanes] == ["gw0", "gw1", "gw2"]
    assert spans(gw0) == [(0, 61, "unknown"), (61, 1001, "isolated:internet"),
                          (1001, 1200, "isolated:casefiles"), (1200, 1800, "open")]
    assert spans(gw1) == [(0, 61, "unknown"), (61, 500, "isolated:internet"),
                          (500, 900, "unreachable"), (900, 1001, "isolated:internet"),
                          (1001, 1200, "isolated:casefiles"), (1200, 1800, "open")]
    assert spans(gw2) == [(0, 1800, "unknown")]  # in the inventory, never touched
    assert [(m.kind, m.seq) for m in gw0.marks] == [
        ("isolate", 2), ("allow", 3), ("plan", 6), ("stage", 7), ("stage", 8), ("plan", 9)]
    assert [(m.kind, m.seq) for m in gw1.marks] == [
        ("isolate", 2), ("plan", 6), ("stage", 7), ("stage", 8), ("plan", 9)]
    assert "NetScaler" in gw0.marks[0].title and "#2" in gw0.marks[0].title
    # unreachable keeps the isolation it last had (the kernel keeps it without us)
    assert gw1.segments[2].condition.state == "isolated"
    assert gw1.segments[2].condition.label.startswith("unreachable (last known: isolated")


def test_exception_closed_by_the_restore_before_it_expires() -> None:
    tl = build_timeline(drill(), ["gw0", "gw1"], W)
    (span,) = tl.lanes[0].exceptions
    assert (span.seq, span.gateway, span.closed_by) == (3, "gw0", "restore #8")
    assert span.requested_seconds == 3600
    assert span.open_seconds == pytest.approx(900)  # 300 s -> restored at 1200 s
    assert span.flow == "tcp 203.0.113.0/24 port 443, out"
    assert tl.lanes[1].exceptions == ()


def test_exception_that_expires_inside_the_window() -> None:
    records = [
        rec(1, 10, "isolate", "ok", ["gw0"], detail={"results": results(["gw0"], "isolated")}),
        rec(2, 20, "allow", "ok", ["gw0"], detail={"args": allow_args(60),
                                                   "results": results(["gw0"], "isolated")}),
    ]
    (span,) = build_timeline(records, ["gw0"], W).lanes[0].exceptions
    assert (span.closed_by, span.open_seconds) == ("expiry", 60)


def test_state_before_the_window_comes_from_earlier_records() -> None:
    before = [
        rec(1, -7200, "isolate", "ok", ["gw0", "gw1"], detail={
            "results": results(["gw0", "gw1"], "isolated", "full")}),
        rec(2, -3600, "restore", "ok", ["gw1"], detail={"results": results(["gw1"], "open")}),
        rec(3, -600, "allow", "ok", ["gw0"], detail={"args": allow_args(3600),
                                                     "results": results(["gw0"], "isolated")}),
    ]
    tl = build_timeline([], ["gw0", "gw1"], W, before=before)
    assert spans(tl.lanes[0]) == [(0, 1800, "isolated:full")]
    assert spans(tl.lanes[1]) == [(0, 1800, "open")]
    (span,) = tl.lanes[0].exceptions  # opened before the window, still open in it
    assert span.seq == 3 and span.opened_at == T0 - 600


def test_unreachable_result_and_observed_changes() -> None:
    records = [
        rec(1, 100, "isolate", "partial", ["gw0", "gw1"], detail={"results": [
            *results(["gw0"], "isolated"), *results(["gw1"], "", outcome="unreachable")]}),
        rec(2, 200, "state.changed", "observed", ["gw0"], actor="controller",
            detail={"state": "isolated", "profile": "full"}),
        rec(3, 300, "state.drift_repaired", "observed", ["gw0"], actor="controller",
            detail={"state": "isolated", "profile": "full"}),
        rec(4, 400, "state.unverified", "observed", ["gw0"], actor="controller"),
    ]
    tl = build_timeline(records, ["gw0", "gw1"], W)
    assert spans(tl.lanes[0])[1:] == [(100, 200, "isolated:internet"),
                                      (200, 400, "isolated:full"),
                                      (400, 1800, "isolated:full")]  # now unverified
    assert tl.lanes[0].segments[-1].condition.verification == "unverified"
    assert [m.kind for m in tl.lanes[0].marks] == ["isolate", "changed", "drift"]
    assert spans(tl.lanes[1]) == [(0, 100, "unknown"), (100, 1800, "unreachable")]
    assert [m.kind for m in tl.lanes[1].marks] == ["isolate"]


def test_requested_records_and_refusals_leave_no_mark_and_no_state() -> None:
    records = [rec(1, 10, "isolate", "requested", ["gw0"]),
               rec(2, 20, "auth.refused", "refused", []),
               rec(3, 30, "probe", "ok", ["gw0"], detail={"results": results(["gw0"], "open")})]
    tl = build_timeline(records, ["gw0"], W)
    assert spans(tl.lanes[0]) == [(0, 1800, "unknown")] and tl.lanes[0].marks == ()


def test_a_gateway_only_in_the_records_gets_a_lane() -> None:
    records = [rec(1, 10, "isolate", "ok", ["gone"],
                   detail={"results": results(["gone"], "isolated")})]
    assert [lane.gateway for lane in build_timeline(records, ["gw0"], W).lanes] == \
        ["gw0", "gone"]


def test_conditions_at_folds_in_seq_order() -> None:
    records = drill()
    assert conditions_at(reversed(records))["gw0"] == Condition(
        state="open", profile=None, reachable=True, verification="verified")


def test_layout_maps_time_to_x_and_keeps_every_mark() -> None:
    tl = build_timeline(drill(), ["gw0", "gw1"], W)
    g = layout(tl, width=1000, label_w=120)
    plot_w = 1000 - 120 - 10
    lane0 = g.lanes[0]
    assert lane0.boxes[0].x == pytest.approx(120)
    assert lane0.boxes[1].x == pytest.approx(120 + 61 / 1800 * plot_w)
    assert sum(b.w for b in lane0.boxes) == pytest.approx(plot_w, abs=1)
    assert [p.seq for p in lane0.pins] == [2, 3, 6, 7, 8, 9]
    assert g.lanes[1].y > lane0.y + lane0.h
    (bar,) = lane0.bars
    assert bar.x == pytest.approx(120 + 300 / 1800 * plot_w)
    assert bar.w == pytest.approx(900 / 1800 * plot_w)
    assert [item.label for item in g.legend] == [
        "open", "isolated (casefiles)", "isolated (internet)", "unreachable", "unknown"]


def test_ticks_are_round_utc_times_inside_the_window() -> None:
    found = ticks(T0, T0 + 6 * 3600, 100, 600)
    assert 3 <= len(found) <= 8
    assert all(100 <= t.x <= 700 for t in found)
    assert all(t.label.endswith(":00") for t in found)


def test_window_must_be_ordered() -> None:
    with pytest.raises(ValueError):
        Window(T0, T0)


def test_short_windows_get_second_ticks() -> None:
    found = ticks(T0, T0 + 20, 0, 100)
    assert 2 <= len(found) <= 8 and all(len(t.label) == 8 for t in found)  # HH:MM:SS
