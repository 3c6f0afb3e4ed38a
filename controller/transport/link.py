"""A gateway's link: its persistent session, reconnect with backoff, its turn lock.

Commands (in turn order) and status polls (outside the turns) use the link at the
same time, each on its own lane of the one session; connecting is done once for
both, under a lock.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from controller.config import SshSettings
from controller.errors import AgentError, ControllerError, TransportError
from controller.inventory import Gateway
from controller.transport.ssh import AgentSession, Lane, SshTarget
from controller.turns import TurnLock

# Requests whose repetition cannot change the outcome: safe to resend once on a fresh
# connection when a kept-open session turns out to be dead. `allow` is not among them
# (it would add a second exception).
IDEMPOTENT_OPS = frozenset({"ping", "status", "isolate", "restore", "render", "probe",
                            "journal"})


class Session(Protocol):
    host_key_seen: str | None

    @property
    def alive(self) -> bool: ...

    def connect(self) -> None: ...

    def request(self, op: str, args: dict[str, Any], *, timeout: float | None = None,
                lane: Lane = "command", request_id: str | None = None,
                audit: str | None = None) -> Any: ...

    def close(self) -> None: ...


SessionFactory = Callable[[SshTarget, SshSettings], Session]


class Backoff:
    """Exponential backoff with jitter: initial, 2x, 4x ... up to maximum."""

    def __init__(self, initial: float, maximum: float,
                 jitter: Callable[[], float] = random.random) -> None:
        self.initial = initial
        self.maximum = maximum
        self.jitter = jitter
        self.failures = 0
        self.next_at = 0.0

    def failed(self, now: float) -> float:
        base = min(self.maximum, self.initial * float(2 ** min(self.failures, 30)))
        delay = base * (0.75 + 0.25 * self.jitter())
        self.failures += 1
        self.next_at = now + delay
        return delay

    def succeeded(self) -> None:
        self.failures = 0
        self.next_at = 0.0

    def ready(self, now: float) -> bool:
        return now >= self.next_at


def target_of(gw: Gateway) -> SshTarget:
    return SshTarget(name=gw.name, host=gw.host, port=gw.port, user=gw.user,
                     key_path=gw.key_path, host_key=gw.host_key,
                     trust_on_first_use=gw.trust_on_first_use)


class GatewayLink:
    def __init__(self, gateway: Gateway, settings: SshSettings, *,
                 session_factory: SessionFactory = AgentSession,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.gateway = gateway
        self.settings = settings
        self.session_factory = session_factory
        self.clock = clock
        self.turns = TurnLock()
        self.backoff = Backoff(settings.backoff_initial, settings.backoff_max)
        self.last_error: TransportError | None = None
        self.host_key_seen: str | None = None
        self._session: Session | None = None
        self._lock = threading.Lock()
        self._connect_lock = threading.Lock()
        self._connect_attempts = 0
        self.sends_audit = True  # False once the agent refused the envelope's `audit`

    @property
    def connected(self) -> bool:
        session = self._session
        return session is not None and session.alive

    def update(self, gateway: Gateway) -> None:
        """New inventory data, used at the next connect. A session opened with other
        connection settings is closed now: `gateway update` on one replica reaches the
        session held by another this way (a key pinned on first use keeps it)."""
        old, self.gateway = self.gateway, gateway
        pinned = old.host_key is None and gateway.host_key is not None
        if (old.host, old.port, old.user, old.key_path) != \
                (gateway.host, gateway.port, gateway.user, gateway.key_path) or \
                (old.host_key != gateway.host_key and not pinned):
            self._drop()

    def _failed(self, exc: TransportError) -> None:
        self.last_error = exc
        self.backoff.failed(self.clock())

    def _drop(self) -> None:
        with self._lock:
            session, self._session = self._session, None
        if session is not None:
            session.close()

    def _connect(self, respect_backoff: bool) -> Session:
        now = self.clock()
        if respect_backoff and not self.backoff.ready(now) and self.last_error is not None:
            wait = self.backoff.next_at - now
            raise TransportError(f"{self.last_error.message} (next attempt in {wait:.0f}s)",
                                 code=self.last_error.code)
        self._connect_attempts += 1
        session = self.session_factory(target_of(self.gateway), self.settings)
        try:
            session.connect()
        except TransportError as exc:
            self.host_key_seen = session.host_key_seen or self.host_key_seen
            self._failed(exc)
            raise
        except ControllerError as exc:  # e.g. the key file is unreadable: not retryable
            wrapped = TransportError(exc.message, code=exc.code)
            wrapped.retryable = False
            self._failed(wrapped)
            raise wrapped from None
        self.host_key_seen = session.host_key_seen
        self.backoff.succeeded()
        self.last_error = None
        with self._lock:
            self._session = session
        return session

    def _open_session(self, respect_backoff: bool) -> tuple[Session, bool]:
        """The open session (reused: True) or a new one. One connect at a time: whoever
        waited while another lane tried shares that attempt's failure instead of
        paying for a second one."""
        attempts = self._connect_attempts
        with self._connect_lock:
            session = self._session
            if session is not None and session.alive:
                return session, True
            if self._connect_attempts != attempts and self.last_error is not None:
                raise self.last_error
            self._drop()
            return self._connect(respect_backoff), False

    def _lost(self, session: Session, exc: TransportError) -> None:
        """After a failed request: forget the session if it died with it (a lane's
        own failure, e.g. a poll that timed out, leaves the others' session alone)."""
        if session.alive:
            return
        with self._lock:
            if self._session is session:
                self._session = None
        session.close()
        self._failed(exc)

    def call(self, op: str, args: dict[str, Any], *, respect_backoff: bool = False,
             timeout: float | None = None, lane: Lane = "command",
             request_id: str | None = None, audit: str | None = None) -> Any:
        """One request on the kept-open session, connecting first if needed. A session
        that died while idle is replaced once, for idempotent requests. An agent from
        before the envelope's `audit` field refuses it (and applies nothing): it is
        asked again without, and from then on."""
        if not self.sends_audit:
            audit = None
        try:
            return self._call(op, args, respect_backoff=respect_backoff, timeout=timeout,
                              lane=lane, request_id=request_id, audit=audit)
        except AgentError as exc:
            if audit is None or exc.code != "bad_request" or "audit" not in exc.message:
                raise
        self.sends_audit = False
        return self._call(op, args, respect_backoff=respect_backoff, timeout=timeout,
                          lane=lane, request_id=request_id, audit=None)

    def _call(self, op: str, args: dict[str, Any], *, respect_backoff: bool,
              timeout: float | None, lane: Lane, request_id: str | None,
              audit: str | None) -> Any:
        session, reused = self._open_session(respect_backoff)
        try:
            return session.request(op, args, timeout=timeout, lane=lane,
                                   request_id=request_id, audit=audit)
        except TransportError as exc:
            self._lost(session, exc)
            if not (reused and exc.code == "connection_lost" and op in IDEMPOTENT_OPS):
                raise
        session, _ = self._open_session(respect_backoff=False)
        try:
            return session.request(op, args, timeout=timeout, lane=lane,
                                   request_id=request_id, audit=audit)
        except TransportError as exc:
            self._lost(session, exc)
            raise

    def close(self) -> None:
        self._drop()


class LinkRegistry:
    """One link per gateway name, created on first use, kept until removed."""

    def __init__(self, settings: SshSettings, *,
                 session_factory: SessionFactory = AgentSession) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self._links: dict[str, GatewayLink] = {}
        self._lock = threading.Lock()

    def get(self, gateway: Gateway) -> GatewayLink:
        with self._lock:
            link = self._links.get(gateway.name)
            if link is None:
                link = GatewayLink(gateway, self.settings, session_factory=self.session_factory)
                self._links[gateway.name] = link
            elif link.gateway != gateway:
                link.update(gateway)
            return link

    def peek(self, name: str) -> GatewayLink | None:
        with self._lock:
            return self._links.get(name)

    def remove(self, name: str) -> None:
        with self._lock:
            link = self._links.pop(name, None)
        if link is not None:
            link.close()

    def close_all(self) -> None:
        with self._lock:
            links, self._links = list(self._links.values()), {}
        for link in links:
            link.close()
