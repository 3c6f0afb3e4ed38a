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
from agent.policy import ExceptionSpec

STATE_FILE = "state.json"
JOURNAL_FILE = "journal.jsonl"
LOCK_FILE = "agent.lock"
SOCKET_FILE = "agent.sock"
Verification = Literal["verified", "unverified", "unknown"]


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


class DesiredState(BaseModel):
    """`profile=None` means open: no table of ours in the kernel."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    profile: str | None = None
    since: float = Field(default_factory=time.time)
    actor: str = "system"
    reason: str = ""
    exceptions: tuple[ExceptionEntry, ...] = ()
    generation: int = 0
    verification: VerificationResult = VerificationResult()

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

    @property
    def state_path(self) -> Path:
        return self.dir / STATE_FILE

    @property
    def journal_path(self) -> Path:
        return self.dir / JOURNAL_FILE

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
            return DesiredState.model_validate_json(raw)
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

    def journal(self, **record: Any) -> None:
        """Append one change record; fsync'd, so an acknowledged change is on disk."""
        self.ensure_dir()
        record = {"time": time.time(), **record}
        line = json.dumps(record, sort_keys=True, default=str) + "\n"
        try:
            fd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode("utf-8"))
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise StateError(f"cannot append to {self.journal_path}: {exc.strerror}") from None

    def read_journal(self, limit: int | None = None) -> list[dict[str, Any]]:
        try:
            lines = self.journal_path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        if limit is not None:
            lines = lines[-limit:]
        return [json.loads(ln) for ln in lines if ln.strip()]

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
