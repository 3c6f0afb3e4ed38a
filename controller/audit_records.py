"""Audit records: what one record holds, how it is hashed into the chain, the chain key.

Each record commits to the one before it:

    hash(n) = HMAC-SHA256(key, canonical(seq, time, actor, action, outcome, targets,
                                         reason, ticket, command_id, detail, hash(n-1)))

The key lives in a file in the controller's state dir, not in the database:
whoever can write to the database (a PostgreSQL admin, a restored backup) cannot
re-hash the chain after an edit.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from controller.errors import ConfigError

GENESIS = "0" * 64
CHAIN_FORMAT = 1
_CHUNK = 1000


def canonical_json(value: Any) -> str:
    """The one JSON spelling hashed and stored: sorted keys, no spaces, UTF-8 text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=str)


def record_hash(key: bytes, *, seq: int, ts_us: int, actor: str, action: str, outcome: str,
                targets: str, reason: str, ticket: str | None, command_id: str | None,
                detail: str, prev_hash: str) -> str:
    """The chain hash of one record, over the values exactly as stored."""
    payload = json.dumps(
        [CHAIN_FORMAT, seq, ts_us, actor, action, outcome, targets, reason, ticket, command_id,
         detail, prev_hash],
        ensure_ascii=False, separators=(",", ":"),
    )
    return hmac.new(key, payload.encode("utf-8"), hashlib.sha256).hexdigest()


def format_time(ts_us: int) -> str:
    return dt.datetime.fromtimestamp(ts_us / 1e6, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class AuditEvent:
    """What happened, before it gets its place in the chain."""

    actor: str
    action: str
    outcome: str
    reason: str = ""
    targets: tuple[str, ...] = ()
    ticket: str | None = None
    command_id: str | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)


class AuditRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    seq: int
    time: str
    ts_us: int
    actor: str
    action: str
    outcome: str
    targets: list[str]
    reason: str
    ticket: str | None
    command_id: str | None
    detail: dict[str, Any]
    prev_hash: str
    hash: str

    def label(self) -> str:
        """How a person names this record: '#17 (2025-07-23T10:01:02Z, isolate by alice)'."""
        return f"#{self.seq} ({self.time[:19]}Z, {self.action} by {self.actor})"


@dataclass(frozen=True)
class HistoryQuery:
    gateway: str | None = None
    since: float | None = None
    until: float | None = None
    actor: str | None = None
    action: str | None = None
    command_id: str | None = None
    limit: int = 1000


class AuditKey:
    """The chain key: 32 random bytes in a 0600 file, created on first use."""

    def __init__(self, key: bytes) -> None:
        self.key = key

    @classmethod
    def load_or_create(cls, path: Path, *, chain_length: int = 0) -> AuditKey:
        """`chain_length`: records the database already holds. A key made now could not
        verify them nor extend their chain: a missing key is then an error, never a new
        key (restore it from the backup)."""
        try:
            text = path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            if chain_length:
                raise ConfigError(
                    f"audit key {path} is missing, and the database holds an audit chain of "
                    f"{chain_length} records made with it: restore the key from your backup "
                    "(every replica uses the same key file). A new key would make the whole "
                    "chain fail verification.") from None
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            text = secrets.token_hex(32)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:  # created concurrently: use theirs
                return cls.load_or_create(path, chain_length=chain_length)
            with os.fdopen(fd, "w", encoding="ascii") as fh:
                fh.write(text + "\n")
        except OSError as exc:
            raise ConfigError(f"cannot read audit key {path}: {exc.strerror}") from None
        try:
            key = bytes.fromhex(text)
        except ValueError:
            raise ConfigError(f"audit key {path} is not hex; it must be 64 hex digits") from None
        if len(key) < 16:
            raise ConfigError(f"audit key {path} is too short (need at least 16 bytes)")
        return cls(key)



def _loads(text: Any, default: Any) -> Any:
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return default


def record_from_row(row: Mapping[str, Any]) -> AuditRecord:
    targets = _loads(row["targets"], [])
    detail = _loads(row["detail"], {})
    return AuditRecord(
        seq=int(row["seq"]), ts_us=int(row["ts_us"]), time=format_time(int(row["ts_us"])),
        actor=row["actor"], action=row["action"], outcome=row["outcome"],
        targets=[str(x) for x in targets] if isinstance(targets, list) else [str(targets)],
        reason=row["reason"], ticket=row["ticket"], command_id=row["command_id"],
        detail=detail if isinstance(detail, dict) else {"value": detail},
        prev_hash=row["prev_hash"], hash=row["hash"],
    )
