"""One persistent SSH session per gateway, running the agent's forced command.

The session is opened once and kept: a request on an open channel costs about
a millisecond, a fresh sshd session a hundred. The gateway's host key is
checked against the fingerprint pinned in the inventory *before* any
authentication, so a gateway that shows another key never receives a byte of
a command. paramiko's exceptions never leave this module: they become
TransportError subclasses with a message a network engineer can act on.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import paramiko  # type: ignore[import-untyped]
from pydantic import ValidationError

from controller.config import SshSettings
from controller.errors import (
    AgentError,
    ConfigError,
    HostKeyMismatch,
    HostKeyUnknown,
    TransportError,
)
from controller.transport.protocol import (
    MAX_REQUEST_BYTES,
    AgentPing,
    RpcRequest,
    RpcResponse,
    decode_response,
)

STDERR_KEEP = 4096


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's SHA256 fingerprint of a public key (what `ssh-keygen -lf` prints)."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def load_private_key(path: str) -> paramiko.PKey:
    try:
        return paramiko.PKey.from_path(path)
    except FileNotFoundError:
        raise ConfigError(f"SSH key {path} does not exist on the controller") from None
    except PermissionError:
        raise ConfigError(f"SSH key {path} is not readable by the controller") from None
    except (paramiko.SSHException, OSError, ValueError) as exc:
        raise ConfigError(f"SSH key {path} cannot be loaded: {exc}") from None


@dataclass(frozen=True)
class SshTarget:
    name: str
    host: str
    port: int
    user: str
    key_path: str
    host_key: str | None
    trust_on_first_use: bool = False

    @property
    def where(self) -> str:
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.name} ({shown}:{self.port})"


class AgentSession:
    """An SSH connection and one channel to `drawbridge-agent rpc`. Not thread-safe:
    its owner (GatewayLink) serialises every use."""

    def __init__(self, target: SshTarget, settings: SshSettings) -> None:
        self.target = target
        self.settings = settings
        self.host_key_seen: str | None = None
        self.agent_name: str | None = None
        self._transport: paramiko.Transport | None = None
        self._chan: paramiko.Channel | None = None
        self._buf = b""
        self._stderr = b""
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    # -- connection ----------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return (self._transport is not None and self._transport.is_active()
                and self._chan is not None and not self._chan.closed
                and not self._chan.exit_status_ready())

    def connect(self) -> None:
        t, s = self.target, self.settings
        try:
            sock = socket.create_connection((t.host, t.port), timeout=s.connect_timeout)
        except TimeoutError:
            raise TransportError(f"{t.where}: no answer within {s.connect_timeout:g}s "
                                 "(host down, or the port is filtered)") from None
        except ConnectionRefusedError:
            raise TransportError(f"{t.where}: connection refused (is sshd running and "
                                 "listening on that address?)") from None
        except OSError as exc:
            raise TransportError(f"{t.where}: cannot connect: {exc.strerror or exc}") from None
        try:
            transport = paramiko.Transport(sock)
        except (paramiko.SSHException, OSError) as exc:
            sock.close()
            raise TransportError(f"{t.where}: cannot start SSH: {exc}",
                                 code="ssh_handshake_failed") from None
        transport.banner_timeout = s.connect_timeout
        transport.handshake_timeout = s.connect_timeout
        self._transport = transport
        try:
            ping = self._handshake(transport)
        except BaseException:
            self.close()
            raise
        if ping.gateway != t.name:
            self.close()
            refused = TransportError(
                f"{t.where}: the agent there says it is gateway {ping.gateway!r}, the inventory "
                f"calls it {t.name!r}; refusing to send commands to what may be the wrong box",
                code="identity_mismatch")
            refused.retryable = False
            raise refused
        self.agent_name = ping.gateway

    def _handshake(self, transport: paramiko.Transport) -> AgentPing:
        """Key exchange, host key check, authentication, the agent channel, a ping. Any
        paramiko failure becomes a TransportError that says which step failed."""
        t, s = self.target, self.settings
        step = "SSH handshake"
        try:
            transport.start_client(timeout=s.connect_timeout)
            step = "host key check"
            self._check_host_key(transport.get_remote_server_key())
            pkey = load_private_key(t.key_path)
            step = "authentication"
            try:
                transport.auth_publickey(t.user, pkey)
            except paramiko.AuthenticationException:
                raise TransportError(
                    f"{t.where}: the gateway refused key {t.key_path} for user {t.user!r} "
                    "(is its public key in authorized_keys?)", code="ssh_auth_failed") from None
            if s.keepalive_seconds:
                transport.set_keepalive(s.keepalive_seconds)
            step = "starting the agent session"
            chan = transport.open_session(timeout=s.connect_timeout)
            chan.exec_command(s.remote_command)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            codes = {"authentication": "ssh_auth_failed",
                     "starting the agent session": "session_refused"}
            raise TransportError(f"{t.where}: {step} failed: {exc or type(exc).__name__}",
                                 code=codes.get(step, "ssh_handshake_failed")) from None
        self._chan = chan
        self._buf = b""
        # The first answer waits for the agent process to start (Python imports): on a
        # busy gateway that takes seconds, so it gets the request timeout, not the
        # connect timeout; giving up early would only start another agent process.
        raw = self.request("ping", {}, timeout=s.request_timeout)
        try:
            return AgentPing.model_validate(raw)
        except ValidationError:
            raise TransportError(f"{t.where}: the agent's answer to ping is not protocol v1: "
                                 f"{str(raw)[:200]}", code="protocol_error") from None

    def _check_host_key(self, key: paramiko.PKey) -> None:
        t = self.target
        seen = fingerprint(key)
        self.host_key_seen = seen
        if t.host_key is None:
            if t.trust_on_first_use:
                return
            raise HostKeyUnknown(
                f"{t.where}: no host key is pinned for this gateway and trust-on-first-use "
                f"was not asked for; it presented {key.get_name()} {seen}",
                expected=None, presented=seen)
        if seen != t.host_key:
            raise HostKeyMismatch(
                f"{t.where}: HOST KEY MISMATCH: the gateway presented {key.get_name()} {seen}, "
                f"the inventory pins {t.host_key}. Refusing to connect: someone may be "
                "impersonating the gateway, or it was reinstalled (then re-add it with the "
                "new fingerprint)", expected=t.host_key, presented=seen)

    def close(self) -> None:
        chan, transport = self._chan, self._transport
        self._chan = self._transport = None
        for thing in (chan, transport):
            if thing is not None:
                with contextlib.suppress(Exception):  # closing a broken session: no raise
                    thing.close()

    # -- requests ------------------------------------------------------------------------

    def request(self, op: str, args: dict[str, Any], *, timeout: float | None = None) -> Any:
        """Send one request, return its result; AgentError if the agent refused it."""
        req = RpcRequest(id=f"c{next(self._ids)}", op=op, args=args)
        line = req.encode()
        if len(line) > MAX_REQUEST_BYTES:
            raise AgentError(f"{self.target.where}: request of {len(line)} bytes exceeds the "
                             f"agent's limit of {MAX_REQUEST_BYTES}", code="too_large")
        resp = self.exchange(line, timeout=timeout)
        if resp.id != req.id:
            self.close()
            raise TransportError(f"{self.target.where}: answer for request {resp.id!r} "
                                 f"arrived while waiting for {req.id!r}", code="protocol_error")
        if not resp.ok:
            err = resp.error
            raise AgentError(f"{self.target.where}: the agent refused {op}: "
                             f"{err.message if err else 'no detail'}",
                             code=err.code if err else "internal")
        return resp.result

    def exchange(self, line: bytes, *, timeout: float | None = None) -> RpcResponse:
        """Write one raw line (newline added if missing) and read one response line."""
        chan = self._chan
        if chan is None:
            raise TransportError(f"{self.target.where}: not connected", code="connection_lost")
        timeout = timeout or self.settings.request_timeout
        with self._lock:
            try:
                chan.sendall(line if line.endswith(b"\n") else line + b"\n")
            except (OSError, EOFError, paramiko.SSHException) as exc:
                self.close()
                raise TransportError(f"{self.target.where}: the SSH channel is gone ({exc})",
                                     code="connection_lost") from None
            raw = self._read_line(chan, time.monotonic() + timeout, timeout)
        return decode_response(raw, where=self.target.where)

    def _drain_stderr(self, chan: paramiko.Channel) -> None:
        while chan.recv_stderr_ready():
            self._stderr = (self._stderr + chan.recv_stderr(65536))[-STDERR_KEEP:]

    def _read_line(self, chan: paramiko.Channel, deadline: float, timeout: float) -> bytes:
        limit = self.settings.max_response_bytes
        while b"\n" not in self._buf:
            self._drain_stderr(chan)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.close()
                raise TransportError(
                    f"{self.target.where}: no answer from the agent within {timeout:g}s; the "
                    "command may or may not have been applied (the next status poll will tell)",
                    code="timeout")
            chan.settimeout(min(remaining, 1.0))
            try:
                data = chan.recv(65536)
            except TimeoutError:
                continue
            except (OSError, EOFError, paramiko.SSHException) as exc:
                self.close()
                raise TransportError(f"{self.target.where}: the SSH channel broke: {exc}",
                                     code="connection_lost") from None
            if not data:
                self._drain_stderr(chan)
                raise self._ended(chan)
            self._buf += data
            if len(self._buf) > limit:
                self.close()
                raise TransportError(f"{self.target.where}: answer larger than {limit} bytes",
                                     code="protocol_error")
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def _ended(self, chan: paramiko.Channel) -> TransportError:
        chan.status_event.wait(1.0)  # the exit status follows EOF closely, if it comes
        status = chan.recv_exit_status() if chan.exit_status_ready() else None
        tail = self._stderr.decode("utf-8", "replace").strip().splitlines()[-3:]
        self.close()
        detail = f" (exit status {status})" if status not in (None, -1) else ""
        said = f": {' | '.join(tail)}" if tail else ""
        return TransportError(f"{self.target.where}: the agent session ended{detail}{said}",
                              code="connection_lost")
