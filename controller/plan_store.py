"""Stored restore plans: one row per plan, its document (controller/plan_machine.py) as
JSON, and who drives it.

Driving is claimed, so that a plan runs once fleet-wide even with several
controllers on one database: `claim` picks a running plan with `SELECT ... FOR
UPDATE SKIP LOCKED` (PostgreSQL: a row another controller is claiming right now is
skipped, not waited for) and takes its lease (owner = the controller's instance id,
until = now + lease) with a compare-and-set UPDATE, which also makes the claim safe
on SQLite. Every write of the driver checks that it still holds the lease and
renews it. A controller that restarts keeps its instance id (a file in its state
dir) and so resumes its own plans at once; another controller takes a plan over
when the lease has run out.

Other writes (approve, pause, resume, abort) are short read-modify-writes under
the row lock (PostgreSQL) or a process lock (SQLite), never waiting for a stage.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from controller.db import Database, fit_row
from controller.errors import ConfigError, LeaseLost, NotFound, StorageError
from controller.plan_doc import ACTIVE, OPEN, PlanDoc


class PlanStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.table = db.schema.plans
        self._local = threading.Lock()  # SQLite: this process's read-modify-writes

    @contextmanager
    def _txn(self) -> Iterator[Connection]:
        if self.db.is_postgresql:
            with self.db.begin() as conn:
                yield conn
            return
        with self._local, self.db.begin() as conn:
            yield conn

    @staticmethod
    def _doc(row: Any) -> PlanDoc:
        try:
            return PlanDoc.model_validate_json(row.doc)
        except ValueError as exc:
            raise StorageError(f"plan {row.plan_id}: its stored document is unreadable: "
                               f"{exc}") from None

    def create(self, doc: PlanDoc, now: float) -> None:
        row = {"plan_id": doc.plan_id, "name": doc.name, "state": doc.state,
               "actor": doc.actor, "created_at": doc.created_at, "updated_at": now,
               "doc": doc.model_dump_json(), "lease_owner": None, "lease_until": None,
               "row_version": 0}
        with self._txn() as conn:
            conn.execute(self.table.insert().values(**fit_row(self.table, row)))

    def get(self, plan_id: str) -> PlanDoc:
        t = self.table
        with self.db.begin() as conn:
            row = conn.execute(sa.select(t).where(t.c.plan_id == plan_id)).first()
        if row is None:
            raise NotFound(f"no restore plan {plan_id!r}")
        return self._doc(row)

    def find(self, *, states: Collection[str] = (), since: float | None = None,
             limit: int = 50) -> list[PlanDoc]:
        """Newest first."""
        t = self.table
        stmt = sa.select(t)
        if states:
            stmt = stmt.where(t.c.state.in_(list(states)))
        if since is not None:
            stmt = stmt.where(sa.or_(t.c.updated_at >= since, t.c.state.in_(list(OPEN))))
        with self.db.begin() as conn:
            rows = conn.execute(stmt.order_by(t.c.created_at.desc()).limit(limit)).fetchall()
        return [self._doc(r) for r in rows]

    def open_plans_with(self, gateways: Sequence[str]) -> list[PlanDoc]:
        wanted = set(gateways)
        return [d for d in self.find(states=OPEN, limit=10_000) if wanted & set(d.targets)]

    def modify(self, plan_id: str, fn: Callable[[PlanDoc], PlanDoc | None], *, now: float,
               owner: str | None = None, lease: float = 0.0) -> PlanDoc:
        """Read the document under the row lock, write `fn`'s (None: unchanged). With
        `owner`: only while it holds the plan's lease (renewed); LeaseLost otherwise."""
        t = self.table
        with self._txn() as conn:
            stmt = sa.select(t).where(t.c.plan_id == plan_id)
            if self.db.is_postgresql:
                stmt = stmt.with_for_update()
            row = conn.execute(stmt).first()
            if row is None:
                raise NotFound(f"no restore plan {plan_id!r}")
            if owner is not None and row.lease_owner != owner:
                raise LeaseLost(f"plan {plan_id} is driven by {row.lease_owner or 'nobody'} "
                                "now, not by this controller")
            doc = self._doc(row)
            new = fn(doc)
            if new is None:
                return doc
            values: dict[str, Any] = {"doc": new.model_dump_json(), "state": new.state,
                                      "updated_at": now, "row_version": row.row_version + 1}
            if owner is not None:
                values["lease_until"] = now + lease
            conn.execute(t.update().where(t.c.plan_id == plan_id).values(**values))
        return new

    def _claimable(self, owner: str, now: float) -> Any:
        t = self.table
        return sa.and_(t.c.state.in_(list(ACTIVE)),
                       sa.or_(t.c.lease_owner.is_(None), t.c.lease_owner == owner,
                              t.c.lease_until < now))

    def claim(self, owner: str, now: float, lease: float, *,
              exclude: Collection[str] = ()) -> str | None:
        """One running (or aborting) plan nobody else drives, leased to `owner`."""
        t = self.table
        with self._txn() as conn:
            stmt = sa.select(t.c.plan_id).where(self._claimable(owner, now))
            if exclude:
                stmt = stmt.where(t.c.plan_id.not_in(list(exclude)))
            stmt = stmt.order_by(t.c.created_at).limit(1)
            if self.db.is_postgresql:
                stmt = stmt.with_for_update(skip_locked=True)
            found = conn.execute(stmt).first()
            if found is None:
                return None
            taken = conn.execute(
                t.update().where(t.c.plan_id == found.plan_id, self._claimable(owner, now))
                .values(lease_owner=owner, lease_until=now + lease))
            return str(found.plan_id) if taken.rowcount == 1 else None

    def release(self, plan_id: str, owner: str) -> None:
        t = self.table
        with self._txn() as conn:
            conn.execute(t.update().where(t.c.plan_id == plan_id, t.c.lease_owner == owner)
                         .values(lease_owner=None, lease_until=None))


def instance_id(path: Path) -> str:
    """This controller's stable id (a file in its state dir, made on first start): who
    holds a plan's lease. Kept across restarts, so a restarted controller resumes its
    own plans at once instead of waiting for their leases to run out."""
    try:
        text = path.read_text(encoding="ascii").strip()
        if text:
            return text[:64]
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    value = f"{socket.gethostname().split('.')[0][:40] or 'controller'}-{uuid.uuid4().hex[:12]}"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return instance_id(path)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(value + "\n")
    return value
