"""This controller as one of several replicas on one PostgreSQL database.

Three jobs, each on its own thread:

- the lease keeper (every `replicas.renew_interval_seconds`): renews this replica's
  heartbeat and its gateways' leases, takes free ones up to its fair share, gives back
  the surplus (controller/lease_store.py, policy in controller/leases.py). A gateway
  whose lease was lost or given back has its SSH session closed here: only the holder
  of a gateway's lease talks to it (commands, polls, retries of pending changes);
- the worker: claims the queued commands of the gateways it holds, in the order they
  were accepted (controller/command_queue.py), and carries them out on the fan-out
  pool, each request under its command's id; the result goes back into the row;
- the accepting side (any request on any replica): `run` queues a command for its
  gateways and waits for the rows' results, which it passes on as they come.

A lease is trusted locally only until renew time + TTL minus a margin, measured on
this host's monotonic clock from before the renewal was asked: a replica that cannot
renew (database gone, process stalled) stops sending before anyone else may take
over, and a request in its turn checks the lease right before it is sent.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from controller.command_queue import Claimed, CommandQueue, QueuedCommand
from controller.config import ReplicaSettings
from controller.db import Database
from controller.errors import ControllerError, LeaseLost
from controller.fleet import CHANGE_OPS, GatewayResult, failure
from controller.holder_calls import Procedure
from controller.holder_calls import procedures as holder_procedures
from controller.inventory import Gateway
from controller.lease_store import LeaseStore, Me, ReplicaView
from controller.replica_orphans import report_orphans
from controller.replica_results import ResultBoard, wait_for_results
from controller.states import Pending

if TYPE_CHECKING:
    from controller.service import Controller

log = logging.getLogger("drawbridge.controller.replicas")

ORPHANS_EVERY = 5.0  # seconds between looks for commands whose acceptor died
PRUNE_EVERY = 300.0  # seconds between sweeps of finished queue rows
KEEP_FINISHED = 7 * 86400.0  # how long finished rows stay (the audit log keeps the story)


class Replicas:
    def __init__(self, ctl: Controller, me: Me, settings: ReplicaSettings, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ctl = ctl
        self.me = me
        self.settings = settings
        self.clock = clock
        # the keeper's own connections: a renewal never queues behind commands' writes
        self._keeper_db = Database(ctl.db.url, pool_size=1, max_overflow=2) \
            if ctl.db.is_postgresql else ctl.db
        self.store = LeaseStore(self._keeper_db, me, ttl=settings.lease_ttl_seconds)
        self.queue = CommandQueue(ctl.db)
        self._lock = threading.Lock()
        self._tick_lock = threading.Lock()
        self._held: dict[str, int] = {}  # gateway -> lease epoch
        self._valid_until = 0.0  # monotonic: our leases are trusted until then
        self._running: dict[int, str] = {}  # queue seq -> gateway, carried out here now
        # A gateway whose request found our lease lapsed is fenced: its later rows are
        # given up too (the turns run them in order), and once none runs any more they
        # are all queued again in one go and the fence lifted. So a row given up is
        # never overtaken by a later one of the same gateway.
        self._fence: set[str] = set()
        self._given_up: dict[str, list[Claimed]] = {}
        self._wake = threading.Event()  # the worker: there may be work
        # results of rows carried out here: written to the queue in batches by the
        # finisher thread (one transaction for many rows), then handed to local waiters
        self._outbox: list[tuple[Claimed, GatewayResult | None]] = []  # None: requeue
        self._outbox_ready = threading.Condition()
        self._board = ResultBoard()
        self._stop = threading.Event()  # the keeper and the worker
        self._stop_finisher = threading.Event()  # after running requests drained
        self._threads: list[threading.Thread] = []
        self._last_prune = 0.0
        self._procedures = holder_procedures(ctl)
        self._last_orphans = 0.0
        self.started = False
        # called with gateways newly taken (the controller polls them: sessions come up
        # before the first command needs them)
        self.on_acquired: Callable[[list[str]], None] = lambda names: None

    # -- lifecycle -----------------------------------------------------------------------

    def start(self, *, api: str = "") -> None:
        """Register, take the first leases, start the keeper and the worker."""
        if self.started:
            return
        self.store.register(api=api)
        self.tick()
        self.started = True
        for name, loop in (("lease-keeper", self._keeper_loop),
                           ("queue-worker", self._worker_loop),
                           ("queue-finisher", self._finisher_loop)):
            thread = threading.Thread(target=loop, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, *, release: bool = True, drain_seconds: float = 5.0) -> None:
        """Stop the threads; with `release`, let running requests finish (up to
        `drain_seconds`) and give every lease back, so that the others take over at
        their next tick. Without it (tests: like a killed process) the leases run out."""
        self._halt(finisher=False)
        if not self.started:
            self._halt()
            return
        self.started = False
        if release:
            deadline = self.clock() + drain_seconds
            while self.busy() and self.clock() < deadline:
                time.sleep(0.05)
        self._halt()
        if release:
            try:
                self.store.deregister()
            except ControllerError as exc:
                log.warning("could not give the leases back: %s", exc.message)
        if self._keeper_db is not self.ctl.db:
            self._keeper_db.dispose()
        with self._lock:
            self._held = {}
            self._valid_until = 0.0

    def _halt(self, *, finisher: bool = True) -> None:
        """Stop the keeper and the worker; with `finisher`, the finisher too (once it
        wrote what it holds)."""
        self._stop.set()
        self._wake.set()
        if finisher:
            self._stop_finisher.set()
            with self._outbox_ready:
                self._outbox_ready.notify_all()
        keep = [t for t in self._threads if not finisher and t.name == "queue-finisher"]
        for thread in self._threads:
            if thread not in keep:
                thread.join(timeout=5)
        self._threads = keep

    def crash(self) -> None:
        """Stop keeping leases and working the queue, give nothing back (tests: like a
        killed process; the accepting side still waits for results)."""
        self._halt()
        with self._lock:
            self._held = {}
            self._valid_until = 0.0

    # -- leases ----------------------------------------------------------------------------

    def tick(self) -> None:
        """One round of the lease keeper."""
        with self._tick_lock:  # the keeper's and an inventory change's, one at a time
            self._tick()

    def _tick(self) -> None:
        asked = self.clock()
        with self._lock:
            previously = set(self._held)
        res = self.store.tick(previously=previously, busy=self.busy())
        ttl = self.settings.lease_ttl_seconds
        with self._lock:
            self._held = dict(res.held)
            # trusted until the TTL from *before* we asked, less a margin for the time
            # between a check and the request it lets through
            self._valid_until = asked + ttl - min(1.0, ttl / 4)
        for name in (*res.lost, *res.released):
            self.ctl.links.remove(name)
        if res.lost:
            log.warning("lost the lease of %s (taken by another replica)", ", ".join(res.lost))
        if res.released:
            log.info("gave back %d gateway(s) to the other replicas: %s", len(res.released),
                     ", ".join(res.released))
        if res.taken:
            log.info("took %d gateway(s): %s", len(res.taken), ", ".join(res.taken))
            self._wake.set()
            try:
                self.on_acquired(list(res.taken))
            except Exception:
                log.exception("after taking leases")
        if self.clock() - self._last_prune > PRUNE_EVERY:
            self._last_prune = self.clock()
            self.queue.prune(KEEP_FINISHED)
        if self.clock() - self._last_orphans > ORPHANS_EVERY:
            self._last_orphans = self.clock()
            self.report_orphans()

    def report_orphans(self) -> int:
        """Record the outcome of commands whose accepting replica died before it could
        (controller/replica_orphans.py); how many were recorded here."""
        return report_orphans(self.ctl, self.queue, self.store.live(), self.me.replica_id)

    def holds(self, name: str) -> bool:
        with self._lock:
            return name in self._held and self.clock() < self._valid_until

    def held(self) -> set[str]:
        with self._lock:
            return set(self._held) if self.clock() < self._valid_until else set()

    def guard(self, gw: Gateway) -> None:
        """Right before a request is sent: do we still hold the gateway?"""
        with self._lock:
            fenced = gw.name in self._fence
        if fenced or not self.holds(gw.name):
            raise LeaseLost(f"{gw.name}: this controller ({self.me.replica_id}) no longer "
                            "holds the gateway's lease; the replica that holds it now "
                            "carries the command out")

    def busy(self) -> set[str]:
        with self._lock:
            return set(self._running.values())

    def overview(self) -> list[ReplicaView]:
        return self.store.overview()

    def _keeper_loop(self) -> None:
        while not self._stop.wait(self.settings.renew_interval_seconds):
            try:
                self.tick()
            except ControllerError as exc:
                log.warning("lease renewal failed: %s", exc.message)
            except Exception:
                log.exception("lease renewal failed")

    # -- the worker: carrying out what our gateways are owed ---------------------------------

    def _worker_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.settings.queue_poll_seconds)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                if self.work_once():
                    self._wake.set()  # a gateway's next command may be eligible now
            except ControllerError as exc:
                log.warning("queue: %s", exc.message)
            except Exception:
                log.exception("queue worker failed")

    def work_once(self) -> int:
        """Claim what may run now and start it; how many rows were claimed."""
        if not self.held():
            return 0
        claimed = self.queue.claim(self.me.replica_id, self.me.incarnation)
        if not claimed:
            return 0
        inventory = {g.name: g for g in self.ctl.inventory.all()}
        # consecutive rows of one command go out together (one fan-out, turns in order)
        for _, group in itertools.groupby(claimed, key=lambda c: c.command.command_id):
            rows = list(group)
            present = [c for c in rows if c.gateway in inventory]
            for c in rows:
                if c.gateway not in inventory:
                    self._finish(c, failure(c.gateway, c.command.op, ControllerError(
                        f"{c.gateway} is no longer in the inventory", code="not_found"), 0.0))
            if present:
                self._start(present, [inventory[c.gateway] for c in present])
        return len(claimed)

    def _start(self, rows: Sequence[Claimed], gateways: Sequence[Gateway]) -> None:
        cmd = rows[0].command
        with self._lock:
            for c in rows:
                self._running[c.seq] = c.gateway
        settle = self.ctl.settle_result

        def after(gw: Gateway, link: Any, res: GatewayResult) -> GatewayResult:
            return settle(gw, link, res, command_id=cmd.command_id, op=cmd.op,
                          actor=cmd.actor, reason=cmd.reason)

        args = cmd.rpc_args()
        try:
            named = self._procedures.get(cmd.op)
            if named is not None:  # work on the session other than one agent request
                futures = [self.ctl.fleet.background(
                    gw, lambda gw, link: self._procedure(cmd, named, gw, link))
                    for gw in gateways]
            else:
                mutating = cmd.op in CHANGE_OPS
                futures = self.ctl.fleet.submit(
                    gateways, cmd.op, lambda gw: args, after=after, guard=self.guard,
                    request_id=cmd.command_id if mutating else None,
                    audit=cmd.audit if mutating else None)
        except Exception:
            # not started (the pool is shutting down): back to the queue, for whoever
            # holds the gateways next (a request that did go out is answered, not
            # applied, when it is sent again under its command id)
            with self._lock:
                for c in rows:
                    self._running.pop(c.seq, None)
            self._requeue(list(rows))
            raise
        for c, fut in zip(rows, futures, strict=True):
            fut.add_done_callback(lambda f, c=c: self._done(c, f))  # type: ignore[misc]

    def _procedure(self, cmd: QueuedCommand, run: Procedure, gw: Gateway,
                   link: Any) -> GatewayResult:
        """A named procedure (controller/holder_calls.py) on our link to `gw`; its JSON
        answer in the result's `value`."""
        started = time.perf_counter()
        try:
            self.guard(gw)
            value = run(gw, link, cmd.args)
        except ControllerError as exc:
            return failure(gw.name, cmd.op, exc, time.perf_counter() - started)
        except Exception as exc:
            log.exception("%s on %s failed", cmd.op, gw.name)
            return failure(gw.name, cmd.op, ControllerError(f"internal error: {exc!r}",
                                                            code="internal"),
                           time.perf_counter() - started)
        ok = value is not False  # a poll says False when the gateway did not answer
        return GatewayResult(gateway=gw.name, op=cmd.op, outcome="applied" if ok else
                             "unreachable", ok=ok, result={"value": value},
                             duration_seconds=time.perf_counter() - started)

    def _done(self, c: Claimed, fut: Future[GatewayResult]) -> None:
        try:
            res = fut.result()
        except Exception as exc:  # the fan-out pool was shut down under it
            res = failure(c.gateway, c.command.op, ControllerError(
                f"not carried out: {exc!r}", code="internal"), 0.0)
        if res.error_code != LeaseLost.code:
            self._finish(c, res)
            return
        # not sent: queued again once the gateway's other rows here are done (by the
        # holder then: us after a late renewal, or the replica that took it over)
        with self._lock:
            self._running.pop(c.seq, None)
            self._fence.add(c.gateway)
            self._given_up.setdefault(c.gateway, []).append(c)
            rows = self._drained()
        self._requeue(rows)

    def _drained(self) -> list[Claimed]:
        """Under the lock: the given-up rows of gateways with nothing running here any
        more (they go back to the queue together)."""
        busy = set(self._running.values())
        out: list[Claimed] = []
        for name in [g for g in self._given_up if g not in busy]:
            out += self._given_up.pop(name)
        return out

    def _requeue(self, rows: list[Claimed]) -> None:
        if rows:
            with self._outbox_ready:
                self._outbox.extend((row, None) for row in rows)
                self._outbox_ready.notify()

    def _finish(self, c: Claimed, res: GatewayResult) -> None:
        with self._outbox_ready:
            self._outbox.append((c, res))
            self._outbox_ready.notify()

    def _finisher_loop(self) -> None:
        """Write finished rows' results in batches; a failed write is tried again (the
        rows stay claimed by us until it succeeds, and nobody else runs them)."""
        while True:
            with self._outbox_ready:
                while not self._outbox and not self._stop_finisher.is_set():
                    self._outbox_ready.wait(1.0)
                batch, self._outbox = self._outbox, []
            if not batch:
                return  # stopped, nothing left
            try:
                self.queue.finish_many([(c.seq, r.model_dump(mode="json"))
                                        for c, r in batch if r is not None])
                self.queue.requeue([(c.seq, c.epoch) for c, r in batch if r is None],
                                   self.me.replica_id)
            except ControllerError as exc:
                log.warning("could not record %d result(s), trying again: %s", len(batch),
                            exc.message)
                with self._outbox_ready:
                    self._outbox[:0] = batch
                if self._stop_finisher.wait(0.5):
                    return
                continue
            with self._lock:
                for c, r in batch:
                    self._running.pop(c.seq, None)
                    if r is None and c.gateway not in self._given_up \
                            and c.gateway not in self._running.values():
                        self._fence.discard(c.gateway)
                rows = self._drained()
            self._requeue(rows)
            if any(r is None for _, r in batch):
                self._wake.set()  # claim them again (if the lease is still ours)
            self._board.post((c.seq, r) for c, r in batch if r is not None)

    # -- the accepting side --------------------------------------------------------------

    def run(self, gateways: Sequence[Gateway], command: QueuedCommand, *,
            pending: Pending | None, retry_of: Pending | None,
            on_accept: Callable[[list[str]], None],
            on_result: Callable[[GatewayResult], None]) -> list[GatewayResult]:
        """Queue `command` for `gateways` and wait for every result; in gateway order.

        In one transaction, with the gateways' state rows locked: a retry keeps only the
        gateways still owed `retry_of`; a state change is recorded as owed (`pending`);
        the queue rows are inserted. `on_accept` gets the gateways accepted."""
        ctl = self.ctl
        names = [g.name for g in gateways]
        if not names:
            return []
        if not self.started and not self.store.live():
            # a command on the controller host (`drawbridge-controller ...`), and no
            # replica serves: nobody holds these gateways to carry it out
            return [failure(n, command.op, ControllerError(
                "no controller replica is running (drawbridge-controller serve): nothing "
                "holds this gateway to carry the request out", code="unreachable"), 0.0)
                for n in names]
        with ctl.db.begin() as conn:
            current = ctl.states.locked(conn, names)
            chosen = names
            if retry_of is not None:
                chosen = [n for n in names if (p := current[n].pending) is not None
                          and p.command_id == retry_of.command_id]
            if pending is not None:
                ctl.states.write_many_locked(conn, [current[n] for n in chosen], {
                    "pending": pending, "last_command_id": command.command_id})
            seqs = self.queue.insert(conn, command, chosen)
        on_accept(chosen)
        self._wake.set()
        got = wait_for_results(self.queue, self._board, dict(zip(seqs, chosen, strict=True)),
                               op=command.op, on_result=on_result,
                               waited=self.wait_seconds(),
                               poll=self.settings.queue_poll_seconds, held=self.held,
                               clock=self.clock)
        return [got[s] for s in seqs]

    def wait_seconds(self) -> float:
        """How long an accepting replica waits for a row's result: a slow agent's whole
        request timeout, a takeover, and a reconnect, with room for the rows before it."""
        s, ssh = self.settings, self.ctl.config.ssh
        return 2 * ssh.request_timeout + 2 * s.lease_ttl_seconds + ssh.connect_timeout + 30
