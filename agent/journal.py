"""The local journal: append-only JSON lines, fsync'd, rotated by size, read from the end.

One line per change request (isolate, restore, exceptions, repairs, verdicts,
confirmations, the controller's checkpoints), for the incident lead who asks
later what happened on this gateway, and for the controller's `audit reconcile`.

A crash can leave a torn last line: reading skips it and says how many lines
it skipped (`Tail.skipped`), appending first ends the torn line. The live file
is rotated to `journal.jsonl.1` (and so on, up to `keep` files) once it passes
`max_bytes`, so the history is bounded and never read whole: `tail` reads
backwards, block by block, only as far as it needs.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import StateError

JOURNAL_FILE = "journal.jsonl"
MAX_BYTES = 16 * 1024 * 1024
KEEP = 5
_BLOCK = 64 * 1024


@dataclass
class Tail:
    """Entries oldest first, and the lines that could not be read (torn, garbled)."""

    entries: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0


def _lines_backwards(path: Path) -> Iterator[bytes]:
    """The file's lines, last first, without reading it whole."""
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed in finally, generator
    except FileNotFoundError:
        return
    try:
        fh.seek(0, os.SEEK_END)
        pos = fh.tell()
        rest = b""
        while pos > 0:
            step = min(_BLOCK, pos)
            pos -= step
            fh.seek(pos)
            chunk = fh.read(step) + rest
            lines = chunk.split(b"\n")
            rest = lines.pop(0)
            yield from reversed(lines)
        if rest:
            yield rest
    finally:
        fh.close()


class Journal:
    def __init__(self, directory: Path, *, max_bytes: int = MAX_BYTES, keep: int = KEEP) -> None:
        self.dir = directory
        self.max_bytes = max_bytes
        self.keep = keep

    @property
    def path(self) -> Path:
        return self.dir / JOURNAL_FILE

    def files(self) -> list[Path]:
        """Newest first: the live file, then journal.jsonl.1, .2, ..."""
        return [self.path, *(self.dir / f"{JOURNAL_FILE}.{i}" for i in range(1, self.keep + 1))]

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        """Append one record (with its time); fsync'd, so an acknowledged change is on
        disk. A torn last line left by a crash is ended first, so it stays one bad line."""
        record = {"time": time.time(), **record}
        line = json.dumps(record, sort_keys=True, default=str).encode("utf-8") + b"\n"
        try:
            self._rotate_if_full()
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    line = b"\n" + line
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise StateError(f"cannot append to {self.path}: {exc.strerror}") from None
        return record

    def _rotate_if_full(self) -> None:
        try:
            if self.path.stat().st_size < self.max_bytes:
                return
        except FileNotFoundError:
            return
        files = self.files()
        with contextlib.suppress(FileNotFoundError):
            files[-1].unlink()
        for older, newer in zip(reversed(files[1:]), reversed(files[:-1]), strict=True):
            with contextlib.suppress(FileNotFoundError):
                os.replace(newer, older)
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def tail(self, limit: int | None = None, *, since: float | None = None) -> Tail:
        """The last `limit` entries (newer than `since`), oldest first."""
        out = Tail()
        for path in self.files():
            for raw in _lines_backwards(path):
                if not raw.strip():
                    continue
                try:
                    entry = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    out.skipped += 1
                    continue
                if not isinstance(entry, dict):
                    out.skipped += 1
                    continue
                if since is not None and float(entry.get("time", 0)) <= since:
                    out.entries.reverse()
                    return out
                out.entries.append(entry)
                if limit is not None and len(out.entries) >= limit:
                    out.entries.reverse()
                    return out
        out.entries.reverse()
        return out

    def find_request(self, request_id: str, *, depth: int = 4096) -> dict[str, Any] | None:
        """The latest entry answering `request_id`, among the last `depth` entries."""
        seen = 0
        for path in self.files():
            for raw in _lines_backwards(path):
                if not raw.strip():
                    continue
                seen += 1
                if seen > depth:
                    return None
                if request_id.encode() not in raw:
                    continue  # cheap filter before parsing
                with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError):
                    entry = json.loads(raw)
                    if isinstance(entry, dict) and entry.get("request_id") == request_id \
                            and "answer" in entry:
                        return entry
        return None
