"""`drawbridge-agent rpc`, the SSH forced command: relay request lines to the daemon.

Each controller session keeps one of these open on the gateway for as long as it
lives, so it is kept small: the standard library only, no config validation,
no CLI framework (the daemon behind the socket validates everything). Only when
no daemon runs does it load the agent and answer the requests itself.

A request whose daemon connection breaks before the answer may have been
applied: it is answered with an error (code `agent_restarting`) rather than run
again directly, and the controller repeats it under the same request id, which
the agent answers once (replay.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from agent.wire import DEFAULT_CONFIG, DEFAULT_STATE_DIR, SOCKET_FILE, encode, read_lines

Answer = Callable[[bytes], bytes]


_TABLE_HEADER = re.compile(r"^[ \t]*\[", re.M)


def top_level_keys(text: str) -> dict[str, Any]:
    """The config's top-level keys, parsed from the text before its first table header
    (TOML puts them there): a profile of 100k allow entries further down costs nothing
    here. A cut that lands inside a multi-line value leaves something unclosed, which
    fails to parse: then the whole text is parsed."""
    header = _TABLE_HEADER.search(text)
    if header is not None:
        with contextlib.suppress(tomllib.TOMLDecodeError):
            return tomllib.loads(text[:header.start()])
    return tomllib.loads(text)


def state_dir_of(config_path: Path) -> Path:
    """Where the daemon's socket lives (the config's state_dir, unvalidated)."""
    try:
        data = top_level_keys(config_path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return DEFAULT_STATE_DIR  # the direct path reports the config error properly
    value = data.get("state_dir")
    return Path(value) if isinstance(value, str) else DEFAULT_STATE_DIR


def _connect(path: Path) -> socket.socket | None:
    """A connection to the daemon; None when no daemon runs (no socket, refused)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None
    return sock


def _request_id(line: bytes) -> str:
    try:
        value = json.loads(line).get("id", "")
    except (ValueError, AttributeError):
        return ""
    return value if isinstance(value, str) and len(value) <= 64 else ""


def _lost(line: bytes) -> bytes:
    answer = {"v": 1, "id": _request_id(line), "ok": False, "error": {
        "code": "agent_restarting",
        "message": "the agent daemon went away during this request; it may have been "
                   "applied: repeat it with the same request id"}}
    return json.dumps(answer, separators=(",", ":")).encode("utf-8") + b"\n"


def _direct(config_path: Path) -> Answer:
    from agent.local import direct_dispatcher

    dispatcher = direct_dispatcher(config_path)
    return lambda line: encode(dispatcher.handle_line(line))


def relay(config_path: Path, stdin: BinaryIO, stdout: BinaryIO) -> int:
    sock_path = state_dir_of(config_path) / SOCKET_FILE
    sock = _connect(sock_path)
    reader = sock.makefile("rb") if sock else None
    direct: Answer | None = None
    for line in read_lines(stdin):
        if sock is None:
            sock = _connect(sock_path)  # a daemon that came back is used again
            reader = sock.makefile("rb") if sock else None
        if sock is not None and reader is not None:
            try:
                sock.sendall(line + b"\n")
                reply = reader.readline()
            except OSError:
                reply = b""
            if not reply:
                sock.close()
                sock = reader = None
                reply = _lost(line)
            stdout.write(reply)
        else:
            direct = direct or _direct(config_path)
            stdout.write(direct(line))
        stdout.flush()
    return 0


def main(config_path: Path) -> int:
    return relay(config_path, sys.stdin.buffer, sys.stdout.buffer)


def config_from_argv(argv: list[str]) -> Path:
    path = os.environ.get("DRAWBRIDGE_AGENT_CONFIG") or str(DEFAULT_CONFIG)
    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
    return Path(path)
