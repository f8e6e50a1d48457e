"""The background round loop every feed follower runs: more at once, idle waits, backoff, leases."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import pytest

from shared.cassandra import CassandraSession
from shared.leases import FollowerLease
from shared.polling import RepeatingWorker


def _wait_for(condition: Callable[[], bool], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


class Rounds:
    """A round that reports `more` for its first `busy` calls, then raises for `failing` calls, then idles."""

    def __init__(self, busy: int = 0, failing: int = 0) -> None:
        self.busy = busy
        self.failing = failing
        self.calls = 0
        self.times: list[float] = []

    def __call__(self) -> bool:
        self.calls += 1
        self.times.append(time.monotonic())
        if self.calls <= self.busy:
            return True
        if self.calls <= self.busy + self.failing:
            raise RuntimeError(f"round {self.calls} failed")
        return False


class StandInLease:
    """A lease whose holder the test decides (the Cassandra-backed one is tested below and in
    test_follower_lease.py)."""

    name = "stand-in"
    retry_seconds = 0.01

    def __init__(self, held: bool) -> None:
        self.held = held
        self.released = False

    def hold(self) -> bool:
        return self.held

    def release(self) -> None:
        self.released = True


@pytest.mark.unit
def test_rounds_repeat_at_once_while_there_is_more_then_wait_when_caught_up() -> None:
    rounds = Rounds(busy=50)
    worker = RepeatingWorker("test-busy", rounds, idle_seconds=30)
    worker.start()
    try:
        assert _wait_for(lambda: rounds.calls >= 51)
        time.sleep(0.2)
        # 50 busy rounds back to back, then one caught-up round, then it waits out the idle period.
        assert rounds.calls == 51
    finally:
        worker.stop()
    assert worker.stopping


@pytest.mark.unit
def test_failures_back_off_longer_each_time_and_the_first_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    rounds = Rounds(failing=3)
    worker = RepeatingWorker("test-failing", rounds, idle_seconds=30, error_backoff_seconds=0.1,
                             failure_message="test round failed")
    with caplog.at_level(logging.WARNING, logger="shared.polling"):
        worker.start()
        try:
            assert _wait_for(lambda: rounds.calls >= 4)
        finally:
            worker.stop()
    gaps = [later - earlier for earlier, later in zip(rounds.times, rounds.times[1:], strict=False)]
    # Waits of 0.1, 0.2 and 0.3 s after the first, second and third failure in a row.
    assert gaps[0] >= 0.09 and gaps[1] >= 0.19 and gaps[2] >= 0.29, gaps
    failures = [r for r in caplog.records if r.getMessage() == "test round failed"]
    assert len(failures) == 1 and failures[0].exc_info is not None  # the first, with its traceback


@pytest.mark.unit
def test_a_worker_without_the_lease_does_not_work_and_is_told_so_until_it_gets_it() -> None:
    rounds = Rounds()
    lease = StandInLease(held=False)
    lost = threading.Event()
    worker = RepeatingWorker("test-lease", rounds, idle_seconds=30, lease=lease, on_lease_lost=lost.set)
    worker.start()
    try:
        assert lost.wait(5)
        time.sleep(0.1)
        assert rounds.calls == 0 and not worker.still_leading()
        lease.held = True
        assert _wait_for(lambda: rounds.calls == 1)
        assert worker.still_leading()
    finally:
        worker.stop()
    assert lease.released and not worker.still_leading()


@pytest.mark.integration
def test_of_two_replicas_one_works_and_the_other_takes_over_when_it_stops(lease_session: CassandraSession) -> None:
    first_rounds, second_rounds = Rounds(), Rounds()
    # A 6 s lease is tried every 2 s by the replica that does not hold it.
    first = RepeatingWorker("replica-1", first_rounds, idle_seconds=0.05,
                            lease=FollowerLease(lease_session, "feed", ttl_seconds=6))
    second = RepeatingWorker("replica-2", second_rounds, idle_seconds=0.05,
                             lease=FollowerLease(lease_session, "feed", ttl_seconds=6))
    first.start()
    try:
        assert _wait_for(lambda: first_rounds.calls > 0)
        second.start()
        time.sleep(2.5)
        assert second_rounds.calls == 0  # the first holds the lease
        first.stop()  # gives the lease back: the second takes it at its next try, not after the TTL
        stopped_at = time.monotonic()
        assert _wait_for(lambda: second_rounds.calls > 0, seconds=10)
        assert second_rounds.times[0] - stopped_at < 4.5  # before the 6 s TTL could expire
    finally:
        first.stop()
        second.stop()
