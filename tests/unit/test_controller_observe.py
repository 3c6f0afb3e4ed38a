"""State-history events from successive polls (pure)."""

from __future__ import annotations

from typing import Any

from controller.errors import TransportError
from controller.observe import events_for_error, events_for_status
from controller.states import GatewayState, Pending
from controller.transport.protocol import AgentStatus


def status(**kw: Any) -> AgentStatus:
    base: dict[str, Any] = {"gateway": "gw", "state": "isolated", "profile": "internet",
                            "actor": "alice", "reason": "incident", "in_sync": True,
                            "verification": {"status": "verified"}, "generation": 4,
                            "drift_repairs": 0}
    return AgentStatus.model_validate({**base, **kw})


SEEN = GatewayState(name="gw", reachable=True, observed_at=1.0, state="isolated",
                    profile="internet", verification="verified", in_sync=True, generation=4,
                    drift_repairs=0)


def kinds(events: list[Any]) -> list[str]:
    return [e.kind for e in events]


def test_first_contact_then_quiet() -> None:
    assert kinds(events_for_status(GatewayState(name="gw"), status())) == ["first_contact"]
    assert events_for_status(SEEN, status()) == []


def test_unreachable_once_then_back() -> None:
    err = TransportError("gw: connection refused")
    assert kinds(events_for_error(SEEN, err)) == ["unreachable"]
    down = SEEN.model_copy(update={"reachable": False, "last_error_code": "unreachable"})
    assert events_for_error(down, err) == []  # no flood while it stays down
    assert kinds(events_for_error(down, TransportError("x", code="host_key_mismatch"))) == \
        ["unreachable"]
    assert kinds(events_for_status(down, status())) == ["reachable"]


def test_break_glass_change_is_noticed() -> None:
    events = events_for_status(SEEN, status(generation=5, state="open", profile=None,
                                            actor="root@console", reason="break-glass"))
    assert kinds(events) == ["changed"]
    assert "root@console" in events[0].message and "break-glass" in events[0].message


def test_our_own_late_change_is_not_reported_as_foreign() -> None:
    pending = Pending(command_id="c", action="isolate", op="isolate",
                      args={"profile": "full"}, actor="alice", reason="incident",
                      accepted_at=0.0)
    prev = SEEN.model_copy(update={"pending": pending})
    assert events_for_status(prev, status(generation=5, profile="full")) == []


def test_verification_and_drift() -> None:
    lost = events_for_status(SEEN, status(verification={"status": "unverified",
                                                         "failing": ["outside-web"]}))
    assert kinds(lost) == ["unverified"] and "outside-web" in lost[0].message
    bad = SEEN.model_copy(update={"in_sync": False})
    assert kinds(events_for_status(bad, status())) == ["verified"]
    drift = events_for_status(SEEN, status(drift_repairs=2))
    assert kinds(drift) == ["drift_repaired"] and "2 times" in drift[0].message
    assert events_for_status(SEEN.model_copy(update={"drift_repairs": 5}), status()) == []
