"""The follower lease against the real Cassandra: one holder at a time, renewal, release, expiry."""

from __future__ import annotations

import time

import pytest

from shared.cassandra import CassandraSession
from shared.leases import FollowerLease
from tests.shared.clocks import FakeClock

pytestmark = pytest.mark.integration




def test_one_owner_holds_the_lease_until_it_gives_it_back(lease_session: CassandraSession) -> None:
    clock = FakeClock()
    first = FollowerLease(lease_session, "feed", ttl_seconds=30, clock=clock)
    second = FollowerLease(lease_session, "feed", ttl_seconds=30, clock=clock)
    assert first.owner != second.owner
    assert first.hold()
    assert not second.hold()
    assert first.holder() == first.owner
    clock.now += 11  # past a third of the TTL: the holder renews (a lightweight transaction), the other still waits
    assert first.hold() and not second.hold()
    first.release()
    assert first.holder() is None
    assert second.hold()
    assert not first.hold()
    assert second.holder() == second.owner


def test_a_lease_nobody_renews_expires_and_another_owner_takes_it(lease_session: CassandraSession) -> None:
    gone = FollowerLease(lease_session, "feed", ttl_seconds=1)
    # The taker's own TTL long enough that reading the lease back right after taking it finds it on a loaded
    # machine (with 1 s, a CI run read it back after it had already expired).
    waiting = FollowerLease(lease_session, "feed", ttl_seconds=30)
    assert gone.hold()
    assert not waiting.hold()
    time.sleep(2.2)  # the holder "died": no renewal within the TTL
    assert waiting.hold()
    assert waiting.holder() == waiting.owner


def test_names_are_independent_leases(lease_session: CassandraSession) -> None:
    assert FollowerLease(lease_session, "feed-a").hold()
    assert FollowerLease(lease_session, "feed-b").hold()

