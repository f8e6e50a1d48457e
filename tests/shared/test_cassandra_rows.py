"""Rows come back as namedtuples like the driver's, with one Row class per column list."""

from __future__ import annotations

import pytest
from cassandra.cluster import EXEC_PROFILE_DEFAULT
from cassandra.query import named_tuple_factory

from shared.cassandra import ROWS_PROFILE, TUPLES_PROFILE, _profile_for, cached_named_tuple_factory

pytestmark = pytest.mark.unit


def test_rows_read_like_the_drivers_and_share_their_class() -> None:
    columns = ["person_id", "merged_into", "token(person_id)"]
    rows = [("p1", None, 7), ("p2", "p1", -3)]
    ours = cached_named_tuple_factory(columns, rows)
    theirs = named_tuple_factory(columns, rows)
    assert [tuple(r) for r in ours] == [tuple(r) for r in theirs]
    assert ours[0]._fields == theirs[0]._fields
    assert ours[1].merged_into == "p1"
    again = cached_named_tuple_factory(list(columns), [("p3", None, 0)])
    assert type(again[0]) is type(ours[0]), "the Row class is built once per column list"
    assert type(cached_named_tuple_factory(["other"], [(1,)])[0]) is not type(ours[0])


@pytest.mark.parametrize(("cql", "lwt"), [
    ("INSERT INTO locks (k, owner) VALUES (?, ?) IF NOT EXISTS", True),
    ("update persons set merged_into = ? where person_id = ? if merged_into = ?", True),
    ("DELETE FROM leases WHERE bucket = ? AND lease_key = ? IF owner = ?", True),
    ("CREATE TABLE IF NOT EXISTS t (a int PRIMARY KEY)", False),
    ("SELECT a FROM t WHERE k = ?", False),
    ("INSERT INTO t (a, notified) VALUES (?, ?)", False),
])
def test_lightweight_transactions_keep_the_drivers_row_factory(cql: str, lwt: bool) -> None:
    # ResultSet.was_applied refuses any row factory but the driver's own.
    assert (_profile_for(cql) == EXEC_PROFILE_DEFAULT) is lwt
    assert (_profile_for(cql) == ROWS_PROFILE) is not lwt
    # Rows asked for as tuples: a lightweight transaction still answers with the driver's factory.
    assert _profile_for(cql, True) == (EXEC_PROFILE_DEFAULT if lwt else TUPLES_PROFILE)
