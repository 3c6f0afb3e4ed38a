"""API tokens and roles.

A token is `dbt_<id>_<secret>`. The database keeps the id, the user, the role
and SHA-256 of the secret; the secret itself is shown once, at creation. The
secret has 256 bits of entropy, so a plain hash is enough (no password
stretching needed) and a leaked database does not leak usable tokens.

Roles are ordered: viewer (read) < operator (isolate, exceptions, probes)
< admin (restore, inventory, users).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict

from controller.db import Database
from controller.errors import InputError, NotFound, Unauthorized

TOKEN_RE = re.compile(r"^dbt_([0-9a-f]{12})_([A-Za-z0-9_-]{20,128})$")
USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:+-]{0,63}$")  # = the agent's actor rule


class Role(enum.IntEnum):
    viewer = 1
    operator = 2
    admin = 3

    @classmethod
    def parse(cls, text: str) -> Role:
        try:
            return cls[text]
        except KeyError:
            raise InputError(f"{text!r} is not a role; use viewer, operator or admin") from None


@dataclass(frozen=True)
class Principal:
    """Who is calling: the user name is the actor in the audit log and on the gateway."""

    user: str
    role: Role
    token_id: str
    source: str = "local"  # the client's address (API), "local" on the controller host

    def can(self, needed: Role) -> bool:
        return self.role >= needed


class TokenInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    user: str
    role: str
    description: str
    created_at: float
    created_by: str
    revoked_at: float | None
    last_used_at: float | None


def check_user(user: str) -> str:
    if not USER_RE.fullmatch(user):
        raise InputError(f"{user!r} is not a valid user name (letters, digits, . _ @ : + -; "
                         "at most 64 characters)")
    return user


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


class TokenStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.table = db.schema.api_tokens

    def create(self, *, user: str, role: Role, created_by: str, description: str = "") -> str:
        """A new token for `user`; returns the full token (shown once, never stored)."""
        check_user(user)
        token_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        with self.db.begin() as conn:
            conn.execute(self.table.insert().values(
                id=token_id, user=user, role=role.name, secret_hash=hash_secret(secret),
                description=description[:500], created_at=time.time(), created_by=created_by,
            ))
        return f"dbt_{token_id}_{secret}"

    def authenticate(self, token: str | None) -> Principal:
        if not token:
            raise Unauthorized("no API token: set DRAWBRIDGE_TOKEN or send "
                               "'Authorization: Bearer <token>'")
        match = TOKEN_RE.fullmatch(token.strip())
        if not match:
            raise Unauthorized("the API token is malformed (expected dbt_<id>_<secret>)")
        token_id, secret = match.groups()
        t = self.table
        with self.db.begin() as conn:
            row = conn.execute(sa.select(t).where(t.c.id == token_id)).first()
            if row is None or not hmac.compare_digest(row.secret_hash, hash_secret(secret)):
                raise Unauthorized("the API token is not valid")
            if row.revoked_at is not None:
                raise Unauthorized(f"the API token {token_id} was revoked")
            conn.execute(t.update().where(t.c.id == token_id).values(last_used_at=time.time()))
        return Principal(user=row.user, role=Role.parse(row.role), token_id=token_id)

    def list(self) -> list[TokenInfo]:
        t = self.table
        with self.db.begin() as conn:
            rows = conn.execute(sa.select(t).order_by(t.c.created_at)).fetchall()
        return [TokenInfo(id=r.id, user=r.user, role=r.role, description=r.description,
                          created_at=r.created_at, created_by=r.created_by,
                          revoked_at=r.revoked_at, last_used_at=r.last_used_at) for r in rows]

    def revoke(self, token_id: str) -> None:
        t = self.table
        with self.db.begin() as conn:
            done = conn.execute(t.update().where(t.c.id == token_id, t.c.revoked_at.is_(None))
                                .values(revoked_at=time.time()))
        if done.rowcount == 0:
            raise NotFound(f"no active token with id {token_id!r}")
