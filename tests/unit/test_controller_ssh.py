"""The SSH transport against an in-process paramiko server on loopback (no lab needed).

The server speaks the agent's real protocol code (agent.rpc.Dispatcher) on an
exec channel, like `drawbridge-agent rpc` behind a forced command.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import paramiko
import pytest

from agent.rpc import Dispatcher, encode, read_lines
from controller.config import SshSettings
from controller.errors import AgentError, HostKeyMismatch, HostKeyUnknown, TransportError
from controller.transport.ssh import AgentSession, SshTarget, fingerprint


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
                   check=True)
    return path


class _Engine:
    """Just enough of agent.engine.Engine for ping and status."""

    def __init__(self, name: str) -> None:
        self.config = SimpleNamespace(gateway=name, profile_names=lambda: ["internet", "full"])
        self.config_digest = ""

    def status(self, *, elements: bool = True) -> Any:
        data = {"gateway": self.config.gateway, "state": "open", "profile": None,
                "since": 0.0, "actor": "system", "reason": "", "in_sync": True, "problems": [],
                "verification": {"status": "verified"}, "exceptions": [], "generation": 0,
                "drift_repairs": 0}
        return SimpleNamespace(model_dump=lambda mode: data)

    def isolate(self, req: Any) -> Any:  # pragma: no cover - requests here never validate
        raise AssertionError("not reached")


@dataclass
class FakeSshd:
    host_key: paramiko.PKey
    client_pub: paramiko.PKey
    agent_name: str = "gw-test"
    mode: str = "agent"  # agent | silent | exit
    delays: dict[str, float] = field(default_factory=dict)  # op -> seconds before answering
    auth_attempts: int = 0
    execs: list[str] = field(default_factory=list)
    port: int = 0
    _sock: socket.socket | None = None
    _transports: list[paramiko.Transport] = field(default_factory=list)

    def start(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(8)
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            transport = paramiko.Transport(conn)
            transport.add_server_key(self.host_key)
            self._transports.append(transport)
            threading.Thread(target=self._start, args=(transport,), daemon=True).start()

    def _start(self, transport: paramiko.Transport) -> None:
        with contextlib.suppress(paramiko.SSHException, EOFError, OSError):
            transport.start_server(server=_Iface(self))

    def serve(self, chan: paramiko.Channel) -> None:
        if self.mode == "exit":
            time.sleep(0.2)  # sshd confirms the exec before the command runs
            with contextlib.suppress(paramiko.SSHException, EOFError, OSError):
                chan.sendall_stderr(b"error: cannot read config /etc/drawbridge/agent.toml\n")
                chan.send_exit_status(2)
                chan.close()
            return
        dispatcher = Dispatcher(_Engine(self.agent_name))  # type: ignore[arg-type]
        with contextlib.suppress(paramiko.SSHException, EOFError, OSError):
            for line in read_lines(chan.makefile("rb")):
                if self.mode == "silent":
                    continue
                with contextlib.suppress(ValueError, AttributeError):
                    time.sleep(self.delays.get(json.loads(line).get("op"), 0.0))
                chan.sendall(encode(dispatcher.handle_line(line)))
            chan.close()

    def stop(self) -> None:
        if self._sock is not None:
            self._sock.close()
        for t in self._transports:
            t.close()


class _Iface(paramiko.ServerInterface):
    def __init__(self, sshd: FakeSshd) -> None:
        self.sshd = sshd

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        self.sshd.auth_attempts += 1
        ok = username == "root" and key.asbytes() == self.sshd.client_pub.asbytes()
        return paramiko.AUTH_SUCCESSFUL if ok else paramiko.AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return paramiko.OPEN_SUCCEEDED if kind == "session" else \
            paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        self.sshd.execs.append(command.decode())
        threading.Thread(target=self.sshd.serve, args=(channel,), daemon=True).start()
        return True


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("keys")
    return {"host": keygen(tmp / "host"), "host2": keygen(tmp / "host2"),
            "client": keygen(tmp / "client"), "other": keygen(tmp / "other")}


@pytest.fixture
def sshd(keys: dict[str, Path]) -> Iterator[FakeSshd]:
    server = FakeSshd(host_key=paramiko.PKey.from_path(str(keys["host"])),
                      client_pub=paramiko.PKey.from_path(str(keys["client"])))
    server.start()
    yield server
    server.stop()


SETTINGS = SshSettings(connect_timeout=3, request_timeout=3)


def target(sshd: FakeSshd, keys: dict[str, Path], **kw: Any) -> SshTarget:
    data: dict[str, Any] = {"name": "gw-test", "host": "127.0.0.1", "port": sshd.port,
                            "user": "root", "key_path": str(keys["client"]),
                            "host_key": fingerprint(sshd.host_key)}
    data.update(kw)
    return SshTarget(**data)


def test_fingerprint_matches_ssh_keygen(keys: dict[str, Path]) -> None:
    out = subprocess.run(["ssh-keygen", "-lf", str(keys["host"]) + ".pub"],
                         capture_output=True, text=True, check=True).stdout
    assert out.split()[1] == fingerprint(paramiko.PKey.from_path(str(keys["host"])))


def test_one_channel_many_requests(sshd: FakeSshd, keys: dict[str, Path]) -> None:
    session = AgentSession(target(sshd, keys), SETTINGS)
    session.connect()
    for _ in range(20):
        assert session.request("status", {})["state"] == "open"
    assert sshd.execs == ["drawbridge-agent rpc"]
    assert session.alive
    session.close()
    assert not session.alive


def test_changed_host_key_refused_before_authentication(sshd: FakeSshd,
                                                        keys: dict[str, Path]) -> None:
    pinned = fingerprint(paramiko.PKey.from_path(str(keys["host2"])))
    session = AgentSession(target(sshd, keys, host_key=pinned), SETTINGS)
    with pytest.raises(HostKeyMismatch) as info:
        session.connect()
    assert info.value.expected == pinned
    assert info.value.presented == fingerprint(sshd.host_key)
    assert "HOST KEY MISMATCH" in str(info.value) and pinned in str(info.value)
    assert sshd.auth_attempts == 0 and sshd.execs == []


def test_unpinned_key_needs_explicit_trust_on_first_use(sshd: FakeSshd,
                                                        keys: dict[str, Path]) -> None:
    with pytest.raises(HostKeyUnknown):
        AgentSession(target(sshd, keys, host_key=None), SETTINGS).connect()
    assert sshd.auth_attempts == 0
    session = AgentSession(target(sshd, keys, host_key=None, trust_on_first_use=True),
                           SETTINGS)
    session.connect()
    assert session.host_key_seen == fingerprint(sshd.host_key)
    session.close()


def test_wrong_client_key(sshd: FakeSshd, keys: dict[str, Path]) -> None:
    with pytest.raises(TransportError, match="authorized_keys") as info:
        AgentSession(target(sshd, keys, key_path=str(keys["other"])), SETTINGS).connect()
    assert info.value.code == "ssh_auth_failed"


def test_connection_refused() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    t = SshTarget(name="gw", host="127.0.0.1", port=port, user="root", key_path="/nope",
                  host_key=None)
    with pytest.raises(TransportError, match="connection refused") as info:
        AgentSession(t, SETTINGS).connect()
    assert info.value.retryable


def test_wrong_box_is_refused(sshd: FakeSshd, keys: dict[str, Path]) -> None:
    sshd.agent_name = "gw-other"
    with pytest.raises(TransportError, match="says it is gateway 'gw-other'") as info:
        AgentSession(target(sshd, keys), SETTINGS).connect()
    assert info.value.code == "identity_mismatch" and not info.value.retryable


def test_malformed_and_oversize_lines_get_errors_and_the_channel_survives(
        sshd: FakeSshd, keys: dict[str, Path]) -> None:
    session = AgentSession(target(sshd, keys), SETTINGS)
    session.connect()
    bad = session.exchange(b"{not json")
    assert not bad.ok and bad.error is not None and bad.error.code == "bad_json"
    big = session.exchange(b'{"v":1,"op":"ping","id":"' + b"x" * 70_000 + b'"}')
    assert big.error is not None and big.error.code == "too_large"
    wrong = session.exchange(b'{"v":2,"op":"ping"}')
    assert wrong.error is not None and wrong.error.code == "unsupported_version"
    with pytest.raises(AgentError) as info:
        session.request("isolate", {"profile": "internet"})  # no reason: refused
    assert info.value.code == "bad_request"
    assert session.request("ping", {})["gateway"] == "gw-test"
    with pytest.raises(AgentError, match="exceeds"):
        session.request("status", {"pad": "x" * 70_000})  # refused before sending
    session.close()


def test_agent_that_exits_is_explained(sshd: FakeSshd, keys: dict[str, Path]) -> None:
    sshd.mode = "exit"
    with pytest.raises(TransportError, match="cannot read config") as info:
        AgentSession(target(sshd, keys), SETTINGS).connect()
    assert "exit status 2" in str(info.value) and info.value.code == "connection_lost"


def test_silent_agent_times_out(sshd: FakeSshd, keys: dict[str, Path]) -> None:
    sshd.mode = "silent"
    session = AgentSession(target(sshd, keys), SshSettings(connect_timeout=0.3,
                                                            request_timeout=0.5))
    with pytest.raises(TransportError) as info:
        session.connect()
    assert info.value.code == "timeout" and not session.alive


# -- liveness and lanes -----------------------------------------------------------------


class CuttableLink:
    """A TCP relay in front of the fake sshd whose wire can be cut: from then on bytes
    are swallowed both ways, like a dead link (no RST, no FIN; the relay's kernel even
    keeps ACKing, so only an answer from sshd itself proves the peer alive)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.cut = threading.Event()
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(4)
        self.port = self._listener.getsockname()[1]
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self._listener.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.upstream_port))
            self._socks += [down, up]
            for src, dst in ((down, up), (up, down)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if not self.cut.is_set():
                    dst.sendall(data)

    def close(self) -> None:
        self._listener.close()
        for sock in self._socks:
            with contextlib.suppress(OSError):
                sock.close()


ALIVE = SshSettings(connect_timeout=3, request_timeout=10, alive_interval=0.2,
                    alive_count_max=2)  # dead after 0.6 s of unanswered silence


def test_slow_agent_keeps_its_whole_request_timeout(sshd: FakeSshd,
                                                    keys: dict[str, Path]) -> None:
    """Silent for 5x the liveness bound, but sshd answers the keepalives: not dead."""
    session = AgentSession(target(sshd, keys), ALIVE)
    session.connect()
    sshd.delays["status"] = 3.0
    started = time.monotonic()
    assert session.request("status", {})["state"] == "open"
    assert time.monotonic() - started >= 3.0 and session.alive
    session.close()


def test_cut_link_is_unreachable_within_the_bound(sshd: FakeSshd,
                                                  keys: dict[str, Path]) -> None:
    link = CuttableLink(sshd.port)
    try:
        session = AgentSession(target(sshd, keys, port=link.port), ALIVE)
        session.connect()
        assert session.request("ping", {})["gateway"] == "gw-test"
        link.cut.set()
        started = time.monotonic()
        with pytest.raises(TransportError, match="stopped answering") as info:
            session.request("status", {})
        took = time.monotonic() - started
        assert ALIVE.dead_after is not None
        assert ALIVE.dead_after - 0.1 <= took <= ALIVE.dead_after + 1.0, took
        assert info.value.code == "unreachable" and info.value.retryable
        assert not session.alive
    finally:
        link.close()


def test_without_liveness_a_cut_link_waits_for_the_request_timeout(
        sshd: FakeSshd, keys: dict[str, Path]) -> None:
    link = CuttableLink(sshd.port)
    try:
        settings = SshSettings(connect_timeout=3, request_timeout=1.5, alive_interval=0)
        session = AgentSession(target(sshd, keys, port=link.port), settings)
        session.connect()
        link.cut.set()
        with pytest.raises(TransportError) as info:
            session.request("status", {})
        assert info.value.code == "timeout"
    finally:
        link.close()


def test_polls_have_their_own_channel_and_never_delay_commands(
        sshd: FakeSshd, keys: dict[str, Path]) -> None:
    session = AgentSession(target(sshd, keys), ALIVE)
    session.connect()
    sshd.delays["status"] = 2.0
    polled: list[Any] = []
    poll = threading.Thread(target=lambda: polled.append(
        session.request("status", {}, lane="poll")))
    poll.start()
    time.sleep(0.3)  # the poll waits for its slow status now
    started = time.monotonic()
    assert session.request("ping", {})["gateway"] == "gw-test"
    assert time.monotonic() - started < 0.5
    poll.join(10)
    assert polled and polled[0]["state"] == "open"
    assert sshd.execs == ["drawbridge-agent rpc"] * 2  # one agent process per lane
    session.close()


def test_a_poll_lane_failure_leaves_the_command_lane_alone(
        sshd: FakeSshd, keys: dict[str, Path]) -> None:
    session = AgentSession(target(sshd, keys), ALIVE)
    session.connect()
    sshd.delays["status"] = 2.0
    with pytest.raises(TransportError) as info:
        session.request("status", {}, lane="poll", timeout=0.5)
    assert info.value.code == "timeout"
    assert session.alive and session.request("ping", {})["gateway"] == "gw-test"
    sshd.delays.clear()
    assert session.request("status", {}, lane="poll")["state"] == "open"  # reopened
    session.close()
