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
import ipaddress
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict

from agent.config import AgentConfig, FlowRule, IPNetwork
from agent.errors import DrawbridgeError, InputError, NftError
from agent.nft.facts import compare
from agent.nft.render import TextMemo, render, render_delete
from agent.nft.runner import Nft
from agent.policy import CompiledProfile, Policy, build_policy, compile_profile
from agent.requests import AllowRequest, IsolateRequest, RestoreRequest
from agent.state import DesiredState, ExceptionEntry, StateStore, VerificationResult

# status reads set contents back only up to this size (a 100k listing takes seconds);
# beyond it, status compares structure and the reconcile loop's full checks cover elements
STATUS_FULL_READ_LIMIT = 10_000


class Verifier(Protocol):
    """Runs probes against the state just applied (see probes.py)."""

    def __call__(self, state: DesiredState, in_sync: bool) -> VerificationResult: ...


def readback_only(state: DesiredState, in_sync: bool) -> VerificationResult:
    """Without probes, the read-back is the only evidence there is."""
    del state
    return VerificationResult(
        status="verified" if in_sync else "unverified",
        checked_at=time.time(),
        failing=() if in_sync else ("readback",),
    )


class ChangeResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    action: str
    gateway: str
    state: str
    profile: str | None
    changed: bool
    in_sync: bool
    problems: tuple[str, ...] = ()
    verification: VerificationResult
    apply_seconds: float
    generation: int
    note: str = ""
    timings: dict[str, float] = {}  # seconds per phase: policy, check, apply, readback, verify


class Status(BaseModel):
    model_config = ConfigDict(frozen=True)

    gateway: str
    state: str
    profile: str | None
    since: float
    actor: str
    reason: str
    in_sync: bool
    problems: tuple[str, ...]
    verification: VerificationResult
    exceptions: tuple[ExceptionEntry, ...]
    generation: int
    drift_repairs: int


class Phases:
    """Wall time per phase of one change, for the result and the benchmarks."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, name: str) -> float:
        now = time.perf_counter()
        self.times[name] = now - self._last
        self._last = now
        return self.times[name]

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 6) for k, v in self.times.items()}


@dataclass
class EngineStats:
    """In-process counters the metrics collector reads (this process's lifetime)."""

    drift_repairs: int = 0
    last_apply_seconds: float = 0.0


def _who(req: IsolateRequest | RestoreRequest | AllowRequest) -> dict[str, Any]:
    return {"actor": req.actor, "reason": req.reason, "ticket": req.ticket}


def resolve_host(host: str) -> tuple[IPNetwork, ...]:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise InputError(f"management host {host!r} does not resolve: {exc.strerror}") from None
    addrs = sorted({str(info[4][0]).split("%")[0] for info in infos})
    return tuple(ipaddress.ip_network(a) for a in addrs)


class Engine:
    def __init__(
        self,
        config: AgentConfig,
        *,
        nft: Nft | None = None,
        verifier: Verifier = readback_only,
        clock: Callable[[], float] = time.time,
        resolver: Callable[[str], tuple[IPNetwork, ...]] = resolve_host,
        on_apply: Callable[[float], None] | None = None,
    ) -> None:
        self.config = config
        self.nft = nft or Nft()
        self.store = StateStore(config.state_dir)
        self.verifier = verifier
        self.clock = clock
        self.resolver = resolver
        self.on_apply = on_apply
        self.stats = EngineStats()
        self._resolved: dict[str, tuple[IPNetwork, ...]] = {}
        self._compiled: dict[str, CompiledProfile] = {}
        self._element_text = TextMemo()
        self._checked: set[str] = set()
        self._last_full_check = float("-inf")

    # -- policy --------------------------------------------------------------------------

    def _resolve_management(self) -> dict[str, tuple[IPNetwork, ...]]:
        """Resolve management hostnames before any rule is built; keep the last good answer
        so a DNS outage during isolation cannot lock the controller out."""
        for entry in self.config.management:
            if entry.host is None:
                continue
            try:
                self._resolved[entry.host] = self.resolver(entry.host)
            except InputError:
                if entry.host not in self._resolved:
                    raise
        return dict(self._resolved)

    def policy_for(self, state: DesiredState) -> Policy | None:
        if state.profile is None:
            return None
        if state.profile not in self._compiled:
            self._compiled[state.profile] = compile_profile(self.config, state.profile)
        return build_policy(
            self.config, state.profile,
            exceptions=[e.spec() for e in state.exceptions],
            resolved_hosts=self._resolve_management(), now=self.clock(),
            compiled=self._compiled[state.profile],
        )

    def warm_up(self) -> None:
        """Compile every profile and dry-check each structure once, so the first isolate
        after a start is as fast as the next (a daemon calls this at start)."""
        for name in self.config.profile_names():
            policy = self.policy_for(DesiredState(profile=name))
            assert policy is not None
            self._dry_check(policy)

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

    def _dry_check(self, policy: Policy) -> None:
        """Let the kernel validate the structure (chains, rules, set types) before the
        desired state is written. Elements are typed, collapsed values and are not part
        of the check: checking 100k of them would double the apply time. A structure
        the kernel accepted once is not checked again by this process (it depends only on
        the mode, and a kernel does not lose features while it runs)."""
        skeleton = render(policy, with_elements=False)
        if skeleton not in self._checked:
            self.nft.check(skeleton)
            self._checked.add(skeleton)

    def _converge(self, policy: Policy | None, phases: Phases) -> list[str]:
        """Make the kernel hold `policy` (None: no table); returns the read-back
        differences that remain (empty: the kernel holds exactly what was meant)."""
        self._apply_file(render_delete() if policy is None
                         else render(policy, element_text=self._element_text))
        elapsed = phases.mark("apply")
        self.stats.last_apply_seconds = elapsed
        if self.on_apply is not None:
            self.on_apply(elapsed)
        problems = compare(policy, self.nft.read_table())
        phases.mark("readback")
        return problems

    def _change(self, action: str, new: DesiredState, old: DesiredState,
                who: dict[str, Any]) -> ChangeResult:
        """Apply `new` (replacing `old`); `who` is the journal's actor, reason, ticket, ..."""
        phases = Phases()
        policy = self.policy_for(new)  # may raise before anything is touched
        phases.mark("policy")
        if policy is not None:
            self._dry_check(policy)
        phases.mark("check")
        self.store.save(new)
        phases.mark("persist")
        try:
            problems = self._converge(policy, phases)
        except DrawbridgeError as exc:
            self.store.save(old)
            self.store.journal(action=action, profile=new.profile, result="failed",
                               error=str(exc), **who)
            raise
        verification = self.verifier(new, not problems)
        phases.mark("verify")
        final = new.model_copy(update={"verification": verification})
        self.store.save(final)
        self.store.journal(
            action=action, profile=new.profile, result="applied", in_sync=not problems,
            verification=verification.status,
            failing=list(verification.failing), apply_seconds=round(phases.times["apply"], 6),
            generation=new.generation, **who,
        )
        return ChangeResult(
            action=action, gateway=self.config.gateway,
            state="isolated" if new.isolated else "open", profile=new.profile, changed=True,
            in_sync=not problems, problems=tuple(problems), verification=verification,
            apply_seconds=phases.times["apply"], generation=new.generation,
            timings=phases.rounded(),
        )

    # -- verbs ---------------------------------------------------------------------------

    def isolate(self, req: IsolateRequest) -> ChangeResult:
        self.config.profile(req.profile)  # unknown profile: refused before the lock
        with self.store.locked():
            old = self.store.load()
            now = self.clock()
            new = DesiredState(
                profile=req.profile,
                since=old.since if old.profile == req.profile else now,
                actor=req.actor, reason=req.reason,
                exceptions=old.live_exceptions(now), generation=old.generation + 1,
            )
            return self._change("isolate", new, old, _who(req))

    def restore(self, req: RestoreRequest) -> ChangeResult:
        with self.store.locked():
            old = self.store.load()
            new = DesiredState(profile=None, since=self.clock(), actor=req.actor,
                               reason=req.reason, generation=old.generation + 1)
            return self._change("restore", new, old, _who(req))

    def allow(self, req: AllowRequest) -> ChangeResult:
        with self.store.locked():
            old = self.store.load()
            now = self.clock()
            entry = ExceptionEntry(
                id=uuid.uuid4().hex[:12],
                flow=FlowRule(cidr=req.cidr, proto=req.proto, ports=req.ports,
                              direction=req.direction),
                expires_at=now + req.duration_seconds, created_at=now,
                actor=req.actor, reason=req.reason,
            )
            new = old.model_copy(update={
                "exceptions": (*old.live_exceptions(now), entry),
                "generation": old.generation + 1,
            })
            who = {**_who(req), "exception": entry.model_dump(mode="json")}
            if not old.isolated:
                # nothing to open while everything is open; kept for the next isolation
                self.store.save(new)
                self.store.journal(action="allow", profile=None, result="recorded", **who)
                return ChangeResult(
                    action="allow", gateway=self.config.gateway, state="open", profile=None,
                    changed=True, in_sync=True, verification=old.verification, apply_seconds=0.0,
                    generation=new.generation,
                    note="gateway is open; the exception applies if it is isolated before expiry",
                )
            return self._change("allow", new, old, who)

    def reconcile(self) -> ChangeResult | None:
        """Compare kernel and desired state; repair any drift. Returns the repair, if any."""
        with self.store.locked():
            state = self.store.load()
            now = self.clock()
            live = state.live_exceptions(now)
            if live != state.exceptions:
                state = state.model_copy(update={"exceptions": live})
                self.store.save(state)
            policy = self.policy_for(state)
            now_mono = time.monotonic()
            full = now_mono - self._last_full_check >= self.config.full_check_interval
            problems = compare(policy, self.nft.read_table(elements=full))
            if full:
                self._last_full_check = now_mono
            if not problems:
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
            verification = self.verifier(state, not remaining)
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
                generation=state.generation, timings=phases.rounded(),
            )

    def status(self, *, elements: bool = True) -> Status:
        """`elements=False`: the terse read-back (chains, rules, sets, not their contents),
        for the controller's frequent polls; the reconcile loop compares contents."""
        state = self.store.load()
        policy = self.policy_for(state)
        full = elements and (policy is None or policy.element_count() <= STATUS_FULL_READ_LIMIT)
        problems = compare(policy, self.nft.read_table(elements=full))
        return Status(
            gateway=self.config.gateway, state="isolated" if state.isolated else "open",
            profile=state.profile, since=state.since, actor=state.actor, reason=state.reason,
            in_sync=not problems, problems=tuple(problems), verification=state.verification,
            exceptions=state.live_exceptions(self.clock()), generation=state.generation,
            drift_repairs=self.stats.drift_repairs,
        )
