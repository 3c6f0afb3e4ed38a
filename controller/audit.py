"""The audit log: append-only events chained by keyed hash, and their verification.

Each record commits to the one before it:

    hash(n) = HMAC-SHA256(key, canonical(seq, time, actor, action, outcome, targets,
                                         reason, ticket, command_id, detail, hash(n-1)))

so editing a record breaks its own hash, and deleting, inserting or moving a
record breaks the link of the record after it. The key lives in a file in the
controller's state dir, not in the database: whoever can write to the database
(a PostgreSQL admin, a restored backup) cannot re-hash the chain after an edit.
A head file next to the key remembers the last record written, so cutting
records off the end is detected too.

`verify()` walks the chain in `seq` order and names the first bad record.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict

from controller.db import Database, storable_text
from controller.errors import ConfigError, StorageError

GENESIS = "0" * 64
CHAIN_FORMAT = 1
_CHUNK = 1000


def canonical_json(value: Any) -> str:
    """The one JSON spelling hashed and stored: sorted keys, no spaces, UTF-8 text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=str)


def record_hash(key: bytes, *, seq: int, ts_us: int, actor: str, action: str, outcome: str,
                targets: str, reason: str, ticket: str | None, command_id: str | None,
                detail: str, prev_hash: str) -> str:
    """The chain hash of one record, over the values exactly as stored."""
    payload = json.dumps(
        [CHAIN_FORMAT, seq, ts_us, actor, action, outcome, targets, reason, ticket, command_id,
         detail, prev_hash],
        ensure_ascii=False, separators=(",", ":"),
    )
    return hmac.new(key, payload.encode("utf-8"), hashlib.sha256).hexdigest()


def format_time(ts_us: int) -> str:
    return dt.datetime.fromtimestamp(ts_us / 1e6, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class AuditEvent:
    """What happened, before it gets its place in the chain."""

    actor: str
    action: str
    outcome: str
    reason: str = ""
    targets: tuple[str, ...] = ()
    ticket: str | None = None
    command_id: str | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)


class AuditRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    seq: int
    time: str
    ts_us: int
    actor: str
    action: str
    outcome: str
    targets: list[str]
    reason: str
    ticket: str | None
    command_id: str | None
    detail: dict[str, Any]
    prev_hash: str
    hash: str

    def label(self) -> str:
        """How a person names this record: '#17 (2025-07-23T10:01:02Z, isolate by alice)'."""
        return f"#{self.seq} ({self.time[:19]}Z, {self.action} by {self.actor})"


class VerifyReport(BaseModel):
    model_config = ConfigDict(frozen=True)

    ok: bool
    records: int
    last_seq: int | None = None
    first_bad_seq: int | None = None
    problem: str | None = None
    bad_record: AuditRecord | None = None


@dataclass(frozen=True)
class HistoryQuery:
    gateway: str | None = None
    since: float | None = None
    until: float | None = None
    actor: str | None = None
    action: str | None = None
    command_id: str | None = None
    limit: int = 1000


class AuditKey:
    """The chain key: 32 random bytes in a 0600 file, created on first use."""

    def __init__(self, key: bytes) -> None:
        self.key = key

    @classmethod
    def load_or_create(cls, path: Path) -> AuditKey:
        try:
            text = path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            text = secrets.token_hex(32)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:  # created concurrently: use theirs
                return cls.load_or_create(path)
            with os.fdopen(fd, "w", encoding="ascii") as fh:
                fh.write(text + "\n")
        except OSError as exc:
            raise ConfigError(f"cannot read audit key {path}: {exc.strerror}") from None
        try:
            key = bytes.fromhex(text)
        except ValueError:
            raise ConfigError(f"audit key {path} is not hex; it must be 64 hex digits") from None
        if len(key) < 16:
            raise ConfigError(f"audit key {path} is too short (need at least 16 bytes)")
        return cls(key)


HEAD_FORMAT = "{seq:020d} {digest}\n"  # fixed width: rewritten in place, never truncated


def _write_head(path: Path, seq: int, digest: str) -> None:
    """One small positional write per record (cheaper than write + rename; a record
    this size within one page is not torn by a crash of this process)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, HEAD_FORMAT.format(seq=seq, digest=digest).encode("ascii"), 0)
    finally:
        os.close(fd)


def _read_head(path: Path) -> tuple[int, str] | None:
    try:
        seq_text, digest = path.read_text(encoding="ascii").split()
        return int(seq_text), digest
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return (-1, "")


class AuditLog:
    def __init__(self, db: Database, key: AuditKey, *, head_path: Path | None = None) -> None:
        self.db = db
        self.key = key.key
        self.head_path = head_path
        self.table = db.schema.audit_log
        self._lock = threading.Lock()
        self._tail: tuple[int, str] | None = None  # (seq, hash) of the last record written

    # -- writing ------------------------------------------------------------------------

    def append(self, event: AuditEvent) -> AuditRecord:
        """Add one record at the end of the chain (serialised; safe across threads, and
        across controllers sharing one PostgreSQL database)."""
        targets = canonical_json(list(event.targets))
        detail = canonical_json(dict(event.detail))
        # a reason may quote an error from a gateway: stored (and hashed) as both stores
        # can keep it; everything else here is validated or built by the controller
        event = dataclasses.replace(event, reason=storable_text(event.reason))
        t = self.table
        with self._lock:
            for attempt in range(5):
                try:
                    with self.db.begin() as conn:
                        # PostgreSQL: other controllers may append to the same chain. Their
                        # appends and ours take turns on an advisory lock held until commit,
                        # and the tail is read under it (our cached one may be stale).
                        self.db.serialise(conn, "audit")
                        if self._tail is None or self.db.is_postgresql:
                            last = conn.execute(
                                sa.select(t.c.seq, t.c.hash).order_by(t.c.seq.desc()).limit(1)
                            ).first()
                            self._tail = (int(last.seq), str(last.hash)) if last \
                                else (0, GENESIS)
                        seq, prev = self._tail[0] + 1, self._tail[1]
                        ts_us = time.time_ns() // 1000
                        digest = record_hash(
                            self.key, seq=seq, ts_us=ts_us, actor=event.actor,
                            action=event.action, outcome=event.outcome, targets=targets,
                            reason=event.reason, ticket=event.ticket,
                            command_id=event.command_id, detail=detail, prev_hash=prev)
                        row: dict[str, Any] = {
                            "seq": seq, "ts_us": ts_us, "actor": event.actor,
                            "action": event.action, "outcome": event.outcome,
                            "targets": targets, "reason": event.reason, "ticket": event.ticket,
                            "command_id": event.command_id, "detail": detail,
                            "prev_hash": prev, "hash": digest,
                        }
                        conn.execute(t.insert().values(**row))
                    self._tail = (seq, digest)
                    break
                except StorageError as exc:
                    # another process took this seq (SQLite has no advisory locks): read the
                    # new tail, retry
                    self._tail = None
                    if not isinstance(exc.__cause__, sa.exc.IntegrityError) or attempt == 4:
                        raise
            if self.head_path is not None:
                try:
                    _write_head(self.head_path, seq, digest)
                except OSError as exc:
                    raise StorageError(f"cannot write {self.head_path}: {exc.strerror}") from None
        return _record(row)

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
            rec = _record(row._asdict())
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
        return _record(row._asdict()) if row else None

    def last_seq(self) -> int:
        with self.db.begin() as conn:
            return int(conn.execute(sa.select(sa.func.max(self.table.c.seq))).scalar() or 0)

    # -- verification --------------------------------------------------------------------

    def verify(self) -> VerifyReport:
        """Walk the whole chain; the first record that does not hold is named."""
        expected_seq, prev, count = 1, GENESIS, 0
        hashes_at: dict[int, str] = {}
        head = _read_head(self.head_path) if self.head_path is not None else None
        for row in self._rows([]):
            data = row._asdict()
            rec = _record(data)
            count += 1
            if rec.seq != expected_seq:
                missing = (f"#{expected_seq}" if rec.seq == expected_seq + 1
                           else f"#{expected_seq} to #{rec.seq - 1}")
                problem = (f"record {rec.label()} follows #{expected_seq - 1}: record {missing} "
                           "is missing (deleted or renumbered)") if rec.seq > expected_seq else (
                           f"record {rec.label()} appears where #{expected_seq} belongs: "
                           "records were renumbered or duplicated")
                return _bad(count, rec, problem)
            if rec.prev_hash != prev:
                return _bad(count, rec, (
                    f"record {rec.label()} does not link to the record before it: a record "
                    "was deleted, inserted or moved at this point (or this one was moved here)"))
            fields = {k: data[k] for k in ("seq", "ts_us", "actor", "action", "outcome",
                                           "targets", "reason", "ticket", "command_id",
                                           "detail", "prev_hash")}
            if not hmac.compare_digest(record_hash(self.key, **fields), rec.hash):
                return _bad(count, rec, (
                    f"record {rec.label()} was altered after it was written: its content "
                    "does not match its hash"))
            if head is not None and rec.seq == head[0]:
                hashes_at[rec.seq] = rec.hash
            prev, expected_seq = rec.hash, expected_seq + 1
        last = expected_seq - 1
        if head is not None:
            head_seq, head_hash = head
            if head_seq < 0:
                return VerifyReport(ok=False, records=count, last_seq=last or None,
                                    problem=f"the head file {self.head_path} is unreadable")
            if head_seq > last:
                gone = f"#{head_seq}" if head_seq == last + 1 else f"#{last + 1} to #{head_seq}"
                return VerifyReport(
                    ok=False, records=count, last_seq=last or None, first_bad_seq=last + 1,
                    problem=(f"record {gone} is missing from the end of the log: the controller "
                             f"wrote up to #{head_seq}, the database ends at #{last}"))
            if head_seq and hashes_at.get(head_seq) != head_hash:
                return VerifyReport(
                    ok=False, records=count, last_seq=last or None, first_bad_seq=head_seq,
                    problem=f"record #{head_seq} is not the record the controller wrote there")
        return VerifyReport(ok=True, records=count, last_seq=last or None)


def _bad(count: int, rec: AuditRecord, problem: str) -> VerifyReport:
    return VerifyReport(ok=False, records=count, first_bad_seq=rec.seq, problem=problem,
                        bad_record=rec)


def _loads(text: Any, default: Any) -> Any:
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return default


def _record(row: Mapping[str, Any]) -> AuditRecord:
    targets = _loads(row["targets"], [])
    detail = _loads(row["detail"], {})
    return AuditRecord(
        seq=int(row["seq"]), ts_us=int(row["ts_us"]), time=format_time(int(row["ts_us"])),
        actor=row["actor"], action=row["action"], outcome=row["outcome"],
        targets=[str(x) for x in targets] if isinstance(targets, list) else [str(targets)],
        reason=row["reason"], ticket=row["ticket"], command_id=row["command_id"],
        detail=detail if isinstance(detail, dict) else {"value": detail},
        prev_hash=row["prev_hash"], hash=row["hash"],
    )
