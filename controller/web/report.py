"""The incident report's content (pure): what was done, what was open, for how long.

Built from a Timeline (states over the window) and the window's audit records.
Every row names the audit `seq` it comes from, and the report carries the
chain's head hash and checkpoint hashes of the moment it was made, so that a
printed report can later be checked against the audit log: the rows must be
the records with those numbers, and the chain must still lead to that head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from controller.audit import AuditRecord, VerifyReport
from controller.web.sources import Checkpoint, PlanView
from controller.web.timeline import ExceptionSpan, Timeline


@dataclass(frozen=True)
class GatewayTime:
    gateway: str
    isolated_seconds: float
    unreachable_seconds: float
    unknown_seconds: float
    by_profile: tuple[tuple[str, float], ...]  # (profile, seconds isolated with it)
    isolated_at_end: bool


@dataclass(frozen=True)
class ChainHead:
    seq: int
    hash: str


@dataclass(frozen=True)
class Report:
    since: float
    until: float
    generated_at: float
    generated_by: str
    actions: tuple[AuditRecord, ...]
    exceptions: tuple[ExceptionSpan, ...]
    gateways: tuple[GatewayTime, ...]
    plans: tuple[PlanView, ...]
    verify: VerifyReport
    head: ChainHead | None
    checkpoint: Checkpoint | None
    timeline: Timeline

    @property
    def first_seq(self) -> int | None:
        return self.actions[0].seq if self.actions else None

    @property
    def last_seq(self) -> int | None:
        return self.actions[-1].seq if self.actions else None


def gateway_times(timeline: Timeline) -> tuple[GatewayTime, ...]:
    """Time isolated (by profile), unreachable and unknown per gateway, inside the window."""
    out: list[GatewayTime] = []
    for lane in timeline.lanes:
        isolated = unreachable = unknown = 0.0
        profiles: dict[str, float] = {}
        for seg in lane.segments:
            clipped = timeline.window.clip(seg.start, seg.end)
            if clipped is None:
                continue
            seconds = clipped[1] - clipped[0]
            cond = seg.condition
            if cond.state == "isolated":
                isolated += seconds
                name = cond.profile or "internet"
                profiles[name] = profiles.get(name, 0.0) + seconds
            elif cond.state == "unknown":
                unknown += seconds
            if cond.reachable is False:
                unreachable += seconds
        last = lane.segments[-1].condition if lane.segments else None
        out.append(GatewayTime(
            gateway=lane.gateway, isolated_seconds=isolated, unreachable_seconds=unreachable,
            unknown_seconds=unknown, by_profile=tuple(sorted(profiles.items())),
            isolated_at_end=last is not None and last.state == "isolated"))
    return tuple(out)


def exceptions_in(timeline: Timeline) -> tuple[ExceptionSpan, ...]:
    """Every exception that was open at some point of the window, in seq order."""
    spans = [e for lane in timeline.lanes for e in lane.exceptions]
    return tuple(sorted(spans, key=lambda e: (e.seq, e.gateway)))


def build_report(*, timeline: Timeline, records: Sequence[AuditRecord], verify: VerifyReport,
                 head: ChainHead | None, checkpoint: Checkpoint | None,
                 plans: Sequence[PlanView], generated_at: float,
                 generated_by: str) -> Report:
    window = timeline.window
    actions = tuple(sorted((r for r in records
                            if window.since <= r.ts_us / 1e6 <= window.until),
                           key=lambda r: r.seq))
    return Report(since=window.since, until=window.until, generated_at=generated_at,
                  generated_by=generated_by, actions=actions,
                  exceptions=exceptions_in(timeline), gateways=gateway_times(timeline),
                  plans=tuple(plans), verify=verify, head=head, checkpoint=checkpoint,
                  timeline=timeline)
