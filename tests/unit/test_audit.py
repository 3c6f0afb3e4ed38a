"""The audit chain: appends, queries, and verification naming the first bad record."""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.audit import AuditEvent, AuditKey, AuditLog, HistoryQuery, record_hash
from controller.db import Database
from tests.storage import raw_sql


@pytest.fixture
def log(tmp_path: Path, db_url: str) -> Iterator[AuditLog]:
    db = Database(db_url)
    db.migrate()
    key = AuditKey.load_or_create(tmp_path / "audit.key")
    yield AuditLog(db, key, head_path=tmp_path / "audit.head")
    db.dispose()


def fill(log: AuditLog, n: int = 6) -> None:
    for i in range(n):
        log.append(AuditEvent(actor=f"user{i % 2}", action="isolate" if i % 2 else "restore",
                              outcome="ok", reason=f"reason {i}", targets=(f"gw{i % 3}",),
                              ticket="INC-1" if i == 3 else None,
                              detail={"i": i, "ünïcode": "✓"}))


sql = raw_sql


def test_chain_links_every_record(log: AuditLog) -> None:
    fill(log)
    records = log.query(HistoryQuery())
    assert [r.seq for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[0].prev_hash == "0" * 64
    for before, after in itertools.pairwise(records):
        assert after.prev_hash == before.hash
    report = log.verify()
    assert report.ok and report.records == 6 and report.last_seq == 6


def test_empty_log_verifies(log: AuditLog) -> None:
    assert log.verify().ok


@pytest.mark.parametrize("column,value", [
    ("reason", "nothing happened"), ("actor", "mallory"), ("targets", '["gw9"]'),
    ("detail", '{"i":3}'), ("ts_us", 1), ("outcome", "failed"), ("ticket", None),
])
def test_edited_record_is_named(log: AuditLog, db_url: str, column: str,
                                value: object) -> None:
    fill(log)
    sql(db_url, f"UPDATE audit_log SET {column} = :value WHERE seq = 4", value=value)
    report = log.verify()
    assert not report.ok
    assert report.first_bad_seq == 4
    assert "#4" in (report.problem or "") and "altered" in (report.problem or "")


def test_deleted_record_is_named(log: AuditLog, db_url: str) -> None:
    fill(log)
    sql(db_url, "DELETE FROM audit_log WHERE seq = 3")
    report = log.verify()
    assert not report.ok and report.first_bad_seq == 4
    assert "#3" in (report.problem or "") and "missing" in (report.problem or "")


def test_deleted_and_renumbered_is_named(log: AuditLog, db_url: str) -> None:
    fill(log)
    sql(db_url, "DELETE FROM audit_log WHERE seq = 3")
    for seq in (4, 5, 6):
        sql(db_url, "UPDATE audit_log SET seq = :new WHERE seq = :old", new=seq - 1, old=seq)
    report = log.verify()
    assert not report.ok and report.first_bad_seq == 3
    assert "does not link" in (report.problem or "")


def test_reordered_records_are_named(log: AuditLog, db_url: str) -> None:
    fill(log)
    sql(db_url, "UPDATE audit_log SET seq = -1 WHERE seq = 2")
    sql(db_url, "UPDATE audit_log SET seq = 2 WHERE seq = 3")
    sql(db_url, "UPDATE audit_log SET seq = 3 WHERE seq = -1")
    report = log.verify()
    assert not report.ok and report.first_bad_seq == 2


def test_truncated_tail_is_detected(log: AuditLog, db_url: str) -> None:
    fill(log)
    sql(db_url, "DELETE FROM audit_log WHERE seq >= 5")
    report = log.verify()
    assert not report.ok and report.first_bad_seq == 5
    assert "#5 to #6" in (report.problem or "")


def test_rehashed_forgery_without_the_key_fails(log: AuditLog, db_url: str) -> None:
    """Someone with the database but not the key recomputes the chain with a guessed key."""
    fill(log, 3)
    rows = sql(db_url, "SELECT seq, ts_us, actor, action, outcome, targets, reason, ticket, "
               "command_id, detail FROM audit_log ORDER BY seq")
    prev = "0" * 64
    for row in rows:
        seq, ts, actor, action, outcome, targets, reason, ticket, cid, detail = row
        if seq == 2:
            reason = "forged"
        digest = record_hash(b"guess" * 8, seq=seq, ts_us=ts, actor=actor, action=action,
                             outcome=outcome, targets=targets, reason=reason, ticket=ticket,
                             command_id=cid, detail=detail, prev_hash=prev)
        sql(db_url, "UPDATE audit_log SET reason=:r, prev_hash=:p, hash=:h WHERE seq=:s",
            r=reason, p=prev, h=digest, s=seq)
        prev = digest
    report = log.verify()
    assert not report.ok and report.first_bad_seq == 1


def test_concurrent_appends_stay_one_chain(log: AuditLog) -> None:
    def work(n: int) -> None:
        for i in range(20):
            log.append(AuditEvent(actor=f"t{n}", action="probe", outcome="ok", reason=str(i)))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report = log.verify()
    assert report.ok and report.records == 120


def test_query_filters(log: AuditLog) -> None:
    fill(log)
    log.append(AuditEvent(actor="controller", action="state.unreachable", outcome="observed",
                          targets=("gw10",)))
    assert [r.seq for r in log.query(HistoryQuery(gateway="gw1"))] == [2, 5]
    assert [r.seq for r in log.query(HistoryQuery(actor="user1"))] == [2, 4, 6]
    assert [r.seq for r in log.query(HistoryQuery(action="restore"))] == [1, 3, 5]
    assert [r.seq for r in log.query(HistoryQuery(action="state"))] == [7]
    assert [r.seq for r in log.query(HistoryQuery(limit=2))] == [6, 7]
    first = log.query(HistoryQuery())[0]
    assert log.query(HistoryQuery(until=first.ts_us / 1e6))[0].seq == 1
    assert all(r.seq > 1 for r in log.query(HistoryQuery(since=first.ts_us / 1e6 + 1e-6)))
    assert log.query(HistoryQuery())[0].detail["ünïcode"] == "✓"


def test_key_file_is_private_and_stable(tmp_path: Path) -> None:
    path = tmp_path / "k" / "audit.key"
    first = AuditKey.load_or_create(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert AuditKey.load_or_create(path).key == first.key


def test_records_are_canonical_json(log: AuditLog, db_url: str) -> None:
    log.append(AuditEvent(actor="a", action="x", outcome="ok", detail={"b": 1, "a": [2]}))
    ((detail,),) = sql(db_url, "SELECT detail FROM audit_log")
    assert detail == '{"a":[2],"b":1}'
    assert json.loads(detail) == {"a": [2], "b": 1}


def test_reason_with_a_nul_character_is_stored_and_verifies(log: AuditLog) -> None:
    log.append(AuditEvent(actor="controller", action="state.unreachable", outcome="observed",
                          reason="agent said: \x00garbage"))
    assert log.query(HistoryQuery())[0].reason == "agent said: \ufffdgarbage"
    assert log.verify().ok
