"""Leases serialize recomputation between threads of one process as well as between processes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from services.identity.graph import IdentityGraph
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
        graph.close()
        cluster.shutdown()


def test_a_held_lease_is_refused_to_another_acquisition_of_the_same_process(graph: IdentityGraph) -> None:
    first = graph._acquire(["p:someone", "i:cookie:abc"])
    assert first is not None
    assert graph._acquire(["i:cookie:abc"]) is None
    graph._release(["p:someone", "i:cookie:abc"], first)
    second = graph._acquire(["i:cookie:abc"])
    assert second is not None and second != first
