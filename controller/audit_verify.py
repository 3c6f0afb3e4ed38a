"""Verification of the audit chain (pure): every link, every keyed hash, the head the
controller wrote, and signed checkpoints.

The chain proves that no record was edited, inserted or moved without the key;
the head file proves that none was cut off the end; a checkpoint (the chain's
head at some seq, signed with a key the database never holds, and kept off the
controller) proves that no record up to its seq was changed or removed, even
against someone who had the chain key and rewrote the database and the head
file alike.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

from controller.audit_head import Head
from controller.audit_records import GENESIS, AuditRecord, record_from_row, record_hash

HASHED_FIELDS = ("seq", "ts_us", "actor", "action", "outcome", "targets", "reason", "ticket",
                 "command_id", "detail", "prev_hash")


class CheckpointResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    seq: int
    head_hash: str
    source: str  # "database", or the file it came from
    key: str  # which public key checked its signature
    ok: bool
    problem: str | None = None


class VerifyReport(BaseModel):
    model_config = ConfigDict(frozen=True)

    ok: bool
    records: int
    last_seq: int | None = None
    first_bad_seq: int | None = None
    problem: str | None = None
    bad_record: AuditRecord | None = None
    checkpoints: list[CheckpointResult] = []
    alarm: str | None = None  # a tamper alarm the controller holds (writes refused)
    notes: list[str] = []  # e.g. acknowledged alarms: what an admin accepted, and when


@dataclass(frozen=True)
class CheckpointClaim:
    """A checkpoint to hold the chain to; its signature was checked before (`problem`
    says why it cannot count, e.g. a bad signature)."""

    seq: int
    head_hash: str
    source: str
    key: str
    problem: str | None = None


def _chain_problem(rec: AuditRecord, data: Mapping[str, Any], key: bytes, expected_seq: int,
                   prev: str) -> str | None:
    if rec.seq != expected_seq:
        if rec.seq > expected_seq:
            missing = (f"#{expected_seq}" if rec.seq == expected_seq + 1
                       else f"#{expected_seq} to #{rec.seq - 1}")
            return (f"record {rec.label()} follows #{expected_seq - 1}: record {missing} "
                    "is missing (deleted or renumbered)")
        return (f"record {rec.label()} appears where #{expected_seq} belongs: "
                "records were renumbered or duplicated")
    if rec.prev_hash != prev:
        return (f"record {rec.label()} does not link to the record before it: a record "
                "was deleted, inserted or moved at this point (or this one was moved here)")
    fields = {k: data[k] for k in HASHED_FIELDS}
    if not hmac.compare_digest(record_hash(key, **fields), rec.hash):
        return (f"record {rec.label()} was altered after it was written: its content "
                "does not match its hash")
    return None


def verify_chain(rows: Iterable[Mapping[str, Any]], key: bytes, *,
                 head: Head | None = None, head_problem: str | None = None,
                 checkpoints: Sequence[CheckpointClaim] = ()) -> VerifyReport:
    """Walk the chain in seq order (`rows` as stored); the first record that does not
    hold is named. `head`: the head file's head (None: none to compare with, see
    `head_problem` for why); `checkpoints`: signed heads the chain must still hold."""
    expected_seq, prev, count = 1, GENESIS, 0
    wanted = {c.seq for c in checkpoints if c.problem is None}
    if head is not None:
        wanted.add(head.seq)
    hashes_at: dict[int, str] = {}
    bad: tuple[AuditRecord, str] | None = None
    notes: list[str] = []
    for data in rows:
        rec = record_from_row(data)
        count += 1
        problem = _chain_problem(rec, data, key, expected_seq, prev)
        if problem is not None:
            bad = (rec, problem)
            break
        if rec.seq in wanted:
            hashes_at[rec.seq] = rec.hash
        if rec.action == "audit.acknowledged":
            notes.append(f"{rec.label()}: an admin acknowledged a tamper alarm: {rec.reason}")
        prev, expected_seq = rec.hash, expected_seq + 1
    last = expected_seq - 1  # the last record proven good
    results = [_checkpoint_result(c, hashes_at, last, bad) for c in checkpoints]
    report: dict[str, Any] = {"records": count, "last_seq": last or None,
                              "checkpoints": results, "notes": notes}
    if bad is not None:
        rec, problem = bad
        return VerifyReport(ok=False, first_bad_seq=rec.seq, problem=problem, bad_record=rec,
                            **report)
    tail_problem = _head_result(head, head_problem, hashes_at, last)
    if tail_problem is not None:
        first_bad, problem = tail_problem
        return VerifyReport(ok=False, first_bad_seq=first_bad, problem=problem, **report)
    failed = [r for r in results if not r.ok]
    if failed:
        return VerifyReport(ok=False, first_bad_seq=None,
                            problem=f"checkpoint #{failed[0].seq} ({failed[0].source}): "
                                    f"{failed[0].problem}", **report)
    return VerifyReport(ok=True, **report)


def _head_result(head: Head | None, head_problem: str | None, hashes_at: dict[int, str],
                 last: int) -> tuple[int | None, str] | None:
    if head is None:
        return (None, head_problem) if head_problem is not None else None
    if head.seq == 0:  # the head of an empty chain: anything that links from it
        return None
    if head.seq > last:
        gone = f"#{head.seq}" if head.seq == last + 1 else f"#{last + 1} to #{head.seq}"
        return (last + 1, f"record {gone} is missing from the end of the log: the controller "
                          f"wrote up to #{head.seq}, the database ends at #{last}")
    if hashes_at.get(head.seq) != head.hash:
        return (head.seq, f"record #{head.seq} is not the record the controller wrote there")
    return None


def _checkpoint_result(claim: CheckpointClaim, hashes_at: dict[int, str], last: int,
                       bad: tuple[AuditRecord, str] | None) -> CheckpointResult:
    def result(ok: bool, problem: str | None = None) -> CheckpointResult:
        return CheckpointResult(seq=claim.seq, head_hash=claim.head_hash, source=claim.source,
                                key=claim.key, ok=ok, problem=problem)

    if claim.problem is not None:
        return result(False, claim.problem)
    if claim.seq in hashes_at:
        if hmac.compare_digest(hashes_at[claim.seq], claim.head_hash):
            return result(True)
        return result(False, f"record #{claim.seq} is not the record this checkpoint signed: "
                             f"the chain up to #{claim.seq} was rewritten (with the chain key)")
    if bad is not None and bad[0].seq <= claim.seq:
        return result(False, f"the chain breaks at #{bad[0].seq}, before this checkpoint's "
                             f"#{claim.seq}: {bad[1]}")
    return result(False, f"the log ends at #{last}: record #{claim.seq}, which this checkpoint "
                         "signed, and everything after it were removed")


def verify_segment(rows: Iterable[Mapping[str, Any]], key: bytes, start: Head | None
                   ) -> str | None:
    """The records after `start` (in seq order) hold: each follows and links to the one
    before it (the first to `start`) and matches its keyed hash. None, or the problem."""
    expected_seq, prev = (start.seq + 1, start.hash) if start else (1, GENESIS)
    for data in rows:
        rec = record_from_row(data)
        problem = _chain_problem(rec, data, key, expected_seq, prev)
        if problem is not None:
            return problem
        prev, expected_seq = rec.hash, expected_seq + 1
    return None
