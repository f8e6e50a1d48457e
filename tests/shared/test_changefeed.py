"""The shared change feed: settled reads never skip a late write; unsettled-tail reads see changes at once
and still never skip one, with the tail a reader re-reads applied once."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from cassandra.util import uuid_from_time

from shared.cassandra import CassandraSession, connect_cluster, open_session
from shared.changefeed import (
    FEED_START,
    MAX_CURSOR_SKEW,
    SETTLE_SECONDS,
    UNSETTLED_SUFFIX,
    ChangeFeed,
    FeedEntry,
    UnsettledCursor,
    UnsettledTail,
    cursor_at,
    parse_cursor,
    time_of,
    uuid_ticks,
    with_unsettled,
)
from shared.config import CassandraSettings
from shared.errors import InvalidArgument
from shared.migrations import SCHEMA_TIMEOUT_SECONDS

pytestmark = pytest.mark.integration


@pytest.fixture
def feed_session(cassandra_settings: CassandraSettings, admin_session: CassandraSession
                 ) -> Iterator[CassandraSession]:
    keyspace = cassandra_settings.keyspace("feed")
    admin_session.execute(f"CREATE KEYSPACE {keyspace} WITH replication = "
                          "{'class': 'SimpleStrategy', 'replication_factor': 1}", timeout=SCHEMA_TIMEOUT_SECONDS)
    admin_session.execute(f"CREATE TABLE {keyspace}.change_days (feed int, bucket date, PRIMARY KEY ((feed), bucket))",
                          timeout=SCHEMA_TIMEOUT_SECONDS)
    admin_session.execute(f"CREATE TABLE {keyspace}.changes (bucket date, change_id timeuuid, person_id text, "
                          "PRIMARY KEY ((bucket), change_id))", timeout=SCHEMA_TIMEOUT_SECONDS)
    cluster = connect_cluster(cassandra_settings)
    try:
        yield open_session(cluster, keyspace, 10)
    finally:
        cluster.shutdown()


def land_late(session: CassandraSession, person_id: str, stamped: datetime) -> uuid.UUID:
    """Write a change stamped at `stamped` now, as a writer that took its id then and was slow would."""
    change_id: uuid.UUID = uuid_from_time(stamped)
    session.execute("INSERT INTO changes (bucket, change_id, person_id) VALUES (?, ?, ?)",
                    (stamped.date(), change_id, person_id))
    return change_id


def persons(entries: list[FeedEntry]) -> list[str]:
    return [e.row.person_id for e in entries]


def test_a_change_stamped_earlier_but_written_later_is_read_in_both_modes(feed_session: CassandraSession) -> None:
    feed = ChangeFeed(feed_session, ["person_id"])
    newer = feed.record(("newer",))
    soon = newer.change_time + timedelta(seconds=0.1)  # the reads below happen "now", within the settle time

    # Settled reads wait: nothing yet.
    assert feed.read(None, 100, soon) == ([], FEED_START)
    # A tail reader sees the newer change at once; its cursor stays before it (not settled).
    start = parse_cursor(with_unsettled(""))
    entries, cursor = feed.read(start, 100, soon)
    assert persons(entries) == ["newer"]
    assert isinstance(cursor, UnsettledCursor) and cursor == FEED_START
    tail = UnsettledTail()
    tail.applied(e.change_id for e in entries)

    # A slower writer's change, stamped before `newer`, lands now.
    older_id = land_late(feed_session, "older", newer.change_time - timedelta(seconds=0.3))
    entries, cursor = feed.read(parse_cursor(str(cursor)), 100, soon)
    assert persons(entries) == ["older", "newer"]
    assert tail.unapplied(e.change_id for e in entries) == [older_id], "the re-read tail is applied once"
    tail.applied([older_id])
    assert cursor == FEED_START

    # Once settled, both are behind the cursor, and the tail forgets them.
    settled = newer.change_time + timedelta(seconds=SETTLE_SECONDS + 0.1)
    entries, cursor = feed.read(parse_cursor(str(cursor)), 100, settled)
    assert persons(entries) == ["older", "newer"] and tail.unapplied(e.change_id for e in entries) == []
    assert cursor == newer.change_id and str(cursor).endswith(UNSETTLED_SUFFIX)
    tail.settled_through(cursor)
    assert len(tail) == 1  # `newer` itself: its time is the cursor's; nothing after the cursor returns it
    assert feed.read(parse_cursor(str(cursor)), 100, settled) == ([], cursor)

    # A settled reader gets both, in stamp order, once they settled.
    entries, plain = feed.read(None, 100, settled)
    assert persons(entries) == ["older", "newer"] and plain == newer.change_id
    assert not isinstance(plain, UnsettledCursor) and str(plain) == str(newer.change_id)


def test_a_full_page_of_settled_changes_moves_the_tail_cursor_to_its_end(feed_session: CassandraSession) -> None:
    feed = ChangeFeed(feed_session, ["person_id"])
    written = feed.record_many([(f"p{i}",) for i in range(5)])
    later = max(e.change_time for e in written) + timedelta(seconds=SETTLE_SECONDS + 0.1)
    entries, cursor = feed.read(parse_cursor(with_unsettled("")), 3, later)
    assert len(entries) == 3 and cursor == entries[-1].change_id
    entries, cursor = feed.read(parse_cursor(str(cursor)), 3, later)
    assert len(entries) == 2 and cursor == entries[-1].change_id
    assert time_of(cursor) <= later


@pytest.mark.parametrize("token", ["nonsense", f"nonsense{UNSETTLED_SUFFIX}", str(uuid.uuid4()),
                                   f"{uuid.uuid4()}{UNSETTLED_SUFFIX}"])
def test_tokens_that_are_not_cursors_are_invalid_arguments(token: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        parse_cursor(token, "page_token")
    assert raised.value.field_violations[0].field == "page_token"


CURSOR = str(uuid.uuid1())


@pytest.mark.parametrize("position", [CURSOR.upper(), f"{{{CURSOR}}}", f"{CURSOR}}}}}", f"urn:uuid:{CURSOR}",
                                      CURSOR.replace("-", ""), f"{CURSOR[:7]}-{CURSOR[7:].replace('-', '')}",
                                      str(FEED_START).replace("-", "")])
@pytest.mark.parametrize("suffix", ["", UNSETTLED_SUFFIX])
def test_only_the_spelling_the_feed_hands_out_is_a_cursor(position: str, suffix: str) -> None:
    """uuid.UUID reads each of these as the cursor: several tokens would be one position, a tampered one taken."""
    assert uuid.UUID(position).version == 1
    with pytest.raises(InvalidArgument) as raised:
        parse_cursor(position + suffix, "cursor")
    assert raised.value.reason == "INVALID_CURSOR"
    assert [v.field for v in raised.value.field_violations] == ["cursor"]


def test_the_skew_limit_is_exact_to_the_tick() -> None:
    """uuid_ticks is a change id's time to the tick: as a float timestamp times 1e7 (past 2**53) this limit was
    2 ticks late, taking a cursor past it."""
    def cursor_at(ticks: int) -> str:
        return str(uuid.UUID(fields=(ticks & 0xFFFFFFFF, (ticks >> 32) & 0xFFFF, 0x1000 | ticks >> 48, 0x80, 0, 0)))

    now = datetime(2026, 11, 25, 4, 23, 26, 123402, UTC)
    limit = uuid_ticks(now + MAX_CURSOR_SKEW)
    assert limit == 0x01B21DD213814000 + (now + MAX_CURSOR_SKEW - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(
        microseconds=1) * 10
    assert parse_cursor(cursor_at(limit), now=now) == uuid.UUID(cursor_at(limit))
    with pytest.raises(InvalidArgument):
        parse_cursor(cursor_at(limit + 1), now=now)


@pytest.mark.parametrize("suffix", ["", UNSETTLED_SUFFIX])
def test_a_cursor_later_than_now_is_no_cursor_of_the_feed(suffix: str) -> None:
    """A follower that stored a cursor ahead of now would skip every change until then."""
    now = datetime.now(UTC)
    for ahead in ("ffffffff-ffff-1fff-8000-02fc00000001",
                  str(uuid_from_time((now + MAX_CURSOR_SKEW + timedelta(seconds=1)).timestamp()))):
        with pytest.raises(InvalidArgument) as raised:
            parse_cursor(ahead + suffix, "cursor", now=now)
        assert raised.value.reason == "INVALID_CURSOR"
        assert [v.field for v in raised.value.field_violations] == ["cursor"]
    # Up to the clock-skew allowance (another host's clock may be a little ahead), a cursor is taken.
    within = str(uuid_from_time((now + MAX_CURSOR_SKEW - timedelta(seconds=1)).timestamp()))
    assert parse_cursor(within + suffix, now=now) == uuid.UUID(within)
    assert parse_cursor(str(uuid.uuid1()) + suffix) is not None

def test_the_spellings_the_feed_hands_out_are_cursors() -> None:
    assert parse_cursor(CURSOR) == uuid.UUID(CURSOR) and not isinstance(parse_cursor(CURSOR), UnsettledCursor)
    unsettled = parse_cursor(CURSOR + UNSETTLED_SUFFIX)
    assert isinstance(unsettled, UnsettledCursor) and str(unsettled) == CURSOR + UNSETTLED_SUFFIX
    assert parse_cursor(str(FEED_START)) == FEED_START
    assert str(parse_cursor(UNSETTLED_SUFFIX)) == str(UnsettledCursor(int=FEED_START.int)) == with_unsettled(
        str(FEED_START))
    assert parse_cursor("") is None


def test_a_cursor_at_a_time_is_that_instant_before_its_changes() -> None:
    when = datetime(2026, 11, 25, 6, 40, 1, 654321, UTC)
    cursor = uuid.UUID(cursor_at(when))
    assert cursor.time == uuid_ticks(when) and time_of(cursor) == when
    assert parse_cursor(str(cursor), now=when) == cursor
    assert (cursor.clock_seq, cursor.node) == (0, 0)  # before any change id of that tick
