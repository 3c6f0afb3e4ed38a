"""The I/O edge of the page and the report: read a window of the audit log and the fleet.

Everything after this is pure (timeline, layout, aggregation, rendering).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from controller.audit import AuditRecord, HistoryQuery, VerifyReport
from controller.service import Controller
from controller.web.report import ChainHead, Report, build_report
from controller.web.sources import CheckpointSource, PlanSource
from controller.web.timeline import Timeline, Window, build_timeline

WINDOW_LIMIT = 100_000  # records in one window; a report of more is refused
SEED_LIMIT = 2_000  # per kind of record, looking back for the state at the window's start
SEED_ACTIONS = ("isolate", "restore", "state", "allow")


class WindowTooLarge(Exception):
    pass


@dataclass(frozen=True)
class WindowData:
    window: Window
    records: list[AuditRecord]
    before: list[AuditRecord]
    gateways: list[str]


def load_window(ctl: Controller, window: Window) -> WindowData:
    records = ctl.history(HistoryQuery(since=window.since, until=window.until,
                                       limit=WINDOW_LIMIT + 1))
    if len(records) > WINDOW_LIMIT:
        raise WindowTooLarge(f"more than {WINDOW_LIMIT} audit records in this window; "
                             "choose a shorter one")
    # What each gateway was when the window opened: the latest state-bearing records
    # before it (bounded per kind, so a long history costs the same as a short one).
    before: dict[int, AuditRecord] = {}
    for action in SEED_ACTIONS:
        for rec in ctl.history(HistoryQuery(until=window.since, action=action,
                                            limit=SEED_LIMIT)):
            if rec.ts_us / 1e6 < window.since:
                before[rec.seq] = rec
    gateways = [g.name for g in ctl.inventory.all()]
    return WindowData(window, records, sorted(before.values(), key=lambda r: r.seq), gateways)


def timeline_of(data: WindowData) -> Timeline:
    return build_timeline(data.records, data.gateways, data.window, before=data.before)


def head_of(ctl: Controller) -> ChainHead | None:
    last = ctl.history(HistoryQuery(limit=1))
    return ChainHead(last[-1].seq, last[-1].hash) if last else None


class VerifyCache:
    """`audit verify` walks the whole chain; the page refreshes often. Reuse a result
    while no record was added and it is younger than `ttl` seconds."""

    def __init__(self, verify: Callable[[], VerifyReport], last_seq: Callable[[], int],
                 ttl: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._verify = verify
        self._last_seq = last_seq
        self._ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: tuple[int, float, VerifyReport] | None = None

    def get(self) -> VerifyReport:
        seq = self._last_seq()
        with self._lock:
            cached = self._cached
            if cached is not None and cached[0] == seq and self._clock() - cached[1] < self._ttl:
                return cached[2]
        report = self._verify()
        with self._lock:
            self._cached = (seq, self._clock(), report)
        return report


def make_report(ctl: Controller, window: Window, *, verify: VerifyReport,
                plans: PlanSource, checkpoints: CheckpointSource,
                generated_by: str) -> Report:
    data = load_window(ctl, window)
    return build_report(timeline=timeline_of(data), records=data.records, verify=verify,
                        head=head_of(ctl), checkpoint=checkpoints.last(),
                        plans=plans.plans(window.since, window.until),
                        generated_at=ctl.clock(), generated_by=generated_by)
