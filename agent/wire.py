"""The agent protocol's framing, shared by the daemon, the direct path and the relay:
newline-delimited JSON, lines of at most MAX_LINE_BYTES (standard library only)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

PROTOCOL_VERSION = 1
MAX_LINE_BYTES = 64 * 1024
DEFAULT_CONFIG = Path("/etc/drawbridge/agent.toml")
DEFAULT_STATE_DIR = Path("/var/lib/drawbridge")
SOCKET_FILE = "agent.sock"


class LineReader(Protocol):
    def readline(self, size: int = -1, /) -> bytes: ...


def read_lines(stream: LineReader) -> Iterator[bytes]:
    """Lines of at most MAX_LINE_BYTES (+1, so oversize is detectable); the rest of an
    oversize line is skipped rather than buffered."""
    while True:
        line = stream.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            while True:
                rest = stream.readline(MAX_LINE_BYTES)
                if not rest or rest.endswith(b"\n"):
                    break
            yield line  # handled as too large
            continue
        if line.strip():
            yield line.rstrip(b"\r\n")


def encode(response: dict[str, Any]) -> bytes:
    return json.dumps(response, separators=(",", ":"), default=str).encode("utf-8") + b"\n"
