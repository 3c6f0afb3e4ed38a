"""The fleet at a glance (pure): each gateway's state in words, since when, its live
exceptions with the time they have left (computed here, on the server: the page
needs no JavaScript)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from controller.schemas import GatewayView
from controller.web.timeline import describe_flow


@dataclass(frozen=True)
class ExceptionRow:
    flow: str
    expires_at: float
    remaining_seconds: float
    actor: str
    reason: str


@dataclass(frozen=True)
class FleetRow:
    name: str
    state: str  # isolated | open | unknown
    profile: str | None
    verified: str  # verified | unverified | unknown
    reachable: str  # reachable | unreachable | unknown
    since: float | None
    actor: str | None
    reason: str | None
    exceptions: tuple[ExceptionRow, ...]
    pending: str | None
    problem: str | None


def verified_word(view: GatewayView) -> str:
    if view.state not in ("open", "isolated"):
        return "unknown"
    return "verified" if view.verification == "verified" and view.in_sync is not False \
        else "unverified"


def _exception(raw: dict[str, Any], now: float) -> ExceptionRow | None:
    try:
        expires = float(raw["expires_at"])
    except (KeyError, TypeError, ValueError):
        return None
    flow = raw.get("flow") if isinstance(raw.get("flow"), dict) else raw
    assert isinstance(flow, dict)
    return ExceptionRow(flow=describe_flow(flow), expires_at=expires,
                        remaining_seconds=max(0.0, expires - now),
                        actor=str(raw.get("actor", "")), reason=str(raw.get("reason", "")))


def fleet_rows(views: Sequence[GatewayView], now: float) -> list[FleetRow]:
    rows: list[FleetRow] = []
    for v in views:
        exceptions = [e for raw in v.exceptions if (e := _exception(raw, now)) is not None
                      and e.remaining_seconds > 0]
        pending = None
        if v.pending is not None:
            pending = f"{v.pending.action}" + (f" ({v.pending.profile})"
                                               if v.pending.profile else "")
        problem = v.last_error if v.reachable is False else ("; ".join(v.problems) or None)
        rows.append(FleetRow(
            name=v.name, state=v.state if v.state in ("open", "isolated") else "unknown",
            profile=v.profile, verified=verified_word(v),
            reachable="unknown" if v.reachable is None
            else ("reachable" if v.reachable else "unreachable"),
            since=v.since or None, actor=v.actor, reason=v.reason,
            exceptions=tuple(sorted(exceptions, key=lambda e: e.expires_at)),
            pending=pending, problem=problem))
    return rows
