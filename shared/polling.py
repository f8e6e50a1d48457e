"""A background thread that repeats one round of work until it is stopped.

Every service that follows a change feed runs the same loop: do a round (read a page, apply it); go
again at once while there is more, sleep a little when caught up; after a failure, back off longer
each time (a dependency that is down would otherwise be hammered, and fill the log) and keep going
from where the round's own saved state says. With a `FollowerLease`, only the replica holding it
works; the others try again every `lease.retry_seconds`, so one of them takes over when the holder
stops (it gives the lease back) or dies (the lease expires).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)


class Lease(Protocol):
    """What the loop needs of a lease (shared.leases.FollowerLease is one)."""

    name: str

    @property
    def retry_seconds(self) -> float: ...

    def hold(self) -> bool: ...

    def release(self) -> None: ...


class RepeatingWorker:
    """Calls `work` in a thread named `name` until `stop()`.

    `work` returns True when there is more to do at once (e.g. it read a full page), False when it is
    caught up: the next round then waits `idle_seconds`. A round that raises is retried after
    `error_backoff_seconds` times the number of failures in a row, at most `max_backoff_seconds`; the
    first failure and every `log_every`-th are logged. `on_lease_lost` runs when the lease turns out
    to be held by another replica (e.g. to reload a saved position when this one leads again).
    """

    def __init__(self, name: str, work: Callable[[], bool], *, idle_seconds: float,
                 lease: Lease | None = None, on_lease_lost: Callable[[], None] = lambda: None,
                 error_backoff_seconds: float = 1.0, max_backoff_seconds: float = 30.0, log_every: int = 30,
                 failure_message: str = "a background round failed; retrying",
                 join_seconds: float = 30.0) -> None:
        self._work = work
        self._idle_seconds = idle_seconds
        self._lease = lease
        self._on_lease_lost = on_lease_lost
        self._error_backoff_seconds = error_backoff_seconds
        self._max_backoff_seconds = max_backoff_seconds
        self._log_every = max(1, log_every)
        self._failure_message = failure_message
        self._join_seconds = join_seconds
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish the current round, then stop; give the lease back so another replica need not wait."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self._join_seconds)
        if self._lease is not None:
            try:
                self._lease.release()
            except Exception:  # the TTL frees it anyway
                log.warning("could not give back a lease; it expires by itself", extra={"lease": self._lease.name})

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def still_leading(self) -> bool:
        """True while this worker is not stopping and holds its lease (if it has one): for long rounds to
        check between steps."""
        return not self._stopping.is_set() and (self._lease is None or self._lease.hold())

    def _run(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                if self._lease is not None and not self._lease.hold():
                    self._on_lease_lost()
                    self._stopping.wait(self._lease.retry_seconds)
                    continue
                more = self._work()
                failures = 0
            except Exception as error:  # keep going: the next round starts from the saved state
                failures += 1
                if failures == 1 or failures % self._log_every == 0:
                    log.warning(self._failure_message, exc_info=failures == 1,
                                extra={"error": f"{type(error).__name__}: {error}", "failures": failures})
                self._stopping.wait(min(self._error_backoff_seconds * failures, self._max_backoff_seconds))
                continue
            if not more:
                self._stopping.wait(self._idle_seconds)
