"""Exceptions (`allow`, `extend`, `revoke`): element changes of the live table, one small
transaction whatever the allowlist size, counters kept (see exceptions.py for what
may be opened)."""

from __future__ import annotations

import uuid
from typing import Any

from agent import exceptions
from agent.config import FlowRule
from agent.engine_core import EngineCore, who_of
from agent.nft.offload import cut_offloaded
from agent.nft.render import (
    render_element_change,
)
from agent.replay import RequestRef, replay
from agent.requests import (
    AllowRequest,
    ExtendRequest,
    RevokeRequest,
)
from agent.results import (
    ChangeResult,
)
from agent.state import (
    DesiredState,
    ExceptionEntry,
)


class ExceptionVerbs(EngineCore):
    """allow, extend, revoke: exceptions as element changes of the live table."""

    def allow(self, req: AllowRequest, ref: RequestRef | None = None) -> ChangeResult:
        flow = FlowRule(cidr=req.cidr, proto=req.proto, ports=req.ports,
                        direction=req.direction)
        exceptions.check_allowed(self.config, flow, req.duration_seconds)
        with self.store.locked():
            if (first := replay(self.store.journal_log, ref)) is not None:
                return ChangeResult.model_validate(first)
            old = self.store.load()
            exceptions.check_isolated(old, "except")
            now = self.clock()
            live = old.live_exceptions(now)
            exceptions.check_no_overlap(flow, live)
            entry = ExceptionEntry(
                id=uuid.uuid4().hex[:12], flow=flow,
                expires_at=now + req.duration_seconds, created_at=now,
                actor=req.actor, reason=req.reason, ticket=req.ticket,
            )
            provisional = self._provisional("allow", old, req.confirm_within_seconds, ref,
                                            exception_id=entry.id)
            new = old.model_copy(update={
                "exceptions": (*live, entry), "generation": old.generation + 1,
                **({"provisional": provisional} if provisional else {})})
            who = {**who_of(req, ref), "exception": entry.model_dump(mode="json")}
            changes = exceptions.element_changes(entry, now)
            return self._change_elements("allow", new, old, who, lambda: self.nft.apply_text(
                render_element_change(add=changes)))

    def extend(self, req: ExtendRequest, ref: RequestRef | None = None) -> ChangeResult:
        with self.store.locked():
            if (first := replay(self.store.journal_log, ref)) is not None:
                return ChangeResult.model_validate(first)
            old = self.store.load()
            exceptions.check_isolated(old, "extend")
            now = self.clock()
            entry = exceptions.find(old, req.id, now)
            exceptions.check_allowed(self.config, entry.flow, req.duration_seconds)
            longer = entry.model_copy(update={"expires_at": now + req.duration_seconds})
            new = old.model_copy(update={
                "exceptions": tuple(longer if e.id == req.id else e
                                    for e in old.live_exceptions(now)),
                "generation": old.generation + 1,
            })
            who = {**who_of(req, ref), "exception": longer.model_dump(mode="json")}
            before = exceptions.element_changes(entry, now)
            after = exceptions.element_changes(longer, now)
            return self._change_elements("extend", new, old, who,
                                         lambda: self.kernel.extend_elements(before, after))

    def revoke(self, req: RevokeRequest, ref: RequestRef | None = None) -> ChangeResult:
        with self.store.locked():
            if (first := replay(self.store.journal_log, ref)) is not None:
                return ChangeResult.model_validate(first)
            old = self.store.load()
            exceptions.check_isolated(old, "revoke")
            now = self.clock()
            entry = exceptions.find(old, req.id, now)
            who = {**who_of(req, ref), "exception": entry.model_dump(mode="json")}
            return self._revoke("revoke", old, entry, who, now)

    def _revoke(self, action: str, old: DesiredState, entry: ExceptionEntry,
                who: dict[str, Any], now: float) -> ChangeResult:
        new = old.model_copy(update={
            "exceptions": tuple(e for e in old.live_exceptions(now) if e.id != entry.id),
            "generation": old.generation + 1,
        })
        gone = exceptions.element_changes(entry, now)

        def apply() -> None:
            # connections of the revoked flow lose their related-ICMP pass at once, and
            # any of them that a flowtable carried is torn down
            self.nft.apply_text(render_element_change(remove=gone, forget_live=True))
            if self.stats.bypass:
                cut_offloaded()

        return self._change_elements(action, new, old, who, apply)

    # -- commit-confirmed (confirm.py) ----------------------------------------------------

    def list_exceptions(self) -> list[dict[str, object]]:
        state = self.store.load()
        now = self.clock()
        return exceptions.listing(state.live_exceptions(now), now)

