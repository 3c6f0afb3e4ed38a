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

import contextlib
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

from agent import exceptions
from agent.config import AgentConfig, FlowRule
from agent.errors import DrawbridgeError, InputError, NftError
from agent.nft.facts import EXPIRY_SLACK_SECONDS, Facts, canonical, compare, flow_key
from agent.nft.offload import bypasses, cut_offloaded
from agent.nft.reference import References
from agent.nft.render import (
    ElementChange,
    TextMemo,
    render,
    render_delete,
    render_element_change,
)
from agent.nft.runner import Nft
from agent.policy import CompiledProfile, Policy, build_policy, compile_profile
from agent.replay import RequestRef, error_answer, ok_answer, replay
from agent.requests import (
    AllowRequest,
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
from agent.state import DesiredState, ExceptionEntry, StateStore, VerificationResult

# status reads set contents back only up to this size (a 100k listing takes seconds);
# beyond it, status compares structure and the reconcile loop's full checks cover elements
STATUS_FULL_READ_LIMIT = 10_000


ChangeRequest = IsolateRequest | RestoreRequest | AllowRequest | ExtendRequest | RevokeRequest


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
    ) -> None:
        self.config = config
        self.nft = nft or Nft()
        self.store = StateStore(config.state_dir)
        self.verifier = verifier
        self.clock = clock
        self.hosts = hosts or ManagementHosts(
            [m.host for m in config.management if m.host], state_dir=config.state_dir,
            timeout=config.resolve_timeout)
        self.on_apply = on_apply
        self.stats = EngineStats()
        self._compiled: dict[str, CompiledProfile] = {}
        self._element_text = TextMemo()
        self._references = references or References()
        self._last_full_check = float("-inf")

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
            self._reference(policy)

    def render(self, profile: str) -> str:
        state = DesiredState(profile=profile)
        policy = self.policy_for(state)
        assert policy is not None
        return render(policy)

    # -- kernel --------------------------------------------------------------------------

    def _apply_file(self, script: str) -> None:
        self.store.ensure_dir()
        fd, path = tempfile.mkstemp(prefix=".apply-", suffix=".nft", dir=self.store.dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(script)
            self.nft.apply_file(path)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)

    def _reference(self, policy: Policy) -> Facts:
        """The structure (chains, rules, set types) the kernel holds for `policy`, learnt
        in a scratch namespace before the desired state is written: that is the dry
        check, and the reference every read-back is compared with (reference.py).
        Elements are typed, collapsed values and are not part of it: checking 100k of
        them would double the apply time. Learnt once per structure per process."""
        return self._references(render(policy, with_elements=False))

    def _compare(self, policy: Policy | None, *, elements: bool = True) -> list[str]:
        live = self.nft.read_table(elements=elements)
        return compare(policy, live, None if policy is None else self._reference(policy))

    def _bypasses(self) -> tuple[str, ...]:
        """Paths around our forward chain; the offloaded connections are cut when found
        (and after every change while they exist)."""
        found = tuple(bypasses(self.nft.read_ruleset()))
        self.stats.bypass = found
        return found

    def _cut_bypass(self, isolated: bool) -> tuple[str, ...]:
        found = self._bypasses()
        if found and isolated:
            problem = cut_offloaded()
            if problem is not None:
                found = (*found, problem)
        return found

    def _verify(self, state: DesiredState, in_sync: bool,
                bypass: tuple[str, ...]) -> VerificationResult:
        return with_bypass(self.verifier(state, in_sync), bypass,
                           self.config.allow_flow_offload)

    def _converge(self, policy: Policy | None, phases: Phases) -> list[str]:
        """Make the kernel hold `policy` (None: no table); returns the read-back
        differences that remain (empty: the kernel holds exactly what was meant)."""
        self._apply_file(render_delete() if policy is None
                         else render(policy, element_text=self._element_text))
        self._timed_apply(phases)
        problems = self._compare(policy)
        phases.mark("readback")
        return problems

    def _timed_apply(self, phases: Phases) -> None:
        elapsed = phases.mark("apply")
        self.stats.last_apply_seconds = elapsed
        if self.on_apply is not None:
            self.on_apply(elapsed)

    def _change(self, action: str, new: DesiredState, old: DesiredState,
                who: dict[str, Any], note: str = "") -> ChangeResult:
        """Apply `new` (replacing `old`); `who` is the journal's actor, reason, ticket, ..."""
        phases = Phases()
        policy = self.policy_for(new)  # may raise before anything is touched
        phases.mark("policy")
        if policy is not None:
            self._reference(policy)
        phases.mark("check")
        self.store.save(new)
        phases.mark("persist")
        try:
            problems = self._converge(policy, phases)
        except DrawbridgeError as exc:
            self._failed(action, new, old, who, exc)
            raise
        return self._finish(action, new, problems, phases, who,
                            self._cut_bypass(new.isolated), note)

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
            request_id=who.get("request_id"),
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
        self._timed_apply(phases)
        problems = self._compare_exception_sets(policy)
        phases.mark("readback")
        return self._finish(action, new, problems, phases, who, self.stats.bypass)

    def _extend_elements(self, old: list[ElementChange], new: list[ElementChange]) -> None:
        """A new lifetime: re-adding an element updates its timeout where the kernel
        supports it (Linux 6.10 and later); elsewhere the element is replaced."""
        self.nft.apply_text(render_element_change(add=new))
        left = self.nft.expiries(sorted({name for name, _ in new}))
        wanted = ((name, canonical(flow_key(el)), (el.timeout or 0)) for name, el in new)
        if any(left.get((name, key), 0) < timeout - EXPIRY_SLACK_SECONDS
               for name, key, timeout in wanted):
            self.nft.apply_text(render_element_change(remove=old, add=new))

    def _compare_exception_sets(self, policy: Policy) -> list[str]:
        live = self.nft.read_sets([name for name in policy.sets if name.startswith("exc_")])
        return compare(policy, live)

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
                               reason=req.reason, generation=old.generation + 1)
            return self._change("restore", new, old, _who(req, ref))

    def _unchanged(self, action: str, state: DesiredState, req: IsolateRequest | RestoreRequest,
                   ref: RequestRef | None) -> ChangeResult | None:
        """The answer to a request that would change nothing (the profile or the open
        state already in force, and the kernel holding it): no apply, no counter reset,
        no new generation; journaled as a request all the same. None if the kernel
        differs: then the request is applied (and repairs it)."""
        policy = self.policy_for(state)
        if self._compare(policy, elements=False):
            return None
        if policy is not None and self._compare_exception_sets(policy):
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
            new = old.model_copy(update={"exceptions": (*live, entry),
                                         "generation": old.generation + 1})
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
                                         lambda: self._extend_elements(before, after))

    def revoke(self, req: RevokeRequest, ref: RequestRef | None = None) -> ChangeResult:
        with self.store.locked():
            if (first := replay(self.store.journal_log, ref)) is not None:
                return ChangeResult.model_validate(first)
            old = self.store.load()
            exceptions.check_isolated(old, "revoke")
            now = self.clock()
            entry = exceptions.find(old, req.id, now)
            new = old.model_copy(update={
                "exceptions": tuple(e for e in old.live_exceptions(now) if e.id != req.id),
                "generation": old.generation + 1,
            })
            who = {**_who(req, ref), "exception": entry.model_dump(mode="json")}
            gone = exceptions.element_changes(entry, now)

            def apply() -> None:
                # connections of the revoked flow lose their related-ICMP pass at once,
                # and any of them that a flowtable carried is torn down
                self.nft.apply_text(render_element_change(remove=gone, forget_live=True))
                if self.stats.bypass:
                    cut_offloaded()

            return self._change_elements("revoke", new, old, who, apply)

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
            problems = self._compare(policy, elements=full)
            if full:
                self._last_full_check = now_mono
            if not problems:
                self._notice_bypass(state)
                return None
            phases = Phases()
            try:
                remaining = self._converge(policy, phases)
            except NftError as exc:
                self.store.journal(action="repair", actor="agent", reason="drift",
                                   profile=state.profile, result="failed", error=str(exc),
                                   drift=problems)
                raise
            self.stats.drift_repairs += 1
            bypass = self._cut_bypass(state.isolated)
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
        found = self._bypasses()
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
        problems = self._compare(policy, elements=full)
        return Status(
            gateway=self.config.gateway, state="isolated" if state.isolated else "open",
            profile=state.profile, since=state.since, actor=state.actor, reason=state.reason,
            in_sync=not problems, problems=tuple(problems), verification=state.verification,
            exceptions=state.live_exceptions(self.clock()), generation=state.generation,
            drift_repairs=self.stats.drift_repairs, bypass=self._bypasses(),
            unresolved=tuple(f"management host {h}: {e}"
                             for h, e in sorted(self.hosts.failures().items())),
        )
