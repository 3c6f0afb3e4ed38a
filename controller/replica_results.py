"""The accepting replica's side of a queued command: waiting for the rows' results.

Rows carried out by this very replica are handed over in memory (the `ResultBoard`,
posted by the queue's finisher once the results are written); the others are read
from the queue every `queue_poll_seconds`, and now and then all of them (a lease may
have moved while the command waited).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable

from controller.command_queue import CommandQueue
from controller.fleet import GatewayResult

log = logging.getLogger("drawbridge.controller.replicas")

FULL_READ_EVERY = 1.0  # a waiter reads even its local rows' results from the queue


class ResultBoard:
    """Results of rows finished here, for waiters in this process."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._local: dict[int, GatewayResult] = {}
        self._waiting: set[int] = set()

    def expect(self, seqs: Iterable[int]) -> None:
        with self._cond:
            self._waiting.update(seqs)

    def forget(self, seqs: Iterable[int]) -> None:
        with self._cond:
            for s in seqs:
                self._waiting.discard(s)
                self._local.pop(s, None)

    def post(self, results: Iterable[tuple[int, GatewayResult]]) -> None:
        """Written to the queue: now hand them to whoever waits for them here."""
        with self._cond:
            for seq, res in results:
                if seq in self._waiting:
                    self._local[seq] = res
            self._cond.notify_all()

    def take(self, seqs: Collection[int]) -> dict[int, GatewayResult]:
        with self._cond:
            return {s: self._local.pop(s) for s in seqs if s in self._local}

    def nap(self, seqs: Collection[int], seconds: float) -> None:
        """Sleep until a result for `seqs` is posted, or `seconds` pass."""
        with self._cond:
            if not any(s in self._local for s in seqs):
                self._cond.wait(max(0.0, seconds))

    def wake_all(self) -> None:
        with self._cond:
            self._cond.notify_all()


def no_result(name: str, op: str, waited: float) -> GatewayResult:
    return GatewayResult(
        gateway=name, op=op, outcome="failed", ok=False, error_code="no_result",
        message=f"{name}: no result within {waited:.0f}s from the replica holding this "
        "gateway; the command stays queued and is carried out when a replica holds it")


def wait_for_results(queue: CommandQueue, board: ResultBoard, seqs: dict[int, str], *,
                     op: str, on_result: Callable[[GatewayResult], None], waited: float,
                     poll: float, held: Callable[[], set[str]],
                     clock: Callable[[], float] = time.monotonic) -> dict[int, GatewayResult]:
    """Every row's result (`seqs`: row -> gateway), passed to `on_result` as it comes;
    after `waited` seconds the missing ones are reported as such."""
    got: dict[int, GatewayResult] = {}
    deadline = clock() + waited
    board.expect(seqs)
    try:
        next_read = 0.0
        next_full = clock() + FULL_READ_EVERY
        while True:
            fresh = board.take(seqs)
            if clock() >= next_read:
                next_read = clock() + poll
                full = clock() >= next_full
                if full:
                    next_full = clock() + FULL_READ_EVERY
                ours = set() if full else held()  # ours come in memory
                missing = [s for s in seqs if s not in got and s not in fresh
                           and seqs[s] not in ours]
                for seq, data in queue.results(missing).items():
                    fresh[seq] = GatewayResult.model_validate(data)
            for seq, res in fresh.items():
                if seq in got:
                    continue
                got[seq] = res
                try:
                    on_result(res)
                except Exception:
                    log.exception("progress callback failed")
            if len(got) == len(seqs):
                return got
            if clock() > deadline:
                return {**got, **{s: no_result(name, op, waited)
                                  for s, name in seqs.items() if s not in got}}
            board.nap(seqs, next_read - clock())
    finally:
        board.forget(seqs)
