"""Replica heartbeats and gateway leases in the database (the policy is
controller/leases.py).

One transaction per tick: renew this replica's heartbeat, read the inventory, the
leases and the live replicas, let the policy decide, then renew, take and release.
Taking locks the free lease rows it wants with SKIP LOCKED (a row another replica is
taking at this moment is left to it, and two replicas never wait on each other's
rows) and re-checks that each is still free: two replicas never both hold a gateway.
Every time is the database's clock (Database.now), so the hosts' clocks do not matter.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from controller.db import Database
from controller.errors import ConfigError
from controller.leases import Lease, LeasePlan, plan_leases

log = logging.getLogger("drawbridge.controller.leases")


class ReplicaIdInUse(ConfigError):
    code = "replica_id_in_use"


@dataclass(frozen=True)
class Me:
    replica_id: str
    incarnation: str


@dataclass(frozen=True)
class TickResult:
    now: float  # the database's clock when the tick ran
    held: dict[str, int]  # gateway -> lease epoch, everything we hold after the tick
    taken: tuple[str, ...]
    released: tuple[str, ...]
    lost: tuple[str, ...]  # held at the last tick, taken by someone else since
    live: tuple[str, ...]


@dataclass(frozen=True)
class ReplicaView:
    replica_id: str
    host: str
    pid: int
    api: str
    started_at: float
    heartbeat_at: float
    live: bool
    gateways: int


class LeaseStore:
    def __init__(self, db: Database, me: Me, *, ttl: float,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.db = db
        self.me = me
        self.ttl = ttl
        self.sleep = sleep
        self.replicas = db.schema.replicas
        self.leases = db.schema.gateway_leases

    def _insert(self, table: sa.Table) -> postgresql.Insert | sqlite.Insert:
        return postgresql.insert(table) if self.db.is_postgresql else sqlite.insert(table)

    # -- this replica ---------------------------------------------------------------------

    def register(self, *, api: str) -> None:
        """Enter this incarnation in the replicas table. A previous process under this
        replica id (killed, its heartbeat still fresh) is waited for, at most one lease
        TTL; a replica id renewed by another live process meanwhile is refused."""
        r = self.replicas
        seen: float | None = None
        for _ in range(3):
            with self.db.begin() as conn:
                now = self.db.now(conn)
                row = conn.execute(sa.select(r).where(r.c.replica_id == self.me.replica_id)
                                   .with_for_update()).first()
                busy = row is not None and row.incarnation != self.me.incarnation \
                    and row.expires_at > now
                if busy and row is not None and seen is not None and row.heartbeat_at > seen:
                    raise ReplicaIdInUse(
                        f"replica id {self.me.replica_id!r} is in use by another live "
                        f"controller (on {row.host}, pid {row.pid}, API {row.api}): give "
                        "each replica its own replica_id (or its own state dir)")
                if not busy:
                    values = {"incarnation": self.me.incarnation, "host": _host(),
                              "pid": os.getpid(), "api": api[:255], "started_at": now,
                              "heartbeat_at": now, "expires_at": now + self.ttl}
                    if row is None:
                        conn.execute(r.insert().values(replica_id=self.me.replica_id,
                                                       **values))
                    else:
                        conn.execute(r.update().where(r.c.replica_id == self.me.replica_id)
                                     .values(**values))
                    return
                assert row is not None
                seen, wait = float(row.heartbeat_at), float(row.expires_at) - now
            log.info("replica id %s: waiting %.1fs for its previous process's heartbeat to "
                     "expire", self.me.replica_id, wait)
            self.sleep(min(wait, self.ttl) + 0.05)
        raise ReplicaIdInUse(f"replica id {self.me.replica_id!r} stays in use by another "
                             "process; give each replica its own replica_id")

    def deregister(self) -> None:
        """Give back every lease and stop the heartbeat (a clean stop: the others take
        over at their next tick, not after the TTL). The row stays: the table knows
        every replica id that ever ran (controller/replica_join.py)."""
        r, lt = self.replicas, self.leases
        with self.db.begin() as conn:
            conn.execute(lt.update().where(lt.c.owner == self.me.replica_id,
                                           lt.c.incarnation == self.me.incarnation)
                         .values(owner=None, incarnation=None, expires_at=0.0))
            conn.execute(r.update().where(r.c.replica_id == self.me.replica_id,
                                          r.c.incarnation == self.me.incarnation)
                         .values(expires_at=0.0))

    def known(self) -> bool:
        """Whether this replica id has run against this database before."""
        r = self.replicas
        with self.db.begin() as conn:
            return conn.execute(sa.select(r.c.replica_id).where(
                r.c.replica_id == self.me.replica_id)).first() is not None

    # -- the tick ------------------------------------------------------------------------

    def tick(self, *, previously: Collection[str], busy: Collection[str] = ()) -> TickResult:
        me, r, lt = self.me, self.replicas, self.leases
        gw_table = self.db.schema.gateways
        with self.db.begin() as conn:
            now = self.db.now(conn)
            self._heartbeat(conn, now)
            names: list[str] = sorted(conn.execute(sa.select(gw_table.c.name)).scalars())
            live: tuple[str, ...] = tuple(conn.execute(
                sa.select(r.c.replica_id).where(r.c.expires_at > now)).scalars())
            leases = self._read(conn)
            missing = [n for n in names if n not in leases]
            if missing:
                conn.execute(self._insert(lt).on_conflict_do_nothing(
                    index_elements=[lt.c.gateway]), [{"gateway": n} for n in missing])
            gone = [n for n in leases if n not in set(names)]
            if gone:
                conn.execute(lt.delete().where(lt.c.gateway.in_(gone)))
            plan = plan_leases(me=me.replica_id, incarnation=me.incarnation, now=now,
                               gateways=names, leases=leases, live=live, busy=busy)
            held = self._apply(conn, plan, now)
        lost = tuple(sorted(set(previously) - set(held) - set(plan.release)))
        return TickResult(now=now, held=held, taken=tuple(g for g in plan.take if g in held),
                          released=plan.release, lost=lost, live=live)

    def _heartbeat(self, conn: Connection, now: float) -> None:
        r, me = self.replicas, self.me
        done = conn.execute(r.update().where(r.c.replica_id == me.replica_id,
                                             r.c.incarnation == me.incarnation)
                            .values(heartbeat_at=now, expires_at=now + self.ttl))
        if done.rowcount == 0:
            # our row is gone (deleted by hand, or another process took our replica id
            # after our heartbeat expired): enter again, unless that process is live
            row = conn.execute(sa.select(r).where(r.c.replica_id == me.replica_id)
                               .with_for_update()).first()
            if row is not None and row.expires_at > now:
                raise ReplicaIdInUse(f"replica id {me.replica_id!r} was taken by another "
                                     f"controller (on {row.host}, pid {row.pid})")
            conn.execute(r.delete().where(r.c.replica_id == me.replica_id))
            conn.execute(r.insert().values(
                replica_id=me.replica_id, incarnation=me.incarnation, host=_host(),
                pid=os.getpid(), api="", started_at=now, heartbeat_at=now,
                expires_at=now + self.ttl))

    def _read(self, conn: Connection) -> dict[str, Lease]:
        lt = self.leases
        return {row.gateway: Lease(gateway=row.gateway, owner=row.owner,
                                   incarnation=row.incarnation,
                                   expires_at=float(row.expires_at), epoch=int(row.epoch))
                for row in conn.execute(sa.select(lt))}

    def _apply(self, conn: Connection, plan: LeasePlan, now: float) -> dict[str, int]:
        lt, me = self.leases, self.me
        ours = sa.and_(lt.c.owner == me.replica_id, lt.c.incarnation == me.incarnation)
        until = now + self.ttl
        if plan.release:
            conn.execute(lt.update().where(ours, lt.c.gateway.in_(plan.release))
                         .values(owner=None, incarnation=None, expires_at=0.0))
        if plan.keep:
            conn.execute(lt.update().where(ours, lt.c.gateway.in_(plan.keep))
                         .values(expires_at=until))
        if plan.take:
            free = sa.or_(lt.c.owner.is_(None), lt.c.expires_at <= now)
            rows: list[str] = list(conn.execute(sa.select(lt.c.gateway).where(
                lt.c.gateway.in_(plan.take), free)
                                .order_by(lt.c.gateway)
                                .with_for_update(skip_locked=True)).scalars())
            if rows:
                # our own expired lease (nobody took it meanwhile) keeps its epoch: the
                # commands we claimed under it are still ours
                conn.execute(lt.update().where(lt.c.gateway.in_(rows)).values(
                    epoch=sa.case((ours, lt.c.epoch), else_=lt.c.epoch + 1),
                    owner=me.replica_id, incarnation=me.incarnation, expires_at=until,
                    acquired_at=now))
        held = conn.execute(sa.select(lt.c.gateway, lt.c.epoch)
                            .where(ours, lt.c.expires_at > now)).all()
        return {str(row.gateway): int(row.epoch) for row in held}

    # -- reading -------------------------------------------------------------------------

    def overview(self) -> list[ReplicaView]:
        """Every replica in the table (live or not) and how many gateways each holds."""
        r, lt = self.replicas, self.leases
        with self.db.begin() as conn:
            now = self.db.now(conn)
            counts: dict[str, int] = {
                str(row.owner): int(row.n) for row in conn.execute(
                    sa.select(lt.c.owner, sa.func.count().label("n"))
                    .where(lt.c.expires_at > now).group_by(lt.c.owner))}
            rows = conn.execute(sa.select(r).order_by(r.c.replica_id)).all()
        return [ReplicaView(replica_id=row.replica_id, host=row.host, pid=row.pid,
                            api=row.api, started_at=row.started_at,
                            heartbeat_at=row.heartbeat_at, live=row.expires_at > now,
                            gateways=int(counts.get(row.replica_id, 0))) for row in rows]

    def live(self) -> set[tuple[str, str]]:
        """(replica id, incarnation) of every live replica."""
        r = self.replicas
        with self.db.begin() as conn:
            now = self.db.now(conn)
            rows = conn.execute(sa.select(r.c.replica_id, r.c.incarnation)
                                .where(r.c.expires_at > now)).all()
        return {(str(row.replica_id), str(row.incarnation)) for row in rows}

    def owners(self) -> dict[str, str | None]:
        """gateway -> the replica holding its lease now (None: nobody)."""
        lt = self.leases
        with self.db.begin() as conn:
            now = self.db.now(conn)
            rows = conn.execute(sa.select(lt.c.gateway, lt.c.owner, lt.c.expires_at)).all()
        return {str(row.gateway): (str(row.owner) if row.owner and row.expires_at > now
                                   else None) for row in rows}


def _host() -> str:
    return socket.gethostname()[:255]
