"""Status polls: what every gateway says now, the state-history events that follow,
and pending changes retried once a gateway answers again.

A poll is cheap and gets out of the way of commands. It asks for the terse status
(`{"elements": false}`: no read-back of set contents, which the agent's own
reconcile loop compares; an older agent that does not know the argument gets the
plain request), on the poll lane of the gateway's session, and takes no turn: a
command never waits for it. So a poll can finish after a command it started
before. It reads the gateway's row version before asking and writes only if the
row is still at that version (under the row lock); otherwise a command, or
another controller, wrote newer facts meanwhile and this poll's are dropped (the
next poll reads them again).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from controller.audit import AuditEvent
from controller.errors import AgentError, ControllerError, TransportError
from controller.inventory import Gateway
from controller.observe import StateEvent, events_for_error, events_for_status
from controller.states import GatewayState, Pending
from controller.transport.link import GatewayLink
from controller.transport.protocol import AgentStatus

if TYPE_CHECKING:
    from controller.service import Controller

log = logging.getLogger("drawbridge.controller.polling")

SYSTEM_ACTOR = "controller"
TERSE_STATUS: dict[str, Any] = {"elements": False}


class Polls:
    def __init__(self, ctl: Controller) -> None:
        self.ctl = ctl
        self._round = threading.Lock()  # one round at a time
        self._plain_status: set[str] = set()  # gateways whose agent predates TERSE_STATUS
        self._plain_lock = threading.Lock()

    def poll_once(self) -> dict[str, bool]:
        """Read every gateway's status; record what changed; retry pending changes.
        Returns who answered (gateways whose poll raised are left out)."""
        ctl = self.ctl
        with self._round:
            gateways = ctl.mine(ctl.inventory.all())  # as a replica: those it holds
            seen = ctl.fleet.map_background(gateways, self.poll_one)
            reach = {g.name: bool(r) for g, r in zip(gateways, seen, strict=True)
                     if r is not None}
            self.retry_pending(gateways, reach)
            return reach

    def poll_soon(self, names: Sequence[str]) -> None:
        """Poll these gateways in the background, now (a replica that just took their
        leases: their sessions come up before a command needs them). Not with polls
        switched off."""
        if not self.ctl.config.poll.enabled:
            return
        wanted = set(names)
        gateways = [g for g in self.ctl.inventory.all() if g.name in wanted]
        if gateways:
            threading.Thread(target=self.ctl.fleet.map_background,
                             args=(gateways, self.poll_one), name="poll-taken",
                             daemon=True).start()

    def _status(self, gw: Gateway, link: GatewayLink) -> Any:
        ctl = self.ctl
        timeout = ctl.config.poll.timeout_seconds
        with self._plain_lock:
            plain = gw.name in self._plain_status
        try:
            return link.call("status", {} if plain else TERSE_STATUS, respect_backoff=True,
                             timeout=timeout, lane="poll")
        except AgentError as exc:
            if plain or exc.code != "bad_request":
                raise
        with self._plain_lock:  # an agent from before the terse status
            self._plain_status.add(gw.name)
        return link.call("status", {}, respect_backoff=True, timeout=timeout, lane="poll")

    def poll_one(self, gw: Gateway, link: GatewayLink) -> bool:
        ctl = self.ctl
        prev = ctl.states.get(gw.name)
        try:
            status = AgentStatus.model_validate(self._status(gw, link))
        except (TransportError, ValidationError, ControllerError) as exc:
            error = exc if isinstance(exc, TransportError) else TransportError(
                f"{gw.name}: {exc}", code=getattr(exc, "code", "protocol_error"))
            ctl.metrics.polls.labels(result="unreachable").inc()
            ctl.host_key_bookkeeping(gw, link, error.code)
            if self._write(prev, reachable=False, last_error_code=error.code,
                           last_error=error.message,
                           host_key_seen=link.host_key_seen or prev.host_key_seen):
                self.record_events(gw, events_for_error(prev, error))
            return False
        if status.provisional:  # a reload or a console change awaiting confirmation
            ctl.confirm_provisional(gw, link, status.provisional)
        now = ctl.clock()
        ctl.metrics.polls.labels(result="ok").inc()
        ctl.host_key_bookkeeping(gw, link, None)
        if self._write(
                prev, reachable=True, last_contact_at=now, last_error_code=None,
                last_error=None, state=status.state, profile=status.profile,
                verification=status.verification.status, in_sync=status.in_sync,
                generation=status.generation, since=status.since, gw_actor=status.actor,
                gw_reason=status.reason, drift_repairs=status.drift_repairs,
                problems=status.problems, exceptions=status.exceptions, observed_at=now,
                host_key_seen=link.host_key_seen, agent_version=status.agent_version or None,
                config_digest=status.config_digest or None, profiles=status.profiles):
            self.record_events(gw, events_for_status(prev, status))
        return True

    def _write(self, seen: GatewayState, **changes: Any) -> bool:
        """Write `changes` unless the row changed since `seen` was read."""
        written = False

        def unless_newer(current: GatewayState) -> dict[str, Any] | None:
            nonlocal written
            if current.row_version != seen.row_version:
                return None
            written = True
            return changes

        self.ctl.states.modify(seen.name, unless_newer)
        return written

    def _forget(self, name: str, pending: Pending) -> bool:
        """Drop `pending` unless a newer command replaced it since it was read (its own
        pending must survive). True if dropped."""
        dropped = False

        def if_still(current: GatewayState) -> dict[str, Any] | None:
            nonlocal dropped
            if current.pending is None or current.pending.command_id != pending.command_id:
                return None
            dropped = True
            return {"pending": None}

        self.ctl.states.modify(name, if_still)
        return dropped

    def record_events(self, gw: Gateway, events: list[StateEvent]) -> None:
        for ev in events:
            self.ctl.record(AuditEvent(actor=SYSTEM_ACTOR, action=f"state.{ev.kind}",
                                       outcome="observed", reason=ev.message,
                                       targets=(gw.name,), detail=ev.detail))

    def retry_pending(self, gateways: Sequence[Gateway], reach: dict[str, bool]) -> None:
        ctl = self.ctl
        now = ctl.clock()
        batches: dict[str, tuple[Pending, list[Gateway]]] = {}
        for gw in gateways:
            st = ctl.states.get(gw.name)
            p = st.pending
            if p is None or not reach.get(gw.name) or ctl.in_flight(p.command_id, gw.name):
                continue  # nothing owed, still down, or being delivered right now
            if now - p.accepted_at > ctl.config.fleet.pending_ttl_seconds:
                if not self._forget(gw.name, p):
                    continue
                self.record_events(gw, [StateEvent(
                    "pending_expired", f"{gw.name}: gave up {p.action} accepted "
                    f"{now - p.accepted_at:.0f}s ago (command {p.command_id}); it was never "
                    "delivered", {"command_id": p.command_id})])
                continue
            if p.delivered(st):  # the request got there after all; only its answer was lost
                if self._forget(gw.name, p):
                    self.record_events(gw, [StateEvent(
                        "pending_delivered", f"{gw.name}: {p.action} (command "
                        f"{p.command_id}) found applied; its answer had been lost",
                        {"command_id": p.command_id})])
                continue
            batches.setdefault(p.command_id, (p, []))[1].append(gw)
        for p, members in batches.values():
            log.info("retrying %s on %s", p.action, ", ".join(g.name for g in members))
            ctl.run_command(members, action=p.action, op=p.op, actor=p.actor,
                            reason=p.reason, ticket=p.ticket, args=p.args, retry_of=p)
