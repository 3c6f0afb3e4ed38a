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
from collections.abc import Callable
from typing import Any

from agent.config import AgentConfig
from agent.confirm import provisional_for
from agent.errors import DrawbridgeError, InputError
from agent.kernel import Kernel
from agent.nft.facts import Facts
from agent.nft.render import (
    render,
)
from agent.nft.runner import Nft
from agent.policy import CompiledProfile, Policy, build_policy, compile_profile
from agent.replay import RequestRef, error_answer, ok_answer
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
    Verifier,
    readback_only,
    with_bypass,
)
from agent.state import (
    DesiredState,
    Provisional,
    StateStore,
    VerificationResult,
)

ChangeRequest = (IsolateRequest | RestoreRequest | AllowRequest | ExtendRequest | RevokeRequest
                 | ConfirmRequest)


def who_of(req: ChangeRequest, ref: RequestRef | None) -> dict[str, Any]:
    """The journal's record of who asked, and which request it was (replay.py)."""
    return {"actor": req.actor, "reason": req.reason, "ticket": req.ticket,
            **(ref.journal_fields() if ref else {})}


class EngineCore:
    """State, kernel and the common path of every change (the verbs: engine.py)."""

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

    def _provisional(self, action: str, old: DesiredState, seconds: int | None,
                     ref: RequestRef | None, **extra: str | None) -> Provisional | None:
        seconds = seconds if seconds is not None else getattr(self.config.confirm, action)
        if seconds is not None and not self.deadlines_enforced:
            raise InputError("a confirmation deadline needs the agent daemon, which enforces "
                             "it (drawbridge-agent run); it is not running")
        return provisional_for(action, old, seconds=seconds, now=self.clock(),
                               request_id=ref.id if ref else None, **extra)

    def _result(self, action: str, state: DesiredState, *, changed: bool, note: str = "",
                ref: RequestRef | None = None) -> ChangeResult:
        """An answer about the state in force, for changes that did not touch the kernel."""
        return ChangeResult(
            action=action, gateway=self.config.gateway,
            state="isolated" if state.isolated else "open", profile=state.profile,
            changed=changed, in_sync=True, verification=state.verification,
            apply_seconds=0.0, generation=state.generation, note=note,
            request_id=ref.id if ref else None)

