"""Is the gateway still there while a request waits for its answer?

Silence on the agent's channel means either "still applying 100k set elements" or
"the link died", and one request_timeout cannot tell them apart (TCP does not
notice a dead peer for minutes, paramiko's own keepalives never expect an answer).
sshd answers SSH global requests sent with want_reply itself, however busy the
agent behind it is (OpenSSH's ServerAliveInterval relies on the same). So while a
request waits, after every `interval` seconds of silence the peer is asked; after
`count_max` questions in a row without any answer it is declared dead: a cut link
is found within interval * (count_max + 1) seconds, a slow agent keeps its full
request timeout.

`AlivePolicy` is the pure rule; `Heartbeat` applies it to one SSH connection (all
its channels share it) and is safe to call from several threads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import paramiko
from paramiko.common import cMSG_GLOBAL_REQUEST

PROBE_REQUEST = "keepalive@openssh.com"  # unknown to sshd on purpose: it says "failure"


@dataclass(frozen=True)
class AlivePolicy:
    interval: float
    count_max: int

    @property
    def dead_after(self) -> float:
        return self.interval * (self.count_max + 1)

    def due(self, now: float, last_heard: float, last_probe: float) -> bool:
        """Ask again: a whole interval passed without a sign of life or a question."""
        return now - max(last_heard, last_probe) >= self.interval

    def dead(self, now: float, unanswered: int, last_probe: float) -> bool:
        """count_max questions unanswered, the last one given a whole interval."""
        return unanswered >= self.count_max and now - last_probe >= self.interval


def send_probe(transport: paramiko.Transport) -> threading.Event:
    """Send a global request with want_reply; the event is set when any global reply
    arrives. paramiko's own `global_request(wait=True)` blocks without a timeout, so
    this is its first half: the same message and the same completion event, whose
    waiting is left to the caller's read loop (no thread per question)."""
    event = threading.Event()
    transport.completion_event = event
    msg = paramiko.Message()
    msg.add_byte(cMSG_GLOBAL_REQUEST)
    msg.add_string(PROBE_REQUEST)
    msg.add_boolean(True)
    transport._send_user_message(msg)  # what global_request itself sends with
    return event


class Heartbeat:
    """The liveness of one SSH connection. Readers waiting for an answer call
    `check()` at least every fraction of a second and `heard()` whenever data
    arrives; `check()` asks the peer when due and says whether it is dead."""

    def __init__(self, policy: AlivePolicy, probe: Callable[[], threading.Event], *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.probe = probe
        self.clock = clock
        self._lock = threading.Lock()
        self._last_heard = clock()
        self._last_probe = float("-inf")
        self._unanswered = 0
        self._answer: threading.Event | None = None
        self.dead = False  # once declared, for good: every lane then says why

    def heard(self) -> None:
        with self._lock:
            self._last_heard = self.clock()
            self._unanswered = 0

    @property
    def silence(self) -> float:
        with self._lock:
            return self.clock() - self._last_heard

    def check(self) -> bool:
        """True when the peer is dead. May send a question (never blocks on it)."""
        with self._lock:
            now = self.clock()
            if self._answer is not None and self._answer.is_set():
                self._answer = None
                self._last_heard, self._unanswered = now, 0
            if self.dead or self.policy.dead(now, self._unanswered, self._last_probe):
                self.dead = True
                return True
            if self.policy.due(now, self._last_heard, self._last_probe):
                self._answer = self.probe()
                self._last_probe = now
                self._unanswered += 1
            return False
