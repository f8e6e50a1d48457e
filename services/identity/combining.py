"""Concurrent calls combined into shared batches: calls that arrive while batches are being worked on
wait, and go together into the next one.

Most of a link call's cost does not grow with its number of observations: round trips, lightweight
transactions per lease bucket, a statement per identifier type and step. Concurrent calls in one
process also tend to touch the same persons, so each would wait for the others' leases and take
more rounds. Combined, they share one pass instead. A batch runs on the thread of one of the calls
in it; at most `concurrency` batches work at once. A batch that waits for something another process
holds (leases of a component) says so (`waiting`) and no longer counts meanwhile: the next batch
starts, so that it does not stop every call of this one.

A batch runs under the latest deadline of its calls. When a combined batch fails, each of its calls
is run again alone (under its own deadline), so a call only ever sees its own errors. A call still
queued when its deadline is about to pass leaves the queue and is told that the service is busy.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

from shared import deadline
from shared.errors import Unavailable

Item = TypeVar("Item")
Result = TypeVar("Result")

# A queued call gives up this long before its deadline, so that the caller learns why.
DEADLINE_MARGIN_SECONDS = 0.25


@dataclass
class _Call(Generic[Item, Result]):
    item: Item
    size: int
    deadline: float | None  # time.monotonic() by which the caller wants an answer
    done: bool = False
    result: Result | None = None
    error: BaseException | None = None


class Combiner(Generic[Item, Result]):
    """Runs `work` on batches of items submitted concurrently; `work` returns one result per item."""

    def __init__(self, work: Callable[[Sequence[Item]], list[Result]], *, size_of: Callable[[Item], int],
                 max_size: int, concurrency: int = 2) -> None:
        self._work = work
        self._size_of = size_of
        self._max_size = max_size
        self._concurrency = concurrency
        self._changed = threading.Condition()
        self._queue: list[_Call[Item, Result]] = []
        self._running = 0  # batches working, not waiting
        self._working = threading.local()  # whether this thread works on a batch now

    def submit(self, item: Item) -> Result:
        """The result of `item`, worked on alone or together with items submitted meanwhile."""
        left = deadline.remaining()
        call: _Call[Item, Result] = _Call(item, self._size_of(item), None if left is None else time.monotonic() + left)
        with self._changed:
            self._queue.append(call)
            while not call.done and (self._running >= self._concurrency or call not in self._queue):
                timeout = None if call.deadline is None else call.deadline - DEADLINE_MARGIN_SECONDS - time.monotonic()
                if timeout is not None and timeout <= 0 and call in self._queue:
                    self._queue.remove(call)
                    raise Unavailable("the service is busy with other calls; retry the call", reason="LINK_BUSY")
                self._changed.wait(timeout)
            if not call.done:
                batch = self._take(call)
                self._running += 1
        if not call.done:
            try:
                self._run(batch)
            finally:
                with self._changed:
                    self._running -= 1
                    self._changed.notify_all()
        if call.error is not None:
            raise call.error
        return call.result  # type: ignore[return-value]  # set whenever no error is

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """While in this block, the batch this thread works on (if any) waits for others and does not count
        against `concurrency`: another batch may start. When the block ends, the batch counts again at once
        (even beyond `concurrency`; it may hold what the batch started meanwhile waits for)."""
        if not getattr(self._working, "batch", False):
            yield
            return
        with self._changed:
            self._running -= 1
            self._changed.notify_all()
        try:
            yield
        finally:
            with self._changed:
                self._running += 1

    def _take(self, call: _Call[Item, Result]) -> list[_Call[Item, Result]]:
        """`call` and the calls queued before and after it, oldest first, up to `max_size` in all."""
        batch = [call]
        size = call.size
        for other in self._queue:
            if other is not call and size + other.size <= self._max_size:
                batch.append(other)
                size += other.size
        for taken in batch:
            self._queue.remove(taken)
        return batch

    def _run(self, batch: list[_Call[Item, Result]]) -> None:
        deadlines = [c.deadline for c in batch]
        latest = None if None in deadlines else max(d for d in deadlines if d is not None)
        self._working.batch = True
        try:
            with deadline.deadline_after(None if latest is None else latest - time.monotonic()):
                results = self._work([c.item for c in batch])
            for c, result in zip(batch, results, strict=True):
                c.result = result
        except Exception as error:  # each call learns its own errors: alone, it runs again
            if len(batch) == 1:
                batch[0].error = error
            else:
                for c in batch:
                    try:
                        with deadline.deadline_after(None if c.deadline is None else c.deadline - time.monotonic()):
                            c.result = self._work([c.item])[0]
                    except Exception as own_error:  # handed to that call's thread
                        c.error = own_error
        finally:
            self._working.batch = False
            with self._changed:
                for c in batch:
                    c.done = True
                self._changed.notify_all()
