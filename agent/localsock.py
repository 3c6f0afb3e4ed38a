"""The daemon's local unix socket: the same protocol as SSH RPC, for the local CLI."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import socketserver
import threading
from pathlib import Path
from typing import Any

from agent.rpc import Dispatcher
from agent.wire import encode, read_lines


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        for line in read_lines(self.rfile):
            self.wfile.write(encode(self.server.dispatcher.handle_line(line)))
            self.wfile.flush()


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        super().__init__(path, _Handler)


class LocalServer:
    """Serves the dispatcher on `path` (mode 0600: root only) in a background thread."""

    def __init__(self, path: Path, dispatcher: Dispatcher) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a socket left by a killed daemon
        old_umask = os.umask(0o177)
        try:
            self._server = _Server(str(path), dispatcher)
        finally:
            os.umask(old_umask)
        self.path = path
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-socket",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


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
