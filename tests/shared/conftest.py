"""Fixtures for the shared runtime's tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.cassandra import CassandraSession, connect_cluster, open_session
from shared.config import CassandraSettings
from shared.migrations import apply_migrations, load_migrations


@pytest.fixture
def lease_session(tmp_path: Path, admin_session: CassandraSession,
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
