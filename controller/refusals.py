"""Refused requests, audited without letting anyone flood the chain.

Every refusal (no token, a bad token, a missing role, invalid input) used to append
one keyed record: a script sending bad tokens wrote the audit log as fast as it
could send. Now refusals are aggregated per source (the client's address, and the
user when the token was valid) and window (`[audit] refusal_window_seconds`,
default 60): the first refusal of a window is written at once, with everything it
said; the rest of the window is counted, and one summary record at the window's
end says how many there were, of which kinds, for which requests. A source thus
writes at most two records per window, whatever it sends. Too many sources at once
(`[audit] refusal_max_sources`) share one bucket, so even a crowd of addresses
writes a bounded number of records.

What the counts held when the controller was killed is lost (the first refusal of
each window is already in the log); a clean stop writes every open summary.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from controller.audit import AuditEvent
from controller.errors import ControllerError

log = logging.getLogger("drawbridge.controller.refusals")

SUMMARY_ACTION = "refusal.summary"
OVERFLOW_SOURCE = "*"  # the bucket shared by sources beyond refusal_max_sources
MAX_KINDS = 20  # distinct requests kept per window (the rest are counted as "other")

Key = tuple[str, str | None]


@dataclass(frozen=True)
class Refusal:
    source: str  # client address ("local": on the controller host)
    user: str | None  # None: anonymous (no valid token)
    action: str  # auth.refused | request.refused
    request: str  # e.g. "POST /v1/isolate"
    code: str
    message: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Window:
    start: float
    action: str
    last: float = 0.0
    more: int = 0  # refusals after the first, not written one by one
    codes: Counter[str] = field(default_factory=Counter)
    requests: Counter[str] = field(default_factory=Counter)

    def count(self, refusal: Refusal, now: float) -> None:
        self.more += 1
        self.last = now
        self.codes[refusal.code] += 1
        if refusal.request in self.requests or len(self.requests) < MAX_KINDS:
            self.requests[refusal.request] += 1
        else:
            self.requests["(other)"] += 1


def first_event(refusal: Refusal, window: float) -> AuditEvent:
    return AuditEvent(
        actor=refusal.user or "anonymous", action=refusal.action, outcome="refused",
        reason=refusal.message,
        detail={"request": refusal.request, "code": refusal.code, "source": refusal.source,
                "window_seconds": window, **refusal.detail})


def summary_event(key: Key, w: _Window, window: float) -> AuditEvent:
    source, user = key
    where = "sources beyond the limit" if source == OVERFLOW_SOURCE else source
    return AuditEvent(
        actor=user or "anonymous", action=SUMMARY_ACTION, outcome="refused",
        reason=f"{w.more} more refusal(s) from {where} within {window:g}s after the first "
               "(recorded one by one no more: aggregated)",
        detail={"source": source, "count": w.more, "first_action": w.action,
                "window_start": w.start, "last_at": w.last, "window_seconds": window,
                "codes": dict(w.codes), "requests": dict(w.requests)})


class RefusalAggregator:
    """Writes through `write` (the audit log's append); thread-safe."""

    def __init__(self, write: Callable[[AuditEvent], Any], *, window_seconds: float,
                 max_sources: int, clock: Callable[[], float] = time.time) -> None:
        # wall-clock time: the summary records when its window started and ended
        self.write = write
        self.window = window_seconds
        self.max_sources = max_sources
        self.clock = clock
        self._lock = threading.Lock()
        self._windows: dict[Key, _Window] = {}
        self.suppressed = 0  # refusals counted, not written one by one (a metric reads it)

    def refused(self, refusal: Refusal) -> bool:
        """Count one refusal; write it if it opens a window. True if written now."""
        now = self.clock()
        due: list[AuditEvent] = []
        first: AuditEvent | None = None
        with self._lock:
            due = self._take_due(now)
            key: Key = (refusal.source, refusal.user)
            if key not in self._windows and len(self._windows) >= self.max_sources:
                key = (OVERFLOW_SOURCE, None)
            w = self._windows.get(key)
            if w is None:
                self._windows[key] = _Window(start=now, action=refusal.action, last=now)
                first = first_event(refusal, self.window)
            else:
                w.count(refusal, now)
                self.suppressed += 1
        for event in due + ([first] if first is not None else []):
            self._write(event)
        return first is not None

    def _take_due(self, now: float, *, everything: bool = False) -> list[AuditEvent]:
        """Under the lock: close the windows that ended; their summaries (if any)."""
        out: list[AuditEvent] = []
        for key, w in list(self._windows.items()):
            if everything or now - w.start >= self.window:
                del self._windows[key]
                if w.more:
                    out.append(summary_event(key, w, self.window))
        return out

    def flush(self, *, everything: bool = False) -> int:
        """Write the summaries of windows that ended (all of them: at a clean stop).
        Returns how many were written."""
        with self._lock:
            due = self._take_due(self.clock(), everything=everything)
        for event in due:
            self._write(event)
        return len(due)

    def _write(self, event: AuditEvent) -> None:
        try:
            self.write(event)
        except ControllerError as exc:  # e.g. a tamper alarm holds the log: still refused
            log.warning("refusal not recorded (%s): %s by %s", exc.code, event.action,
                        event.actor)
