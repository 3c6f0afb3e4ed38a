"""The controller's core: lifecycle, authentication and refusals, where requests go
(here, or as a replica through the gateways' lease holders), state views, audit reads.

The HTTP API is a thin layer over this class; tests drive it directly with a
fake transport. Its other parts are mixins, one job each: the inventory's changes
(controller/gateway_admin.py), the command verbs (controller/commands.py) and the path
every command takes, audited before and after (controller/command_path.py).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

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
from controller.command_path import short_id
from controller.command_queue import QueuedCommand
from controller.commands import Commands
from controller.config import ControllerConfig
from controller.db import Database
from controller.errors import ConfigError, ControllerError, Forbidden
from controller.fleet import Fleet, GatewayResult
from controller.gateway_admin import GatewayAdmin
from controller.holder_calls import procedures as holder_procedures
from controller.inventory import Gateway, Inventory
from controller.lease_store import Me
from controller.metrics import ControllerMetrics, FleetCollector
from controller.plan_service import Plans
from controller.polling import SYSTEM_ACTOR, Polls
from controller.refusals import Refusal, RefusalAggregator
from controller.replica import new_incarnation, replica_id
from controller.replica_join import join_chain
from controller.replica_metrics import ReplicaCollector
from controller.replicas import Replicas
from controller.schemas import GatewayView, PendingView, Targets
from controller.states import GatewayState, StateStore
from controller.transport.link import LinkRegistry, SessionFactory
from controller.transport.ssh import AgentSession
from controller.web.plan_metrics import PlanStageCollector
from controller.web.sources import DbPlanSource


class Controller(GatewayAdmin, Commands):
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

    # -- inventory (its changes: controller/gateway_admin.py) ----------------------------

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

    # -- where requests go (the commands: controller/commands.py) ------------------------

    def read(self, gateways: Sequence[Gateway], op: str, *, actor: str,
             args: dict[str, Any] | None = None) -> list[GatewayResult]:
        """A request that changes nothing (not audited), asked now: directly, or as a
        replica through the gateways' lease holders."""
        if self.replicas is None:
            return self.fleet.run(gateways, op, lambda gw: dict(args or {}))
        command = QueuedCommand(
            command_id=short_id(), action=op, op=op, args=dict(args or {}), actor=actor,
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
