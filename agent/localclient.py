"""The client side of the daemon's local socket (standard library only: the CLI talks to a
running daemon without loading the agent itself)."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any


class LocalClient:
    """One connection to a running daemon. `connect` returns None when none is running."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._file = sock.makefile("rwb")

    @classmethod
    def connect(cls, path: Path, timeout: float = 300.0) -> LocalClient | None:
        """None only when no daemon runs (no socket, or nobody accepts on it); any
        other failure is raised: it does not prove the daemon is gone."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            return None
        except OSError:
            sock.close()
            raise
        return cls(sock)

    def call_raw(self, line: bytes) -> bytes:
        self._file.write(line.rstrip(b"\n") + b"\n")
        self._file.flush()
        reply = self._file.readline()
        if not reply:
            raise ConnectionError("the agent daemon closed the connection")
        return reply

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        reply = json.loads(self.call_raw(json.dumps(request).encode("utf-8")))
        assert isinstance(reply, dict)
        return reply

    def close(self) -> None:
        self._file.close()
        self._sock.close()
