"""The controller's core: inventory, commands, fan-out, state, audit, in one place.

The HTTP API is a thin layer over this class; tests drive it directly with a
fake transport. Every decision is audited before it is carried out (the
`requested` record) and again with its per-gateway results, so an incident
lead can see both what was asked and what happened, even if the controller
died in between.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import ValidationError

from controller.audit import (
    AuditEvent,
    AuditKey,
    AuditLog,
    AuditRecord,
    HistoryQuery,
    TamperAlarm,
    VerifyReport,
)
from controller.audit_verify import CheckpointClaim
from controller.auth import Principal, Role, TokenStore
from controller.checkpoint_keys import CheckpointKey
from controller.checkpoints import Checkpointer
from controller.command_queue import QueuedCommand
from controller.config import ControllerConfig
from controller.db import Database
from controller.errors import (
    ConfigError,
    ControllerError,
    Forbidden,
    HostKeyMismatch,
    InputError,
)
from controller.exceptions import check_breadth
from controller.fleet import CHANGE_OPS, EXCEPTION_OPS, Fleet, GatewayResult
from controller.holder_calls import procedures as holder_procedures
from controller.inventory import Gateway, Inventory, parse_address, require_absolute_key
from controller.lease_store import Me
from controller.metrics import ControllerMetrics, FleetCollector
from controller.plan_service import Plans
from controller.polling import SYSTEM_ACTOR, Polls
from controller.refusals import Refusal, RefusalAggregator
from controller.replica import new_incarnation, replica_id
from controller.replica_join import join_chain
from controller.replica_metrics import ReplicaCollector
from controller.replicas import Replicas
from controller.schemas import (
    CommandResult,
    GatewayView,
    PendingView,
    Targets,
)
from controller.states import GatewayState, Pending, StateStore
from controller.transport.link import GatewayLink, LinkRegistry, SessionFactory
from controller.transport.protocol import AgentChange
from controller.transport.ssh import AgentSession, load_private_key
from controller.web.plan_metrics import PlanStageCollector
from controller.web.sources import DbPlanSource

log = logging.getLogger("drawbridge.controller")

Emit = Callable[[dict[str, Any]], None]
STATE_OPS = ("isolate", "restore")
CONFIRMED_OPS = ("isolate", "restore", "allow")  # may carry a confirmation deadline


def _noop(event: dict[str, Any]) -> None:
    del event


def _short_id() -> str:
    return uuid.uuid4().hex[:16]


def audit_result(res: GatewayResult) -> dict[str, Any]:
    """What the audit record keeps of one gateway's result (incl. probe evidence)."""
    keep = res.model_dump(exclude={"result"}, exclude_none=True)
    if res.result:
        if "verification" in res.result:
            keep["evidence"] = res.result["verification"]
        if "probes" in res.result:
            keep["probes"] = res.result["probes"]
    return keep


def _check_key(name: str, key_path: str) -> None:
    """The controller's private key for a gateway: an absolute path that it can load."""
    require_absolute_key(name, key_path)
    try:
        load_private_key(key_path)
    except ConfigError as exc:
        raise InputError(exc.message) from None


class Controller:
    def __init__(self, config: ControllerConfig, *,
                 session_factory: SessionFactory = AgentSession,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.db = Database(config.db_url)
        self.inventory = Inventory(self.db)
        self.tokens = TokenStore(self.db)
        self.states = StateStore(self.db)
        self.links = LinkRegistry(config.ssh, session_factory=session_factory)
        self.fleet = Fleet(self.links, parallelism=config.fleet.parallelism,
                           background_parallelism=config.fleet.poll_parallelism)
        # streamed API commands run here, not on a thread each: bounded like the rest
        self.streams = ThreadPoolExecutor(max_workers=config.fleet.stream_workers,
                                          thread_name_prefix="stream")
        self.polls = Polls(self)
        self.metrics = ControllerMetrics()
        self._audit: AuditLog | None = None
        self._checkpoints: Checkpointer | None = None
        self._plans: Plans | None = None
        self.refusals = RefusalAggregator(
            self._record_refusal, window_seconds=config.audit.refusal_window_seconds,
            max_sources=config.audit.refusal_max_sources, clock=clock)
        self._mismatch_reported: dict[str, str] = {}
        self._report_lock = threading.Lock()
        self._inflight: set[str] = set()  # commands accepted and not finished yet
        self._inflight_lock = threading.Lock()
        # several controllers on one PostgreSQL database (None: this one alone, as on SQLite)
        self.replicas: Replicas | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def open(self) -> Controller:
        """Migrate the database, load (or create) the audit key. Idempotent."""
        if self._audit is not None:
            return self
        try:
            self.config.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create state dir {self.config.state_dir}: "
                              f"{exc.strerror}") from None
        self.db.migrate()
        if self.replica_mode:
            me = Me(replica_id(self.config), new_incarnation())
            self.replicas = Replicas(self, me, self.config.replicas)
            self.replicas.on_acquired = self.polls.poll_soon
            self.metrics.attach(ReplicaCollector(self.replicas))
        key = AuditKey.load_or_create(self.config.audit_key_path,
                                      chain_length=self.db.audit_records())
        signer = CheckpointKey.load_or_create(self.config.checkpoint_key_path)
        self._audit = AuditLog(self.db, key, head_path=self.config.audit_head_path,
                               on_alarm=self._on_alarm)
        joined = None
        if self.replicas is not None:  # a new replica starts its head at the chain's end
            joined = join_chain(self._audit, self.config.audit_head_path,
                                replica_id=self.replicas.me.replica_id,
                                known=self.replicas.store.known())
        # the database against the head this controller wrote: a cut or replaced chain,
        # or a lost head file, is an alarm here, before anything is appended
        self._audit.check_head()
        if joined is not None and self._audit.alarm is None:
            self.record(joined.event())
        self._checkpoints = Checkpointer(self, signer)
        self.metrics.attach(FleetCollector(self._snapshot, self._audit.last_seq))
        # the plan driver's lease holder is this controller's replica id
        self._plans = Plans(self, replica_id(self.config))
        self.metrics.attach(PlanStageCollector(DbPlanSource(self._plans.store).latest))
        return self

    @property
    def replica_mode(self) -> bool:
        """Whether this controller shares its database with other replicas: leases say
        which gateways it talks to, and commands go through the queue."""
        enabled = self.config.replicas.enabled
        if enabled and not self.db.is_postgresql:
            raise ConfigError("replicas.enabled needs PostgreSQL (database_url): SQLite "
                              "holds one controller only")
        return self.db.is_postgresql if enabled is None else enabled

    def start(self, *, api: str = "") -> Controller:
        """Begin serving: as a replica, register, take leases, start the queue worker
        (`serve` does this; host commands such as `token create` only open())."""
        self.open()
        if self.replicas is not None:
            self.replicas.start(api=api)
        return self

    def _on_alarm(self, alarm: TamperAlarm | None) -> None:
        self.metrics.audit_alarm.set(1 if alarm else 0)
        if alarm is not None:
            self.metrics.audit_alarms.inc()

    def close(self) -> None:
        if self.replicas is not None:
            self.replicas.stop(release=True)
        if self._plans is not None:
            self._plans.driver.shutdown()
        if self._checkpoints is not None:
            self._checkpoints.shutdown()
        if self._audit is not None:
            self.refusals.flush(everything=True)
        self.streams.shutdown(wait=False, cancel_futures=True)
        self.fleet.shutdown()
        self.links.close_all()
        self.db.dispose()

    @property
    def audit(self) -> AuditLog:
        if self._audit is None:
            raise ConfigError("the controller is not open (call open() first)")
        return self._audit

    def _snapshot(self) -> tuple[list[str], dict[str, GatewayState]]:
        return [g.name for g in self.inventory.all()], self.states.all()

    @property
    def checkpoints(self) -> Checkpointer:
        if self._checkpoints is None:
            raise ConfigError("the controller is not open (call open() first)")
        return self._checkpoints

    @property
    def plans(self) -> Plans:
        if self._plans is None:
            raise ConfigError("the controller is not open (call open() first)")
        return self._plans

    def record(self, event: AuditEvent) -> AuditRecord:
        return self.audit.append(event)

    # -- authentication and refusals -----------------------------------------------------

    def authenticate(self, token: str | None, *, path: str = "",
                     source: str = "local") -> Principal:
        try:
            principal = self.tokens.authenticate(token)
        except ControllerError as exc:
            self.refused(None, path, exc, source=source)
            raise
        return dataclasses.replace(principal, source=source)

    def refused(self, principal: Principal | None, what: str, exc: ControllerError,
                *, detail: dict[str, Any] | None = None, source: str | None = None) -> None:
        """Every refusal is counted and audited: the first of each source and window at
        once (who if known, from where, what was asked, why not), the rest of the window
        as one summary record (controller/refusals.py)."""
        self.metrics.refusals.labels(reason=exc.code).inc()
        written = self.refusals.refused(Refusal(
            source=source or (principal.source if principal else "local"),
            user=principal.user if principal else None,
            action="auth.refused" if exc.code in ("unauthorized", "forbidden")
            else "request.refused",
            request=what, code=exc.code, message=exc.message, detail=dict(detail or {})))
        if not written:
            self.metrics.refusals_aggregated.inc()

    def _record_refusal(self, event: AuditEvent) -> None:
        self.record(event)

    def require(self, principal: Principal, role: Role, what: str, *,
                request: str | None = None) -> None:
        if not principal.can(role):
            exc = Forbidden(f"{what} needs the {role.name} role; {principal.user} has the "
                            f"{principal.role.name} role")
            self.refused(principal, request or what, exc,
                         detail={"needed": role.name, "role": principal.role.name})
            raise exc

    # -- inventory -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _inventory_change(self, principal: Principal, request: str, name: str
                          ) -> Iterator[None]:
        """Bad input to an inventory change is refused, audited, and changes nothing."""
        try:
            yield
        except ValidationError as exc:
            err = InputError(f"invalid gateway: {exc.errors()[0]['msg']}")
            self.refused(principal, request, err, detail={"gateway": name})
            raise err from None
        except ControllerError as exc:
            self.refused(principal, request, exc, detail={"gateway": name})
            raise

    def add_gateway(self, principal: Principal, *, name: str, address: str, user: str,
                    key_path: str, host_key: str | None, trust_on_first_use: bool,
                    groups: Sequence[str], reason: str, ticket: str | None) -> Gateway:
        with self._inventory_change(principal, "gateway.add", name):
            host, port = parse_address(address)
            _check_key(name, key_path)
            gw = Gateway(name=name, host=host, port=port, user=user, key_path=key_path,
                         host_key=host_key, trust_on_first_use=trust_on_first_use,
                         groups=tuple(groups), created_by=principal.user)
            gw = self.inventory.add(gw)
        self.states.delete(name)  # a re-added name starts with a clean slate
        if self.replicas is not None and self.replicas.started:
            self.replicas.tick()  # a new gateway gets its holder now, not at the next tick
        self.record(AuditEvent(
            actor=principal.user, action="gateway.add", outcome="ok", reason=reason,
            ticket=ticket, targets=(name,),
            detail={"address": gw.address, "user": gw.user, "key_path": gw.key_path,
                    "host_key": gw.host_key, "trust_on_first_use": gw.trust_on_first_use,
                    "groups": list(gw.groups)}))
        return gw

    def update_gateway(self, principal: Principal, name: str, *, reason: str,
                       ticket: str | None, address: str | None = None,
                       user: str | None = None, key_path: str | None = None,
                       host_key: str | None = None, trust_on_first_use: bool = False
                       ) -> Gateway:
        """Re-pin a host key (the gateway was reinstalled, or its key rotated), rotate the
        controller's key, follow a moved sshd: audited, and the session is reopened with
        the new settings. State, pending change and history stay."""
        changes: dict[str, object] = {}
        with self._inventory_change(principal, "gateway.update", name):
            if host_key is not None and trust_on_first_use:
                raise InputError("give --host-key or --trust-on-first-use, not both")
            if address is not None:
                changes["host"], changes["port"] = parse_address(address)
            if user is not None:
                changes["user"] = user
            if key_path is not None:
                _check_key(name, key_path)
                changes["key_path"] = key_path
            if host_key is not None or trust_on_first_use:
                changes.update(host_key=host_key, trust_on_first_use=trust_on_first_use)
            if not changes:
                raise InputError("nothing to change: give --host-key, --trust-on-first-use, "
                                 "--key, --user or --address")
            before, after = self.inventory.update(name, **changes)
        self.links.remove(name)  # the next request connects with the new settings
        old, new = before.model_dump(), after.model_dump()
        fields = ("host", "port", "user", "key_path", "host_key", "trust_on_first_use")
        self.record(AuditEvent(
            actor=principal.user, action="gateway.update", outcome="ok", reason=reason,
            ticket=ticket, targets=(name,),
            detail={"changed": {f: [old[f], new[f]] for f in fields if old[f] != new[f]}}))
        return after

    def remove_gateway(self, principal: Principal, name: str, *, reason: str,
                       ticket: str | None) -> Gateway:
        try:
            gw = self.inventory.remove(name)
        except ControllerError as exc:
            self.refused(principal, "gateway.remove", exc, detail={"gateway": name})
            raise
        last = self.states.get(name)
        self.states.delete(name)
        self.links.remove(name)
        if self.replicas is not None:  # nobody will hold it: what it was owed is void
            self.replicas.queue.drop(name, GatewayResult(
                gateway=name, op="?", outcome="failed", ok=False, error_code="not_found",
                message=f"{name} was removed from the inventory").model_dump(mode="json"))
        self.record(AuditEvent(
            actor=principal.user, action="gateway.remove", outcome="ok", reason=reason,
            ticket=ticket, targets=(name,),
            detail={"address": gw.address, "last_state": last.state,
                    "last_profile": last.profile,
                    "dropped_pending": last.pending.command_id if last.pending else None}))
        return gw

    def views(self) -> list[GatewayView]:
        states = self.states.all()
        out = []
        for gw in self.inventory.all():
            st = states.get(gw.name) or GatewayState(name=gw.name)
            p = st.pending
            out.append(GatewayView(
                name=gw.name, address=gw.address, user=gw.user, key_path=gw.key_path,
                host_key=gw.host_key, trust_on_first_use=gw.trust_on_first_use,
                groups=list(gw.groups), reachable=st.reachable, state=st.state,
                profile=st.profile, verification=st.verification, in_sync=st.in_sync,
                generation=st.generation, since=st.since, actor=st.gw_actor,
                reason=st.gw_reason, drift_repairs=st.drift_repairs, problems=st.problems,
                exceptions=st.exceptions, last_contact_at=st.last_contact_at,
                observed_at=st.observed_at, last_error_code=st.last_error_code,
                last_error=st.last_error, agent_version=st.agent_version,
                config_digest=st.config_digest,
                pending=PendingView(command_id=p.command_id, action=p.action, op=p.op,
                                    profile=p.args.get("profile"), actor=p.actor,
                                    reason=p.reason, accepted_at=p.accepted_at,
                                    attempts=p.attempts) if p else None,
            ))
        return out

    def select(self, principal: Principal | None, targets: Targets, what: str) -> list[Gateway]:
        try:
            return self.inventory.select(names=targets.gateways, groups=targets.groups,
                                         all_gateways=targets.all)
        except ControllerError as exc:
            self.refused(principal, what, exc, detail={"targets": targets.model_dump()})
            raise

    # -- commands ------------------------------------------------------------------------

    def check_profile(self, principal: Principal, gateways: Sequence[Gateway],
                      profile: str) -> None:
        """Refuse a profile that a targeted gateway does not have (as its last status
        said) before anything is sent to any gateway: bad input, not a failed command."""
        missing = []
        for gw in gateways:
            known = self.states.get(gw.name).profiles
            if known is not None and profile not in known:
                missing.append(f"{gw.name} (it has: {', '.join(known)})")
        if missing:
            exc = InputError(f"unknown profile {profile!r} on {'; '.join(missing)}")
            self.refused(principal, "isolate", exc, detail={"profile": profile})
            raise exc

    def isolate(self, principal: Principal, targets: Targets, *, profile: str, reason: str,
                ticket: str | None, emit: Emit = _noop) -> CommandResult:
        gateways = self.select(principal, targets, "isolate")
        self.check_profile(principal, gateways, profile)
        return self.run_command(
            gateways, action="isolate", op="isolate", actor=principal.user, reason=reason,
            ticket=ticket, args={"profile": profile}, emit=emit)

    def restore(self, principal: Principal, targets: Targets, *, reason: str,
                ticket: str | None, emit: Emit = _noop) -> CommandResult:
        gateways = self.select(principal, targets, "restore")
        return self.run_command(gateways, action="restore", op="restore", actor=principal.user,
                                reason=reason, ticket=ticket, args={}, emit=emit)

    def allow(self, principal: Principal, targets: Targets, *, flow: dict[str, Any],
              reason: str, ticket: str | None, emit: Emit = _noop) -> CommandResult:
        self.check_exception_breadth(principal, "allow", flow["cidr"])
        gateways = self.select(principal, targets, "allow")
        return self.run_command(gateways, action="allow", op="allow", actor=principal.user,
                                reason=reason, ticket=ticket, args=flow, emit=emit)

    def check_exception_breadth(self, principal: Principal, what: str, cidr: Any) -> None:
        try:
            check_breadth(ipaddress.ip_network(str(cidr)), principal, self.config.exceptions)
        except ControllerError as exc:
            self.refused(principal, what, exc, detail={"cidr": str(cidr)})
            raise

    def exceptions(self, principal: Principal, targets: Targets) -> list[GatewayResult]:
        """The live exceptions of each gateway, asked now (a read: not audited)."""
        gateways = self.select(principal, targets, "exceptions")
        return self.read(gateways, "exceptions", actor=principal.user)

    def change_exception(self, principal: Principal, op: str, *, gateway: str,
                         exception_id: str, reason: str, ticket: str | None,
                         duration_seconds: int | None = None) -> CommandResult:
        """`extend` or `revoke` one exception of one gateway. Extending is held to the
        same breadth rule as opening (the flow is read from the gateway first)."""
        gateways = self.select(principal, Targets(gateways=(gateway,)), op)
        args: dict[str, Any] = {"id": exception_id}
        if op == "extend":
            [listing] = self.read(gateways, "exceptions", actor=principal.user)
            live = {e["id"]: e for e in (listing.result or {}).get("exceptions", [])}
            if exception_id in live:
                self.check_exception_breadth(principal, op, live[exception_id]["flow"]["cidr"])
            args["duration_seconds"] = duration_seconds
        return self.run_command(gateways, action=op, op=op, actor=principal.user,
                                reason=reason, ticket=ticket, args=args)

    def read(self, gateways: Sequence[Gateway], op: str, *, actor: str,
             args: dict[str, Any] | None = None) -> list[GatewayResult]:
        """A request that changes nothing (not audited), asked now: directly, or as a
        replica through the gateways' lease holders."""
        if self.replicas is None:
            return self.fleet.run(gateways, op, lambda gw: dict(args or {}))
        command = QueuedCommand(
            command_id=_short_id(), action=op, op=op, args=dict(args or {}), actor=actor,
            reason="", ticket=None, accepted_at=self.clock(),
            accepted_by=self.replicas.me.replica_id,
            accepted_incarnation=self.replicas.me.incarnation, audited=False)
        return self.replicas.run(gateways, command, pending=None, retry_of=None,
                                 on_accept=lambda names: None, on_result=lambda r: None)

    def on_holders(self, gateways: Sequence[Gateway], name: str,
                   args: dict[str, Any]) -> list[Any]:
        """Run the procedure `name` (controller/holder_calls.py) for each gateway where
        its session is: here, or as a replica on each gateway's holder. The answers in
        the order of `gateways`; None where it raised or could not run."""
        if self.replicas is None:
            run = holder_procedures(self)[name]
            return self.fleet.map_background(gateways, lambda gw, link: run(gw, link, args))
        results = self.read(gateways, name, actor=SYSTEM_ACTOR, args=args)
        return [(r.result or {}).get("value") if r.ok else None for r in results]

    def mine(self, gateways: Sequence[Gateway]) -> list[Gateway]:
        """The gateways this controller talks to: all of them, or, as a replica, those
        whose lease it holds (only they are polled and retried here)."""
        if self.replicas is None:
            return list(gateways)
        held = self.replicas.held()
        return [g for g in gateways if g.name in held]

    def probe(self, principal: Principal, targets: Targets, *, reason: str,
              emit: Emit = _noop) -> CommandResult:
        gateways = self.select(principal, targets, "probe")
        return self.run_command(gateways, action="probe", op="probe", actor=principal.user,
                                reason=reason or "probe", ticket=None, args={}, emit=emit)

    def run_command(self, gateways: Sequence[Gateway], *, action: str, op: str, actor: str,
                    reason: str, ticket: str | None, args: dict[str, Any],
                    emit: Emit = _noop, command_id: str | None = None,
                    detail: dict[str, Any] | None = None,
                    retry_of: Pending | None = None) -> CommandResult:
        """Audit the intent, fan out, keep each gateway's state, audit the results.

        The command id is the envelope id of every request it sends and the hash of its
        `requested` record goes with it: the agent journals both with the change (so the
        controller's story and the gateways' can be compared: controller/reconcile.py),
        and a request sent again under the same id is answered, not applied again. A
        retry of an undelivered change (`retry_of`) therefore keeps its command's id."""
        if retry_of is not None:
            command_id = retry_of.command_id
        command_id = command_id or _short_id()
        names = [g.name for g in gateways]
        started, t0 = self.clock(), time.perf_counter()
        extra = dict(detail or {})
        if retry_of is not None:
            extra.update(retry_of=retry_of.command_id, attempt=retry_of.attempts + 1)
        requested = self.record(AuditEvent(
            actor=actor, action=action, outcome="requested", reason=reason, ticket=ticket,
            targets=tuple(names), command_id=command_id,
            detail={"op": op, "args": args, **extra}))
        with self._inflight_lock:
            self._inflight.add(command_id)
        try:
            result = self._fan_out(gateways, action=action, op=op, actor=actor,
                                   reason=reason, ticket=ticket, args=args, emit=emit,
                                   command_id=command_id, audit=requested.hash, extra=extra,
                                   retry_of=retry_of, started=started, t0=t0)
        finally:
            with self._inflight_lock:
                self._inflight.discard(command_id)
        if op in STATE_OPS and any(r.ok for r in result.results):
            self.checkpoints.request(f"after {action} {command_id}")
        return result

    def _fan_out(self, gateways: Sequence[Gateway], *, action: str, op: str, actor: str,
                 reason: str, ticket: str | None, args: dict[str, Any], emit: Emit,
                 command_id: str, audit: str, extra: dict[str, Any],
                 retry_of: Pending | None, started: float, t0: float) -> CommandResult:
        profile = args.get("profile") if op == "isolate" else None

        def accept(candidates: Sequence[Gateway]) -> Sequence[Gateway]:
            """Under the fleet's accept lock: the recorded intent follows accept order."""
            chosen = list(candidates)
            if retry_of is not None:  # only where nothing newer was accepted meanwhile
                current = {g.name: self.states.get(g.name).pending for g in chosen}
                chosen = [g for g in chosen if (p := current[g.name]) is not None
                          and p.command_id == retry_of.command_id]
            if op in STATE_OPS:
                pending = Pending(
                    command_id=command_id, action=action, op=op, args=args, actor=actor,
                    reason=reason, ticket=ticket,
                    accepted_at=retry_of.accepted_at if retry_of else started,
                    attempts=retry_of.attempts + 1 if retry_of else 1)
                self.states.update_many([g.name for g in chosen], pending=pending,
                                        last_command_id=command_id)
            emit({"event": "accepted", "command_id": command_id, "action": action,
                  "targets": [g.name for g in chosen], "total": len(chosen)})
            return chosen

        rpc_args = {**args, "reason": reason, "actor": actor}
        if op in CHANGE_OPS and ticket:
            rpc_args["ticket"] = ticket
        deadline = getattr(self.config.confirm, op, None) if op in CONFIRMED_OPS else None
        if deadline is not None:
            rpc_args.setdefault("confirm_within_seconds", deadline)
        if op == "probe":
            rpc_args = {}

        def after(gw: Gateway, link: GatewayLink, res: GatewayResult) -> GatewayResult:
            return self.settle_result(gw, link, res, command_id=command_id, op=op,
                                      actor=actor, reason=reason)

        mutating = op in CHANGE_OPS

        def on_result(r: GatewayResult) -> None:
            emit({"event": "result", "result": r.model_dump(mode="json")})

        if self.replicas is not None:
            results = self._queued(gateways, action=action, op=op, actor=actor, reason=reason,
                                   ticket=ticket, args=args, command_id=command_id,
                                   audit=audit if mutating else None, retry_of=retry_of,
                                   started=started, emit=emit, on_result=on_result)
        else:
            results = self.fleet.run(
                gateways, op, lambda gw: rpc_args, after=after, accept=accept,
                on_result=on_result, request_id=command_id if mutating else None,
                audit=audit if mutating else None)
        names = [r.gateway for r in results]
        counts = Counter(r.outcome for r in results)
        ok = all(r.ok for r in results)
        overall = "ok" if ok else ("failed" if not any(r.ok for r in results) else "partial")
        if not results and gateways:
            overall = "superseded"  # a retry that newer commands made moot
        duration = time.perf_counter() - t0
        log.info("%s %s by %s on %d gateway(s) in %.2fs: %s", action, command_id, actor,
                 len(results), duration, dict(counts) or overall)
        self.metrics.commands.labels(verb=action, result=overall).inc()
        self.metrics.latency.labels(verb=action).observe(duration)
        for r in results:
            self.metrics.gateway_results.labels(verb=action, outcome=r.outcome).inc()
        self.record(AuditEvent(
            actor=actor, action=action, outcome=overall, reason=reason, ticket=ticket,
            targets=tuple(names), command_id=command_id,
            detail={"op": op, "args": args, "counts": dict(counts),
                    "duration_seconds": round(duration, 4),
                    "results": [audit_result(r) for r in results], **extra}))
        if self.replicas is not None:  # nobody else need record it
            me = self.replicas.me
            self.replicas.queue.mark_reported(command_id, me.replica_id, me.incarnation)
        return CommandResult(
            command_id=command_id, action=action, op=op, actor=actor, reason=reason,
            ticket=ticket, profile=profile, stage=extra.get("stage"), targets=names,
            results=results, ok=ok, counts=dict(counts), started_at=started,
            duration_seconds=duration)

    def _queued(self, gateways: Sequence[Gateway], *, action: str, op: str, actor: str,
                reason: str, ticket: str | None, args: dict[str, Any], command_id: str,
                audit: str | None, retry_of: Pending | None, started: float, emit: Emit,
                on_result: Callable[[GatewayResult], None]) -> list[GatewayResult]:
        """As a replica: queue the command for the gateways' lease holders and wait for
        their results (controller/replicas.py)."""
        assert self.replicas is not None
        me = self.replicas.me
        command = QueuedCommand(command_id=command_id, action=action, op=op, args=args,
                                actor=actor, reason=reason, ticket=ticket,
                                accepted_at=started, accepted_by=me.replica_id,
                                accepted_incarnation=me.incarnation, audit=audit)
        pending = Pending(
            command_id=command_id, action=action, op=op, args=args, actor=actor,
            reason=reason, ticket=ticket,
            accepted_at=retry_of.accepted_at if retry_of else started,
            attempts=retry_of.attempts + 1 if retry_of else 1) if op in STATE_OPS else None

        def accepted(names: list[str]) -> None:
            emit({"event": "accepted", "command_id": command_id, "action": action,
                  "targets": names, "total": len(names)})

        return self.replicas.run(gateways, command, pending=pending, retry_of=retry_of,
                                 on_accept=accepted, on_result=on_result)

    def settle_result(self, gw: Gateway, link: GatewayLink, res: GatewayResult, *,
                      command_id: str, op: str, actor: str, reason: str) -> GatewayResult:
        """Runs on the fan-out thread, still holding the gateway's turn (as a replica: on
        the replica holding the gateway's lease): what the gateway said becomes its
        state; a change delivered (or refused for good) is no longer owed."""
        if res.result and res.result.get("provisional"):
            problem = self.confirm_provisional(gw, link, res.result["provisional"])
            if problem is not None:
                res = res.model_copy(update={"message": f"{res.message}; not confirmed "
                                             f"({problem}): the agent rolls it back at its "
                                             "deadline"})
        now = self.clock()
        self.host_key_bookkeeping(gw, link, res.error_code)
        changes: dict[str, Any] = {}
        if link.host_key_seen:
            changes["host_key_seen"] = link.host_key_seen
        if res.outcome not in ("unreachable", "refused"):
            changes.update(reachable=True, last_contact_at=now, last_error_code=None,
                           last_error=None)
        else:
            changes.update(reachable=False, last_error_code=res.error_code,
                           last_error=res.message)
        if res.result and op in CHANGE_OPS:
            change = AgentChange.model_validate(res.result)
            changes.update(state=change.state, profile=change.profile,
                           verification=change.verification.status, in_sync=change.in_sync,
                           generation=change.generation, problems=change.problems,
                           observed_at=now)
            if op not in EXCEPTION_OPS:
                changes.update(since=now, gw_actor=actor, gw_reason=reason)
        will_retry = res.outcome == "unreachable" and op in STATE_OPS

        def settle(current: GatewayState) -> dict[str, Any]:
            ours = current.pending is not None and current.pending.command_id == command_id
            if ours and not will_retry:
                return {**changes, "pending": None}  # delivered (or refused for good)
            return changes

        after = self.states.modify(gw.name, settle)
        will_retry = will_retry and after.pending is not None \
            and after.pending.command_id == command_id
        if will_retry:
            return res.model_copy(update={
                "will_retry": True,
                "message": res.message + " - will retry when the gateway answers"})
        return res

    def confirm_provisional(self, gw: Gateway, link: GatewayLink,
                            provisional: dict[str, Any]) -> str | None:
        """The gateway answered over its management path, so that path works: make its
        provisional change final (commit-confirmed). Not confirming leaves the agent to
        roll it back at its deadline, which is what a change that cut us off needs.
        Returns why it could not confirm, or None."""
        request_id = provisional.get("request_id")
        try:
            link.call("confirm", {"request_id": request_id, "actor": SYSTEM_ACTOR,
                                  "reason": "the controller reaches the gateway"})
        except ControllerError as exc:
            log.warning("%s: confirming %s failed: %s", gw.name, request_id, exc)
            return exc.message
        self.record(AuditEvent(actor=SYSTEM_ACTOR, action="confirm", outcome="ok",
                               reason=f"{provisional.get('action')} confirmed: the controller "
                                      "reaches the gateway", targets=(gw.name,),
                               detail={"request_id": request_id}))
        return None

    def host_key_bookkeeping(self, gw: Gateway, link: GatewayLink, code: str | None) -> None:
        """Audit a refused host key once per key seen; pin a key trusted on first use."""
        if code in ("host_key_mismatch", "host_key_unknown"):
            err = link.last_error
            presented = err.presented if isinstance(err, HostKeyMismatch) else "?"
            with self._report_lock:
                if self._mismatch_reported.get(gw.name) == presented:
                    return
                self._mismatch_reported[gw.name] = presented
            self.record(AuditEvent(
                actor=SYSTEM_ACTOR, action="hostkey.refused", outcome="refused",
                reason=err.message if err else "host key refused", targets=(gw.name,),
                detail={"expected": gw.host_key, "presented": presented,
                        "address": gw.address, "code": code}))
            return
        if code is None and link.connected:
            with self._report_lock:
                self._mismatch_reported.pop(gw.name, None)
            seen = link.host_key_seen
            if gw.host_key is None and gw.trust_on_first_use and seen:
                self.inventory.pin_host_key(gw.name, seen)
                link.update(self.inventory.get(gw.name))
                self.record(AuditEvent(
                    actor=SYSTEM_ACTOR, action="hostkey.pinned", outcome="ok",
                    reason="trust on first use, as asked at 'gateway add'", targets=(gw.name,),
                    detail={"host_key": seen, "address": gw.address}))

    # -- polling and retries (controller/polling.py) ----------------------------------------

    def poll_once(self) -> dict[str, bool]:
        """Read every gateway's status; record what changed; retry pending changes."""
        return self.polls.poll_once()

    def refresh(self, *, actor: str) -> None:
        """Poll every gateway now (`status --refresh`); as a replica, each by its holder
        (through the queue), waiting for all of them."""
        if self.replicas is None:
            self.poll_once()
            return
        self.read(self.inventory.all(), "poll", actor=actor)

    def in_flight(self, command_id: str, gateway: str | None = None) -> bool:
        """Accepted and not finished yet (a retry of it now would deliver it twice); as a
        replica: queued or being carried out for `gateway` by any replica."""
        if self.replicas is not None:
            return self.replicas.queue.unfinished(command_id, gateway)
        with self._inflight_lock:
            return command_id in self._inflight

    # -- reading -------------------------------------------------------------------------

    def history(self, query: HistoryQuery) -> list[AuditRecord]:
        return self.audit.query(query)

    def verify_audit(self, claims: Sequence[CheckpointClaim] = ()) -> VerifyReport:
        """The whole chain against the head file, the database's own checkpoints and
        `claims` (checkpoints from elsewhere, e.g. an exported file)."""
        return self.audit.verify([*self.checkpoints.stored_claims(), *claims])

    def acknowledge_alarm(self, principal: Principal, *, reason: str,
                          ticket: str | None) -> AuditRecord:
        """An admin accepts the chain as it is now (after looking): recorded, and
        writes resume."""
        self.require(principal, Role.admin, "acknowledging a tamper alarm",
                     request="audit.acknowledge")
        return self.audit.acknowledge(actor=principal.user, reason=reason, ticket=ticket)

    def create_token(self, *, user: str, role: Role, created_by: str, reason: str,
                     ticket: str | None = None, description: str = "") -> str:
        token = self.tokens.create(user=user, role=role, created_by=created_by,
                                   description=description)
        self.record(AuditEvent(
            actor=created_by, action="token.create", outcome="ok", reason=reason, ticket=ticket,
            detail={"user": user, "role": role.name, "token_id": token.split("_")[1],
                    "description": description}))
        return token
