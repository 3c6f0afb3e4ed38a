"""The agent's core: change the desired state, make the kernel match it, prove it.

Every change follows the same path under the agent lock:
validate -> render -> dry check -> write desired state -> one atomic nft
transaction -> read back and compare -> verify. If nft refuses, the previous
desired state is written back, so the disk never claims what the kernel
does not hold. The script is read from a complete file and sent as one
netlink batch: if this process is killed mid-apply, the kernel commits all of
it or none of it, and the reconcile loop converges on the desired state.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from agent import exceptions
from agent.config import AgentConfig, FlowRule
from agent.confirm import due as confirm_due
from agent.confirm import provisional_for
from agent.confirm import rolled_back as confirm_rolled_back
from agent.confirm import why as confirm_why
from agent.errors import ConflictError, DrawbridgeError, InputError, NftError, StateError
from agent.kernel import Kernel
from agent.nft.facts import Facts
from agent.nft.offload import cut_offloaded
from agent.nft.render import (
    render,
    render_element_change,
)
from agent.nft.runner import Nft
from agent.policy import CompiledProfile, Policy, build_policy, compile_profile
from agent.replay import RequestRef, error_answer, ok_answer, replay
from agent.requests import (
    AllowRequest,
    ConfirmRequest,
    ExtendRequest,
    IsolateRequest,
    RestoreRequest,
    RevokeRequest,
)
from agent.resolve import ManagementHosts
from agent.results import (
    ChangeResult,
    EngineStats,
    Phases,
    Status,
    Verifier,
    readback_only,
    with_bypass,
)
from agent.state import (
    DesiredState,
    ExceptionEntry,
    Provisional,
    StateStore,
    VerificationResult,
)
from agent.version import package_version

# status reads set contents back only up to this size (a 100k listing takes seconds);
# beyond it, status compares structure and the reconcile loop's full checks cover elements
STATUS_FULL_READ_LIMIT = 10_000


ChangeRequest = (IsolateRequest | RestoreRequest | AllowRequest | ExtendRequest | RevokeRequest
                 | ConfirmRequest)


def _who(req: ChangeRequest, ref: RequestRef | None) -> dict[str, Any]:
    """The journal's record of who asked, and which request it was (replay.py)."""
    return {"actor": req.actor, "reason": req.reason, "ticket": req.ticket,
            **(ref.journal_fields() if ref else {})}


class Engine:
    def __init__(
        self,
        config: AgentConfig,
        *,
        nft: Nft | None = None,
        verifier: Verifier = readback_only,
        clock: Callable[[], float] = time.time,
        hosts: ManagementHosts | None = None,
        on_apply: Callable[[float], None] | None = None,
        references: Callable[[str], Facts] | None = None,
        config_digest: str = "",
    ) -> None:
        self.config = config
        self.config_digest = config_digest  # which config file this engine runs
        self.nft = nft or Nft()
        self.store = StateStore(config.state_dir)
        self.verifier = verifier
        self.clock = clock
        self.hosts = hosts or ManagementHosts(
            [m.host for m in config.management if m.host], state_dir=config.state_dir,
            timeout=config.resolve_timeout)
        self.stats = EngineStats()
        self.kernel = Kernel(self.nft, config.state_dir, stats=self.stats,
                             references=references)
        self.kernel.on_apply = on_apply
        self._compiled: dict[str, CompiledProfile] = {}
        self._last_full_check = float("-inf")
        # set by the daemon: it enforces confirmation deadlines and holds old configs
        self.deadlines_enforced = False
        self.on_config_rollback: Callable[[Provisional], ChangeResult | None] | None = None

    # -- policy --------------------------------------------------------------------------

    def policy_for(self, state: DesiredState) -> Policy | None:
        if state.profile is None:
            return None
        if state.profile not in self._compiled:
            self._compiled[state.profile] = compile_profile(self.config, state.profile)
        return build_policy(
            self.config, state.profile,
            exceptions=[e.spec() for e in state.exceptions],
            resolved_hosts=self.hosts.answers(), now=self.clock(),
            compiled=self._compiled[state.profile],
        )

    def warm_up(self) -> None:
        """Compile every profile and learn each structure once, so the first isolate
        after a start is as fast as the next (a daemon calls this at start)."""
        for name in self.config.profile_names():
            policy = self.policy_for(DesiredState(profile=name))
            assert policy is not None
            self.kernel.reference(policy)

    def render(self, profile: str) -> str:
        state = DesiredState(profile=profile)
        policy = self.policy_for(state)
        assert policy is not None
        return render(policy)

    def _verify(self, state: DesiredState, in_sync: bool,
                bypass: tuple[str, ...]) -> VerificationResult:
        return with_bypass(self.verifier(state, in_sync), bypass,
                           self.config.allow_flow_offload)

    def _change(self, action: str, new: DesiredState, old: DesiredState,
                who: dict[str, Any], note: str = "") -> ChangeResult:
        """Apply `new` (replacing `old`); `who` is the journal's actor, reason, ticket, ..."""
        phases = Phases()
        policy = self.policy_for(new)  # may raise before anything is touched
        phases.mark("policy")
        if policy is not None:
            self.kernel.reference(policy)
        phases.mark("check")
        self.store.save(new)
        phases.mark("persist")
        try:
            problems = self.kernel.converge(policy, phases)
            self.kernel.save_boot(policy, config_digest=self.config_digest)
        except DrawbridgeError as exc:
            self._failed(action, new, old, who, exc)
            raise
        return self._finish(action, new, problems, phases, who,
                            self.kernel.cut_bypass(new.isolated), note)

    def _failed(self, action: str, new: DesiredState, old: DesiredState, who: dict[str, Any],
                exc: DrawbridgeError) -> None:
        """nft refused: the disk goes back to what the kernel still holds; the journal
        keeps the refusal (and the answer, for a retry of the same request)."""
        self.store.save(old)
        self.store.journal(action=action, profile=new.profile, result="failed",
                           error=str(exc), **who, answer=error_answer(exc))

    def _finish(self, action: str, new: DesiredState, problems: list[str], phases: Phases,
                who: dict[str, Any], bypass: tuple[str, ...], note: str = "") -> ChangeResult:
        """After the kernel changed: verify, record, answer."""
        verification = self._verify(new, not problems, bypass)
        phases.mark("verify")
        self.store.save(new.model_copy(update={"verification": verification}))
        result = ChangeResult(
            action=action, gateway=self.config.gateway,
            state="isolated" if new.isolated else "open", profile=new.profile, changed=True,
            in_sync=not problems, problems=tuple(problems), verification=verification,
            apply_seconds=phases.times["apply"], generation=new.generation,
            timings=phases.rounded(), bypass=bypass, note=note,
            request_id=who.get("request_id"), provisional=new.provisional,
        )
        self.store.journal(
            action=action, profile=new.profile, result="applied", in_sync=not problems,
            verification=verification.status,
            failing=list(verification.failing), apply_seconds=round(phases.times["apply"], 6),
            generation=new.generation, **who, answer=ok_answer(result.model_dump(mode="json")),
        )
        return result

    def _change_elements(self, action: str, new: DesiredState, old: DesiredState,
                         who: dict[str, Any], apply: Callable[[], None]) -> ChangeResult:
        """An exception change as element changes of the live table (`apply`): small
        transactions whatever the allowlist size, counters kept. The proof is the
        exception sets read back; the rest of the table did not change and the
        reconcile loop keeps comparing it (and looking for bypass paths)."""
        phases = Phases()
        policy = self.policy_for(new)
        assert policy is not None  # exceptions change only while isolated
        phases.mark("policy")
        self.store.save(new)
        phases.mark("persist")
        try:
            apply()
        except DrawbridgeError as exc:
            self._failed(action, new, old, who, exc)
            raise
        self.kernel.timed_apply(phases)
        problems = self.kernel.compare_exception_sets(policy)
        phases.mark("readback")
        return self._finish(action, new, problems, phases, who, self.stats.bypass)

    # -- verbs ---------------------------------------------------------------------------

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
            return self._change("isolate", new, old, _who(req, ref), "; ".join(notes))

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
            return self._change("restore", new, old, _who(req, ref))

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
        who = _who(req, ref)
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
            who = {**_who(req, ref), "exception": entry.model_dump(mode="json")}
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
            who = {**_who(req, ref), "exception": longer.model_dump(mode="json")}
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
            who = {**_who(req, ref), "exception": entry.model_dump(mode="json")}
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

    def _provisional(self, action: str, old: DesiredState, seconds: int | None,
                     ref: RequestRef | None, **extra: str | None) -> Provisional | None:
        seconds = seconds if seconds is not None else getattr(self.config.confirm, action)
        if seconds is not None and not self.deadlines_enforced:
            raise InputError("a confirmation deadline needs the agent daemon, which enforces "
                             "it (drawbridge-agent run); it is not running")
        return provisional_for(action, old, seconds=seconds, now=self.clock(),
                               request_id=ref.id if ref else None, **extra)

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
                               **_who(req, ref), answer=ok_answer(result.model_dump(mode="json")))
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

    def _result(self, action: str, state: DesiredState, *, changed: bool, note: str = "",
                ref: RequestRef | None = None) -> ChangeResult:
        """An answer about the state in force, for changes that did not touch the kernel."""
        return ChangeResult(
            action=action, gateway=self.config.gateway,
            state="isolated" if state.isolated else "open", profile=state.profile,
            changed=changed, in_sync=True, verification=state.verification,
            apply_seconds=0.0, generation=state.generation, note=note,
            request_id=ref.id if ref else None)

    def list_exceptions(self) -> list[dict[str, object]]:
        state = self.store.load()
        now = self.clock()
        return exceptions.listing(state.live_exceptions(now), now)

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
            unresolved=tuple(f"management host {h}: {e}"
                             for h, e in sorted(self.hosts.failures().items())),
        )
