"""The leases of the operations a process owns, against the real Cassandra: one owner per operation,
renewal on a thread of their own, a lease taken away lost for good, failures logged, not raised."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from functools import partial

import pytest

from shared.cassandra import CassandraSession
from shared.errors import Aborted, Unavailable
from shared.leases import FollowerLease, OwnedLeases, operation_lease_name
from tests.shared.clocks import FakeClock

pytestmark = pytest.mark.integration




class FailingLease(FollowerLease):
    """A FollowerLease whose Cassandra calls fail while `failing` is set."""

    failing = threading.Event()

    def hold(self) -> bool:
        if self.failing.is_set():
            raise Unavailable("Cassandra could not serve the request", reason="STORAGE_UNAVAILABLE")
        return super().hold()

    def renew(self) -> bool:
        if self.failing.is_set():
            raise Unavailable("Cassandra could not serve the request", reason="STORAGE_UNAVAILABLE")
        return super().renew()

    def release(self) -> None:
        if self.failing.is_set():
            raise Unavailable("Cassandra could not serve the request", reason="STORAGE_UNAVAILABLE")
        super().release()


def new_operation_id() -> str:
    return uuid.uuid4().hex  # the keyspace is shared with other tests: names of this test's own


def holder(session: CassandraSession, operation_id: str) -> str | None:
    return FollowerLease(session, operation_lease_name(operation_id)).holder()


def test_an_operation_is_owned_by_one_process_under_its_operations_lease(lease_session: CassandraSession) -> None:
    first = OwnedLeases(partial(FollowerLease, lease_session), 30)
    second = OwnedLeases(partial(FollowerLease, lease_session), 30)
    operation_id = new_operation_id()
    first.take_new(operation_id)
    assert operation_lease_name(operation_id) == f"operations/{operation_id}"
    assert holder(lease_session, operation_id) == first.owner
    assert first.holds(operation_id) and not second.holds(operation_id)
    assert not second.take(operation_id)
    with pytest.raises(Aborted) as taken:
        second.take_new(operation_id)
    assert taken.value.reason == "OPERATION_OWNED"
    assert taken.value.message == f"operation operations/{operation_id} is already owned by another process; retry"
    assert not second.holds(operation_id)
    first.release(operation_id)  # given back: the other need not wait for the TTL
    assert not first.holds(operation_id) and holder(lease_session, operation_id) is None
    assert second.take(operation_id) and second.holds(operation_id)


def test_the_renewer_keeps_leases_past_their_ttl_and_stops_once_none_is_owned(
        lease_session: CassandraSession) -> None:
    renewer = f"owned-leases-{uuid.uuid4().hex[:8]}"
    # 3 s: Cassandra counts TTLs in whole seconds from a truncated now, so a row lives 2-3 s, renewed every 1 s.
    leases = OwnedLeases(partial(FollowerLease, lease_session), 3, renewer=renewer)
    operation_id = new_operation_id()
    leases.take_new(operation_id)
    time.sleep(7)  # more than twice the TTL: renewed every third of it meanwhile
    assert holder(lease_session, operation_id) == leases.owner
    assert not FollowerLease(lease_session, operation_lease_name(operation_id), ttl_seconds=3).hold()
    assert leases.holds(operation_id)
    leases.release(operation_id)
    assert holder(lease_session, operation_id) is None
    end = time.monotonic() + 10
    while any(thread.name == renewer for thread in threading.enumerate()) and time.monotonic() < end:
        time.sleep(0.1)
    assert not any(thread.name == renewer for thread in threading.enumerate())
    # The next operation starts another renewer.
    second = new_operation_id()
    leases.take_new(second)
    assert any(thread.name == renewer for thread in threading.enumerate())
    leases.release(second)


def test_a_lease_taken_away_is_lost_once_and_never_taken_back(lease_session: CassandraSession) -> None:
    clock = FakeClock()
    lost: list[str] = []
    leases = OwnedLeases(partial(FollowerLease, lease_session, clock=clock), 30, on_lost=lost.append)
    taken_away, kept = new_operation_id(), new_operation_id()
    leases.take_new(taken_away)
    leases.take_new(kept)
    # This process was paused past the TTL: its lease expired and another process took it.
    FollowerLease(lease_session, operation_lease_name(taken_away), owner=leases.owner).release()
    thief = FollowerLease(lease_session, operation_lease_name(taken_away), ttl_seconds=30)
    assert thief.hold()
    clock.now += 11  # past a third of the TTL: the next round renews
    assert leases.renew() == [taken_away]
    assert lost == [taken_away]
    assert not leases.holds(taken_away) and leases.holds(kept)
    assert holder(lease_session, kept) == leases.owner
    # Lost for good: once the other owner lets it go, this process does not take it back by renewing.
    thief.release()
    clock.now += 11
    assert leases.renew() == []
    assert lost == [taken_away]
    assert not leases.holds(taken_away) and holder(lease_session, taken_away) is None
    leases.release(taken_away)
    leases.release(kept)
    assert holder(lease_session, kept) is None


def logged(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == "shared.leases"]


def test_failures_to_renew_or_release_are_logged_not_raised(lease_session: CassandraSession,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    leases = OwnedLeases(partial(FailingLease, lease_session, clock=clock), 30, what="a recompute")
    operation_id = new_operation_id()
    leases.take_new(operation_id)
    clock.now += 11
    FailingLease.failing.set()
    try:
        with caplog.at_level(logging.WARNING, logger="shared.leases"):
            assert leases.renew() == []  # not lost: the next round tries again
            assert leases.holds(operation_id)
            assert [r.getMessage() for r in logged(caplog)] == ["could not renew a recompute's lease"]
            assert getattr(logged(caplog)[0], "operation", None) == operation_id
            FailingLease.failing.clear()
            assert leases.renew() == [] and holder(lease_session, operation_id) == leases.owner
            caplog.clear()
            FailingLease.failing.set()
            leases.release(operation_id)
            assert [r.getMessage() for r in logged(caplog)] == [
                "could not release a recompute's lease; it expires by itself"]
            assert getattr(logged(caplog)[0], "lease", None) == operation_lease_name(operation_id)
    finally:
        FailingLease.failing.clear()
    assert not leases.holds(operation_id)
    assert holder(lease_session, operation_id) == leases.owner  # still there, until its TTL ends


def test_a_forgotten_lease_is_neither_renewed_nor_given_back(lease_session: CassandraSession) -> None:
    clock = FakeClock()
    lost: list[str] = []
    leases = OwnedLeases(partial(FollowerLease, lease_session, clock=clock), 30, on_lost=lost.append)
    operation_id = new_operation_id()
    leases.take_new(operation_id)
    leases.forget(operation_id)
    assert not leases.holds(operation_id)
    assert holder(lease_session, operation_id) == leases.owner  # expires by itself
    FollowerLease(lease_session, operation_lease_name(operation_id), owner=leases.owner).release()
    thief = FollowerLease(lease_session, operation_lease_name(operation_id), ttl_seconds=30)
    assert thief.hold()
    clock.now += 11
    assert leases.renew() == [] and lost == []  # not owned any more: nothing to renew, nothing lost
    leases.release(operation_id)  # nothing to give back
    assert holder(lease_session, operation_id) == thief.owner
    thief.release()


def test_a_lease_that_expired_is_lost_even_when_nobody_holds_it_now(lease_session: CassandraSession) -> None:
    # A process paused longer than the lease: another took the operation over, finished it and released the
    # lease. The paused one must not take the free lease again and resume a finished operation.
    clock = FakeClock()
    lost: list[str] = []
    leases = OwnedLeases(partial(FollowerLease, lease_session, clock=clock), 30, on_lost=lost.append)
    operation_id = new_operation_id()
    leases.take_new(operation_id)
    FollowerLease(lease_session, operation_lease_name(operation_id), owner=leases.owner).release()  # as expired
    other = FollowerLease(lease_session, operation_lease_name(operation_id), ttl_seconds=30)
    assert other.hold()
    other.release()  # the other process finished the operation
    clock.now += 11
    assert leases.renew() == [operation_id] and lost == [operation_id]
    assert not leases.holds(operation_id)
    assert holder(lease_session, operation_id) is None
