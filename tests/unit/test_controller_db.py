"""Migrations: versioned, idempotent, matching the schema queries use; newer DBs refused.
Every test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import sqlalchemy as sa

from controller.db import LATEST_VERSION, Database, Schema, normalise_url
from controller.errors import ConfigError, StorageError


def columns(db: Database) -> dict[str, set[str]]:
    inspector = sa.inspect(db.engine)
    return {t.name: {c["name"] for c in inspector.get_columns(t.name)}
            for t in Schema().metadata.sorted_tables if inspector.has_table(t.name)}


def test_migrate_creates_the_current_schema(db_url: str) -> None:
    db = Database(db_url)
    try:
        assert db.schema_version() == 0
        assert db.migrate() == list(range(1, LATEST_VERSION + 1))
        assert db.schema_version() == LATEST_VERSION
        for table in Schema().metadata.sorted_tables:
            assert columns(db)[table.name] == {c.name for c in table.columns}, table.name
    finally:
        db.dispose()


def test_migrate_is_idempotent(db_url: str) -> None:
    db = Database(db_url)
    db.migrate()
    assert db.migrate() == []
    again = Database(db_url)
    assert again.migrate() == []
    db.dispose()
    again.dispose()


def test_migrate_from_version_1_keeps_the_data(db_url: str) -> None:
    db = Database(db_url)
    assert db.migrate(target=1) == [1]
    assert db.schema_version() == 1
    assert "row_version" not in columns(db)["gateway_state"]
    with db.engine.begin() as conn:  # a row written by a version-1 controller
        conn.execute(sa.text("INSERT INTO gateway_state (name, reachable, state, since) "
                             "VALUES ('gw1', :yes, 'isolated', 1700000000.25)"), {"yes": True})
    assert db.migrate() == list(range(2, LATEST_VERSION + 1))
    t = db.schema.gateway_state
    with db.begin() as conn:
        row = conn.execute(sa.select(t).where(t.c.name == "gw1")).one()
    assert (row.reachable, row.state, row.since, row.row_version) == (
        True, "isolated", 1700000000.25, 0)
    db.dispose()


def test_newer_database_is_refused(db_url: str) -> None:
    db = Database(db_url)
    db.migrate()
    with db.engine.begin() as conn:
        conn.execute(db.schema.schema_version.insert().values(
            version=LATEST_VERSION + 1, description="future", applied_at=0.0))
    with pytest.raises(ConfigError, match="newer than this controller"):
        db.migrate()
    with pytest.raises(ConfigError, match="newer than this controller"):
        Database(db_url).migrate()
    db.dispose()


def test_two_controllers_migrating_at_once(db_url: str) -> None:
    """Two controllers started together on one database: each step is applied once."""
    dbs = [Database(db_url) for _ in range(2)]
    applied: list[list[int]] = []
    errors: list[BaseException] = []

    def run(db: Database) -> None:
        try:
            applied.append(db.migrate())
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(db,)) for db in dbs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if dbs[0].is_postgresql:  # SQLite: the loser may see "database is locked" instead
        assert not errors
        assert sorted(v for a in applied for v in a) == list(range(1, LATEST_VERSION + 1))
    assert dbs[0].schema_version() == LATEST_VERSION
    for db in dbs:
        db.dispose()


def test_bad_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not a database URL"):
        Database("not a url at all")


def test_postgresql_urls_use_psycopg3() -> None:
    assert normalise_url("postgresql://u@h/db").drivername == "postgresql+psycopg"
    assert normalise_url("postgres://u@h/db").drivername == "postgresql+psycopg"
    assert normalise_url("postgresql+psycopg://u@h/db").drivername == "postgresql+psycopg"
    assert normalise_url("sqlite:///x.db").drivername == "sqlite"


def test_unreachable_postgresql_is_a_storage_error(tmp_path: Path) -> None:
    db = Database(f"postgresql://nobody@/nothing?host={tmp_path}&port=1&connect_timeout=2")
    with pytest.raises(StorageError, match="database error"):
        db.schema_version()
    db.dispose()


def test_display_url_hides_the_password() -> None:
    db = Database("postgresql://drawbridge:s3cret@db.example.net/controller")
    assert "s3cret" not in db.display_url and "db.example.net" in db.display_url
    db.dispose()


def test_what_gateways_report_is_stored_fitted(db_url: str) -> None:
    """Over-long and NUL-carrying text from a gateway: PostgreSQL would refuse it."""
    from controller.states import StateStore

    db = Database(db_url)
    db.migrate()
    states = StateStore(db)
    states.update("gw", gw_actor="a" * 300, gw_reason="x\x00y", last_error="e\x00",
                  profile="p" * 100)
    got = states.get("gw")
    assert got.gw_actor == "a" * 128 and got.profile == "p" * 63
    assert (got.gw_reason, got.last_error) == ("x\ufffdy", "e\ufffd")
    db.dispose()
