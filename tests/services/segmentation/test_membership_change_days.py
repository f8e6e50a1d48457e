"""The membership change log in day partitions per segment (schema 0006), against real Cassandra.

Pages run across days in change id order, stop at `through`, resume from a cursor in the middle of a day,
return the history recorded in the old one-partition table (`membership_changes`) in order with the new,
and `delete_history` removes it all. Changes are stamped on chosen days by replacing the clock the store
takes its change ids from (`uuid.uuid1`), so they go through `apply_changes` like any other."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta

import pytest
from cassandra.util import uuid_from_time

from services.segmentation.store import SegmentStore, StoredChange, cursor_before
from shared.cassandra import CassandraSession
from shared.changefeed import FEED_START, time_of, uuid_ticks

pytestmark = pytest.mark.integration

DAY1, DAY2, DAY3 = date(2026, 3, 1), date(2026, 3, 2), date(2026, 3, 4)


def at(day: date, hour: int, minute: int = 0) -> datetime:
    return datetime(day.year, day.month, day.day, hour, minute, tzinfo=UTC)


@pytest.fixture
def stamps(monkeypatch: pytest.MonkeyPatch) -> list[datetime]:
    """Times the next change ids are taken at, in order (append to it); the real clock once it is empty."""
    times: list[datetime] = []
    real = uuid.uuid1

    def uuid1(node: int | None = None, clock_seq: int | None = None) -> uuid.UUID:
        if times:
            stamped: uuid.UUID = uuid_from_time(times.pop(0).timestamp())
            return stamped
        return real(node, clock_seq)

    monkeypatch.setattr(uuid, "uuid1", uuid1)
    return times


def record(store: SegmentStore, stamps: list[datetime], *changes: tuple[str, datetime]) -> None:
    """Each (person, time) as an enter of segment `s`, stamped at that time, in one `apply_changes`."""
    stamps.extend(when for _, when in changes)
    store.apply_changes("s", [person for person, _ in changes], [], "realtime", datetime.now(UTC))
    assert not stamps


def all_pages(store: SegmentStore, limit: int, after: uuid.UUID = FEED_START,
              through: uuid.UUID | None = None) -> list[StoredChange]:
    changes: list[StoredChange] = []
    while True:
        page = store.changes_page("s", after, limit, through)
        assert len(page) <= limit
        changes += page
        if len(page) < limit:
            return changes
        after = page[-1].change_id


def persons(changes: list[StoredChange]) -> list[str]:
    return [change.person_id for change in changes]


def days_indexed(session: CassandraSession) -> list[date]:
    return [row.day.date() for row in session.execute("SELECT day FROM membership_change_days WHERE segment_id = ?",
                                                      ("s",))]


def write_old(session: CassandraSession, person_id: str, when: datetime) -> uuid.UUID:
    """A change in the table of before schema 0006 (as recorded before the upgrade, or by a process not
    upgraded yet)."""
    change_id: uuid.UUID = uuid_from_time(when.timestamp())
    session.execute("INSERT INTO membership_changes (segment_id, change_id, person_id, entered, cause) "
                    "VALUES (?, ?, ?, ?, ?)", ("s", change_id, person_id, True, "recompute"))
    return change_id


def test_pages_run_across_day_partitions_in_order(segmentation_session: CassandraSession,
                                                 stamps: list[datetime]) -> None:
    store = SegmentStore(segmentation_session)
    # One call whose changes fall on two days, then two more days.
    record(store, stamps, ("a", at(DAY1, 10)), ("b", at(DAY1, 23, 59)), ("c", at(DAY2, 0, 1)))
    record(store, stamps, ("d", at(DAY2, 12)))
    record(store, stamps, ("e", at(DAY3, 8)), ("f", at(DAY3, 9)))
    assert days_indexed(segmentation_session) == [DAY1, DAY2, DAY3]
    for day, expected in ((DAY1, ["a", "b"]), (DAY2, ["c", "d"]), (DAY3, ["e", "f"])):
        rows = segmentation_session.execute("SELECT person_id FROM membership_change_log WHERE segment_id = ? "
                                            "AND day = ?", ("s", day))
        assert [row.person_id for row in rows] == expected
    assert segmentation_session.execute("SELECT * FROM membership_changes WHERE segment_id = ?", ("s",)).one() is None

    for limit in (1, 2, 3, 4, 100):
        changes = all_pages(store, limit)
        assert persons(changes) == ["a", "b", "c", "d", "e", "f"], limit
    assert [time_of(c.change_id) for c in changes] == [at(DAY1, 10), at(DAY1, 23, 59), at(DAY2, 0, 1),
                                                       at(DAY2, 12), at(DAY3, 8), at(DAY3, 9)]
    assert all(c.entered and c.cause == "realtime" for c in changes)
    assert store.changes_page("s", FEED_START, 0) == []

    # A cursor in the middle of a day: the rest of that day, then the next days.
    b = changes[1].change_id
    assert persons(store.changes_page("s", b, 2)) == ["c", "d"]
    assert persons(store.changes_page("s", changes[0].change_id, 100)) == ["b", "c", "d", "e", "f"]
    # A start time (the server's cursor_from) in the middle of a day, and on a day without changes.
    assert persons(store.changes_page("s", cursor_before(uuid_ticks(at(DAY2, 6))), 100)) == ["d", "e", "f"]
    assert persons(store.changes_page("s", cursor_before(uuid_ticks(at(DAY3 - timedelta(days=1), 6))), 100)) == [
        "e", "f"]
    assert store.changes_page("s", changes[-1].change_id, 100) == []

    # `through`: only changes up to it, inclusive, whichever day it falls on.
    assert persons(all_pages(store, 2, through=changes[3].change_id)) == ["a", "b", "c", "d"]
    assert persons(store.changes_page("s", b, 100, through=changes[2].change_id)) == ["c"]
    assert persons(store.changes_page("s", FEED_START, 100, through=cursor_before(uuid_ticks(at(DAY2, 0, 1))))) == [
        "a", "b"]
    assert persons(store.changes_page("s", b, 100, through=cursor_before(uuid_ticks(at(DAY3, 0))))) == ["c", "d"]
    assert store.changes_page("s", changes[4].change_id, 100, through=b) == []


def test_a_chunked_write_across_midnight_indexes_both_days(segmentation_session: CassandraSession,
                                                           stamps: list[datetime]) -> None:
    store = SegmentStore(segmentation_session)
    start = at(DAY1, 23, 59)
    # 600 changes a second apart from 23:59: three chunks, the first on two days.
    record(store, stamps, *((f"p{i:03d}", start + timedelta(seconds=i)) for i in range(600)))
    assert days_indexed(segmentation_session) == [DAY1, DAY2]
    changes = all_pages(store, 97)
    assert persons(changes) == [f"p{i:03d}" for i in range(600)]
    assert [time_of(c.change_id).date() for c in changes[:60]] == [DAY1] * 60
    assert {time_of(c.change_id).date() for c in changes[60:]} == {DAY2}


def test_changes_of_the_old_table_come_in_order_with_the_new(segmentation_session: CassandraSession,
                                                             stamps: list[datetime]) -> None:
    store = SegmentStore(segmentation_session)
    # Recorded before the upgrade, one of them on a day the new log also has changes of.
    write_old(segmentation_session, "old1", at(DAY1 - timedelta(days=30), 9))
    write_old(segmentation_session, "old2", at(DAY1, 8))
    record(store, stamps, ("new1", at(DAY1, 10)), ("new2", at(DAY2, 10)))
    # A process not upgraded yet wrote to the old table between two changes of the new log.
    write_old(segmentation_session, "old3", at(DAY2, 11))
    record(store, stamps, ("new3", at(DAY3, 10)))
    assert days_indexed(segmentation_session) == [DAY1, DAY2, DAY3]  # the new changes in the day log
    expected = ["old1", "old2", "new1", "new2", "old3", "new3"]
    for limit in (1, 2, 3, 100):
        assert persons(all_pages(store, limit)) == expected, limit
    changes = all_pages(store, 100)
    assert [c.cause for c in changes] == ["recompute", "recompute", "realtime", "realtime", "recompute", "realtime"]
    assert persons(store.changes_page("s", changes[1].change_id, 2)) == ["new1", "new2"]
    assert persons(store.changes_page("s", changes[3].change_id, 100, through=changes[4].change_id)) == ["old3"]
    assert persons(all_pages(store, 2, through=changes[2].change_id)) == ["old1", "old2", "new1"]


def test_delete_history_removes_every_day(segmentation_session: CassandraSession, stamps: list[datetime]) -> None:
    store = SegmentStore(segmentation_session)
    write_old(segmentation_session, "old", at(DAY1, 8))
    record(store, stamps, ("a", at(DAY1, 10)), ("b", at(DAY2, 10)), ("c", at(DAY3, 10)))
    assert persons(all_pages(store, 100)) == ["old", "a", "b", "c"]
    assert days_indexed(segmentation_session) == [DAY1, DAY2, DAY3]

    SegmentStore(segmentation_session).delete_history("s")
    assert store.changes_page("s", FEED_START, 100) == []
    for table in ("membership_changes", "membership_change_days"):
        assert segmentation_session.execute(f"SELECT * FROM {table} WHERE segment_id = ?", ("s",)).one() is None
    for day in (DAY1, DAY2, DAY3):
        assert segmentation_session.execute("SELECT * FROM membership_change_log WHERE segment_id = ? AND day = ?",
                                            ("s", day)).one() is None


def test_changes_after_a_delete_by_another_process_are_found(segmentation_session: CassandraSession) -> None:
    """A process that indexed today before the segment was deleted (and created again under the same id)
    elsewhere writes its next changes of today without indexing the day again: they must still be read."""
    writer = SegmentStore(segmentation_session)
    writer.apply_changes("s", ["before"], [], "realtime", datetime.now(UTC))
    SegmentStore(segmentation_session).delete_history("s")
    assert writer.changes_page("s", FEED_START, 100) == []
    writer.apply_changes("s", ["after"], [], "realtime", datetime.now(UTC))
    assert persons(SegmentStore(segmentation_session).changes_page("s", FEED_START, 100)) == ["after"]
