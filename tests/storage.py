"""Raw SQL against a test database, store-neutral: how tests play the attacker who
edits rows behind the controller's back, or look at what was stored."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa


def raw_sql(url: str, statement: str, **params: Any) -> list[sa.Row[Any]]:
    """Run one statement (`:name` placeholders) in its own transaction; rows if any."""
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            result = conn.execute(sa.text(statement), params)
            return list(result.fetchall()) if result.returns_rows else []
    finally:
        engine.dispose()
