"""A driver failure while a later page of a read is fetched comes out as the same domain error as the first page's.

`CassandraSession.execute` translates driver errors (a timeout becomes UNAVAILABLE, or DEADLINE_EXCEEDED once
the caller's deadline passed), but iterating the ResultSet it returns fetches pages 2..n outside it: a timeout
there reached the gRPC caller as INTERNAL. Against real Cassandra: real paged reads (small pages over a few
rows) whose every fetch of a further page times out in the driver (`ResultSet.fetch_next_page` raises
OperationTimedOut, as it does when a page's response does not arrive in time).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sized
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cassandra import OperationTimedOut
from cassandra.cluster import ResultSet

import shared.cassandra
from services.identity.graph import IdentityGraph
from services.identity.partition import IdKey
from services.profile.store import ProfileStore
from services.segmentation.store import CATALOG, SegmentStore
from shared import deadline
from shared.cassandra import CassandraSession, connect_cluster, open_session
from shared.changefeed import FEED_START
from shared.config import CassandraSettings
from shared.errors import DeadlineExceeded, Unavailable
from shared.migrations import migrate_service
from tests.shared.keyspaces import keyspace_of_its_own

pytestmark = pytest.mark.integration

_MIN_TOKEN, _MAX_TOKEN = -(2**63), 2**63 - 1


def time_out_later_pages(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """From now on every fetch of a further page of any read times out; the list counts the fetches tried."""
    fetches: list[int] = []

    def time_out(result: ResultSet) -> None:
        fetches.append(len(result.current_rows))
        raise OperationTimedOut("no response for the next page (test)")

    monkeypatch.setattr(ResultSet, "fetch_next_page", time_out)
    return fetches


@pytest.fixture
def later_pages_time_out(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    return time_out_later_pages(monkeypatch)


@pytest.fixture
def items_session(tmp_path: Path, admin_session: CassandraSession,
                  cassandra_settings: CassandraSettings) -> Iterator[CassandraSession]:
    """A session on a keyspace of this test's own whose `items` table holds 3 partitions of 5 rows; reads without
    a fetch size of their own are paged 2 rows at a time."""
    with keyspace_of_its_own(tmp_path, admin_session, cassandra_settings, "items",
                             "CREATE TABLE IF NOT EXISTS {keyspace}.items (k int, c int, PRIMARY KEY (k, c));"
                             ) as session:
        session.write_all([("INSERT INTO items (k, c) VALUES (?, ?)", (k, c)) for k in range(3) for c in range(5)])
        session.driver_session.default_fetch_size = 2
        yield session


def _assert_unavailable(error: Unavailable) -> None:
    assert error.reason == "STORAGE_UNAVAILABLE"
    assert "OperationTimedOut" in error.message
    assert isinstance(error.__cause__, OperationTimedOut)


def test_paged_reads_return_every_row(items_session: CassandraSession) -> None:
    # The helpers read every page (fetch size 2 over 5 rows: 3 pages), in clustering order.
    cql = "SELECT c FROM items WHERE k = ?"
    assert [row.c for row in items_session.rows(cql, (1,), fetch_size=2)] == [0, 1, 2, 3, 4]
    assert [row.c for row in items_session.iterate(cql, (1,), fetch_size=2)] == [0, 1, 2, 3, 4]
    pending = items_session.start_reads(cql, [(0,), (2,)], limited=False)
    assert sorted(row.c for row in pending.rows()) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_reads_asked_for_as_tuples_give_tuples_on_every_page_and_read_again(
        items_session: CassandraSession, monkeypatch: pytest.MonkeyPatch) -> None:
    cql = "SELECT k, c FROM items WHERE k = ?"
    paged = list(items_session.iterate(cql, (1,), fetch_size=2, tuples=True))  # 3 pages
    assert paged == [(1, c) for c in range(5)] and all(type(row) is tuple for row in paged)
    pending = items_session.start_reads(cql, [(0,), (2,)], limited=False, tuples=True)
    assert sorted(pending.rows()) == sorted((k, c) for k in (0, 2) for c in range(5))
    # An IN read that fills its LIMIT is read again without it: as tuples too.
    monkeypatch.setattr(shared.cassandra, "IN_READ_ROWS", 2)
    rows = items_session.select_in("SELECT k, c FROM items WHERE k IN ?", (), [0, 1, 2], tuples=True).rows()
    assert sorted(rows) == [(k, c) for k in range(3) for c in range(5)] and all(type(row) is tuple for row in rows)
    assert all(hasattr(row, "c") for row in items_session.rows(cql, (1,)))  # Rows otherwise, as before


def test_a_later_page_of_a_list_read_fails_translated(items_session: CassandraSession,
                                                      later_pages_time_out: list[int]) -> None:
    with pytest.raises(Unavailable) as raised:
        items_session.rows("SELECT c FROM items WHERE k = ?", (1,), fetch_size=2)
    _assert_unavailable(raised.value)
    assert later_pages_time_out == [2]  # the first page arrived; fetching the second failed


def test_a_later_page_of_a_streamed_read_fails_translated(items_session: CassandraSession,
                                                          later_pages_time_out: list[int]) -> None:
    rows = items_session.iterate("SELECT k, c FROM items", fetch_size=2)
    assert len([next(rows), next(rows)]) == 2  # the first page, before any further one is fetched
    assert later_pages_time_out == []
    with pytest.raises(Unavailable) as raised:
        next(rows)
    _assert_unavailable(raised.value)


def test_a_later_page_past_the_callers_deadline_is_deadline_exceeded(items_session: CassandraSession,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def time_out_at_the_deadline(result: ResultSet) -> None:
        time.sleep(max(0.0, deadline.remaining() or 0.0))
        raise OperationTimedOut("no response for the next page (test)")

    monkeypatch.setattr(ResultSet, "fetch_next_page", time_out_at_the_deadline)
    with deadline.deadline_after(2.0):
        rows = items_session.iterate("SELECT c FROM items WHERE k = ?", (0,), fetch_size=2)
        assert [row.c for row in (next(rows), next(rows))] == [0, 1]
        with pytest.raises(DeadlineExceeded) as raised:
            next(rows)
    assert raised.value.reason == "STORAGE_DEADLINE"


def test_a_later_page_of_pending_range_reads_fails_translated(items_session: CassandraSession,
                                                              later_pages_time_out: list[int]) -> None:
    # limited=False: each read is paged by the driver (its default fetch size: 2 here).
    pending = items_session.start_reads("SELECT c FROM items WHERE k = ?", [(0,), (1,)], limited=False)
    with pytest.raises(Unavailable) as raised:
        pending.rows()
    _assert_unavailable(raised.value)


def test_a_later_page_of_a_pending_read_again_without_its_limit_fails_translated(
        items_session: CassandraSession, later_pages_time_out: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    # An IN read that fills its LIMIT is read again without it, paged: its second page fails.
    monkeypatch.setattr(shared.cassandra, "IN_READ_ROWS", 2)
    pending = items_session.select_in("SELECT k, c FROM items WHERE k IN ?", (), [0, 1, 2])
    with pytest.raises(Unavailable) as raised:
        pending.rows()
    _assert_unavailable(raised.value)
    assert later_pages_time_out == [2]  # the limited read's later pages are never fetched; the re-read's are


@contextmanager
def service_session(cluster_settings: CassandraSettings, admin_session: CassandraSession,
                    service: str) -> Iterator[CassandraSession]:
    """A session on `service`'s migrated keyspace of this test."""
    migrate_service(admin_session, service, cluster_settings)
    cluster = connect_cluster(cluster_settings)
    try:
        yield open_session(cluster, cluster_settings.keyspace(service), cluster_settings.request_timeout_seconds)
    finally:
        cluster.shutdown()


@pytest.mark.parametrize("read", ["all", "references", "running_operations"])
def test_segment_store_reads_fail_translated_on_a_later_page(read: str, admin_session: CassandraSession,
                                                             cassandra_settings: CassandraSettings,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    with service_session(cassandra_settings, admin_session, "segmentation") as session:
        # More segments than all()'s page of 1000; reads with the default fetch size are paged by 2.
        session.write_all([("INSERT INTO segments (catalog, segment_id, rule_text, revision, state, etag) "
                            "VALUES (?, ?, ?, ?, ?, ?)", (CATALOG, f"s{n:04d}", "true", 1, 0, "e"))
                           for n in range(1001)]
                          + [("INSERT INTO running_operations (catalog, operation_id) VALUES (?, ?)",
                              (CATALOG, f"op{n}")) for n in range(3)])
        session.driver_session.default_fetch_size = 2
        store = SegmentStore(session)
        assert len(store.all()) == 1001
        assert len(store.references()[0]) == 1001
        assert sorted(store.running_operations()) == ["op0", "op1", "op2"]

        time_out_later_pages(monkeypatch)
        with pytest.raises(Unavailable) as raised:
            getattr(store, read)()
        _assert_unavailable(raised.value)


@pytest.mark.parametrize("read", ["member_ids", "members_page", "changes_page"])
def test_segment_member_reads_fail_translated_on_a_later_page(read: str, admin_session: CassandraSession,
                                                              cassandra_settings: CassandraSettings,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    with service_session(cassandra_settings, admin_session, "segmentation") as session:
        store = SegmentStore(session)
        # 40 members over 16 buckets: some bucket holds 3 or more, more than a page of 2.
        store.apply_changes("big", [f"p{n:02d}" for n in range(40)], [], "test", datetime.now(UTC))
        session.driver_session.default_fetch_size = 2

        def read_them() -> Sized:
            if read == "member_ids":
                return store.member_ids("big")
            if read == "members_page":
                return store.members_page("big", "", 100)
            return store.changes_page("big", FEED_START, 100)
        assert len(read_them()) == 40

        time_out_later_pages(monkeypatch)
        with pytest.raises(Unavailable) as raised:
            read_them()
        _assert_unavailable(raised.value)


def test_a_profile_scan_streams_and_fails_translated_on_a_later_page(admin_session: CassandraSession,
                                                                     cassandra_settings: CassandraSettings,
                                                                     later_pages_time_out: list[int]) -> None:
    with service_session(cassandra_settings, admin_session, "profile") as session:
        now = datetime.now(UTC)
        session.write_all([("INSERT INTO profiles (person_id, update_time) VALUES (?, ?)", (f"p{n}", now))
                           for n in range(5)])
        scan = ProfileStore(session).scan(_MIN_TOKEN, _MAX_TOKEN, page_size=2)
        assert len([next(scan), next(scan)]) == 2
        assert later_pages_time_out == []  # streamed: the next page is fetched only when reached
        with pytest.raises(Unavailable) as raised:
            next(scan)
        _assert_unavailable(raised.value)


@pytest.mark.parametrize("read", ["person_members", "neighbours_of"])
def test_identity_graph_reads_fail_translated_on_a_later_page(read: str, admin_session: CassandraSession,
                                                              cassandra_settings: CassandraSettings,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # A person can hold up to MAX_COMPONENT_IDENTIFIERS identifiers, an identifier link to as many: more than a
    # page of the driver's (5000 rows by default; 2 here).
    with service_session(cassandra_settings, admin_session, "identity") as session:
        session.write_all([("INSERT INTO person_identifiers (person_id, id_type, id_value) VALUES (?, ?, ?)",
                            ("p1", "email", f"e{n}")) for n in range(5)]
                          + [("INSERT INTO links (id_type, id_value, other_type, other_value, message_id) "
                              "VALUES (?, ?, ?, ?, ?)", ("email", "e0", "device", f"d{n}", "m1")) for n in range(5)])
        session.driver_session.default_fetch_size = 2
        graph = IdentityGraph(session)
        arguments = {"person_members": ("p1",), "neighbours_of": (IdKey("email", "e0"),)}[read]
        assert len(getattr(graph, read)(*arguments)) == 5

        time_out_later_pages(monkeypatch)
        with pytest.raises(Unavailable) as raised:
            getattr(graph, read)(*arguments)
        _assert_unavailable(raised.value)
