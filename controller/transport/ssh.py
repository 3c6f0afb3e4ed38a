"""One persistent SSH session per gateway, running the agent's forced command.

The session is opened once and kept: a request on an open channel costs about
a millisecond, a fresh sshd session a hundred. The gateway's host key is
checked against the fingerprint pinned in the inventory *before* any
authentication, so a gateway that shows another key never receives a byte of
a command. paramiko's exceptions never leave this module: they become
TransportError subclasses with a message a network engineer can act on.

One connection, several lanes: commands go over the `command` channel, status
polls over their own `poll` channel (opened when first needed), so a slow poll
never holds up a command. All lanes share the connection's heartbeat
(controller/transport/liveness.py).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import socket
import threading
from dataclasses import dataclass
from typing import Any, Literal

import paramiko
from pydantic import ValidationError

from controller.config import SshSettings
from controller.errors import (
    ConfigError,
    HostKeyMismatch,
    HostKeyUnknown,
    TransportError,
)
from controller.transport.channel import AgentChannel
from controller.transport.liveness import AlivePolicy, Heartbeat, send_probe
from controller.transport.protocol import AgentPing, RpcResponse

Lane = Literal["command", "poll"]
LANES: tuple[Lane, ...] = ("command", "poll")


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
    """An SSH connection to a gateway and its channels to `drawbridge-agent rpc`, one
    per lane. Each lane serves one request at a time; lanes run side by side."""

    def __init__(self, target: SshTarget, settings: SshSettings) -> None:
        self.target = target
        self.settings = settings
        self.host_key_seen: str | None = None
        self.agent_name: str | None = None
        self.heartbeat: Heartbeat | None = None
        self._transport: paramiko.Transport | None = None
        self._lanes: dict[Lane, AgentChannel] = {}
        self._lanes_lock = threading.Lock()

    # -- connection ----------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        command = self._lanes.get("command")
        return (self._transport is not None and self._transport.is_active()
                and command is not None and command.alive)

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
        transport.auth_timeout = s.connect_timeout
        self._transport = transport
        if s.alive_interval:
            self.heartbeat = Heartbeat(AlivePolicy(s.alive_interval, s.alive_count_max),
                                       self._probe)
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

    def _probe(self) -> threading.Event:
        transport = self._transport
        try:
            if transport is not None:
                return send_probe(transport)
        except (paramiko.SSHException, OSError, EOFError):
            pass  # cannot even send: counts as unanswered
        return threading.Event()

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
            self._lanes["command"] = self._open_lane(transport)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            codes = {"authentication": "ssh_auth_failed",
                     "starting the agent session": "session_refused"}
            raise TransportError(f"{t.where}: {step} failed: {exc or type(exc).__name__}",
                                 code=codes.get(step, "ssh_handshake_failed")) from None
        # The first answer waits for the agent process to start (Python imports): on a
        # busy gateway that takes seconds, so it gets the request timeout, not the
        # connect timeout; giving up early would only start another agent process.
        raw = self.request("ping", {}, timeout=s.request_timeout)
        try:
            return AgentPing.model_validate(raw)
        except ValidationError:
            raise TransportError(f"{t.where}: the agent's answer to ping is not protocol v1: "
                                 f"{str(raw)[:200]}", code="protocol_error") from None

    def _open_lane(self, transport: paramiko.Transport) -> AgentChannel:
        s = self.settings
        chan = transport.open_session(timeout=s.connect_timeout)
        chan.exec_command(s.remote_command)
        return AgentChannel(chan, where=self.target.where, request_timeout=s.request_timeout,
                            max_response_bytes=s.max_response_bytes,
                            heartbeat=self.heartbeat, on_dead=self.close)

    def _lane(self, lane: Lane) -> AgentChannel:
        """The lane's channel; a lane other than `command` is (re)opened on demand."""
        with self._lanes_lock:
            channel = self._lanes.get(lane)
            if channel is not None and (channel.alive or lane == "command"):
                return channel
            transport = self._transport
            if transport is None or not transport.is_active():
                raise TransportError(f"{self.target.where}: not connected",
                                     code="connection_lost")
            try:
                channel = self._open_lane(transport)
            except (paramiko.SSHException, EOFError, OSError) as exc:
                raise TransportError(f"{self.target.where}: cannot open a {lane} channel: "
                                     f"{exc or type(exc).__name__}",
                                     code="session_refused") from None
            self._lanes[lane] = channel
            return channel

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
        with self._lanes_lock:
            lanes, self._lanes = list(self._lanes.values()), {}
        transport, self._transport = self._transport, None
        for lane in lanes:
            lane.close()
        if transport is not None:
            with contextlib.suppress(Exception):  # closing a broken session: no raise
                transport.close()

    # -- requests ------------------------------------------------------------------------

    def request(self, op: str, args: dict[str, Any], *, timeout: float | None = None,
                lane: Lane = "command", request_id: str | None = None,
                audit: str | None = None) -> Any:
        """Send one request on `lane`, return its result; AgentError if the agent
        refused it."""
        return self._lane(lane).request(op, args, timeout=timeout, request_id=request_id,
                                        audit=audit)

    def exchange(self, line: bytes, *, timeout: float | None = None,
                 lane: Lane = "command") -> RpcResponse:
        """Write one raw line (newline added if missing) and read one response line."""
        return self._lane(lane).exchange(line, timeout=timeout)
