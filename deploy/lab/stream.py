"""A long-lived TCP connection held by a probe process inside a namespace."""

from __future__ import annotations

import os
import secrets
import select
import subprocess
import time
from types import TracebackType
from typing import Any


class LineReader:
    """Read whole lines from a pipe with a timeout (no buffering surprises with select)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""

    def readline(self, timeout: float) -> str | None:
        """The next line without its newline, or None on timeout or end of file."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(self.fd, 4096)
            if not chunk:
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode(errors="replace")


class Stream:
    """One TCP connection kept open by ``probe.py stream`` in the source namespace.

    ``roundtrip()`` sends a fresh line over the same connection and says whether
    the echo came back in time: after isolation an established connection must
    stop carrying data, so ``roundtrip()`` turns False.
    """

    def __init__(self, proc: subprocess.Popen[Any], description: str, connect_timeout: float):
        self.proc = proc
        self.description = description
        assert proc.stdout is not None
        self._reader = LineReader(proc.stdout.fileno())
        first = self._reader.readline(connect_timeout + 5.0) or ""
        self.connected = first.startswith("CONNECTED")
        # the connection's own source port: attack tests forge packets about it
        self.local_port = int(first.split()[1]) if self.connected else 0
        self.error = None if self.connected else (first or "probe process gave no answer")

    def roundtrip(self, timeout: float = 1.0) -> bool:
        """Send one line over the connection; True if it was echoed within ``timeout``."""
        if not self.connected or self.proc.poll() is not None or self.proc.stdin is None:
            return False
        token = "rt-" + secrets.token_hex(6)
        try:
            self.proc.stdin.write(f"{token} {timeout}\n".encode())
            self.proc.stdin.flush()
        except OSError:
            return False
        deadline = time.monotonic() + timeout + 5.0
        while True:
            line = self._reader.readline(max(0.0, deadline - time.monotonic()))
            if line is None:
                return False
            parts = line.split()
            if len(parts) >= 2 and parts[1] == token:
                return parts[0] == "OK"

    def close(self) -> None:
        """Close the connection (ends the probe process)."""
        if self.proc.poll() is None:
            try:
                if self.proc.stdin is not None:
                    self.proc.stdin.close()
                self.proc.wait(timeout=2.0)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None and not pipe.closed:
                pipe.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "connected" if self.connected else f"failed: {self.error}"
        return f"<Stream {self.description} {state}>"
