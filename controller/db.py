"""Storage: SQLAlchemy 2 Core, SQLite in the state dir by default, PostgreSQL by URL.

The tables' current shape is `Schema` (controller/schema.py); the migrations that
build it, a small versioned list applied by `Database.migrate`, are in
controller/migrations.py. Both names are importable from here too.

PostgreSQL is a first-class store (several controllers may share one): schema
changes and audit appends are serialised with transaction-scoped advisory locks
(`Database.serialise`), read-modify-writes of rows use `SELECT ... FOR UPDATE`.
SQLite is the default; it serialises writers itself, and the controller's own
threads are serialised in-process, so the same calls are no-ops there.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from controller.errors import ConfigError, StorageError
from controller.migrations import LATEST_VERSION, MIGRATIONS, Migration
from controller.schema import BigInt, Schema

__all__ = [
    "ADVISORY_LOCKS",
    "LATEST_VERSION",
    "MIGRATIONS",
    "PG_DRIVER",
    "BigInt",
    "Database",
    "Migration",
    "Schema",
    "fit_row",
    "normalise_url",
    "storable_text",
]

# Keys of transaction-scoped advisory locks (PostgreSQL): one per kind of write that
# must happen one at a time across every controller sharing the database.
ADVISORY_LOCKS = {"migrate": 0x4442_0001, "audit": 0x4442_0002}
PG_DRIVER = "postgresql+psycopg"


def _sqlite_pragmas(dbapi_conn: Any, record: Any) -> None:
    del record
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is on disk (the WAL fsynced) before the caller hears "ok"; NORMAL
    # may lose the last commits at a power cut, and an audit record acknowledged and
    # then lost would look like a truncated chain.
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def storable_text(value: str, limit: int | None = None) -> str:
    """Text as both stores keep it: PostgreSQL refuses NUL characters (SQLite does not)
    and enforces VARCHAR lengths (SQLite does not). Used where the text comes from
    outside (a gateway's answers, error messages), never on validated input."""
    text = value.replace("\x00", "\ufffd")
    return text[:limit] if limit is not None else text


def fit_row(table: sa.Table, row: dict[str, Any]) -> dict[str, Any]:
    """`row` with every string made storable for its column (see storable_text)."""
    out = dict(row)
    for column in table.columns:
        value = out.get(column.name)
        if isinstance(value, str):
            length = getattr(column.type, "length", None)
            out[column.name] = storable_text(value, length)
    return out


def normalise_url(url: str) -> sa.URL:
    """Parse a database URL; a PostgreSQL URL without a driver uses psycopg 3 (the one
    the controller ships with), not SQLAlchemy's default psycopg2."""
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError as exc:
        raise ConfigError(f"database_url {url!r} is not a database URL: {exc}") from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername=PG_DRIVER)
    return parsed


class Database:
    def __init__(self, url: str, *, pool_size: int = 10, max_overflow: int = 20) -> None:
        """`pool_size`, `max_overflow`: PostgreSQL connections kept, and allowed beyond
        them (a replica's lease keeper has a small pool of its own: its renewals never
        wait for a connection behind a thousand gateways' results)."""
        self.url = url
        self.schema = Schema()
        self.engine: Engine = self._create_engine(url, pool_size, max_overflow)
        self.dialect = self.engine.dialect.name

    @property
    def display_url(self) -> str:
        """The URL without its password (for messages and logs)."""
        return normalise_url(self.url).render_as_string(hide_password=True)

    @property
    def is_postgresql(self) -> bool:
        return self.dialect == "postgresql"

    @staticmethod
    def _create_engine(url: str, pool_size: int, max_overflow: int) -> Engine:
        parsed = normalise_url(url)
        if parsed.get_backend_name() == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                path = Path(parsed.database)
                try:
                    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                except OSError as exc:
                    raise ConfigError(f"cannot create {path.parent}: {exc.strerror}") from None
            engine = sa.create_engine(
                parsed, connect_args={"check_same_thread": False, "timeout": 30},
            )
            sa.event.listen(engine, "connect", _sqlite_pragmas)
            return engine
        try:
            return sa.create_engine(parsed, pool_pre_ping=True, pool_size=pool_size,
                                    max_overflow=max_overflow)
        except (ImportError, SQLAlchemyError) as exc:
            raise ConfigError(f"cannot use database {parsed.render_as_string()}: {exc}") from None

    @contextlib.contextmanager
    def begin(self) -> Iterator[Connection]:
        """One transaction; database errors become StorageError with a readable message."""
        try:
            with self.engine.begin() as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise StorageError(f"database error: {exc.__class__.__name__}: "
                               f"{str(exc.orig if hasattr(exc, 'orig') else exc)[:300]}") from exc

    def serialise(self, conn: Connection, what: str) -> None:
        """Hold `what`'s advisory lock until this transaction ends (PostgreSQL); other
        controllers sharing the database wait here. A no-op on SQLite, which lets one
        writer at a time in anyway."""
        if self.is_postgresql:
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(ADVISORY_LOCKS[what])))

    def schema_version(self) -> int:
        with self.begin() as conn:
            if not sa.inspect(conn).has_table("schema_version"):
                return 0
            value = conn.execute(sa.select(sa.func.max(self.schema.schema_version.c.version)))
            return int(value.scalar() or 0)

    def audit_records(self) -> int:
        """How many records the audit chain holds (0: none yet)."""
        with self.begin() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(
                self.schema.audit_log)).scalar() or 0)

    def migrate(self, *, target: int = LATEST_VERSION) -> list[int]:
        """Apply every migration newer than the database, up to `target` (tests stop at
        older versions); returns the versions applied. Two controllers starting at once
        on one PostgreSQL take turns: each step re-reads the version under the lock."""
        from alembic.operations import Operations  # only needed here: keeps CLI start fast
        from alembic.runtime.migration import MigrationContext

        version = self.schema.schema_version.c.version
        applied: list[int] = []
        for step in (None, *MIGRATIONS):
            if step is not None and step.version > target:
                break
            with self.begin() as conn:
                self.serialise(conn, "migrate")
                if step is None:  # first: the version table, and a database from the future
                    self.schema.schema_version.create(conn, checkfirst=True)
                current = int(conn.execute(sa.select(sa.func.max(version))).scalar() or 0)
                if current > LATEST_VERSION:
                    raise ConfigError(
                        f"the database schema is version {current}, newer than this "
                        f"controller understands ({LATEST_VERSION}); upgrade the controller")
                if step is None or step.version <= current:
                    continue
                step.apply(Operations(MigrationContext.configure(conn)))
                conn.execute(self.schema.schema_version.insert().values(
                    version=step.version, description=step.description, applied_at=time.time()))
            applied.append(step.version)
        return applied

    def now(self, conn: Connection) -> float:
        """The database's clock (PostgreSQL; SQLite: this host's): leases and heartbeats
        of every replica are timed by one clock, whatever the hosts' clocks say."""
        if self.is_postgresql:
            return float(conn.execute(sa.text(
                "SELECT EXTRACT(EPOCH FROM clock_timestamp())")).scalar_one())
        return time.time()

    def dispose(self) -> None:
        self.engine.dispose()
