"""The daemon's local unix socket: the same protocol as SSH RPC, for the local CLI."""

from __future__ import annotations

import contextlib
import os
import socketserver
import threading
from pathlib import Path

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
