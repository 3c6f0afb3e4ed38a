"""Per-gateway serialisation in the order commands were accepted.

A plain lock is not fair: two commands racing for one gateway could run in
either order, and the gateway would end in whichever state lost the race.
A TurnLock hands out numbered turns when a command is accepted and runs them
strictly in that order, so the final state is always the last accepted
command's. Background work (status polls) takes no turn: it has a lane of its own.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class TurnLock:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next = 0  # next turn to hand out
        self._serving = 0  # the turn allowed to run now
        self._busy = False
        self._cancelled: set[int] = set()

    def take(self) -> int:
        """Reserve the next turn (call in acceptance order)."""
        with self._cond:
            turn = self._next
            self._next += 1
            return turn

    def cancel(self, turn: int) -> None:
        """Give up a reserved turn that will never run."""
        with self._cond:
            self._cancelled.add(turn)
            self._advance()
            self._cond.notify_all()

    def _advance(self) -> None:
        while self._serving in self._cancelled:
            self._cancelled.discard(self._serving)
            self._serving += 1

    @contextlib.contextmanager
    def turn(self, turn: int) -> Iterator[None]:
        with self._cond:
            while self._serving != turn or self._busy:
                self._cond.wait()
            self._busy = True
        try:
            yield
        finally:
            with self._cond:
                self._busy = False
                self._serving += 1
                self._advance()
                self._cond.notify_all()

    @property
    def queued(self) -> int:
        with self._cond:
            return self._next - self._serving
