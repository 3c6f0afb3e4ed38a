"""The command queue: claim order, head-of-line per gateway, leases, adoption after a
takeover, SKIP LOCKED with two claimants (PostgreSQL), no double claim."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from controller.command_queue import CLAIMED, DONE, QUEUED, CommandQueue, QueuedCommand
from controller.db import Database
from controller.lease_store import LeaseStore, Me
from controller.states import StateStore

A = Me("replica-a", "inc-a")
B = Me("replica-b", "inc-b")


def command(cid: str, op: str = "isolate") -> QueuedCommand:
    return QueuedCommand(command_id=cid, action=op, op=op, args={"profile": "internet"},
                         actor="olga", reason="drill", ticket=None, accepted_at=time.time(),
                         accepted_by=A.replica_id, accepted_incarnation=A.incarnation)


def add_gateways(db: Database, names: list[str]) -> None:
    t = db.schema.gateways
    with db.begin() as conn:
        conn.execute(t.insert(), [{"name": n, "host": f"10.0.{i // 250}.{i % 250}",
                                   "port": 22, "user": "root", "key_path": "/k",
                                   "trust_on_first_use": True, "groups": "[]",
                                   "created_at": 0.0, "created_by": "t"}
                                  for i, n in enumerate(names)])


def enqueue(db: Database, queue: CommandQueue, cmd: QueuedCommand, names: list[str]) -> list[int]:
    states = StateStore(db)
    with db.begin() as conn:
        states.locked(conn, names)
        return queue.insert(conn, cmd, names)


def expire_leases(db: Database) -> None:
    lt = db.schema.gateway_leases
    with db.begin() as conn:
        conn.execute(lt.update().values(expires_at=0.5))


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url)
    database.migrate()
    add_gateways(database, ["gw0", "gw1", "gw2"])
    yield database
    database.dispose()


def test_claims_in_acceptance_order_one_gateway_step_at_a_time(db: Database) -> None:
    LeaseStore(db, A, ttl=30).tick(previously=())  # alone: holds all three
    q = CommandQueue(db)
    c1 = enqueue(db, q, command("c1"), ["gw0", "gw1"])
    c2 = enqueue(db, q, command("c2", "restore"), ["gw0"])
    c3 = enqueue(db, q, command("c3"), ["gw1", "gw2"])
    first = q.claim(A.replica_id, A.incarnation)
    # each gateway's first unfinished row; c2 waits behind c1 on gw0, c3 behind c1 on gw1
    assert [(c.command.command_id, c.gateway) for c in first] == [
        ("c1", "gw0"), ("c1", "gw1"), ("c3", "gw2")]
    assert [c.seq for c in first] == [c1[0], c1[1], c3[1]]
    assert first[0].command.rpc_args() == {"profile": "internet", "reason": "drill",
                                           "actor": "olga"}
    # claimed by us under the same lease: the next rows may follow (turns keep the order)
    second = q.claim(A.replica_id, A.incarnation)
    assert [(c.command.command_id, c.gateway) for c in second] == [
        ("c2", "gw0"), ("c3", "gw1")]
    assert [c.seq for c in second] == [c2[0], c3[0]]
    assert q.claim(A.replica_id, A.incarnation) == []
    assert {r["state"] for r in q.rows()} == {CLAIMED}


def test_nothing_is_claimed_without_the_lease(db: Database) -> None:
    q = CommandQueue(db)
    enqueue(db, q, command("c1"), ["gw0", "gw1"])
    assert q.claim(A.replica_id, A.incarnation) == []  # no leases at all
    LeaseStore(db, B, ttl=30).tick(previously=())  # b holds everything
    assert q.claim(A.replica_id, A.incarnation) == []
    expire_leases(db)
    assert q.claim(B.replica_id, B.incarnation) == []  # expired: not b's any more either


def test_a_new_holder_adopts_rows_claimed_under_the_old_lease(db: Database) -> None:
    LeaseStore(db, A, ttl=30).tick(previously=())
    q = CommandQueue(db)
    enqueue(db, q, command("c1"), ["gw0"])
    enqueue(db, q, command("c2", "restore"), ["gw0"])
    [mine] = q.claim(A.replica_id, A.incarnation)
    assert mine.attempts == 1
    # a dies: its leases run out, b takes over (a new epoch)
    expire_leases(db)
    b = LeaseStore(db, B, ttl=30)
    b.register(api="")
    res = b.tick(previously=())
    assert res.held["gw0"] == mine.epoch + 1
    adopted = q.claim(B.replica_id, B.incarnation)
    assert [(c.command.command_id, c.attempts, c.epoch) for c in adopted] == [
        ("c1", 2, mine.epoch + 1)]
    # c1 again under the same command id: c2 only after it
    assert [c.command.command_id for c in q.claim(B.replica_id, B.incarnation)] == ["c2"]


def test_the_first_result_wins_and_unfinished_is_tracked(db: Database) -> None:
    LeaseStore(db, A, ttl=30).tick(previously=())
    q = CommandQueue(db)
    [seq] = enqueue(db, q, command("c1"), ["gw0"])
    assert q.unfinished("c1", "gw0") and not q.unfinished("c1", "gw1")
    q.claim(A.replica_id, A.incarnation)
    assert q.finish(seq, {"gateway": "gw0", "outcome": "verified"})
    assert not q.finish(seq, {"gateway": "gw0", "outcome": "failed"})
    assert q.results([seq]) == {seq: {"gateway": "gw0", "outcome": "verified"}}
    assert not q.unfinished("c1")


def test_drop_finishes_what_a_removed_gateway_was_owed(db: Database) -> None:
    q = CommandQueue(db)
    seqs = enqueue(db, q, command("c1"), ["gw0", "gw1"])
    assert q.drop("gw1", {"outcome": "failed"}) == [seqs[1]]
    assert [r["state"] for r in q.rows()] == [QUEUED, DONE]


# -- PostgreSQL: concurrent claimants ------------------------------------------------------


def test_skip_locked_passes_over_a_row_being_claimed(pg_url: str) -> None:
    db = Database(pg_url)
    db.migrate()
    add_gateways(db, ["gw0", "gw1", "gw2"])
    LeaseStore(db, A, ttl=30).tick(previously=())
    q = CommandQueue(db)
    c1 = enqueue(db, q, command("c1"), ["gw0", "gw1", "gw2"])
    enqueue(db, q, command("c2"), ["gw0"])
    other = sa.create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://", 1)
                             if pg_url.startswith("postgresql://") else pg_url)
    try:
        with other.begin() as conn:  # another claimant holds c1's row of gw0
            conn.execute(sa.text("SELECT seq FROM commands WHERE seq = :s FOR UPDATE"),
                         {"s": c1[0]})
            # a claim that waited for the lock would wait for this block to end: run it
            # aside and see it return while the lock is still held
            box: list[Any] = []
            worker = threading.Thread(
                target=lambda: box.append(q.claim(A.replica_id, A.incarnation)), daemon=True)
            worker.start()
            worker.join(60)
            assert box, "the claim waited for the row another claimant holds"
            claimed = box[0]
            # gw0's row skipped, and gw0's later row not run ahead of it
            assert [(c.command.command_id, c.gateway) for c in claimed] == [
                ("c1", "gw1"), ("c1", "gw2")]
        assert [(c.command.command_id, c.gateway)
                for c in q.claim(A.replica_id, A.incarnation)] == [("c1", "gw0")]
    finally:
        other.dispose()
        db.dispose()


def test_two_claimants_never_claim_a_row_twice(pg_url: str) -> None:
    setup = Database(pg_url)
    setup.migrate()
    names = [f"gw{i}" for i in range(40)]
    add_gateways(setup, names)
    LeaseStore(setup, A, ttl=60).tick(previously=())
    q = CommandQueue(setup)
    expected: list[int] = []
    for i in range(10):
        expected += enqueue(setup, q, command(f"c{i}"), names)
    claims: list[tuple[str, int]] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def claimant(who: str) -> None:
        db = Database(pg_url)  # its own connection pool: like another process
        queue = CommandQueue(db)
        try:
            idle = 0
            while idle < 20:
                got = queue.claim(A.replica_id, A.incarnation, limit=37)
                with lock:
                    claims.extend((who, c.seq) for c in got)
                idle = 0 if got else idle + 1
                time.sleep(0.001)
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            db.dispose()

    threads = [threading.Thread(target=claimant, args=(w,)) for w in ("x", "y")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    seqs = Counter(seq for _, seq in claims)
    assert sorted(seqs) == sorted(expected)
    assert max(seqs.values()) == 1  # no double claim
    rows = q.rows()
    assert all(r["state"] == CLAIMED and r["attempts"] == 1 for r in rows)
    setup.dispose()


def test_an_orphaned_command_is_reported_once(db: Database) -> None:
    LeaseStore(db, A, ttl=30).tick(previously=())
    q = CommandQueue(db)
    seqs = enqueue(db, q, command("c1"), ["gw0", "gw1"])
    enqueue(db, q, command("c2"), ["gw2"])  # not finished: not an orphan yet
    q.claim(A.replica_id, A.incarnation)
    for seq in seqs:
        q.finish(seq, {"gateway": "gw", "outcome": "verified"})
    assert q.orphaned({(A.replica_id, A.incarnation)}) == []  # its acceptor is alive
    assert q.orphaned({(A.replica_id, "a-later-incarnation")}) == ["c1"]
    written: list[tuple[str, int]] = []
    assert q.report("c1", lambda cmd, rows: written.append((cmd.command_id, len(rows))))
    assert not q.report("c1", lambda cmd, rows: written.append(("again", 0)))
    assert written == [("c1", 2)] and q.orphaned(set()) == []
    q.mark_reported("c2", A.replica_id, A.incarnation)
    assert q.orphaned(set()) == []
