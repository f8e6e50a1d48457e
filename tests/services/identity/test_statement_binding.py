"""The identity service's writes bound through CassandraSession's memoizing binder equal the driver's bind.

One test, one keyspace: each check needs only the identity tables' prepared statements.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from cassandra.query import UNSET_VALUE

from services.identity.graph import _INSERT_LINK, _INSERT_SIGHTING
from shared.cassandra import CassandraSession, bind_memoized

_OBSERVATIONS = ("INSERT INTO observations (message_id, identifiers, source, source_kind, event_time, recorded_at) "
                 "VALUES (?, ?, ?, ?, ?, ?)")


def _rows() -> list[tuple[str, tuple[object, ...]]]:
    aware = datetime(2026, 11, 24, 12, 0, 0, 123456, tzinfo=UTC)
    # The same instant, naive (the driver reads naive as UTC) and in another zone: equal bytes.
    naive, shifted = aware.replace(tzinfo=None), aware.astimezone(timezone(timedelta(hours=8)))
    return [
        (_INSERT_LINK, ("cookie", "ck-1", "device_id", "DEV-1", "m1", "web", 0, aware, aware)),
        (_INSERT_LINK, ("device_id", "DEV-1", "cookie", "ck-1", "m1", "web", 0, naive, shifted)),
        (_INSERT_LINK, ("cookie", "ck-1", "email", "a@b.c", "m2", None, 3, aware, naive)),
        (_INSERT_SIGHTING, ("cookie", "ck-1", "m1", aware)),
        (_INSERT_SIGHTING, ("cookie", "ck-1", "m2", shifted)),
        (_OBSERVATIONS, ("m1", [("cookie", "ck-1"), ("device_id", "DEV-1")], "web", 0, aware, aware)),
        (_OBSERVATIONS, ("m2", [("cookie", "ck-1")], "", 1, naive, naive)),
    ]


def test_memoized_binding_is_the_drivers_bind(identity_session: CassandraSession) -> None:
    _check_the_drivers_values_and_routing_keys(identity_session)
    _check_values_equal_in_python_but_not_in_storage(identity_session)
    _check_what_the_driver_treats_specially(identity_session)


def _check_the_drivers_values_and_routing_keys(identity_session: CassandraSession) -> None:
    serialized: dict[tuple[object, type, object], bytes] = {}
    for cql, params in _rows():
        statement = identity_session.prepare(cql)
        expected, bound = statement.bind(params), bind_memoized(statement, params, serialized)
        assert bound.values == expected.values, cql
        assert bound.routing_key == expected.routing_key
        assert bound.keyspace == expected.keyspace
        assert bound.raw_values == params
    # Values repeated across rows were serialized once: the memo holds each distinct one.
    assert len(serialized) < sum(len(params) for _, params in _rows())


def _check_values_equal_in_python_but_not_in_storage(identity_session: CassandraSession) -> None:
    statement = identity_session.prepare(_INSERT_LINK)
    serialized: dict[tuple[object, type, object], bytes] = {}
    # source_kind is an int column: True == 1 in Python, and bool is not memoized, so neither leaks into the other.
    first = bind_memoized(statement, ("a", "b", "c", "d", "m", "s", 1, None, None), serialized)
    second = bind_memoized(statement, ("a", "b", "c", "d", "m", "s", True, None, None), serialized)
    assert first.values == statement.bind(("a", "b", "c", "d", "m", "s", 1, None, None)).values
    assert second.values == statement.bind(("a", "b", "c", "d", "m", "s", True, None, None)).values


def _check_what_the_driver_treats_specially(identity_session: CassandraSession) -> None:
    """A short row, an unset value, a wrong type, too many values: the driver's own bind and errors."""
    statement = identity_session.prepare(_INSERT_SIGHTING)
    short = bind_memoized(statement, ("cookie", "ck-1", "m1"), {})  # the missing value is unset (protocol v5)
    assert short.values[-1] is UNSET_VALUE
    unset = bind_memoized(statement, ("cookie", "ck-1", "m1", UNSET_VALUE), {})
    assert unset.values[-1] is UNSET_VALUE
    with pytest.raises(TypeError, match="event_time"):
        bind_memoized(statement, ("cookie", "ck-1", "m1", "not a time"), {})
    with pytest.raises(ValueError, match="Too many arguments"):
        bind_memoized(statement, ("cookie", "ck-1", "m1", None, "extra"), {})
