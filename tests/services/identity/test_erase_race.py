"""An observation that passed the tombstone check just before an erasure must not bring the identifier back."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from services.identity.graph import Evidence, GuardKind, IdentityGraph, RawObservation
from services.identity.partition import IdKey
from shared.cassandra import CassandraSession, connect_cluster, open_session
from shared.config import CassandraSettings
from shared.migrations import migrate_service

pytestmark = pytest.mark.integration


@pytest.fixture
def graph(cassandra_settings: CassandraSettings, admin_session: CassandraSession) -> Iterator[IdentityGraph]:
    migrate_service(admin_session, "identity", cassandra_settings)
    cluster = connect_cluster(cassandra_settings)
    graph = IdentityGraph(open_session(cluster, cassandra_settings.keyspace("identity"), 10))
    try:
        yield graph
    finally:
        cluster.shutdown()


def test_evidence_appended_after_an_erasure_is_dropped_under_the_lease(graph: IdentityGraph) -> None:
    email, cookie, late_cookie = IdKey("email", "gone@x.io"), IdKey("cookie", "c1"), IdKey("cookie", "late")
    graph.link([RawObservation([("email", "gone@x.io"), ("cookie", "c1")], Evidence("m1"))])
    person = graph.persons_of([email])[email]
    assert person
    graph.erase(person, allow_relink=False, reason="test")
    # The late observation checked the tombstones before the erasure wrote them, and appends its
    # evidence after the erasure finished: what link() does between its check and its recomputation.
    graph._append_evidence([([email, late_cookie], Evidence("m2"))])
    reconciled = graph.reconcile({email, late_cookie}, "late observation")
    assert reconciled.erased == {email}
    assert graph.persons_of([email, cookie]) == {email: None, cookie: None}
    assert graph.neighbours_of(email) == set() and graph.neighbours_of(late_cookie) == set()
    assert graph.persons_of([late_cookie])[late_cookie]
    # A call that sees the tombstone at once says so.
    outcome = graph.link([RawObservation([("email", "gone@x.io"), ("cookie", "late")], Evidence("m3"))])[0]
    assert [d.guard for d in outcome.guard_decisions] == [GuardKind.ERASED]
