"""Storage: SQLAlchemy 2 Core, SQLite in the state dir by default, PostgreSQL by URL.

Migrations are a small versioned list in this module, not an alembic script
directory: each step has a number, runs in one transaction together with the
row that records it in `schema_version`, and uses alembic's `Operations` for
portable DDL (SQLite has no real ALTER TABLE; alembic's batch mode covers it).
A packaged controller thus needs no alembic.ini or env.py on disk, `serve`
migrates on start, and a database newer than the code is refused.

Migration steps are frozen snapshots of the schema at their version; `Schema`
below is the current shape that queries use. A unit test checks that a
freshly migrated database has exactly the columns `Schema` declares.

PostgreSQL is a first-class store (several controllers may share one): schema
changes and audit appends are serialised with transaction-scoped advisory locks
(`Database.serialise`), read-modify-writes of rows use `SELECT ... FOR UPDATE`.
SQLite is the default; it serialises writers itself, and the controller's own
threads are serialised in-process, so the same calls are no-ops there.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from controller.errors import ConfigError, StorageError

if TYPE_CHECKING:
    from alembic.operations import Operations

BigInt = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

# Keys of transaction-scoped advisory locks (PostgreSQL): one per kind of write that
# must happen one at a time across every controller sharing the database.
ADVISORY_LOCKS = {"migrate": 0x4442_0001, "audit": 0x4442_0002}
PG_DRIVER = "postgresql+psycopg"


class Schema:
    """The current tables (built per instance: no module-level registry)."""

    def __init__(self) -> None:
        self.metadata = sa.MetaData()
        m = self.metadata
        self.schema_version = sa.Table(
            "schema_version", m,
            sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
            sa.Column("description", sa.Text, nullable=False),
            sa.Column("applied_at", sa.Float, nullable=False),
        )
        self.gateways = sa.Table(
            "gateways", m,
            sa.Column("name", sa.String(63), primary_key=True),
            sa.Column("host", sa.String(255), nullable=False),
            sa.Column("port", sa.Integer, nullable=False),
            sa.Column("user", sa.String(64), nullable=False),
            sa.Column("key_path", sa.Text, nullable=False),
            sa.Column("host_key", sa.String(80)),
            sa.Column("trust_on_first_use", sa.Boolean, nullable=False),
            sa.Column("groups", sa.Text, nullable=False),
            sa.Column("created_at", sa.Float, nullable=False),
            sa.Column("created_by", sa.String(64), nullable=False),
        )
        self.api_tokens = sa.Table(
            "api_tokens", m,
            sa.Column("id", sa.String(32), primary_key=True),
            sa.Column("user", sa.String(64), nullable=False),
            sa.Column("role", sa.String(16), nullable=False),
            sa.Column("secret_hash", sa.String(64), nullable=False),
            sa.Column("description", sa.Text, nullable=False),
            sa.Column("created_at", sa.Float, nullable=False),
            sa.Column("created_by", sa.String(64), nullable=False),
            sa.Column("revoked_at", sa.Float),
            sa.Column("last_used_at", sa.Float),
        )
        self.audit_log = sa.Table(
            "audit_log", m,
            sa.Column("seq", BigInt, primary_key=True, autoincrement=False),
            sa.Column("ts_us", BigInt, nullable=False, index=True),
            sa.Column("actor", sa.String(128), nullable=False, index=True),
            sa.Column("action", sa.String(64), nullable=False, index=True),
            sa.Column("outcome", sa.String(32), nullable=False),
            sa.Column("targets", sa.Text, nullable=False),
            sa.Column("reason", sa.Text, nullable=False),
            sa.Column("ticket", sa.String(64)),
            sa.Column("command_id", sa.String(64), index=True),
            sa.Column("detail", sa.Text, nullable=False),
            sa.Column("prev_hash", sa.String(64), nullable=False),
            sa.Column("hash", sa.String(64), nullable=False),
        )
        self.gateway_state = sa.Table(
            "gateway_state", m,
            sa.Column("name", sa.String(63), primary_key=True),
            sa.Column("reachable", sa.Boolean),
            sa.Column("last_contact_at", sa.Float),
            sa.Column("last_error_code", sa.String(64)),
            sa.Column("last_error", sa.Text),
            sa.Column("state", sa.String(16)),
            sa.Column("profile", sa.String(63)),
            sa.Column("verification", sa.String(16)),
            sa.Column("in_sync", sa.Boolean),
            sa.Column("generation", sa.Integer),
            sa.Column("since", sa.Float),
            sa.Column("gw_actor", sa.String(128)),
            sa.Column("gw_reason", sa.Text),
            sa.Column("drift_repairs", sa.Integer),
            sa.Column("problems", sa.Text),
            sa.Column("exceptions", sa.Text),
            sa.Column("observed_at", sa.Float),
            sa.Column("pending", sa.Text),
            sa.Column("last_command_id", sa.String(64)),
            sa.Column("host_key_seen", sa.String(80)),
            sa.Column("row_version", BigInt, nullable=False, server_default="0"),
            sa.Column("agent_version", sa.String(64)),
            sa.Column("config_digest", sa.String(32)),
            sa.Column("profiles", sa.Text),
        )
        self.audit_checkpoints = sa.Table(
            "audit_checkpoints", m,
            sa.Column("seq", BigInt, primary_key=True, autoincrement=False),
            *_checkpoint_columns(),
        )
        self.plans = sa.Table(
            "plans", m,
            sa.Column("plan_id", sa.String(32), primary_key=True),
            *_plan_columns(),
        )
        self.replicas = sa.Table("replicas", m, *_replica_columns())
        self.gateway_leases = sa.Table("gateway_leases", m, *_lease_columns())
        self.commands = sa.Table(
            "commands", m, *_command_columns(),
            sa.Index("ix_commands_gateway_seq", "gateway", "seq"),
            sa.Index("ix_commands_command_id", "command_id"),
            sa.Index("ix_commands_state", "state"),
            sa.Index("ix_commands_reported", "reported"),
        )


def _checkpoint_columns() -> list[sa.Column[Any]]:
    return [
        sa.Column("head_hash", sa.String(64), nullable=False),
        sa.Column("ts_us", BigInt, nullable=False),
        sa.Column("signature", sa.Text, nullable=False),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("public_key", sa.Text, nullable=False),
        sa.Column("anchored", sa.Text, nullable=False),  # JSON {gateway: "recorded" | why not}
    ]


def _plan_columns() -> list[sa.Column[Any]]:
    return [
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("doc", sa.Text, nullable=False),  # JSON: controller.plan_machine.PlanDoc
        # Who drives the plan now (controller instance id) and until when: claimed with
        # SELECT ... FOR UPDATE SKIP LOCKED, so two controllers never drive one plan.
        sa.Column("lease_owner", sa.String(64)),
        sa.Column("lease_until", sa.Float),
        sa.Column("row_version", BigInt, nullable=False, server_default="0"),
    ]


def _replica_columns() -> list[sa.Column[Any]]:
    # Live controllers sharing the database: a heartbeat renewed with their leases.
    return [
        sa.Column("replica_id", sa.String(64), primary_key=True),
        sa.Column("incarnation", sa.String(32), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("api", sa.String(255), nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("heartbeat_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
    ]


def _lease_columns() -> list[sa.Column[Any]]:
    # Which replica holds which gateway, until when (the database's clock); `epoch` is
    # bumped whenever the lease changes hands (a fencing token for queued commands).
    return [
        sa.Column("gateway", sa.String(63), primary_key=True),
        sa.Column("owner", sa.String(64)),
        sa.Column("incarnation", sa.String(32)),
        sa.Column("epoch", BigInt, nullable=False, server_default="0"),
        sa.Column("expires_at", sa.Float, nullable=False, server_default="0"),
        sa.Column("acquired_at", sa.Float),
    ]


def _command_columns() -> list[sa.Column[Any]]:
    # One row per command and gateway, in the order accepted (`seq`): what the replica
    # holding the gateway's lease carries out, and where the accepting replica finds
    # the result. state: queued -> claimed -> done.
    return [
        sa.Column("seq", BigInt, primary_key=True, autoincrement=True),
        sa.Column("command_id", sa.String(64), nullable=False),
        sa.Column("gateway", sa.String(63), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("op", sa.String(32), nullable=False),
        sa.Column("args", sa.Text, nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("ticket", sa.String(64)),
        sa.Column("accepted_at", sa.Float, nullable=False),
        sa.Column("accepted_by", sa.String(64), nullable=False),
        sa.Column("accepted_incarnation", sa.String(32), nullable=False),
        sa.Column("audit", sa.String(64)),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("claimed_by", sa.String(64)),
        sa.Column("claim_epoch", BigInt),
        sa.Column("claimed_at", sa.Float),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("finished_at", sa.Float),
        sa.Column("result", sa.Text),
        sa.Column("reported", sa.Boolean, nullable=False, server_default=sa.false()),
    ]


# -- migrations ------------------------------------------------------------------------


def _m1_initial(op: Operations) -> None:
    op.create_table(
        "gateways",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("port", sa.Integer, nullable=False),
        sa.Column("user", sa.String(64), nullable=False),
        sa.Column("key_path", sa.Text, nullable=False),
        sa.Column("host_key", sa.String(80)),
        sa.Column("trust_on_first_use", sa.Boolean, nullable=False),
        sa.Column("groups", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("created_by", sa.String(64), nullable=False),
    )
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("user", sa.String(64), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("created_by", sa.String(64), nullable=False),
        sa.Column("revoked_at", sa.Float),
        sa.Column("last_used_at", sa.Float),
    )
    op.create_table(
        "audit_log",
        sa.Column("seq", BigInt, primary_key=True, autoincrement=False),
        sa.Column("ts_us", BigInt, nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("targets", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("ticket", sa.String(64)),
        sa.Column("command_id", sa.String(64)),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    for column in ("ts_us", "actor", "action", "command_id"):
        op.create_index(f"ix_audit_log_{column}", "audit_log", [column])
    op.create_table(
        "gateway_state",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("reachable", sa.Boolean),
        sa.Column("last_contact_at", sa.Float),
        sa.Column("last_error_code", sa.String(64)),
        sa.Column("last_error", sa.Text),
        sa.Column("state", sa.String(16)),
        sa.Column("profile", sa.String(63)),
        sa.Column("verification", sa.String(16)),
        sa.Column("in_sync", sa.Boolean),
        sa.Column("generation", sa.Integer),
        sa.Column("since", sa.Float),
        sa.Column("gw_actor", sa.String(128)),
        sa.Column("gw_reason", sa.Text),
        sa.Column("drift_repairs", sa.Integer),
        sa.Column("problems", sa.Text),
        sa.Column("exceptions", sa.Text),
        sa.Column("observed_at", sa.Float),
        sa.Column("pending", sa.Text),
        sa.Column("last_command_id", sa.String(64)),
        sa.Column("host_key_seen", sa.String(80)),
    )


def _m2_row_version(op: Operations) -> None:
    # Bumped by every write of a gateway's row: a status poll that read the row before
    # asking the gateway can tell, when it comes back, whether a command (or another
    # controller sharing the database) wrote newer facts meanwhile.
    op.add_column("gateway_state",
                  sa.Column("row_version", BigInt, nullable=False, server_default="0"))


def _m3_checkpoints_plans(op: Operations) -> None:
    # Signed chain heads (the key that signs them is a file, never in the database) and
    # durable restore plans, driven by the controller's scheduler.
    op.create_table(
        "audit_checkpoints",
        sa.Column("seq", BigInt, primary_key=True, autoincrement=False),
        sa.Column("head_hash", sa.String(64), nullable=False),
        sa.Column("ts_us", BigInt, nullable=False),
        sa.Column("signature", sa.Text, nullable=False),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("public_key", sa.Text, nullable=False),
        sa.Column("anchored", sa.Text, nullable=False),
    )
    op.create_table(
        "plans",
        sa.Column("plan_id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("doc", sa.Text, nullable=False),
        sa.Column("lease_owner", sa.String(64)),
        sa.Column("lease_until", sa.Float),
        sa.Column("row_version", BigInt, nullable=False, server_default="0"),
    )


def _m5_replicas(op: Operations) -> None:
    # Controller replicas on one PostgreSQL database: heartbeats, gateway leases and the
    # command queue (controller/replicas.py).
    op.create_table(
        "replicas",
        sa.Column("replica_id", sa.String(64), primary_key=True),
        sa.Column("incarnation", sa.String(32), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("api", sa.String(255), nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("heartbeat_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
    )
    op.create_table(
        "gateway_leases",
        sa.Column("gateway", sa.String(63), primary_key=True),
        sa.Column("owner", sa.String(64)),
        sa.Column("incarnation", sa.String(32)),
        sa.Column("epoch", BigInt, nullable=False, server_default="0"),
        sa.Column("expires_at", sa.Float, nullable=False, server_default="0"),
        sa.Column("acquired_at", sa.Float),
    )
    op.create_table(
        "commands",
        sa.Column("seq", BigInt, primary_key=True, autoincrement=True),
        sa.Column("command_id", sa.String(64), nullable=False),
        sa.Column("gateway", sa.String(63), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("op", sa.String(32), nullable=False),
        sa.Column("args", sa.Text, nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("ticket", sa.String(64)),
        sa.Column("accepted_at", sa.Float, nullable=False),
        sa.Column("accepted_by", sa.String(64), nullable=False),
        sa.Column("accepted_incarnation", sa.String(32), nullable=False),
        sa.Column("audit", sa.String(64)),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("claimed_by", sa.String(64)),
        sa.Column("claim_epoch", BigInt),
        sa.Column("claimed_at", sa.Float),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("finished_at", sa.Float),
        sa.Column("result", sa.Text),
        sa.Column("reported", sa.Boolean, nullable=False, server_default=sa.false()),
    )
    op.create_index("ix_commands_gateway_seq", "commands", ["gateway", "seq"])
    op.create_index("ix_commands_command_id", "commands", ["command_id"])
    op.create_index("ix_commands_state", "commands", ["state"])
    op.create_index("ix_commands_reported", "commands", ["reported"])


def _m4_agent_facts(op: Operations) -> None:
    # What each gateway runs (agent version, config digest) and which profiles it knows:
    # an isolate naming a profile a gateway does not have is refused before anything is
    # sent to any gateway.
    for column in (sa.Column("agent_version", sa.String(64)),
                   sa.Column("config_digest", sa.String(32)),
                   sa.Column("profiles", sa.Text)):
        op.add_column("gateway_state", column)


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[Operations], None]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial schema: gateways, api_tokens, audit_log, gateway_state", _m1_initial),
    Migration(2, "gateway_state.row_version", _m2_row_version),
    Migration(3, "audit_checkpoints; plans", _m3_checkpoints_plans),
    Migration(4, "gateway_state: agent_version, config_digest, profiles", _m4_agent_facts),
    Migration(5, "replicas, gateway_leases, commands", _m5_replicas),
)
LATEST_VERSION = MIGRATIONS[-1].version


# -- database ----------------------------------------------------------------------------


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
