"""Commit-confirmed: which provisional change goes back to what, if nobody confirms it.

Pure: the engine applies what these functions decide. The rule is fail closed: a
rollback returns to the previous *closed* state, never to open.

| change (unconfirmed)            | at the deadline                                    |
|---------------------------------|----------------------------------------------------|
| isolate of an open gateway      | stays isolated, reported `unconfirmed`             |
| isolate: profile A -> B         | back to A                                          |
| restore (from profile A)        | isolated again with A                              |
| allow                           | the new exception is revoked                       |
| config reload                   | the previous config (the daemon keeps it)          |
"""

from __future__ import annotations

from agent.state import DesiredState, Provisional


def provisional_for(action: str, old: DesiredState, *, seconds: int | None, now: float,
                    request_id: str | None, exception_id: str | None = None,
                    config_digest: str | None = None) -> Provisional | None:
    """The provisional marker for a change of `old` by `action`, or None (final)."""
    if seconds is None:
        return None
    base = {"action": action, "request_id": request_id, "started_at": now,
            "deadline": now + seconds}
    if action == "isolate":
        if old.isolated:
            return Provisional(**base, back_to_profile=old.profile)
        return Provisional(**base, keep=True)
    if action == "restore":
        return Provisional(**base, back_to_profile=old.profile) if old.isolated else None
    if action == "allow":
        return Provisional(**base, revoke_exception=exception_id)
    if action == "reload":
        return Provisional(**base, config_digest=config_digest)
    raise ValueError(f"{action} cannot be provisional")


def due(state: DesiredState, now: float) -> Provisional | None:
    p = state.provisional
    return p if p is not None and now >= p.deadline else None


def why(p: Provisional) -> str:
    return f"{p.action} not confirmed within {p.deadline - p.started_at:.0f}s"


def rolled_back(state: DesiredState, p: Provisional, now: float) -> DesiredState:
    """The state to go back to for a profile rollback (`back_to_profile` set)."""
    assert p.back_to_profile is not None
    return DesiredState(
        profile=p.back_to_profile, since=now, actor="agent", reason=why(p),
        exceptions=state.live_exceptions(now) if state.isolated else (),
        generation=state.generation + 1,
    )
