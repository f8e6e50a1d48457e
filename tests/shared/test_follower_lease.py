"""The follower lease against the real Cassandra: one holder at a time, renewal, release, expiry."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.cassandra import CassandraSession, connect_cluster, open_session
from shared.config import CassandraSettings
from shared.leases import FollowerLease
from shared.migrations import apply_migrations, load_migrations

pytestmark = pytest.mark.integration


@pytest.fixture
def session(tmp_path: Path, admin_session: CassandraSession,
            cassandra_settings: CassandraSettings) -> Iterator[CassandraSession]:
    """A session on a keyspace of this test's own holding the table shared.leases documents."""
    keyspace = cassandra_settings.keyspace("profile")
    (tmp_path / "0001_leases.cql").write_text(
        "CREATE TABLE IF NOT EXISTS {keyspace}.follower_leases (name text PRIMARY KEY, owner text);")
    apply_migrations(admin_session, keyspace, load_migrations(tmp_path), cassandra_settings)
    cluster = connect_cluster(cassandra_settings)
    try:
        yield open_session(cluster, keyspace, cassandra_settings.request_timeout_seconds)
    finally:
        cluster.shutdown()


class FakeClock:
    """Monotonic seconds that a test moves by hand, to make renewals due without sleeping."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_one_owner_holds_the_lease_until_it_gives_it_back(session: CassandraSession) -> None:
    clock = FakeClock()
    first = FollowerLease(session, "feed", ttl_seconds=30, clock=clock)
    second = FollowerLease(session, "feed", ttl_seconds=30, clock=clock)
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


def test_a_lease_nobody_renews_expires_and_another_owner_takes_it(session: CassandraSession) -> None:
    gone = FollowerLease(session, "feed", ttl_seconds=1)
    waiting = FollowerLease(session, "feed", ttl_seconds=1)
    assert gone.hold()
    assert not waiting.hold()
    time.sleep(2.2)  # the holder "died": no renewal within the TTL
    assert waiting.hold()
    assert waiting.holder() == waiting.owner


def test_names_are_independent_leases(session: CassandraSession) -> None:
    assert FollowerLease(session, "feed-a").hold()
    assert FollowerLease(session, "feed-b").hold()

