"""Migrations: versioned, idempotent, matching the schema queries use; newer DBs refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from controller.db import LATEST_VERSION, Database, Schema
from controller.errors import ConfigError


def test_migrate_creates_the_current_schema(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'sub' / 'c.db'}")
    assert db.schema_version() == 0
    assert db.migrate() == list(range(1, LATEST_VERSION + 1))
    assert db.schema_version() == LATEST_VERSION
    inspector = sa.inspect(db.engine)
    for table in Schema().metadata.sorted_tables:
        got = {c["name"] for c in inspector.get_columns(table.name)}
        assert got == {c.name for c in table.columns}, table.name


def test_migrate_is_idempotent(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'c.db'}")
    db.migrate()
    assert db.migrate() == []
    assert Database(f"sqlite:///{tmp_path / 'c.db'}").migrate() == []


def test_newer_database_is_refused(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'c.db'}")
    db.migrate()
    with db.engine.begin() as conn:
        conn.execute(db.schema.schema_version.insert().values(
            version=LATEST_VERSION + 1, description="future", applied_at=0.0))
    with pytest.raises(ConfigError, match="newer than this controller"):
        db.migrate()


def test_bad_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not a database URL"):
        Database("not a url at all")
