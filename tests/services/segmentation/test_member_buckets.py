"""Segment members spread over MEMBER_BUCKETS partitions per segment (schema 0007), against real Cassandra.

Pages run in person id order across the buckets at every page size, counts add the buckets up, point reads
find members in their bucket, and members stored before the buckets (in the old one-partition `members`
table, written here directly) are merged into every read, moved out of it by an exit or enter, never counted
twice, and removed by `delete_history`."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.segmentation.store import MEMBER_BUCKETS, SegmentStore, bucket_of
from shared.cassandra import CassandraSession

pytestmark = pytest.mark.integration

WHEN = datetime(2026, 3, 1, 12, tzinfo=UTC)
OLD_WHEN = datetime(2025, 1, 1, tzinfo=UTC)


def all_pages(store: SegmentStore, segment_id: str, limit: int) -> list[str]:
    persons: list[str] = []
    after = ""
    while True:
        page = store.members_page(segment_id, after, limit)
        assert len(page) <= limit
        persons += [person_id for person_id, _ in page]
        if len(page) < limit:
            return persons
        after = page[-1][0]


def write_old(session: CassandraSession, segment_id: str, *persons: str) -> None:
    """Members as stored before schema 0007: rows of the one-partition `members` table."""
    session.execute_many("INSERT INTO members (segment_id, person_id, enter_time) VALUES (?, ?, ?)",
                         [(segment_id, person_id, OLD_WHEN) for person_id in persons])


def rows_in_buckets(session: CassandraSession, segment_id: str) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {}
    for bucket in range(MEMBER_BUCKETS):
        rows = session.execute("SELECT person_id FROM segment_members WHERE segment_id = ? AND bucket = ?",
                               (segment_id, bucket))
        persons = [row.person_id for row in rows]
        if persons:
            found[bucket] = persons
    return found


def old_rows(session: CassandraSession, segment_id: str) -> list[str]:
    return [row.person_id for row in session.execute("SELECT person_id FROM members WHERE segment_id = ?",
                                                     (segment_id,))]


def test_bucket_is_a_stable_hash() -> None:
    # Fixed values: a bucket must never change across processes or versions (not Python's salted hash()).
    assert [bucket_of(p) for p in ("p000", "p001", "alice", "")] == [12, 0, 9, 4]
    assert {bucket_of(f"p{i:03}") for i in range(200)} == set(range(MEMBER_BUCKETS))
    assert all(0 <= bucket_of(f"x{i}") < MEMBER_BUCKETS for i in range(100))


def test_members_spread_over_buckets_read_in_person_order(segmentation_session: CassandraSession) -> None:
    store = SegmentStore(segmentation_session)
    persons = [f"p{i:03}" for i in range(60)]
    store.apply_changes("s", list(reversed(persons)), [], "recompute", WHEN)
    store.apply_changes("other", ["p001", "q"], [], "recompute", WHEN)

    # Many partitions, each person in its own bucket, none in the old table.
    buckets = rows_in_buckets(segmentation_session, "s")
    assert len(buckets) > MEMBER_BUCKETS // 2
    assert all(bucket_of(p) == bucket for bucket, ps in buckets.items() for p in ps)
    assert sorted(p for ps in buckets.values() for p in ps) == persons
    assert old_rows(segmentation_session, "s") == []

    for limit in (1, 2, 3, 7, 16, 17, 59, 60, 61, 1000):
        assert all_pages(store, "s", limit) == persons, limit
    page = store.members_page("s", "p010", 5)
    assert page == [(p, WHEN) for p in ("p011", "p012", "p013", "p014", "p015")]
    assert store.members_page("s", "", 0) == []

    assert store.member_count("s") == 60
    assert store.member_counts(["s", "other", "none"]) == {"s": 60, "other": 2, "none": 0}
    assert store.member_ids("s") == set(persons)
    assert store.is_member("s", "p042") and not store.is_member("s", "q") and store.is_member("other", "q")
    assert store.memberships([("s", "p000"), ("s", "q"), ("other", "q"), ("other", "p002")]) == {
        ("s", "p000"), ("other", "q")}

    store.apply_changes("s", ["p999"], ["p000", "p030", "p059"], "realtime", WHEN)
    expected = [p for p in persons if p not in ("p000", "p030", "p059")] + ["p999"]
    for limit in (1, 4, 100):
        assert all_pages(store, "s", limit) == expected, limit
    assert store.member_count("s") == 58
    assert not store.is_member("s", "p030") and store.is_member("s", "p999")


def test_members_of_the_old_table_are_merged_moved_and_counted_once(segmentation_session: CassandraSession) -> None:
    store = SegmentStore(segmentation_session)
    write_old(segmentation_session, "s", "a", "c", "e", "g")
    store.apply_changes("s", ["b", "d", "f"], [], "realtime", WHEN)

    for limit in (1, 2, 3, 6, 7, 100):
        assert all_pages(store, "s", limit) == ["a", "b", "c", "d", "e", "f", "g"], limit
    assert store.members_page("s", "", 3) == [("a", OLD_WHEN), ("b", WHEN), ("c", OLD_WHEN)]
    assert store.member_count("s") == 7
    assert store.member_ids("s") == {"a", "b", "c", "d", "e", "f", "g"}
    assert store.is_member("s", "a") and store.is_member("s", "b") and not store.is_member("s", "z")
    assert store.memberships([("s", "a"), ("s", "d"), ("s", "z"), ("t", "a")]) == {("s", "a"), ("s", "d")}

    # An exit of a person only in the old table removes them there; an enter again of an old member moves
    # them to the buckets (not in both tables: counted once).
    store.apply_changes("s", ["c", "h"], ["a", "d", "z"], "realtime", WHEN)
    assert old_rows(segmentation_session, "s") == ["e", "g"]
    assert not store.is_member("s", "a") and store.is_member("s", "c")
    assert store.members_page("s", "b", 1) == [("c", WHEN)]
    for limit in (1, 2, 5, 100):
        assert all_pages(store, "s", limit) == ["b", "c", "e", "f", "g", "h"], limit
    assert store.member_count("s") == 6
    assert store.member_ids("s") == {"b", "c", "e", "f", "g", "h"}

    # An exit of the last old members empties the old partition; reads go on from the buckets alone.
    store.apply_changes("s", [], ["e", "g"], "recompute", WHEN)
    assert old_rows(segmentation_session, "s") == []
    assert all_pages(store, "s", 2) == ["b", "c", "f", "h"]
    assert store.member_count("s") == 4


def test_delete_history_drops_both_tables(segmentation_session: CassandraSession) -> None:
    store = SegmentStore(segmentation_session)
    write_old(segmentation_session, "s", "old1", "old2")
    store.apply_changes("s", [f"p{i}" for i in range(40)], [], "recompute", WHEN)
    store.apply_changes("keep", ["p1"], [], "recompute", WHEN)
    assert store.member_count("s") == 42

    store.delete_history("s")
    assert rows_in_buckets(segmentation_session, "s") == {}
    assert old_rows(segmentation_session, "s") == []
    assert store.member_count("s") == 0 and store.members_page("s", "", 10) == [] and store.member_ids("s") == set()
    assert store.member_ids("keep") == {"p1"}
