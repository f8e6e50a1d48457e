"""How CassandraSession.write_all packs statements into unlogged batches (pure logic)."""

from __future__ import annotations

import pytest

from shared.cassandra import (
    BATCH_BYTES,
    BATCH_PARTITIONS,
    BATCH_STATEMENTS,
    CassandraSession,
    batch_bytes_for,
    connect_cluster,
    data_size_bytes,
    open_session,
    pack_batches,
)
from shared.config import CassandraSettings
from shared.migrations import create_keyspace


def _partition(name: str, statements: int, size: int = 10) -> list[tuple[str, int]]:
    return [(name, size)] * statements


def _size(statement: tuple[str, int]) -> int:
    return statement[1]


def _partitions_in(batch: list[tuple[str, int]]) -> set[str]:
    return {name for name, _ in batch}


@pytest.mark.unit
def test_small_partitions_share_batches_up_to_the_partition_limit() -> None:
    partitions = [_partition(f"p{i}", 3) for i in range(BATCH_PARTITIONS * 2 + 1)]
    batches = pack_batches(partitions, _size)
    assert [len(_partitions_in(b)) for b in batches] == [BATCH_PARTITIONS, BATCH_PARTITIONS, 1]
    assert sum(len(b) for b in batches) == 3 * len(partitions)


@pytest.mark.unit
def test_a_partition_is_never_split_across_shared_batches() -> None:
    partitions = [_partition(f"p{i}", 7) for i in range(50)]
    for batch in pack_batches(partitions, _size):
        assert all(len([s for s in batch if s[0] == name]) == 7 for name in _partitions_in(batch))


@pytest.mark.unit
def test_shared_batches_stay_under_the_size_warning() -> None:
    partitions = [_partition(f"p{i}", 2, size=BATCH_BYTES // 5) for i in range(12)]
    batches = pack_batches(partitions, _size)
    assert all(sum(_size(s) for s in b) <= BATCH_BYTES for b in batches)
    assert len(batches) > 1


@pytest.mark.unit
def test_a_large_partition_goes_alone_in_slices() -> None:
    big = _partition("big", BATCH_STATEMENTS * 2 + 5)
    batches = pack_batches([_partition("a", 1), big, _partition("b", 1)], _size)
    alone = [b for b in batches if _partitions_in(b) == {"big"}]
    assert [len(b) for b in alone] == [BATCH_STATEMENTS, BATCH_STATEMENTS, 5]
    assert any(_partitions_in(b) == {"a", "b"} for b in batches)


@pytest.mark.integration
def test_write_all_and_select_in_round_trip_many_partitions(cassandra_settings: CassandraSettings,
                                                            admin_session: CassandraSession) -> None:
    keyspace = cassandra_settings.keyspace("batches")
    create_keyspace(admin_session, keyspace, cassandra_settings)
    admin_session.execute(f"CREATE TABLE {keyspace}.rows (k text, c int, v text, PRIMARY KEY ((k), c))", timeout=60)
    cluster = connect_cluster(cassandra_settings)
    try:
        session = open_session(cluster, keyspace, 10)
        # 300 partitions of 1-3 rows and one partition far beyond a batch: every row lands, none twice.
        rows = [(f"k{i}", c, f"v{i}.{c}") for i in range(300) for c in range(i % 3 + 1)]
        rows += [("big", c, "x" * 100) for c in range(BATCH_STATEMENTS * 2 + 1)]
        session.write_all([("INSERT INTO rows (k, c, v) VALUES (?, ?, ?)", row) for row in rows])
        keys = [f"k{i}" for i in range(300)] + ["big", "absent"]
        found = session.select_in("SELECT k, c, v FROM rows WHERE k IN ?", (), keys).rows()
        assert sorted((r.k, r.c, r.v) for r in found) == sorted(rows)
    finally:
        cluster.shutdown()


@pytest.mark.unit
def test_the_warning_threshold_is_read_in_any_unit() -> None:
    assert [data_size_bytes(v) for v in ("16KiB", "5KiB", "5", "1MiB", "512B", "lots", "")] == [
        16384, 5120, 5120, 1024 * 1024, 512, None, None]


@pytest.mark.unit
def test_batches_are_cut_under_the_clusters_warning_threshold() -> None:
    """A cluster left at Cassandra's default (5 KiB) gets 5 KiB batches, OneCDP's (16 KiB) BATCH_BYTES, one that
    does not say the default's; a threshold of 0 (warn on every shared batch) leaves each partition alone."""
    assert [batch_bytes_for(v) for v in ("5KiB", "16KiB", "1MiB", None, "lots", "0KiB")] == [
        5120, BATCH_BYTES, BATCH_BYTES, 5120, 5120, 0]
    assert [len(b) for b in pack_batches([_partition(f"p{i}", 1, size=100) for i in range(3)], _size, 0)] == [1, 1, 1]


@pytest.mark.integration
def test_shared_batches_of_many_small_cells_draw_no_size_warning(cassandra_settings: CassandraSettings,
                                                                admin_session: CassandraSession,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """Cassandra sizes a batch by its cells (each value plus its timestamp, TTL and expiry), not by the values
    bound: rows of small numbers, packed by their values alone, were five times the size counted, past Cassandra's
    warning on every batch (an outside check: identity's log after the demo load was 11,783 of these warnings).
    Batches stay under the node's own threshold, whatever it is configured to."""
    keyspace = cassandra_settings.keyspace("batchcells")
    create_keyspace(admin_session, keyspace, cassandra_settings)
    columns = [f"n{i}" for i in range(16)]
    admin_session.execute(f"CREATE TABLE {keyspace}.counts (k text, c int, {', '.join(f'{n} int' for n in columns)}, "
                          "PRIMARY KEY ((k), c)) WITH default_time_to_live = 86400", timeout=60)
    threshold_setting = admin_session.execute("SELECT value FROM system_views.settings WHERE name = ?",
                                              ("batch_size_warn_threshold",)).one().value
    cluster = connect_cluster(cassandra_settings)
    try:
        session = open_session(cluster, keyspace, 10)
        assert session.batch_bytes() == batch_bytes_for(threshold_setting)
        rows = [(f"partition-{i:04d}", c, *range(16)) for i in range(100) for c in range(5)]
        insert = f"INSERT INTO counts (k, c, {', '.join(columns)}) VALUES ({', '.join('?' * 18)})"
        with caplog.at_level("WARNING", logger="cassandra.protocol"):
            session.write_all([(insert, row) for row in rows])
        assert len(session.execute("SELECT k FROM counts", ()).all()) == len(rows)
        warned = [r.getMessage() for r in caplog.records if "exceeding specified threshold" in r.getMessage()]
        assert not warned, warned[:1]
    finally:
        cluster.shutdown()
