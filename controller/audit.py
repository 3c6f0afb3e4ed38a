"""The audit log: append-only records chained by keyed hash, held to a head kept off the
database, and their verification.

Records and their hashes are in controller/audit_records.py, the head file and the
comparison with it in controller/audit_head.py, verification in
controller/audit_verify.py. This module writes and reads the chain:

- every append reads the chain's tail under the audit lock (PostgreSQL: an advisory
  lock, so several controllers append to one chain) and compares it with the head
  the controller wrote (in memory and in the head file, whichever is further): a
  shorter or different chain, or a lost head file, is a tamper alarm. The alarm is
  recorded (at the database's end; the head file keeps the evidence), counted, and
  every further write is refused until an admin acknowledges it;
- a record is committed (SQLite synchronous=FULL; PostgreSQL's default, durable
  commit) and the head written and fsynced before the caller hears "ok".
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from controller.audit_head import EMPTY, Head, HeadFile, HeadUnreadable, compare_head
from controller.audit_records import (
    GENESIS,
    AuditEvent,
    AuditKey,
    AuditRecord,
    HistoryQuery,
    canonical_json,
    format_time,
    record_from_row,
    record_hash,
)
from controller.audit_verify import CheckpointClaim, VerifyReport, verify_chain, verify_segment
from controller.db import Database, storable_text
from controller.errors import AuditTampered, Conflict, StorageError

__all__ = ["ACK_ACTION", "ALARM_ACTION", "GENESIS", "AuditEvent", "AuditKey", "AuditLog",
           "AuditRecord", "HistoryQuery", "TamperAlarm", "VerifyReport", "canonical_json",
           "format_time", "record_hash"]

log = logging.getLogger("drawbridge.controller.audit")
_CHUNK = 1000
ALARM_ACTION = "audit.tamper_alarm"
ACK_ACTION = "audit.acknowledged"


@dataclass(frozen=True)
class TamperAlarm:
    """The chain does not hold the head the controller wrote."""

    problem: str
    expected: Head | None  # the head the controller trusted
    found: Head | None  # the database's last record when it was seen
    since: float

    def detail(self) -> dict[str, Any]:
        def head(h: Head | None) -> dict[str, Any] | None:
            return {"seq": h.seq, "hash": h.hash} if h else None
        return {"problem": self.problem, "expected": head(self.expected),
                "found": head(self.found), "since": self.since}


AlarmHook = Callable[[TamperAlarm | None], None]


def _no_hook(alarm: TamperAlarm | None) -> None:
    del alarm


class AuditLog:
    def __init__(self, db: Database, key: AuditKey, *, head_path: Path | None = None,
                 on_alarm: AlarmHook = _no_hook, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.key = key.key
        self.head_file = HeadFile(head_path) if head_path is not None else None
        self.table = db.schema.audit_log
        self.on_alarm = on_alarm
        self.clock = clock
        self._lock = threading.Lock()
        self._expected: Head | None = None  # the last head this controller wrote or read
        self._alarm: TamperAlarm | None = None

    @property
    def head_path(self) -> Path | None:
        return self.head_file.path if self.head_file is not None else None

    @property
    def alarm(self) -> TamperAlarm | None:
        if self._alarm is not None:
            with self._lock:
                self._acknowledged_elsewhere()
        return self._alarm

    # -- the head guard ------------------------------------------------------------------

    def _tail(self, conn: Connection) -> Head | None:
        t = self.table
        last = conn.execute(sa.select(t.c.seq, t.c.hash).order_by(t.c.seq.desc()).limit(1)
                            ).first()
        return Head(int(last.seq), str(last.hash)) if last else None

    def _hash_at(self, conn: Connection, seq: int) -> str | None:
        t = self.table
        value = conn.execute(sa.select(t.c.hash).where(t.c.seq == seq)).scalar()
        return str(value) if value is not None else None

    def _trusted_head(self) -> tuple[Head | None, str | None]:
        """The further of the head in memory and the one in the file (another process on
        this state dir, e.g. `drawbridge-controller token create`, may have moved it);
        or why there is none to trust."""
        assert self.head_file is not None
        try:
            on_disk = self.head_file.read()
        except HeadUnreadable as exc:
            return None, str(exc)
        mine = self._expected
        if on_disk is None:
            if mine is not None:
                return None, (f"the head file {self.head_file.path} vanished while the "
                              f"controller ran (the chain's head was {mine.label()})")
            return None, None
        if mine is not None and mine.seq >= on_disk.seq:
            return mine, None
        return on_disk, None

    def _guard(self, conn: Connection, tail: Head | None) -> tuple[str | None, Head | None]:
        """Why the chain may not be appended to (None: it may), and the trusted head."""
        if self.head_file is None:
            return None, None
        expected, problem = self._trusted_head()
        if problem is not None:
            return problem, expected
        if expected is None:
            at = None
        elif tail is not None and tail.seq == expected.seq:
            at = tail.hash
        else:
            at = self._hash_at(conn, expected.seq)
        return compare_head(expected, tail, at, head_file=f"the head file {self.head_file.path}"
                            ), expected

    def check_head(self) -> TamperAlarm | None:
        """Compare the database with the head (at start); raise the alarm if it does not
        hold it. Returns the alarm (also kept: writes are refused until acknowledged)."""
        if self.head_file is None:
            return None
        with self._lock:
            with self.db.begin() as conn:
                self.db.serialise(conn, "audit")
                tail = self._tail(conn)
                problem, expected = self._guard(conn, tail)
            if problem is None:
                if expected is None:  # a new chain: the head file exists from now on
                    self._advance(Head(*EMPTY))
                else:
                    self._expected = expected
                return None
            return self._raise_alarm(problem, expected, tail)

    def _raise_alarm(self, problem: str, expected: Head | None,
                     found: Head | None) -> TamperAlarm:
        """Under self._lock. Record the alarm at the database's end (once per head it is
        about: a restart that finds the same damage does not add another record); the
        head file is left as it is, as the evidence."""
        alarm = TamperAlarm(problem=problem, expected=expected, found=found,
                            since=self.clock())
        self._alarm = alarm
        log.error("AUDIT TAMPER ALARM: %s; writes refused until an admin acknowledges "
                  "(drawbridge audit acknowledge)", problem)
        try:
            with self.db.begin() as conn:
                self.db.serialise(conn, "audit")
                t = self.table
                last = conn.execute(sa.select(t).order_by(t.c.seq.desc()).limit(1)).first()
                previous = record_from_row(last._asdict()) if last is not None else None
                if previous is None or previous.action != ALARM_ACTION or \
                        previous.detail.get("expected") != alarm.detail()["expected"]:
                    self._insert(conn, self._tail(conn), AuditEvent(
                        actor="controller", action=ALARM_ACTION, outcome="alarm",
                        reason=problem, detail=alarm.detail()))
        except StorageError as exc:
            log.error("could not record the tamper alarm in the audit log: %s", exc.message)
        self.on_alarm(alarm)
        return alarm

    def _refusal(self) -> AuditTampered:
        alarm = self._alarm
        return AuditTampered(
            "the audit log is held by a tamper alarm, so nothing is done that it would "
            f"have to record: {alarm.problem if alarm else '?'}. An admin must look, then "
            "acknowledge it: drawbridge audit acknowledge --reason ...")

    def acknowledge(self, *, actor: str, reason: str, ticket: str | None = None
                    ) -> AuditRecord:
        """An admin accepts the chain as the database holds it now: recorded (what was
        seen, by whom, why), the head moves to that record, writes resume."""
        with self._lock:
            alarm = self._alarm
            if alarm is None:
                raise Conflict("there is no tamper alarm to acknowledge")
            with self.db.begin() as conn:
                self.db.serialise(conn, "audit")
                row = self._insert(conn, self._tail(conn), AuditEvent(
                    actor=actor, action=ACK_ACTION, outcome="ok", reason=reason,
                    ticket=ticket, detail={"alarm": alarm.detail()}))
            self._advance(Head(row["seq"], row["hash"]))
            self._alarm = None
        log.warning("tamper alarm acknowledged by %s: %s", actor, reason)
        self.on_alarm(None)
        return record_from_row(row)

    def _acknowledged_elsewhere(self) -> bool:
        """Under self._lock, while an alarm holds: did an admin acknowledge it from another
        process on this state dir (`drawbridge-controller audit acknowledge` on the host)?
        Then the head file names a record that the chain holds, and the chain has an
        acknowledgement made since the alarm: the alarm is lifted here too."""
        alarm = self._alarm
        if alarm is None or self.head_file is None:
            return alarm is None
        try:
            on_disk = self.head_file.read()
        except HeadUnreadable:
            return False
        if on_disk is None:
            return False
        t = self.table
        with self.db.begin() as conn:
            tail = self._tail(conn)
            if compare_head(on_disk, tail, self._hash_at(conn, on_disk.seq)) is not None:
                return False
            acked = conn.execute(sa.select(t.c.seq).where(
                t.c.action == ACK_ACTION, t.c.seq <= on_disk.seq,
                t.c.ts_us >= int(alarm.since * 1_000_000)).limit(1)).first()
        if acked is None:
            return False
        self._expected, self._alarm = on_disk, None
        log.warning("tamper alarm acknowledged by another process (audit record #%s)",
                    acked.seq)
        self.on_alarm(None)
        return True

    def raise_alarm(self, problem: str) -> TamperAlarm:
        """A break found by someone else (e.g. the checks before a checkpoint)."""
        with self._lock:
            if self._alarm is not None:
                return self._alarm
            with self.db.begin() as conn:
                tail = self._tail(conn)
            return self._raise_alarm(problem, self._expected, tail)

    def _advance(self, head: Head) -> None:
        self._expected = head
        if self.head_file is not None:
            self.head_file.write(head)

    # -- writing ------------------------------------------------------------------------

    def _insert(self, conn: Connection, tail: Head | None, event: AuditEvent
                ) -> dict[str, Any]:
        targets = canonical_json(list(event.targets))
        detail = canonical_json(dict(event.detail))
        # a reason may quote an error from a gateway: stored (and hashed) as both stores
        # can keep it; everything else here is validated or built by the controller
        event = dataclasses.replace(event, reason=storable_text(event.reason))
        seq, prev = (tail.seq + 1, tail.hash) if tail else (1, GENESIS)
        ts_us = time.time_ns() // 1000
        digest = record_hash(
            self.key, seq=seq, ts_us=ts_us, actor=event.actor, action=event.action,
            outcome=event.outcome, targets=targets, reason=event.reason, ticket=event.ticket,
            command_id=event.command_id, detail=detail, prev_hash=prev)
        row: dict[str, Any] = {
            "seq": seq, "ts_us": ts_us, "actor": event.actor, "action": event.action,
            "outcome": event.outcome, "targets": targets, "reason": event.reason,
            "ticket": event.ticket, "command_id": event.command_id, "detail": detail,
            "prev_hash": prev, "hash": digest,
        }
        conn.execute(self.table.insert().values(**row))
        return row

    def append(self, event: AuditEvent) -> AuditRecord:
        """Add one record at the end of the chain (serialised; safe across threads, and
        across controllers sharing one PostgreSQL database); durable when it returns.
        AuditTampered while a tamper alarm holds the log."""
        with self._lock:
            if self._alarm is not None and not self._acknowledged_elsewhere():
                raise self._refusal()
            problem: str | None = None
            for attempt in range(5):
                try:
                    with self.db.begin() as conn:
                        # PostgreSQL: other controllers append to the same chain. Their
                        # appends and ours take turns on an advisory lock held until
                        # commit, and the tail is read under it.
                        self.db.serialise(conn, "audit")
                        tail = self._tail(conn)
                        problem, expected = self._guard(conn, tail)
                        if problem is None:
                            row = self._insert(conn, tail, event)
                    break
                except StorageError as exc:
                    # another process took this seq (SQLite has no advisory locks): read
                    # the new tail, retry
                    if not isinstance(exc.__cause__, sa.exc.IntegrityError) or attempt == 4:
                        raise
            if problem is not None:
                self._raise_alarm(problem, expected, tail)
                raise self._refusal()
            self._advance(Head(row["seq"], row["hash"]))
        return record_from_row(row)

    # -- reading ------------------------------------------------------------------------

    def _rows(self, where: list[Any], *, descending: bool = False) -> Iterator[sa.Row[Any]]:
        t = self.table
        cursor: int | None = None
        while True:
            stmt = sa.select(t).where(*where)
            if cursor is not None:
                stmt = stmt.where(t.c.seq < cursor if descending else t.c.seq > cursor)
            stmt = stmt.order_by(t.c.seq.desc() if descending else t.c.seq).limit(_CHUNK)
            with self.db.begin() as conn:
                rows = conn.execute(stmt).fetchall()
            if not rows:
                return
            yield from rows
            cursor = int(rows[-1].seq)

    def query(self, q: HistoryQuery) -> list[AuditRecord]:
        """Matching records, oldest first; the most recent `limit` of them."""
        t = self.table
        where: list[Any] = []
        if q.since is not None:
            where.append(t.c.ts_us >= round(q.since * 1e6))
        if q.until is not None:
            where.append(t.c.ts_us <= round(q.until * 1e6))
        if q.actor:
            where.append(t.c.actor == q.actor)
        if q.action:
            where.append(sa.or_(t.c.action == q.action, t.c.action.startswith(q.action + ".")))
        if q.command_id:
            where.append(t.c.command_id == q.command_id)
        if q.gateway:
            where.append(t.c.targets.contains(json.dumps(q.gateway)))
        found: list[AuditRecord] = []
        for row in self._rows(where, descending=True):
            rec = record_from_row(row._asdict())
            if q.gateway and q.gateway not in rec.targets:
                continue
            found.append(rec)
            if len(found) >= q.limit:
                break
        found.reverse()
        return found

    def get(self, seq: int) -> AuditRecord | None:
        """One record by its number (None if there is none)."""
        t = self.table
        with self.db.begin() as conn:
            row = conn.execute(sa.select(t).where(t.c.seq == seq)).first()
        return record_from_row(row._asdict()) if row else None

    def tail(self) -> Head | None:
        """The database's last record (seq, hash)."""
        with self.db.begin() as conn:
            return self._tail(conn)

    def count_since(self, seq: int, *, exclude_actions: Sequence[str] = ()) -> int:
        """Records after `seq`, except those of `exclude_actions`."""
        t = self.table
        stmt = sa.select(sa.func.count()).select_from(t).where(t.c.seq > seq)
        if exclude_actions:
            stmt = stmt.where(t.c.action.not_in(list(exclude_actions)))
        with self.db.begin() as conn:
            return int(conn.execute(stmt).scalar() or 0)

    def last_seq(self) -> int:
        with self.db.begin() as conn:
            return int(conn.execute(sa.select(sa.func.max(self.table.c.seq))).scalar() or 0)

    # -- verification --------------------------------------------------------------------

    def head_state(self) -> tuple[Head | None, str | None]:
        """The head file's head, or why there is none to hold the chain to."""
        if self.head_file is None:
            return None, None
        try:
            head = self.head_file.read()
        except HeadUnreadable as exc:
            return None, str(exc)
        if head is None and self.last_seq() > 0:
            return None, (f"the head file {self.head_file.path} is missing, but the log holds "
                          "records: whether records were cut off the end cannot be told")
        return head, None

    def verify(self, checkpoints: Sequence[CheckpointClaim] = ()) -> VerifyReport:
        """Walk the whole chain; the first record that does not hold is named; the head
        file and every checkpoint given must agree with it."""
        head, head_problem = self.head_state()
        report = verify_chain((row._asdict() for row in self._rows([])), self.key, head=head,
                              head_problem=head_problem, checkpoints=checkpoints)
        alarm = self._alarm
        if alarm is not None:
            # the alarm says what was found first (a record cut off the end, say); the
            # head comparison would only see the alarm's own record where the head was
            problem = alarm.problem if report.bad_record is None else report.problem
            report = report.model_copy(update={"ok": False, "alarm": alarm.problem,
                                               "problem": problem})
        return report

    def verify_since(self, start: Head | None) -> str | None:
        """Check only the records after `start` (a head proven before, e.g. the last
        checkpoint): each links to the one before and matches its keyed hash."""
        where = [self.table.c.seq > start.seq] if start is not None else []
        return verify_segment((row._asdict() for row in self._rows(where)), self.key, start)
