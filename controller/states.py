"""What the controller last knew of each gateway, and what it still owes it.

`pending` is a state change that was accepted but could not be delivered
(gateway unreachable): it is retried when the gateway answers again, unless a
newer command replaced it or it expired. Everything here survives a restart.

Every write is a read-modify-write of whole rows, so it locks them first
(`SELECT ... FOR UPDATE` on PostgreSQL, where other threads or controllers write
the same rows; SQLite has no row locks, and this process's writes are serialised
by a lock instead). `row_version` counts the writes of a row.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from controller.db import Database, fit_row


class Pending(BaseModel):
    model_config = ConfigDict(frozen=True)

    command_id: str
    action: str
    op: str
    args: dict[str, Any]
    actor: str
    reason: str
    ticket: str | None = None
    accepted_at: float
    attempts: int = 1

    def delivered(self, gw: GatewayState) -> bool:
        """The gateway shows this very change (its answer was lost, e.g. a timeout)."""
        if gw.gw_actor != self.actor or gw.gw_reason != self.reason:
            return False
        if self.op == "restore":
            return gw.state == "open"
        if self.op == "isolate":
            return gw.state == "isolated" and gw.profile == self.args.get("profile", "internet")
        return False


class GatewayState(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    reachable: bool | None = None
    last_contact_at: float | None = None
    last_error_code: str | None = None
    last_error: str | None = None
    state: str | None = None
    profile: str | None = None
    verification: str | None = None
    in_sync: bool | None = None
    generation: int | None = None
    since: float | None = None
    gw_actor: str | None = None
    gw_reason: str | None = None
    drift_repairs: int | None = None
    problems: list[str] = Field(default_factory=list)
    exceptions: list[dict[str, Any]] = Field(default_factory=list)
    observed_at: float | None = None
    pending: Pending | None = None
    last_command_id: str | None = None
    host_key_seen: str | None = None
    row_version: int = 0
    agent_version: str | None = None
    config_digest: str | None = None
    profiles: list[str] | None = None  # None: not known yet (never polled)


_JSON_FIELDS = ("problems", "exceptions", "pending", "profiles")


def _to_row(state: GatewayState) -> dict[str, Any]:
    row = state.model_dump(mode="json")
    for key in _JSON_FIELDS:
        row[key] = None if row[key] is None else json.dumps(row[key], sort_keys=True)
    return row


def _from_row(row: dict[str, Any]) -> GatewayState:
    data = dict(row)
    for key in _JSON_FIELDS:
        data[key] = json.loads(data[key]) if data.get(key) else None
    data["problems"] = data["problems"] or []
    data["exceptions"] = data["exceptions"] or []
    return GatewayState.model_validate(data)


class StateStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.table = db.schema.gateway_state
        # SQLite: one writer per process at a time (it has no row locks to wait on).
        # PostgreSQL: the row locks do it, across processes too.
        self._lock: contextlib.AbstractContextManager[Any] = (
            contextlib.nullcontext() if db.is_postgresql else threading.Lock())

    def _lock_rows(self, conn: Connection, names: list[str]) -> dict[str, GatewayState]:
        """Make sure the rows exist, then lock them (in name order: two writers of
        overlapping sets never deadlock) and return what they hold."""
        t = self.table
        ordered = sorted(set(names))
        insert = (postgresql.insert(t) if self.db.is_postgresql else sqlite.insert(t))
        conn.execute(insert.on_conflict_do_nothing(index_elements=[t.c.name]),
                     [{"name": n} for n in ordered])
        rows = conn.execute(sa.select(t).where(t.c.name.in_(ordered)).order_by(t.c.name)
                            .with_for_update()).fetchall()
        return {r.name: _from_row(r._asdict()) for r in rows}

    def _write(self, conn: Connection, old: GatewayState,
               changes: dict[str, Any]) -> GatewayState:
        new = GatewayState.model_validate({**old.model_dump(), **changes, "name": old.name,
                                           "row_version": old.row_version + 1})
        t = self.table
        # what a gateway reported may be longer than a column or hold NUL characters
        # (PostgreSQL refuses both, SQLite would not notice): stored fitted
        conn.execute(t.update().where(t.c.name == old.name).values(**fit_row(t, _to_row(new))))
        return new

    def locked(self, conn: Connection, names: list[str]) -> dict[str, GatewayState]:
        """Lock these gateways' rows inside the caller's transaction (PostgreSQL; see
        `_lock_rows`) and return what they hold."""
        return self._lock_rows(conn, names)

    def write_locked(self, conn: Connection, old: GatewayState,
                     changes: dict[str, Any]) -> GatewayState:
        """Write a row locked by `locked` in the same transaction."""
        return self._write(conn, old, changes)

    def write_many_locked(self, conn: Connection, olds: list[GatewayState],
                          changes: dict[str, Any]) -> None:
        """The same change to rows locked by `locked`, in one statement (executemany)."""
        if not olds:
            return
        t = self.table
        rows = []
        for old in olds:
            new = GatewayState.model_validate({**old.model_dump(), **changes, "name": old.name,
                                               "row_version": old.row_version + 1})
            rows.append({f"v_{k}": v for k, v in fit_row(t, _to_row(new)).items()})
        columns = [c.name for c in t.columns]
        conn.execute(t.update().where(t.c.name == sa.bindparam("v_name")).values(
            {c: sa.bindparam(f"v_{c}") for c in columns if c != "name"}), rows)

    def get(self, name: str) -> GatewayState:
        t = self.table
        with self.db.begin() as conn:
            row = conn.execute(sa.select(t).where(t.c.name == name)).first()
        return _from_row(row._asdict()) if row else GatewayState(name=name)

    def all(self) -> dict[str, GatewayState]:
        with self.db.begin() as conn:
            rows = conn.execute(sa.select(self.table)).fetchall()
        return {r.name: _from_row(r._asdict()) for r in rows}

    def update(self, name: str, **changes: Any) -> GatewayState:
        """Set fields of one gateway's row."""
        return self.modify(name, lambda old: changes)

    def modify(self, name: str,
               change: Callable[[GatewayState], dict[str, Any] | None]) -> GatewayState:
        """Read-modify-write of one gateway's row, with the row locked: `change` sees
        the current state and returns the fields to set (None: leave the row alone)."""
        with self._lock, self.db.begin() as conn:
            old = self._lock_rows(conn, [name])[name]
            changes = change(old)
            return old if changes is None else self._write(conn, old, changes)

    def update_many(self, names: list[str], **changes: Any) -> None:
        """The same change to several gateways, in one transaction."""
        if not names:
            return
        with self._lock, self.db.begin() as conn:
            for old in self._lock_rows(conn, names).values():
                self._write(conn, old, changes)

    def delete(self, name: str) -> None:
        with self._lock, self.db.begin() as conn:
            conn.execute(self.table.delete().where(self.table.c.name == name))
