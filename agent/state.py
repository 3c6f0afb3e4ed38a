"""Desired state on disk (atomic write + fsync), the local journal, and the agent lock.

The state file is the agent's memory across restarts and reboots: the
reconcile loop makes the kernel match it. The journal is append-only JSON
lines, one per change, for the incident lead who asks later what happened.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.config import FlowRule
from agent.errors import BusyError, StateError
from agent.journal import Journal
from agent.policy import ExceptionSpec
from agent.wire import SOCKET_FILE

STATE_FILE = "state.json"
LOCK_FILE = "agent.lock"
Verification = Literal["verified", "unverified", "unknown"]
# state.json's format: 1 is the unversioned file of agents before 0.2 (read and migrated),
# a newer one is refused with the table left as it is (it may mean more than we know)
STATE_FORMAT = 2


class ExceptionEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    flow: FlowRule
    expires_at: float
    created_at: float
    actor: str
    reason: str
    ticket: str | None = None

    def spec(self) -> ExceptionSpec:
        return ExceptionSpec(flow=self.flow, expires_at=self.expires_at)


class VerificationResult(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    status: Verification = "unknown"
    checked_at: float | None = None
    failing: tuple[str, ...] = ()
    detail: tuple[str, ...] = ()


class Provisional(BaseModel):
    """A change not yet confirmed (commit-confirmed), and what happens if nobody confirms
    it before the deadline. A rollback never opens the gateway: an isolate of an open
    gateway is kept (and reported unconfirmed), a restore is isolated again."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    action: str
    request_id: str | None = None
    started_at: float
    deadline: float
    back_to_profile: str | None = None  # isolate again with this profile
    keep: bool = False  # nothing closed to go back to: stay, and say so
    revoke_exception: str | None = None  # an exception opened provisionally
    config_digest: str | None = None  # a reload: the config to return to (the daemon's)


class DesiredState(BaseModel):
    """`profile=None` means open: no table of ours in the kernel."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: int = STATE_FORMAT
    profile: str | None = None
    since: float = Field(default_factory=time.time)
    actor: str = "system"
    reason: str = ""
    exceptions: tuple[ExceptionEntry, ...] = ()
    generation: int = 0
    verification: VerificationResult = VerificationResult()
    provisional: Provisional | None = None
    unconfirmed: str = ""  # a fail-closed change that nobody confirmed, kept

    @property
    def isolated(self) -> bool:
        return self.profile is not None

    def live_exceptions(self, now: float) -> tuple[ExceptionEntry, ...]:
        return tuple(e for e in self.exceptions if e.expires_at > now)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StateStore:
    """Reads and writes the state dir. Writes go to a temp file, fsync, rename, fsync dir,
    so a crash leaves the old file or the new one, never a torn one."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.journal_log = Journal(state_dir)

    @property
    def state_path(self) -> Path:
        return self.dir / STATE_FILE

    @property
    def journal_path(self) -> Path:
        return self.journal_log.path

    @property
    def socket_path(self) -> Path:
        return self.dir / SOCKET_FILE

    def ensure_dir(self) -> None:
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"cannot create state dir {self.dir}: {exc.strerror}") from None

    def load(self) -> DesiredState:
        try:
            raw = self.state_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return DesiredState(since=0.0)
        except OSError as exc:
            raise StateError(f"cannot read {self.state_path}: {exc.strerror}") from None
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise StateError(f"{self.state_path} is corrupt: {exc}") from None
        if not isinstance(data, dict):
            raise StateError(f"{self.state_path} is corrupt: not a JSON object")
        found = data.get("format", 1)
        if not isinstance(found, int) or found > STATE_FORMAT:
            raise StateError(
                f"{self.state_path} has format {found!r}, written by a newer agent; this "
                f"agent reads formats up to {STATE_FORMAT}. Upgrade the agent (the ruleset "
                "in the kernel is left as it is)")
        data["format"] = STATE_FORMAT  # format 1 differs only by lacking the field
        try:
            return DesiredState.model_validate(data)
        except ValidationError as exc:
            raise StateError(f"{self.state_path} is corrupt: {exc.errors()[0]['msg']}") from None

    def save(self, state: DesiredState) -> None:
        self.ensure_dir()
        tmp = self.state_path.with_suffix(f".tmp.{os.getpid()}")
        data = state.model_dump_json(indent=2).encode("utf-8")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.state_path)
            _fsync_dir(self.dir)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise StateError(f"cannot write {self.state_path}: {exc.strerror}") from None

    def journal(self, **record: Any) -> dict[str, Any]:
        """Append one change record (see journal.py); fsync'd."""
        self.ensure_dir()
        return self.journal_log.append(record)

    def read_journal(self, limit: int | None = None, *,
                     since: float | None = None) -> list[dict[str, Any]]:
        return self.journal_log.tail(limit, since=since).entries

    @contextlib.contextmanager
    def locked(self, timeout: float = 60.0) -> Iterator[None]:
        """Serialise every change to this gateway (daemon, local CLI, RPC sessions)."""
        self.ensure_dir()
        fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise BusyError(
                            f"another change holds {self.dir / LOCK_FILE} for over {timeout:.0f}s"
                        ) from None
                    time.sleep(0.01)
            yield
        finally:
            os.close(fd)
