"""The command queue: commands accepted by any replica, carried out by the replica that
holds each gateway's lease.

One row per command and gateway. The accepting replica inserts the rows in the same
transaction that locks the gateways' state rows and records what they are owed
(`pending`), so for each gateway the order of the rows' `seq` is the order in which
commands were accepted, fleet-wide. The replica holding a gateway's lease claims its
rows in `seq` order with `SELECT ... FOR UPDATE SKIP LOCKED` (a row someone else is
claiming right now is skipped, never waited for) and only a gateway's first
unfinished row, or a row after rows it claimed itself under the same lease: a row is
never run before an earlier one of the same gateway. A row claimed under an older
lease (its replica died or lost the gateway) is claimed again by the new holder and
sent under the same command id, which the agent answers without applying twice.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from controller.db import Database, fit_row
from controller.fleet import CHANGE_OPS

QUEUED, CLAIMED, DONE = "queued", "claimed", "done"


@dataclass(frozen=True)
class QueuedCommand:
    """What is carried out on each gateway of a command (the same for all of them)."""

    command_id: str
    action: str
    op: str
    args: dict[str, Any]
    actor: str
    reason: str
    ticket: str | None
    accepted_at: float
    accepted_by: str
    accepted_incarnation: str = ""
    audited: bool = True  # its outcome is recorded in the audit log (reads are not)
    audit: str | None = None  # the hash of its `requested` audit record (in the envelope)

    def rpc_args(self) -> dict[str, Any]:
        """The request's arguments as the agent gets them."""
        if self.op == "probe":
            return {}
        if self.op not in CHANGE_OPS:
            return dict(self.args)
        out = {**self.args, "reason": self.reason, "actor": self.actor}
        if self.ticket:
            out["ticket"] = self.ticket
        return out


@dataclass(frozen=True)
class Claimed:
    seq: int
    gateway: str
    epoch: int
    attempts: int
    command: QueuedCommand


class CommandQueue:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.table = db.schema.commands
        self.leases = db.schema.gateway_leases

    # -- the accepting replica ------------------------------------------------------------

    def insert(self, conn: Connection, command: QueuedCommand,
               gateways: Sequence[str]) -> list[int]:
        """Queue `command` for `gateways` inside the caller's transaction (which holds the
        gateways' state rows locked); the rows' seqs, in the order of `gateways`."""
        t = self.table
        rows = [fit_row(t, {
            "command_id": command.command_id, "gateway": name, "action": command.action,
            "op": command.op, "args": json.dumps(command.args, sort_keys=True),
            "actor": command.actor, "reason": command.reason, "ticket": command.ticket,
            "accepted_at": command.accepted_at, "accepted_by": command.accepted_by,
            "accepted_incarnation": command.accepted_incarnation, "audit": command.audit,
            "state": QUEUED,
            "attempts": 0, "reported": not command.audited}) for name in gateways]
        if not rows:
            return []
        stmt = t.insert().returning(t.c.seq, sort_by_parameter_order=True)
        seqs: list[int] = list(conn.execute(stmt, rows).scalars())
        return [int(seq) for seq in seqs]

    def results(self, seqs: Collection[int]) -> dict[int, dict[str, Any]]:
        """The results of those rows that are done."""
        t = self.table
        if not seqs:
            return {}
        out: dict[int, dict[str, Any]] = {}
        ordered = sorted(seqs)
        with self.db.begin() as conn:
            for i in range(0, len(ordered), 1000):
                rows = conn.execute(sa.select(t.c.seq, t.c.result).where(
                    t.c.seq.in_(ordered[i:i + 1000]), t.c.state == DONE)).all()
                out.update({int(row.seq): json.loads(str(row.result)) for row in rows
                            if row.result})
        return out

    def unfinished(self, command_id: str, gateway: str | None = None) -> bool:
        """Queued or being carried out somewhere (a retry now would only queue it twice)."""
        t = self.table
        where = [t.c.command_id == command_id, t.c.state != DONE]
        if gateway is not None:
            where.append(t.c.gateway == gateway)
        with self.db.begin() as conn:
            return conn.execute(sa.select(t.c.seq).where(*where).limit(1)).first() is not None

    # -- the replica holding the lease ----------------------------------------------------

    def claim(self, replica: str, incarnation: str, *, limit: int = 1000) -> list[Claimed]:
        """Claim, in `seq` order, the rows this replica may carry out now (see the module
        docstring); SKIP LOCKED: rows being claimed by someone else are passed over."""
        t, lt = self.table, self.leases
        earlier = t.alias("earlier")
        with self.db.begin() as conn:
            now = self.db.now(conn)
            mine_now = sa.and_(earlier.c.state == CLAIMED, earlier.c.claimed_by == replica,
                               earlier.c.claim_epoch == lt.c.epoch)
            blocked = sa.exists().where(earlier.c.gateway == t.c.gateway,
                                        earlier.c.seq < t.c.seq,
                                        earlier.c.state != DONE, sa.not_(mine_now))
            stale_claim = sa.and_(t.c.state == CLAIMED, sa.or_(
                t.c.claimed_by != replica, t.c.claim_epoch != lt.c.epoch))
            stmt = (sa.select(t, lt.c.epoch.label("lease_epoch"))
                    .join(lt, lt.c.gateway == t.c.gateway)
                    .where(lt.c.owner == replica, lt.c.incarnation == incarnation,
                           lt.c.expires_at > now,
                           sa.or_(t.c.state == QUEUED, stale_claim), sa.not_(blocked))
                    .order_by(t.c.seq).limit(limit)
                    .with_for_update(skip_locked=True, of=t))
            rows = conn.execute(stmt).all()
            if rows:
                epoch = (sa.select(lt.c.epoch).where(lt.c.gateway == t.c.gateway)
                         .scalar_subquery())
                conn.execute(t.update().where(t.c.seq.in_([r.seq for r in rows])).values(
                    state=CLAIMED, claimed_by=replica, claim_epoch=epoch, claimed_at=now,
                    attempts=t.c.attempts + 1))
        return [Claimed(seq=int(row.seq), gateway=row.gateway, epoch=int(row.lease_epoch),
                        attempts=int(row.attempts) + 1, command=_command(row))
                for row in rows]

    def finish(self, seq: int, result: dict[str, Any]) -> bool:
        """Record a row's result (the first result wins: a late duplicate from a replica
        that lost the lease meanwhile carried the same command id, and the agent answered
        it with the first answer). True if this call recorded it."""
        t = self.table
        with self.db.begin() as conn:
            now = self.db.now(conn)
            done = conn.execute(t.update().where(t.c.seq == seq, t.c.state != DONE).values(
                state=DONE, result=json.dumps(result, default=str), finished_at=now))
            return bool(done.rowcount)

    def finish_many(self, results: Sequence[tuple[int, dict[str, Any]]]) -> None:
        """`finish` for many rows in one transaction (the first result of each wins)."""
        t = self.table
        if not results:
            return
        with self.db.begin() as conn:
            now = self.db.now(conn)
            conn.execute(
                t.update().where(t.c.seq == sa.bindparam("b_seq"), t.c.state != DONE)
                .values(state=DONE, result=sa.bindparam("b_result"), finished_at=now),
                [{"b_seq": seq, "b_result": json.dumps(res, default=str)}
                 for seq, res in results])

    def requeue(self, rows: Sequence[tuple[int, int]], replica: str) -> None:
        """Give back rows (seq, claim epoch) claimed by `replica` and not sent: queued
        again, for whoever holds their gateway (ourselves included) to claim in order.
        A row claimed again meanwhile (under another epoch, or by another) is left."""
        t = self.table
        if not rows:
            return
        with self.db.begin() as conn:
            conn.execute(
                t.update().where(t.c.seq == sa.bindparam("b_seq"), t.c.state == CLAIMED,
                                 t.c.claimed_by == replica,
                                 t.c.claim_epoch == sa.bindparam("b_epoch"))
                .values(state=QUEUED, claimed_by=None, claim_epoch=None, claimed_at=None),
                [{"b_seq": seq, "b_epoch": epoch} for seq, epoch in rows])

    def drop(self, gateway: str, result: dict[str, Any]) -> list[int]:
        """Finish every unfinished row of a gateway with `result` (it left the inventory)."""
        t = self.table
        with self.db.begin() as conn:
            now = self.db.now(conn)
            seqs: list[int] = list(conn.execute(sa.select(t.c.seq).where(
                t.c.gateway == gateway, t.c.state != DONE).with_for_update()).scalars())
            if seqs:
                conn.execute(t.update().where(t.c.seq.in_(seqs)).values(
                    state=DONE, result=json.dumps(result, default=str), finished_at=now))
        return [int(s) for s in seqs]

    def mark_reported(self, command_id: str, replica: str, incarnation: str) -> None:
        """The accepting replica recorded the command's outcome in the audit log."""
        t = self.table
        with self.db.begin() as conn:
            conn.execute(t.update().where(
                t.c.command_id == command_id, t.c.accepted_by == replica,
                t.c.accepted_incarnation == incarnation).values(reported=True))

    def orphaned(self, live: Collection[tuple[str, str]]) -> list[str]:
        """Commands carried out to the end whose outcome nobody recorded, because the
        replica that accepted them (`live`: (replica, incarnation) of the live ones)
        is gone; oldest first."""
        t = self.table
        unfinished = sa.func.sum(sa.case((t.c.state != DONE, 1), else_=0))
        with self.db.begin() as conn:
            rows = conn.execute(
                sa.select(t.c.command_id, t.c.accepted_by, t.c.accepted_incarnation,
                          sa.func.min(t.c.seq).label("first"))
                .where(t.c.reported.is_(False))
                .group_by(t.c.command_id, t.c.accepted_by, t.c.accepted_incarnation)
                .having(unfinished == 0).order_by("first")).all()
        alive = set(live)
        return [str(r.command_id) for r in rows
                if (r.accepted_by, r.accepted_incarnation) not in alive]

    def report(self, command_id: str,
               write: Callable[[QueuedCommand, list[dict[str, Any]]], None]) -> bool:
        """Record an orphaned command's outcome once: its rows are locked (SKIP LOCKED:
        another replica doing the same gets none and leaves it), `write` gets the
        command and the rows' results, then the rows are marked. True if written."""
        t = self.table
        with self.db.begin() as conn:
            rows = conn.execute(sa.select(t).where(
                t.c.command_id == command_id, t.c.reported.is_(False), t.c.state == DONE)
                .order_by(t.c.seq).with_for_update(skip_locked=True)).all()
            if not rows:
                return False
            results = [json.loads(r.result) if r.result else {} for r in rows]
            write(_command(rows[0]), results)
            conn.execute(t.update().where(t.c.seq.in_([r.seq for r in rows]))
                         .values(reported=True))
        return True

    def prune(self, older_than: float) -> int:
        """Forget finished rows older than `older_than` seconds (their story is in the
        audit log)."""
        t = self.table
        with self.db.begin() as conn:
            now = self.db.now(conn)
            gone = conn.execute(t.delete().where(t.c.state == DONE,
                                                 t.c.finished_at < now - older_than))
            return int(gone.rowcount or 0)

    def rows(self, *, command_id: str | None = None) -> list[dict[str, Any]]:
        """Rows as stored (for tests and inspection), in seq order."""
        t = self.table
        stmt = sa.select(t).order_by(t.c.seq)
        if command_id is not None:
            stmt = stmt.where(t.c.command_id == command_id)
        with self.db.begin() as conn:
            return [dict(r._asdict()) for r in conn.execute(stmt)]


def _command(row: Any) -> QueuedCommand:
    return QueuedCommand(command_id=row.command_id, action=row.action, op=row.op,
                         args=json.loads(row.args), actor=row.actor, reason=row.reason,
                         ticket=row.ticket, accepted_at=float(row.accepted_at),
                         accepted_by=row.accepted_by,
                         accepted_incarnation=row.accepted_incarnation, audit=row.audit)
