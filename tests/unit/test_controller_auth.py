"""API tokens: shown once, stored hashed, roles ordered, revocation."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from controller.auth import Role, TokenStore
from controller.db import Database
from controller.errors import InputError, NotFound, Unauthorized
from tests.storage import raw_sql


@pytest.fixture
def store(db_url: str) -> Iterator[TokenStore]:
    db = Database(db_url)
    db.migrate()
    yield TokenStore(db)
    db.dispose()


def test_token_round_trip_and_hash_only(store: TokenStore, db_url: str) -> None:
    token = store.create(user="alice", role=Role.operator, created_by="root@host")
    p = store.authenticate(token)
    assert (p.user, p.role) == ("alice", Role.operator)
    secret = token.split("_", 2)[2]
    dump = "\n".join(str(tuple(row)) for row in raw_sql(db_url, "SELECT * FROM api_tokens"))
    assert token.split("_")[1] in dump
    assert secret not in dump


@pytest.mark.parametrize("bad", [None, "", "garbage", "dbt_000000000000_" + "x" * 43,
                                 "Bearer dbt_x"])
def test_bad_tokens_are_unauthorized(store: TokenStore, bad: str | None) -> None:
    with pytest.raises(Unauthorized):
        store.authenticate(bad)


def test_wrong_secret_for_a_real_id(store: TokenStore) -> None:
    token = store.create(user="alice", role=Role.admin, created_by="x")
    prefix = token.rsplit("_", 1)[0]
    with pytest.raises(Unauthorized, match="not valid"):
        store.authenticate(prefix + "_" + "y" * 43)


def test_revoked_token(store: TokenStore) -> None:
    token = store.create(user="bob", role=Role.viewer, created_by="x")
    token_id = token.split("_")[1]
    store.revoke(token_id)
    with pytest.raises(Unauthorized, match="revoked"):
        store.authenticate(token)
    with pytest.raises(NotFound):
        store.revoke(token_id)
    assert store.list()[0].revoked_at is not None


def test_roles_are_ordered() -> None:
    assert Role.admin > Role.operator > Role.viewer
    assert Role.parse("operator") is Role.operator
    with pytest.raises(InputError):
        Role.parse("root")


@pytest.mark.parametrize("user", ["", "a b", "x" * 65, "-lead", "a\nb"])
def test_user_names_follow_the_agent_actor_rule(store: TokenStore, user: str) -> None:
    with pytest.raises(InputError):
        store.create(user=user, role=Role.viewer, created_by="x")
