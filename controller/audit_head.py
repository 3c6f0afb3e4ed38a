"""The audit chain's head, kept outside the database, and the check of the database
against it.

The head file (`<state_dir>/audit.head`) holds the seq and hash of the last record
this controller wrote. Whoever edits the database can cut records off the end of
the chain without breaking a single link; the head file is what says the chain
was longer. So the database is compared with it when the controller starts and
before every append: a chain that is shorter, or holds another record where the
head was, is a tamper alarm, never a new beginning. A database that is *ahead* of
the head is fine: the controller died between committing a record and writing the
head (the commit is first, so an acknowledged record is never missing from the
database), or another controller sharing a PostgreSQL database appended; the
records past the head are still bound to it by their keyed links.

Writes are durable: the head is written in place (fixed width) and fsynced, and
the directory is fsynced when the file is created, before the caller hears "ok".
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from controller.errors import StorageError

HEAD_FORMAT = "{seq:020d} {digest}\n"  # fixed width: rewritten in place, never truncated
GENESIS = "0" * 64
# The head of an empty chain: written when a controller first sees the database
# empty, so that a head file exists from the start (its loss is then an alarm), and
# controllers starting together on one empty database accept each other's records.
EMPTY = (0, GENESIS)


@dataclass(frozen=True)
class Head:
    seq: int
    hash: str

    def label(self) -> str:
        return f"#{self.seq} ({self.hash[:16]}...)"


class HeadUnreadable(Exception):
    """The head file exists but does not hold a head (edited, or garbage)."""


class HeadFile:
    def __init__(self, path: Path) -> None:
        self.path = path

    def exists(self) -> bool:
        return self.path.exists()

    def read(self) -> Head | None:
        """The head, None if there is no head file; HeadUnreadable if it is garbage."""
        try:
            text = self.path.read_text(encoding="ascii")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise HeadUnreadable(f"the head file {self.path} cannot be read: {exc}") from None
        try:
            seq_text, digest = text.split()
            seq = int(seq_text)
        except ValueError:
            raise HeadUnreadable(f"the head file {self.path} does not hold a head: "
                                 f"{text[:100]!r}") from None
        if seq < 0 or len(digest) != 64 or (seq == 0 and digest != GENESIS):
            raise HeadUnreadable(f"the head file {self.path} does not hold a head: "
                                 f"{text[:100]!r}")
        return Head(seq, digest)

    def write(self, head: Head) -> None:
        """One positional write of a fixed-width line, fsynced (a record this size
        within one sector is not torn); the directory is fsynced when the file is new,
        so that the file itself survives a power cut."""
        created = not self.path.exists()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.pwrite(fd, HEAD_FORMAT.format(seq=head.seq, digest=head.hash)
                          .encode("ascii"), 0)
                os.fsync(fd)
            finally:
                os.close(fd)
            if created:
                dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        except OSError as exc:
            raise StorageError(f"cannot write {self.path}: {exc.strerror}") from None


def compare_head(expected: Head | None, tail: Head | None, at_expected: str | None, *,
                 head_file: str = "the head file") -> str | None:
    """Whether the database's chain still holds the head the controller wrote (pure).

    `expected`: the head this controller knows (None: there is no head file);
    `tail`: the database's last record (None: the log is empty); `at_expected`: the
    hash of the database's record at `expected.seq` (None: there is none).
    Returns None when the chain holds the head, else what is wrong.
    """
    if expected is None:
        if tail is None:
            return None  # a new chain
        return (f"{head_file} is missing, but the database holds an audit chain up to "
                f"#{tail.seq}: the head that says where the chain ends is gone, so a cut "
                "end would go unnoticed")
    if tail is None:
        if expected.seq == 0:
            return None
        return (f"the audit log is empty, but the controller wrote records up to "
                f"{expected.label()}: every record was deleted")
    if tail.seq < expected.seq:
        gone = f"#{expected.seq}" if tail.seq + 1 == expected.seq \
            else f"#{tail.seq + 1} to #{expected.seq}"
        return (f"record {gone} is missing from the end of the audit log: the controller "
                f"wrote up to #{expected.seq}, the database ends at #{tail.seq}")
    if expected.seq > 0 and at_expected != expected.hash:
        return (f"record #{expected.seq} is not the record the controller wrote there "
                f"(its hash was {expected.hash[:16]}..., the database has "
                f"{(at_expected or 'nothing')[:16]}...): the chain was replaced from there")
    return None
