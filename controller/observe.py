"""From two successive looks at a gateway to state-history events (pure).

The scheduler polls every gateway; what changed between the last look and
this one becomes an event in the audit log: the agent went away or came back,
the gateway was changed through its local break-glass CLI, its ruleset
drifted and was repaired, or its isolation stopped being verified.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from controller.errors import TransportError
from controller.states import GatewayState
from controller.transport.protocol import AgentStatus


@dataclass(frozen=True)
class StateEvent:
    kind: str  # the audit action: state.<kind>
    message: str
    detail: dict[str, Any] = field(default_factory=dict)


def _describe(status: AgentStatus) -> str:
    shown = status.state + (f" ({status.profile})" if status.profile else "")
    return f"{shown}, set by {status.actor or '?'}: {status.reason or '-'}"


def _healthy(in_sync: bool | None, verification: str | None, state: str | None) -> bool:
    if in_sync is False:
        return False
    return not (state == "isolated" and verification == "unverified")


def events_for_error(prev: GatewayState, error: TransportError) -> list[StateEvent]:
    if prev.reachable is False and prev.last_error_code == error.code:
        return []
    return [StateEvent("unreachable", f"{prev.name}: agent unreachable: {error.message}",
                       {"error_code": error.code})]


def events_for_status(prev: GatewayState, status: AgentStatus) -> list[StateEvent]:
    name = prev.name
    events: list[StateEvent] = []
    snapshot = {"state": status.state, "profile": status.profile,
                "generation": status.generation, "verification": status.verification.status,
                "in_sync": status.in_sync, "actor": status.actor, "reason": status.reason}
    if prev.reachable is False:
        events.append(StateEvent("reachable", f"{name}: agent reachable again; gateway is "
                                 f"{_describe(status)}", snapshot))
    elif prev.observed_at is None:
        events.append(StateEvent("first_contact", f"{name}: first contact; gateway is "
                                 f"{_describe(status)}", snapshot))
    pending = prev.pending
    ours = pending is not None and status.actor == pending.actor \
        and status.reason == pending.reason
    if prev.generation is not None and status.generation != prev.generation and not ours:
        events.append(StateEvent(
            "changed", f"{name}: changed outside the controller (local CLI or another "
            f"controller): now {_describe(status)}", snapshot))
    was = _healthy(prev.in_sync, prev.verification, prev.state)
    now = _healthy(status.in_sync, status.verification.status, status.state)
    if prev.observed_at is not None and was and not now:
        why = "; ".join(status.problems) or ", ".join(status.verification.failing) or "?"
        events.append(StateEvent("unverified", f"{name}: state no longer verified: {why}",
                                 {**snapshot, "problems": status.problems,
                                  "failing": status.verification.failing}))
    elif prev.observed_at is not None and not was and now:
        events.append(StateEvent("verified", f"{name}: state verified again", snapshot))
    if prev.drift_repairs is not None and status.drift_repairs > prev.drift_repairs:
        count = status.drift_repairs - prev.drift_repairs
        events.append(StateEvent(
            "drift_repaired", f"{name}: the agent repaired drift of its ruleset "
            f"({count} time{'s' if count > 1 else ''} since the last poll)",
            {**snapshot, "repairs": count}))
    return events
