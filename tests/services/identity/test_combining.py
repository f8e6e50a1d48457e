"""Concurrent calls share batches, each gets its own results and only its own errors, and a call that
cannot start before its deadline is told the service is busy."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from services.identity.combining import Combiner
from shared import deadline
from shared.errors import InvalidArgument, Unavailable


class _Doubling:
    """Doubles numbers, slowly, remembering the batches it was given; a negative number fails its batch."""

    def __init__(self, seconds: float = 0.05) -> None:
        self.batches: list[list[int]] = []
        self.seconds = seconds
        self.lock = threading.Lock()

    def __call__(self, items: Sequence[list[int]]) -> list[list[int]]:
        with self.lock:
            self.batches.append([n for item in items for n in item])
        time.sleep(self.seconds)
        if any(n < 0 for item in items for n in item):
            raise InvalidArgument(f"negative number in {list(items)}")
        return [[2 * n for n in item] for item in items]


def _combiner(work: _Doubling, *, concurrency: int = 1, max_size: int = 100) -> Combiner[list[int], list[int]]:
    return Combiner(work, size_of=len, max_size=max_size, concurrency=concurrency)


def test_concurrent_calls_share_batches_and_each_gets_its_own_results() -> None:
    work = _Doubling()
    combiner = _combiner(work)
    items = [[i, i + 100] for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(combiner.submit, items))
    assert results == [[2 * a, 2 * b] for a, b in items]
    assert len(work.batches) < len(items), "no calls were combined"
    assert sorted(n for batch in work.batches for n in batch) == sorted(n for item in items for n in item)


def test_a_batch_never_exceeds_the_maximum_size() -> None:
    work = _Doubling()
    combiner = _combiner(work, max_size=5)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(combiner.submit, [[i, i, i] for i in range(8)]))
    assert max(len(batch) for batch in work.batches) <= 5


def test_a_failing_call_fails_alone() -> None:
    work = _Doubling()
    combiner = _combiner(work)
    items = [[1], [-1], [2], [3], [4], [5]]

    def submit(item: list[int]) -> list[int] | str:
        try:
            return combiner.submit(item)
        except InvalidArgument as error:
            return error.message

    with ThreadPoolExecutor(len(items)) as pool:
        results = list(pool.map(submit, items))
    assert results[0] == [2] and results[2:] == [[4], [6], [8], [10]]
    assert results[1] == "negative number in [[-1]]"
    assert any(-1 in batch and len(batch) > 1 for batch in work.batches), "the failing call was never combined"


def _counting_work() -> tuple[Callable[[Sequence[list[int]]], list[list[int]]], list[int]]:
    """Work that takes 50 ms a batch, and [batches working now, most working at once]."""
    running = [0, 0]
    lock = threading.Lock()

    def work(items: Sequence[list[int]]) -> list[list[int]]:
        with lock:
            running[0] += 1
            running[1] = max(running[1], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return list(items)

    return work, running


def test_at_most_concurrency_batches_run_at_once() -> None:
    work, running = _counting_work()
    combiner: Combiner[list[int], list[int]] = Combiner(work, size_of=len, max_size=1, concurrency=2)
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(combiner.submit, [[i] for i in range(8)])) == [[i] for i in range(8)]
    assert running[1] == 2


def test_a_call_queued_past_its_deadline_is_told_the_service_is_busy() -> None:
    work = _Doubling(seconds=1.5)
    combiner = _combiner(work, max_size=1)
    first = threading.Thread(target=combiner.submit, args=([1],))
    first.start()
    time.sleep(0.2)  # the first call's batch is running: the next one waits in the queue
    started = time.monotonic()
    with deadline.deadline_after(0.6), pytest.raises(Unavailable) as raised:
        combiner.submit([2])
    assert raised.value.reason == "LINK_BUSY"
    assert time.monotonic() - started < 1.0
    first.join()
    assert work.batches == [[1]], "the call that gave up was worked on anyway"


def test_a_batch_waiting_for_others_lets_the_next_one_start() -> None:
    # One batch at a time, but the first waits (as for leases another process holds) until the second ran.
    first_working, second_ran = threading.Event(), threading.Event()

    def work(items: Sequence[list[int]]) -> list[list[int]]:
        if items == [[1]]:
            first_working.set()
            with combiner.waiting():
                assert second_ran.wait(5), "the next batch did not start while the first waited"
        else:
            second_ran.set()
        return list(items)

    combiner: Combiner[list[int], list[int]] = Combiner(work, size_of=len, max_size=1, concurrency=1)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(combiner.submit, [1])
        assert first_working.wait(5)
        assert combiner.submit([2]) == [2]
        assert first.result(timeout=5) == [1]


def test_waiting_outside_a_batch_changes_nothing() -> None:
    work, running = _counting_work()
    combiner: Combiner[list[int], list[int]] = Combiner(work, size_of=len, max_size=1, concurrency=1)
    # Not in a batch: it must not let two batches work at once.
    with combiner.waiting(), ThreadPoolExecutor(4) as pool:
        assert list(pool.map(combiner.submit, [[i] for i in range(4)])) == [[i] for i in range(4)]
    assert running[1] == 1
