"""The agent's verbs: isolate, restore, confirm and roll back, reload, reconcile, status.

Every change follows the same path under the agent lock (engine_core.py):
validate -> render -> dry check -> write desired state -> one atomic nft
transaction -> read back and compare -> verify -> journal (with the request id,
so a repeated request is answered, not applied again: replay.py). Exceptions
are in engine_exceptions.py, what the kernel is asked in kernel.py.
"""

from __future__ import annotations

import time

from agent.config import AgentConfig
from agent.confirm import due as confirm_due
from agent.confirm import rolled_back as confirm_rolled_back
from agent.confirm import why as confirm_why
from agent.engine_core import who_of
from agent.engine_exceptions import ExceptionVerbs
from agent.errors import ConflictError, DrawbridgeError, InputError, NftError, StateError
from agent.nft.offload import cut_offloaded
from agent.nft.render import (
    render_element_change,
)
from agent.replay import RequestRef, ok_answer, replay
from agent.requests import (
    ConfirmRequest,
    IsolateRequest,
    RestoreRequest,
)
from agent.resolve import ManagementHosts
from agent.results import (
    ChangeResult,
    Phases,
    Status,
    with_bypass,
)
from agent.state import (
    DesiredState,
)
from agent.version import package_version

# status reads set contents back only up to this size (a 100k listing takes seconds);
# beyond it, status compares structure and the reconcile loop's full checks cover elements
STATUS_FULL_READ_LIMIT = 10_000



class Engine(ExceptionVerbs):
    def isolate(self, req: IsolateRequest, ref: RequestRef | None = None) -> ChangeResult:
        try:  # unknown profile: bad input, refused before the lock
            self.config.profile(req.profile)
        except DrawbridgeError as exc:
            raise InputError(str(exc)) from None
        with self.store.locked():
            if (first := replay(self.store.journal_log, ref)) is not None:
                return ChangeResult.model_validate(first)
            old = self.store.load()
            now = self.clock()
            if old.profile == req.profile and (noop := self._unchanged("isolate", old, req,
                                                                         ref)):
                return noop
            # Exceptions live only while isolated: moving between profiles keeps them (the
            # answer lists them); an open gateway has none to carry (an older agent could
            # record some while open: they are dropped, and the answer says so).
            carried = old.live_exceptions(now) if old.isolated else ()
            dropped = len(old.live_exceptions(now)) - len(carried)
            new = DesiredState(
                profile=req.profile,
                since=old.since if old.profile == req.profile else now,
                actor=req.actor, reason=req.reason,
                exceptions=carried, generation=old.generation + 1,
                provisional=self._provisional("isolate", old, req.confirm_within_seconds, ref),
            )
            notes = []
            if carried:
                notes.append(f"{len(carried)} live exception(s) stay in force: "
                             + ", ".join(e.id for e in carried))
            if dropped:
                notes.append(f"{dropped} exception(s) recorded while open were discarded")
            return self._change("isolate", new, old, who_of(req, ref), "; ".join(notes))

    def restore(self, req: RestoreRequest, ref: RequestRef | None = None) -> ChangeResult:
        with self.store.locked():
            if (first := replay(self.store.journal_log, ref)) is not None:
                return ChangeResult.model_validate(first)
            old = self.store.load()
            if not old.isolated and (noop := self._unchanged("restore", old, req, ref)):
                return noop
            new = DesiredState(profile=None, since=self.clock(), actor=req.actor,
                               reason=req.reason, generation=old.generation + 1,
                               provisional=self._provisional(
                                   "restore", old, req.confirm_within_seconds, ref))
            return self._change("restore", new, old, who_of(req, ref))

    def _unchanged(self, action: str, state: DesiredState, req: IsolateRequest | RestoreRequest,
                   ref: RequestRef | None) -> ChangeResult | None:
        """The answer to a request that would change nothing (the profile or the open
        state already in force, and the kernel holding it): no apply, no counter reset,
        no new generation; journaled as a request all the same. None if the kernel
        differs: then the request is applied (and repairs it)."""
        policy = self.policy_for(state)
        if self.kernel.compare(policy, elements=False):
            return None
        if policy is not None and self.kernel.compare_exception_sets(policy):
            return None
        who = who_of(req, ref)
        what = f"isolated with profile {state.profile}" if state.isolated else "open"
        result = ChangeResult(
            action=action, gateway=self.config.gateway,
            state="isolated" if state.isolated else "open", profile=state.profile,
            changed=False, in_sync=True, verification=state.verification, apply_seconds=0.0,
            generation=state.generation, request_id=who.get("request_id"),
            note=f"already {what}; nothing changed",
        )
        self.store.journal(action=action, profile=state.profile, result="noop",
                           generation=state.generation, **who,
                           answer=ok_answer(result.model_dump(mode="json")))
        return result

    def confirm(self, req: ConfirmRequest, ref: RequestRef | None = None) -> ChangeResult:
        """The provisional change in force becomes final."""
        with self.store.locked():
            if (first := replay(self.store.journal_log, ref)) is not None:
                return ChangeResult.model_validate(first)
            state = self.store.load()
            pending = state.provisional
            if pending is not None and req.request_id not in (None, pending.request_id):
                raise ConflictError(f"the provisional change is request "
                                    f"{pending.request_id!r}, not {req.request_id!r}")
            if pending is not None:
                state = state.model_copy(update={"provisional": None})
                self.store.save(state)
            result = self._result("confirm", state, changed=pending is not None,
                                  note=f"{pending.action} confirmed" if pending
                                  else "nothing to confirm", ref=ref)
            self.store.journal(action="confirm", profile=state.profile,
                               result="confirmed" if pending else "noop",
                               confirmed=pending.request_id if pending else None,
                               **who_of(req, ref), answer=ok_answer(result.model_dump(mode="json")))
            return result

    def expire(self) -> ChangeResult | None:
        """Roll back a provisional change whose deadline passed (the daemon asks every
        second). None when there is nothing due."""
        with self.store.locked(timeout=5.0):
            state = self.store.load()
            now = self.clock()
            due = confirm_due(state, now)
            if due is None:
                return None
            who = {"actor": "agent", "reason": confirm_why(due), "rolled_back": due.request_id}
            if due.keep:
                state = state.model_copy(update={"provisional": None, "unconfirmed": (
                    f"{confirm_why(due)}; kept (a rollback never opens the gateway)")})
                self.store.save(state)
                self.store.journal(action="rollback", profile=state.profile, result="kept",
                                   **who)
                return self._result("rollback", state, changed=False, note=state.unconfirmed)
            if due.revoke_exception is not None:
                live = {e.id: e for e in state.live_exceptions(now)}
                cleared = state.model_copy(update={"provisional": None})
                if due.revoke_exception not in live:  # it expired by itself meanwhile
                    self.store.save(cleared)
                    return None
                return self._revoke("rollback", cleared, live[due.revoke_exception], who, now)
            if due.config_digest is None:
                return self._change("rollback", confirm_rolled_back(state, due, now), state,
                                    who)
            if self.on_config_rollback is None:
                raise StateError("a provisional reload is pending but no daemon holds the "
                                 "previous config")
            self.store.save(state.model_copy(update={"provisional": None}))
        # outside the lock: a reload takes it itself
        return self.on_config_rollback(due)

    def reload(self, config: AgentConfig, digest: str, *, actor: str = "agent",
               reason: str = "config reload", confirm: bool = True,
               action: str = "reload") -> ChangeResult:
        """Run `config` from now on: the state in force is applied with it in one
        transaction (never a moment without enforcement). Refused, with the old config
        kept and the kernel untouched, if the new one cannot hold the state in force.
        With `[confirm] reload`, the reload is provisional (the daemon keeps the old
        config to return to)."""
        with self.store.locked():
            old_state = self.store.load()
            previous = (self.config, self.config_digest)
            self._swap(config, digest)
            try:
                if old_state.profile is not None:  # still a profile of the new config?
                    self.config.profile(old_state.profile)
                seconds = config.confirm.reload if confirm else None
                provisional = self._provisional("reload", old_state, seconds, None,
                                                config_digest=previous[1]) if seconds else None
                new = old_state.model_copy(update={
                    "generation": old_state.generation + 1,
                    **({"provisional": provisional} if provisional else {})})
                return self._change(action, new, old_state, {
                    "actor": actor, "reason": reason, "config_digest": digest,
                    "previous_config_digest": previous[1]})
            except DrawbridgeError:
                self._swap(*previous)
                raise

    def _swap(self, config: AgentConfig, digest: str) -> None:
        hosts = [m.host for m in config.management if m.host]
        if tuple(dict.fromkeys(hosts)) != self.hosts.hosts:
            self.hosts.close()
            self.hosts = ManagementHosts(hosts, state_dir=config.state_dir,
                                         timeout=config.resolve_timeout)
        self.config, self.config_digest = config, digest
        self._compiled.clear()

    def reconcile(self) -> ChangeResult | None:
        """Compare kernel and desired state; repair any drift. Returns the repair, if any.
        Also notices paths around our chains (offload.py) as they appear or go."""
        with self.store.locked():
            state = self.store.load()
            now = self.clock()
            live = state.live_exceptions(now)
            if live != state.exceptions:
                state = state.model_copy(update={"exceptions": live})
                self.store.save(state)
                if state.isolated:  # the kernel expired them: forget their connections too
                    self.nft.apply_text(render_element_change(forget_live=True))
            policy = self.policy_for(state)
            now_mono = time.monotonic()
            full = now_mono - self._last_full_check >= self.config.full_check_interval
            problems = self.kernel.compare(policy, elements=full)
            if full:
                self._last_full_check = now_mono
            if not problems:
                self._notice_bypass(state)
                return None
            phases = Phases()
            try:
                remaining = self.kernel.converge(policy, phases)
                self.kernel.save_boot(policy, config_digest=self.config_digest)
            except NftError as exc:
                self.store.journal(action="repair", actor="agent", reason="drift",
                                   profile=state.profile, result="failed", error=str(exc),
                                   drift=problems)
                raise
            self.stats.drift_repairs += 1
            bypass = self.kernel.cut_bypass(state.isolated)
            verification = self._verify(state, not remaining, bypass)
            state = state.model_copy(update={"verification": verification})
            self.store.save(state)
            self.store.journal(action="repair", actor="agent", reason="drift",
                               profile=state.profile, result="applied", drift=problems,
                               in_sync=not remaining, verification=verification.status,
                               apply_seconds=round(phases.times["apply"], 6))
            return ChangeResult(
                action="repair", gateway=self.config.gateway,
                state="isolated" if state.isolated else "open", profile=state.profile,
                changed=True, in_sync=not remaining, problems=tuple(problems),
                verification=verification, apply_seconds=phases.times["apply"],
                generation=state.generation, timings=phases.rounded(), bypass=bypass,
            )

    def _notice_bypass(self, state: DesiredState) -> None:
        """A path around our forward chain that appeared since the last look: cut what
        was offloaded and record the state unverified (journal, status, metrics)."""
        before = self.stats.bypass
        found = self.kernel.bypasses()
        if found == before or not state.isolated:
            return
        if found:
            problem = cut_offloaded()
            found = (*found, problem) if problem else found
        self.store.journal(action="bypass", actor="agent", reason="offload check",
                           profile=state.profile, result="found" if found else "gone",
                           bypass=list(found))
        if found and not self.config.allow_flow_offload:
            checked = state.verification.model_copy(update={"checked_at": self.clock()})
            verdict = with_bypass(checked, found, accepted=False)
            self.store.save(state.model_copy(update={"verification": verdict}))

    def status(self, *, elements: bool = True) -> Status:
        """`elements=False`: the terse read-back (chains, rules, sets, not their contents),
        for the controller's frequent polls; the reconcile loop compares contents."""
        state = self.store.load()
        policy = self.policy_for(state)
        full = elements and (policy is None or policy.element_count() <= STATUS_FULL_READ_LIMIT)
        problems = self.kernel.compare(policy, elements=full)
        return Status(
            gateway=self.config.gateway, state="isolated" if state.isolated else "open",
            profile=state.profile, since=state.since, actor=state.actor, reason=state.reason,
            in_sync=not problems, problems=tuple(problems), verification=state.verification,
            exceptions=state.live_exceptions(self.clock()), generation=state.generation,
            drift_repairs=self.stats.drift_repairs, bypass=self.kernel.bypasses(),
            agent_version=package_version(), config_digest=self.config_digest,
            provisional=state.provisional, unconfirmed=state.unconfirmed,
            profiles=tuple(self.config.profile_names()),
            unresolved=tuple(f"management host {h}: {e}"
                             for h, e in sorted(self.hosts.failures().items())),
        )
