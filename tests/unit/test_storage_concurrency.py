"""Two controllers writing one PostgreSQL database at once: no lost updates on gateway
rows, no deadlock on overlapping sets, one unbroken audit chain.

Each writer has its own Database (its own connection pool), as two controller
processes would; they contend in the database, not on a Python lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from controller.audit import AuditEvent, AuditKey, AuditLog, HistoryQuery
from controller.db import Database
from controller.states import GatewayState, StateStore

WRITERS = 2


@pytest.fixture
def dbs(pg_url: str) -> Iterator[list[Database]]:
    first = Database(pg_url)
    first.migrate()
    out = [first] + [Database(pg_url) for _ in range(WRITERS - 1)]
    yield out
    for db in out:
        db.dispose()


def run_together(work: Callable[[int], None], n: int) -> None:
    """Start n threads at the same instant; re-raise the first failure."""
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def body(i: int) -> None:
        barrier.wait()
        try:
            work(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]


def test_unlocked_read_modify_write_loses_updates(dbs: list[Database]) -> None:
    """The hazard the row locks exist for (and proof that this test setup contends)."""
    t = dbs[0].schema.gateway_state
    with dbs[0].begin() as conn:
        conn.execute(t.insert().values(name="gw", drift_repairs=0))
    rounds = 40

    def naive(i: int) -> None:
        for _ in range(rounds):
            with dbs[i].begin() as conn:
                seen = conn.execute(sa.select(t.c.drift_repairs).where(t.c.name == "gw"))
                value = int(seen.scalar_one())
                time.sleep(0.002)
                conn.execute(t.update().where(t.c.name == "gw").values(drift_repairs=value + 1))

    run_together(naive, WRITERS)
    with dbs[0].begin() as conn:
        final = conn.execute(sa.select(t.c.drift_repairs)).scalar_one()
    assert final < WRITERS * rounds


def test_concurrent_modify_loses_no_update(dbs: list[Database]) -> None:
    stores = [StateStore(db) for db in dbs]
    rounds = 40
    count = threading.Lock()
    active, contended = 0, 0

    def bump(i: int) -> None:
        nonlocal active, contended

        def change(old: GatewayState) -> dict[str, int]:
            # a slow change: the other writer arrives while this one holds the row
            time.sleep(0.002)
            return {"drift_repairs": (old.drift_repairs or 0) + 1}

        for _ in range(rounds):
            with count:
                active += 1
                contended += active > 1
            stores[i].modify("gw", change)
            with count:
                active -= 1

    run_together(bump, WRITERS)
    final = stores[0].get("gw")
    assert contended > rounds // 2  # the writers really were in there together
    assert final.drift_repairs == WRITERS * rounds
    assert final.row_version == WRITERS * rounds


def test_first_write_of_a_row_by_two_writers(dbs: list[Database]) -> None:
    """Both find no row and create it: one insert wins, the other's change still lands."""
    stores = [StateStore(db) for db in dbs]
    names = [f"new{i}" for i in range(30)]

    def create(i: int) -> None:
        for name in names:
            stores[i].modify(name, lambda old: {"drift_repairs": (old.drift_repairs or 0) + 1})

    run_together(create, WRITERS)
    got = stores[0].all()
    assert {n: got[n].drift_repairs for n in names} == {n: WRITERS for n in names}


def test_overlapping_update_many_does_not_deadlock(dbs: list[Database]) -> None:
    stores = [StateStore(db) for db in dbs]
    names = [f"gw{i}" for i in range(8)]

    def write(i: int) -> None:
        order = names if i % 2 == 0 else list(reversed(names))
        for n in range(30):
            stores[i].update_many(order, last_command_id=f"w{i}-{n}")

    run_together(write, WRITERS)
    rows = stores[0].all()
    assert all(rows[n].row_version == WRITERS * 30 for n in names)


def test_concurrent_appenders_keep_one_chain(dbs: list[Database], tmp_path: Path) -> None:
    """Two controllers (own pools, own head files, one key) and threads in each."""
    key = AuditKey.load_or_create(tmp_path / "audit.key")
    logs = [AuditLog(db, key, head_path=tmp_path / f"head{i}") for i, db in enumerate(dbs)]
    for log in logs:  # as each controller does when it opens
        assert log.check_head() is None
    threads_per_log, rounds = 3, 25

    def append(i: int) -> None:
        log = logs[i % WRITERS]
        for n in range(rounds):
            log.append(AuditEvent(actor=f"w{i}", action="probe", outcome="ok", reason=str(n)))

    run_together(append, WRITERS * threads_per_log)
    total = WRITERS * threads_per_log * rounds
    for log in logs:
        report = log.verify()
        assert report.ok, report.problem
        assert report.records == total and report.last_seq == total
    records = logs[0].query(HistoryQuery(limit=total))
    assert [r.seq for r in records] == list(range(1, total + 1))
    assert {r.actor for r in records} == {f"w{i}" for i in range(WRITERS * threads_per_log)}
