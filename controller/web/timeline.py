"""What each gateway was, moment by moment, rebuilt from the audit log (pure).

The audit log already holds everything an incident lead asks about: every
command's per-gateway result (state, profile, verification), what the poller
observed (unreachable, changed on the console, drift repaired, verified or
not) and every exception with its lifetime. Folding those records in `seq`
order gives one lane per gateway: coloured segments (open, isolated by
profile, unreachable) and marks (isolate, restore, exception, plan stage),
each pointing back at the record it came from.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from controller.audit import AuditRecord

# Command actions whose per-gateway results carry the gateway's new state.
STATE_ACTIONS = frozenset({"isolate", "restore"})
# Mark kinds, in the order a legend lists them.
MARK_KINDS = ("isolate", "restore", "allow", "stage", "plan", "changed", "drift")


@dataclass(frozen=True)
class Window:
    """A time range in epoch seconds, since < until."""

    since: float
    until: float

    def __post_init__(self) -> None:
        if not self.until > self.since:
            raise ValueError("the window must end after it starts")

    @property
    def seconds(self) -> float:
        return self.until - self.since

    def clip(self, start: float, end: float) -> tuple[float, float] | None:
        """The part of [start, end) inside the window, or None."""
        lo, hi = max(start, self.since), min(end, self.until)
        return (lo, hi) if hi > lo else None


@dataclass(frozen=True)
class Condition:
    """What one gateway was at one moment, as far as the controller knew."""

    state: str = "unknown"  # open | isolated | unknown
    profile: str | None = None
    reachable: bool | None = None
    verification: str | None = None

    @property
    def kind(self) -> str:
        """The colour key: unreachable wins over the (kept) isolation state."""
        if self.reachable is False:
            return "unreachable"
        if self.state == "isolated":
            return f"isolated:{self.profile or 'internet'}"
        return self.state

    @property
    def label(self) -> str:
        words = {"open": "open", "unknown": "unknown"}.get(self.state)
        shown = words or f"isolated ({self.profile or 'internet'})"
        if self.reachable is False:
            shown = f"unreachable (last known: {shown})"
        if self.verification in ("verified", "unverified"):
            shown += f", {self.verification}"
        return shown


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    condition: Condition
    seq: int | None  # the record that began it (None: before the window's first record)

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class Mark:
    at: float
    kind: str  # one of MARK_KINDS
    seq: int
    gateway: str
    title: str  # what a person reads on hover: action, outcome, actor, reason


@dataclass(frozen=True)
class ExceptionSpan:
    """One exception on one gateway: opened, meant to last, actually open until."""

    gateway: str
    seq: int
    opened_at: float
    expires_at: float
    closed_at: float  # expiry, or the restore that removed it (whichever came first)
    closed_by: str  # "expiry" | "restore #<seq>"
    flow: str
    actor: str
    reason: str
    ticket: str | None

    @property
    def open_seconds(self) -> float:
        return max(0.0, self.closed_at - self.opened_at)

    @property
    def requested_seconds(self) -> float:
        return self.expires_at - self.opened_at


@dataclass(frozen=True)
class Lane:
    gateway: str
    segments: tuple[Segment, ...]
    marks: tuple[Mark, ...]
    exceptions: tuple[ExceptionSpan, ...]


@dataclass(frozen=True)
class Timeline:
    window: Window
    lanes: tuple[Lane, ...]

    def kinds(self) -> list[str]:
        """Segment colour keys present, in a stable order (for the legend)."""
        found = {s.condition.kind for lane in self.lanes for s in lane.segments}
        rank = {"open": 0, "unreachable": 2, "unknown": 3}
        return sorted(found, key=lambda k: (rank.get(k, 1), k))


# -- one record's effect ---------------------------------------------------------------


def describe_flow(args: Mapping[str, Any]) -> str:
    """'tcp 203.0.113.0/24 port 443, out' from an allow command's arguments."""
    ports = args.get("ports") or []
    shown = ",".join(str(p) if not isinstance(p, list | tuple) else
                     (str(p[0]) if len(p) == 2 and p[0] == p[1] else "-".join(map(str, p)))
                     for p in ports)
    text = f"{args.get('proto', '?')} {args.get('cidr', '?')}"
    if shown:
        text += f" port {shown}"
    return text + f", {args.get('direction', 'both')}"


def _title(rec: AuditRecord) -> str:
    text = f"#{rec.seq} {rec.action} {rec.outcome} by {rec.actor}: {rec.reason}"
    return text + (f" [{rec.ticket}]" if rec.ticket else "")


def changes_of(rec: AuditRecord) -> list[tuple[str, dict[str, Any]]]:
    """(gateway, fields of Condition that this record sets) for every gateway it touched."""
    out: list[tuple[str, dict[str, Any]]] = []
    detail = rec.detail
    if rec.action in STATE_ACTIONS and rec.outcome != "requested":
        for res in detail.get("results") or []:
            if not isinstance(res, dict) or not isinstance(res.get("gateway"), str):
                continue
            if res.get("outcome") == "unreachable":
                out.append((res["gateway"], {"reachable": False}))
            elif res.get("state") in ("open", "isolated"):
                out.append((res["gateway"], {
                    "state": res["state"], "profile": res.get("profile"), "reachable": True,
                    "verification": res.get("verification")}))
    elif rec.action.startswith("state.") and rec.targets:
        kind = rec.action.removeprefix("state.")
        fields: dict[str, Any] = {}
        if kind == "unreachable":
            fields = {"reachable": False}
        elif kind in ("reachable", "first_contact", "changed", "drift_repaired"):
            fields = {"reachable": True}
            if detail.get("state") in ("open", "isolated"):
                fields.update(state=detail["state"], profile=detail.get("profile"),
                              verification=detail.get("verification"))
        elif kind in ("verified", "unverified"):
            fields = {"reachable": True, "verification": kind}
        if fields:
            out.extend((gw, fields) for gw in rec.targets)
    return out


def marks_of(rec: AuditRecord) -> list[Mark]:
    """The marks one record puts on the lanes (decisions and notable observations)."""
    if rec.outcome == "requested" and rec.action != "restore.plan":
        return []  # the result record carries the mark (it says what happened)
    kind: str | None = None
    gateways: Sequence[str] = rec.targets
    if rec.action == "restore.plan":
        kind = "plan"
    elif rec.action in STATE_ACTIONS and rec.detail.get("stage"):
        kind = "stage"
    elif rec.action in STATE_ACTIONS or rec.action == "allow":
        kind = rec.action
    elif rec.action == "state.changed":
        kind = "changed"
    elif rec.action == "state.drift_repaired":
        kind = "drift"
    if kind is None:
        return []
    if rec.action in STATE_ACTIONS or rec.action == "allow":
        results = [r for r in rec.detail.get("results") or [] if isinstance(r, dict)]
        if results:
            gateways = [str(r.get("gateway")) for r in results]
    at = rec.ts_us / 1e6
    return [Mark(at=at, kind=kind, seq=rec.seq, gateway=gw, title=_title(rec))
            for gw in gateways]


def _allowed(rec: AuditRecord) -> list[str]:
    """Gateways on which an allow record's exception actually went in."""
    if rec.action != "allow" or rec.outcome == "requested":
        return []
    return [str(r["gateway"]) for r in rec.detail.get("results") or []
            if isinstance(r, dict) and r.get("ok") and "gateway" in r]


# -- folding ---------------------------------------------------------------------------


def conditions_at(records: Iterable[AuditRecord],
                  start: Mapping[str, Condition] | None = None) -> dict[str, Condition]:
    """Every gateway's condition after `records` (in seq order), from `start`."""
    known = dict(start or {})
    for rec in sorted(records, key=lambda r: r.seq):
        for gw, fields in changes_of(rec):
            known[gw] = replace(known.get(gw, Condition()), **fields)
    return known


@dataclass
class _LaneBuilder:
    gateway: str
    window: Window
    condition: Condition
    started: float
    seq: int | None = None

    def __post_init__(self) -> None:
        self.segments: list[Segment] = []
        self.marks: list[Mark] = []
        self.open_exceptions: list[ExceptionSpan] = []
        self.exceptions: list[ExceptionSpan] = []

    def change(self, at: float, condition: Condition, seq: int) -> None:
        if condition == self.condition:
            return
        self._close(at)
        if self.condition.state == "isolated" and condition.state == "open":
            self._end_exceptions(at, f"restore #{seq}")
        self.condition, self.started, self.seq = condition, at, seq

    def _close(self, at: float) -> None:
        if at > self.started:
            self.segments.append(Segment(self.started, at, self.condition, self.seq))

    def _end_exceptions(self, at: float, why: str) -> None:
        for span in self.open_exceptions:
            ended = span.expires_at <= at
            self.exceptions.append(replace(
                span, closed_at=span.expires_at if ended else at,
                closed_by="expiry" if ended else why))
        self.open_exceptions = []

    def finish(self) -> Lane:
        self._close(self.window.until)
        for span in self.open_exceptions:
            self.exceptions.append(span)  # closes at expiry as far as the log knows
        shown = [s for s in self.exceptions
                 if self.window.clip(s.opened_at, max(s.closed_at, s.opened_at + 1e-6))]
        return Lane(self.gateway, tuple(self.segments), tuple(self.marks),
                    tuple(sorted(shown, key=lambda s: s.seq)))


def build_timeline(records: Sequence[AuditRecord], gateways: Sequence[str], window: Window,
                   *, before: Sequence[AuditRecord] = ()) -> Timeline:
    """Lanes for `gateways` (plus any other gateway the records name) over `window`.

    `records` are the window's records; `before` are earlier records that say what
    each gateway was when the window opened (and which exceptions were still live).
    """
    start = conditions_at(r for r in before if r.ts_us / 1e6 < window.since)
    names = list(dict.fromkeys([*gateways, *(g for r in records for g, _ in changes_of(r))]))
    lanes = {gw: _LaneBuilder(gw, window, start.get(gw, Condition()), window.since)
             for gw in names}
    early = [r for r in before if r.ts_us / 1e6 < window.since]
    inside = [r for r in records if window.since <= r.ts_us / 1e6 <= window.until]
    for rec in sorted(early, key=lambda r: r.seq):
        _exceptions(rec, lanes, window, early=True)
    for rec in sorted(inside, key=lambda r: r.seq):
        at = rec.ts_us / 1e6
        for gw, fields in changes_of(rec):
            lane = lanes.setdefault(gw, _LaneBuilder(gw, window, Condition(), window.since))
            lane.change(at, replace(lane.condition, **fields), rec.seq)
        for mark in marks_of(rec):
            if mark.gateway in lanes:
                lanes[mark.gateway].marks.append(mark)
        _exceptions(rec, lanes, window, early=False)
    return Timeline(window, tuple(lanes[n].finish() for n in lanes))


def _exceptions(rec: AuditRecord, lanes: dict[str, _LaneBuilder], window: Window,
                *, early: bool) -> None:
    """Open spans for an allow record; before the window, replay restores too."""
    at = rec.ts_us / 1e6
    if early:  # a restore before the window already closed what was open then
        for gw, fields in changes_of(rec):
            if fields.get("state") == "open" and gw in lanes:
                lanes[gw].open_exceptions = []
    args = rec.detail.get("args") or {}
    try:
        seconds = float(args.get("duration_seconds") or 0)
    except (TypeError, ValueError):
        seconds = 0.0
    for gw in _allowed(rec):
        if gw not in lanes or seconds <= 0:
            continue
        span = ExceptionSpan(gateway=gw, seq=rec.seq, opened_at=at, expires_at=at + seconds,
                             closed_at=at + seconds, closed_by="expiry",
                             flow=describe_flow(args), actor=rec.actor, reason=rec.reason,
                             ticket=rec.ticket)
        if early and span.expires_at <= window.since:
            continue
        lanes[gw].open_exceptions.append(span)
