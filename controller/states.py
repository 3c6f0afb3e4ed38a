"""What the controller last knew of each gateway, and what it still owes it.

`pending` is a state change that was accepted but could not be delivered
(gateway unreachable): it is retried when the gateway answers again, unless a
newer command replaced it or it expired. Everything here survives a restart.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field

from controller.db import Database


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


_JSON_FIELDS = ("problems", "exceptions", "pending")


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
        self._lock = threading.Lock()

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
               change: Callable[[GatewayState], dict[str, Any]]) -> GatewayState:
        """Read-modify-write of one gateway's row (serialised in this process):
        `change` sees the current state and returns the fields to set."""
        t = self.table
        with self._lock, self.db.begin() as conn:
            row = conn.execute(sa.select(t).where(t.c.name == name)).first()
            old = _from_row(row._asdict()) if row else GatewayState(name=name)
            new = GatewayState.model_validate({**old.model_dump(), **change(old)})
            values = _to_row(new)
            if row is None:
                conn.execute(t.insert().values(**values))
            else:
                conn.execute(t.update().where(t.c.name == name).values(**values))
        return new

    def update_many(self, names: list[str], **changes: Any) -> None:
        """The same change to several gateways, in one transaction."""
        if not names:
            return
        t = self.table
        with self._lock, self.db.begin() as conn:
            rows = {r.name: _from_row(r._asdict()) for r in
                    conn.execute(sa.select(t).where(t.c.name.in_(names))).fetchall()}
            for name in names:
                old = rows.get(name) or GatewayState(name=name)
                values = _to_row(GatewayState.model_validate({**old.model_dump(), **changes}))
                if name in rows:
                    conn.execute(t.update().where(t.c.name == name).values(**values))
                else:
                    conn.execute(t.insert().values(**values))

    def delete(self, name: str) -> None:
        with self._lock, self.db.begin() as conn:
            conn.execute(self.table.delete().where(self.table.c.name == name))
