"""One exec channel to `drawbridge-agent rpc` on a gateway: a request line out, an
answer line back, one request at a time (a lock per channel).

A connection carries several such channels (commands on one, status polls on
another: a slow poll never delays a command), each its own agent process on the
gateway. While a request waits, the connection's heartbeat tells a slow agent
(keep waiting, up to the request timeout) from a dead link (give up now).
paramiko's exceptions never leave this module: they become TransportError.
"""

from __future__ import annotations

import contextlib
import itertools
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

import paramiko

from controller.errors import AgentError, TransportError
from controller.transport.liveness import Heartbeat
from controller.transport.protocol import (
    MAX_REQUEST_BYTES,
    RpcRequest,
    RpcResponse,
    decode_response,
)

STDERR_KEEP = 4096
READ_SLICE = 0.25  # how often a waiting reader looks at the heartbeat


class AgentChannel:
    def __init__(self, chan: paramiko.Channel, *, where: str, request_timeout: float,
                 max_response_bytes: int, heartbeat: Heartbeat | None,
                 on_dead: Callable[[], None]) -> None:
        self.where = where
        self.request_timeout = request_timeout
        self.max_response_bytes = max_response_bytes
        self.heartbeat = heartbeat
        self.on_dead = on_dead  # the whole connection is gone: close it
        self._chan: paramiko.Channel | None = chan
        self._buf = b""
        self._stderr = b""
        self._ids = itertools.count(1)
        # the agent answers a request id it has seen with its first answer: ids must
        # never repeat across channels, sessions or controller restarts
        self._nonce = secrets.token_hex(6)
        self._lock = threading.Lock()

    @property
    def alive(self) -> bool:
        chan = self._chan
        return chan is not None and not chan.closed and not chan.exit_status_ready()

    def close(self) -> None:
        chan, self._chan = self._chan, None
        if chan is not None:
            with contextlib.suppress(Exception):  # closing a broken channel: no raise
                chan.close()

    def request(self, op: str, args: dict[str, Any], *, timeout: float | None = None,
                request_id: str | None = None, audit: str | None = None) -> Any:
        """Send one request, return its result; AgentError if the agent refused it.
        `request_id`: the envelope id (a mutating request's is the controller's command
        id, which the agent remembers: the same id again is answered, not applied);
        otherwise this channel's nonce and a counter (never repeated)."""
        req = RpcRequest(id=request_id or f"c{self._nonce}-{next(self._ids)}", op=op,
                         args=args, audit=audit)
        line = req.encode()
        if len(line) > MAX_REQUEST_BYTES:
            raise AgentError(f"{self.where}: request of {len(line)} bytes exceeds the "
                             f"agent's limit of {MAX_REQUEST_BYTES}", code="too_large")
        resp = self.exchange(line, timeout=timeout)
        if resp.id != req.id:
            self.close()
            raise TransportError(f"{self.where}: answer for request {resp.id!r} "
                                 f"arrived while waiting for {req.id!r}", code="protocol_error")
        if not resp.ok:
            err = resp.error
            raise AgentError(f"{self.where}: the agent refused {op}: "
                             f"{err.message if err else 'no detail'}",
                             code=err.code if err else "internal")
        return resp.result

    def exchange(self, line: bytes, *, timeout: float | None = None) -> RpcResponse:
        """Write one raw line (newline added if missing) and read one response line."""
        timeout = timeout or self.request_timeout
        with self._lock:
            chan = self._chan
            if chan is None:
                if self._declared_dead():
                    raise self._dead()
                raise TransportError(f"{self.where}: not connected", code="connection_lost")
            try:
                chan.sendall(line if line.endswith(b"\n") else line + b"\n")
            except (OSError, EOFError, paramiko.SSHException) as exc:
                self.close()
                if self._declared_dead():
                    raise self._dead() from None
                raise TransportError(f"{self.where}: the SSH channel is gone ({exc})",
                                     code="connection_lost") from None
            raw = self._read_line(chan, time.monotonic() + timeout, timeout)
        return decode_response(raw, where=self.where)

    def _drain_stderr(self, chan: paramiko.Channel) -> None:
        while chan.recv_stderr_ready():
            self._stderr = (self._stderr + chan.recv_stderr(65536))[-STDERR_KEEP:]

    def _read_line(self, chan: paramiko.Channel, deadline: float, timeout: float) -> bytes:
        limit = self.max_response_bytes
        while b"\n" not in self._buf:
            self._drain_stderr(chan)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.close()
                raise TransportError(
                    f"{self.where}: no answer from the agent within {timeout:g}s; the "
                    "command may or may not have been applied (the next status poll will tell)",
                    code="timeout")
            if self.heartbeat is not None and self.heartbeat.check():
                self.on_dead()
                raise self._dead()
            chan.settimeout(min(remaining, READ_SLICE))
            try:
                data = chan.recv(65536)
            except TimeoutError:
                continue
            except (OSError, EOFError, paramiko.SSHException) as exc:
                self.close()
                if self._declared_dead():  # another lane found the peer dead and closed
                    raise self._dead() from None
                raise TransportError(f"{self.where}: the SSH channel broke: {exc}",
                                     code="connection_lost") from None
            if not data:
                if self._declared_dead():
                    self.close()
                    raise self._dead()
                self._drain_stderr(chan)
                raise self._ended(chan)
            if self.heartbeat is not None:
                self.heartbeat.heard()
            self._buf += data
            if len(self._buf) > limit:
                self.close()
                raise TransportError(f"{self.where}: answer larger than {limit} bytes",
                                     code="protocol_error")
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def _declared_dead(self) -> bool:
        return self.heartbeat is not None and self.heartbeat.dead

    def _dead(self) -> TransportError:
        silence = self.heartbeat.silence if self.heartbeat is not None else 0.0
        return TransportError(
            f"{self.where}: the gateway stopped answering (nothing for {silence:.1f}s, SSH "
            "keepalives unanswered): the management link or the gateway is down; the command "
            "may or may not have arrived", code="unreachable")

    def _ended(self, chan: paramiko.Channel) -> TransportError:
        chan.status_event.wait(1.0)  # the exit status follows EOF closely, if it comes
        status = chan.recv_exit_status() if chan.exit_status_ready() else None
        tail = self._stderr.decode("utf-8", "replace").strip().splitlines()[-3:]
        self.close()
        detail = f" (exit status {status})" if status not in (None, -1) else ""
        said = f": {' | '.join(tail)}" if tail else ""
        return TransportError(f"{self.where}: the agent session ended{detail}{said}",
                              code="connection_lost")
