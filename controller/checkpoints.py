"""Checkpoints anchored off the controller: signed heads of the audit chain, sent to every
gateway's journal and kept for export.

When (`Checkpointer.make`): every `[audit] checkpoint_interval_seconds` (default
15 min; skipped when nothing but checkpoint bookkeeping was recorded since the last
one) and after every isolate and restore (requested from the command's thread,
made on the checkpointer's own thread: a command never waits for it).

How: the records since the last checkpoint are verified first (each links to the
one before and matches its keyed hash), so a checkpoint never signs a broken chain;
a break found here is a tamper alarm. Then the head is signed (controller/
checkpoint_keys.py), stored (table `audit_checkpoints`: for export and for the
page; the database cannot forge one, it has no key), and sent to every gateway
(op `checkpoint`, on the poll lane, best effort per gateway). A gateway that
misses one is audited (`audit.checkpoint`, naming it and why).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict

from controller.audit import ACK_ACTION, AuditEvent, HistoryQuery
from controller.audit_head import Head
from controller.audit_verify import CheckpointClaim
from controller.checkpoint_keys import CheckpointFile, CheckpointKey, SignedCheckpoint, claims_from
from controller.db import Database, fit_row
from controller.errors import AgentError, ControllerError
from controller.inventory import Gateway
from controller.transport.link import GatewayLink

if TYPE_CHECKING:
    from controller.service import Controller

log = logging.getLogger("drawbridge.controller.checkpoints")

CHECKPOINT_ACTION = "audit.checkpoint"
RECORDED = "recorded"


class StoredCheckpoint(BaseModel):
    model_config = ConfigDict(frozen=True)

    checkpoint: SignedCheckpoint
    public_key: str
    anchored: dict[str, str]  # gateway -> "recorded", or why not

    @property
    def recorded_on(self) -> list[str]:
        return sorted(g for g, v in self.anchored.items() if v == RECORDED)


class CheckpointStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.table = db.schema.audit_checkpoints

    def add(self, cp: SignedCheckpoint, public_key: str) -> bool:
        """False if a checkpoint of this seq exists already (another controller's)."""
        row = {"seq": cp.seq, "head_hash": cp.head_hash, "ts_us": round(cp.time * 1e6),
               "signature": cp.signature, "key_id": cp.key_id, "public_key": public_key,
               "anchored": "{}"}
        with self.db.begin() as conn:
            exists = conn.execute(sa.select(self.table.c.seq)
                                  .where(self.table.c.seq == cp.seq)).first()
            if exists:
                return False
            conn.execute(self.table.insert().values(**row))
        return True

    def set_anchored(self, seq: int, anchored: dict[str, str]) -> None:
        with self.db.begin() as conn:
            conn.execute(self.table.update().where(self.table.c.seq == seq).values(
                **fit_row(self.table, {"anchored": json.dumps(anchored, sort_keys=True)})))

    def _of(self, row: Any) -> StoredCheckpoint:
        try:
            anchored = json.loads(row.anchored)
        except ValueError:
            anchored = {}
        cp = SignedCheckpoint(seq=int(row.seq), head_hash=row.head_hash,
                              time=int(row.ts_us) / 1e6, signature=row.signature,
                              key_id=row.key_id)
        return StoredCheckpoint(checkpoint=cp, public_key=row.public_key,
                                anchored=anchored if isinstance(anchored, dict) else {})

    def find(self, *, since_seq: int = 0, since_time: float | None = None,
             limit: int = 100_000) -> list[StoredCheckpoint]:
        """Oldest first."""
        t = self.table
        stmt = sa.select(t).where(t.c.seq > since_seq)
        if since_time is not None:
            stmt = stmt.where(t.c.ts_us >= round(since_time * 1e6))
        with self.db.begin() as conn:
            rows = conn.execute(stmt.order_by(t.c.seq.desc()).limit(limit)).fetchall()
        return [self._of(r) for r in reversed(rows)]

    def last(self) -> StoredCheckpoint | None:
        found = self.find(limit=1)
        return found[-1] if found else None


class Checkpointer:
    def __init__(self, ctl: Controller, key: CheckpointKey) -> None:
        self.ctl = ctl
        self.key = key
        self.store = CheckpointStore(ctl.db)
        self._lock = threading.Lock()  # one checkpoint at a time
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._queued: Future[Any] | None = None
        self._queue_lock = threading.Lock()

    # -- when ------------------------------------------------------------------------------

    def request(self, why: str) -> None:
        """Make a checkpoint soon, on the checkpointer's thread (requests that arrive
        while one is queued share it)."""
        with self._queue_lock:
            if self._queued is not None and not self._queued.done() \
                    and not self._queued.running():
                return
            try:
                self._queued = self._pool.submit(self._safe_make, why)
            except RuntimeError:  # shut down
                return

    def _safe_make(self, why: str) -> None:
        try:
            self.make(why)
        except ControllerError as exc:
            log.warning("checkpoint (%s) not made: %s", why, exc.message)
        except RuntimeError as exc:  # the controller is stopping (its pools are shut)
            log.info("checkpoint (%s) not made: %s", why, exc)
        except Exception:
            log.exception("checkpoint (%s) failed", why)

    def wait(self, timeout: float = 30.0) -> None:
        """Until the queued checkpoint (if any) is made (tests; a clean stop)."""
        with self._queue_lock:
            queued = self._queued
        if queued is not None:
            queued.result(timeout)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- what ------------------------------------------------------------------------------

    def make(self, why: str = "interval") -> StoredCheckpoint | None:
        """Sign the chain's head now and send it to every gateway. None when there is
        nothing to sign (no records, no new record since the last checkpoint, or, for
        the interval, only checkpoint bookkeeping since), or a tamper alarm holds the log."""
        audit = self.ctl.audit
        with self._lock:
            if audit.alarm is not None:
                return None
            tail = audit.tail()
            if tail is None:
                return None
            last = self.store.last()
            start = Head(last.checkpoint.seq, last.checkpoint.head_hash) if last else None
            if start is not None and start.seq >= tail.seq:
                return None
            if why == "interval" and start is not None and \
                    audit.count_since(start.seq, exclude_actions=(CHECKPOINT_ACTION,)) == 0:
                return None
            start, problem = self._start(start)
            if problem is None:
                problem = audit.verify_since(start)
            if problem is not None:
                audit.raise_alarm(f"before signing a checkpoint: {problem}")
                return None
            cp = self.key.sign(tail.seq, tail.hash, self.ctl.clock())
            if not self.store.add(cp, self.key.public_b64):
                return None
            anchored = self.anchor(cp)
            self.store.set_anchored(cp.seq, anchored)
        self.ctl.metrics.checkpoint_seq.set(cp.seq)
        missed = {g: why_not for g, why_not in anchored.items() if why_not != RECORDED}
        for g in missed:
            self.ctl.metrics.checkpoint_misses.labels(gateway=g).inc()
        if missed:
            self.ctl.record(AuditEvent(
                actor="controller", action=CHECKPOINT_ACTION,
                outcome="failed" if len(missed) == len(anchored) else "partial",
                reason=f"checkpoint #{cp.seq} did not reach {len(missed)} of {len(anchored)} "
                       "gateway(s)", targets=tuple(sorted(missed)),
                detail={"seq": cp.seq, "head_hash": cp.head_hash, "key_id": cp.key_id,
                        "why": why, "missed": missed}))
        log.info("checkpoint #%d (%s) recorded on %d of %d gateway(s)", cp.seq, why,
                 len(anchored) - len(missed), len(anchored))
        return StoredCheckpoint(checkpoint=cp, public_key=self.key.public_b64,
                                anchored=anchored)

    def _start(self, last: Head | None) -> tuple[Head | None, str | None]:
        """Where the records still to be verified begin: after the last checkpoint, if
        the chain still holds it. If it does not, an admin must have acknowledged a
        chain that ended before it (the records it signed are gone, and every
        verification says so); then everything is verified again. Otherwise the chain
        was rewritten under the checkpoint: that is the problem."""
        audit = self.ctl.audit
        if last is None:
            return None, None
        rec = audit.get(last.seq)
        if rec is not None and rec.hash == last.hash:
            return last, None
        for ack in reversed(audit.query(HistoryQuery(action=ACK_ACTION, limit=100))):
            found = (ack.detail.get("alarm") or {}).get("found") or {}
            if ack.seq > last.seq or int(found.get("seq") or 0) < last.seq:
                return None, None
        return None, (f"the chain no longer holds checkpoint #{last.seq} (signed "
                      f"{last.hash[:16]}...): it was rewritten or cut under it")

    def anchor(self, cp: SignedCheckpoint, gateways: Sequence[Gateway] | None = None
               ) -> dict[str, str]:
        """Send `cp` to each gateway's journal; gateway -> "recorded" or why not."""
        ctl = self.ctl
        targets = list(gateways) if gateways is not None else ctl.inventory.all()
        # where each gateway's session is (as a replica: its lease holder sends it)
        results = ctl.on_holders(targets, "checkpoint.send", cp.rpc_args())
        return {g.name: r if isinstance(r, str) else "internal error"
                for g, r in zip(targets, results, strict=True)}

    def send_one(self, link: GatewayLink, args: dict[str, Any]) -> str:
        """Send one checkpoint (its RPC arguments) on `link`: "recorded" or why not."""
        try:
            link.call("checkpoint", args, respect_backoff=True,
                      timeout=self.ctl.config.poll.timeout_seconds, lane="poll")
        except AgentError as exc:
            if exc.code == "bad_request" and "checkpoint" in exc.message:
                return "the agent does not know checkpoints (upgrade it): " + exc.message
            return exc.message
        except ControllerError as exc:
            return exc.message
        return RECORDED

    # -- export and verification -------------------------------------------------------------

    def export(self, *, since_seq: int = 0, last: int | None = None) -> CheckpointFile:
        found = self.store.find(since_seq=since_seq)
        if last is not None:
            found = found[-last:] if last else []
        return CheckpointFile(public_key=self.key.public_b64, key_id=self.key.key_id,
                              checkpoints=[s.checkpoint for s in found])

    def stored_claims(self) -> list[CheckpointClaim]:
        """The database's own checkpoints, as claims on the chain (their signatures
        checked with the controller's key: the database cannot forge one)."""
        return claims_from([s.checkpoint for s in self.store.find()], source="database",
                           controller_public=self.key.public_raw)

