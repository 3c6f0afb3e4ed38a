"""TurnLock: commands on one gateway run in acceptance order."""

from __future__ import annotations

import random
import threading
import time

from controller.turns import TurnLock


def test_turns_run_in_acceptance_order_whatever_the_thread_order() -> None:
    lock = TurnLock()
    turns = [lock.take() for _ in range(20)]
    order: list[int] = []
    shuffled = turns[:]
    random.Random(4).shuffle(shuffled)

    def run(turn: int) -> None:
        time.sleep(random.random() / 200)
        with lock.turn(turn):
            order.append(turn)

    threads = [threading.Thread(target=run, args=(t,)) for t in shuffled]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert order == turns


def test_cancelled_turn_does_not_block_the_queue() -> None:
    lock = TurnLock()
    first, second, third = lock.take(), lock.take(), lock.take()
    lock.cancel(second)
    with lock.turn(first):
        pass
    done = threading.Event()

    def run() -> None:
        with lock.turn(third):
            done.set()

    threading.Thread(target=run).start()
    assert done.wait(2)
