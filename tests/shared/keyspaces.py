"""Keyspaces of a test's own for the shared runtime's tests, holding only the tables a test declares."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shared.cassandra import CassandraSession, connect_cluster, open_session
from shared.config import CassandraSettings
from shared.migrations import apply_migrations, load_migrations


@contextmanager
def keyspace_of_its_own(tmp_path: Path, admin_session: CassandraSession, cassandra_settings: CassandraSettings,
                        service: str, schema: str) -> Iterator[CassandraSession]:
    """A session on the test's keyspace for `service`, holding only what `schema` (one migration) creates."""
    keyspace = cassandra_settings.keyspace(service)
    (tmp_path / "0001_schema.cql").write_text(schema)
    apply_migrations(admin_session, keyspace, load_migrations(tmp_path), cassandra_settings)
    cluster = connect_cluster(cassandra_settings)
    try:
        yield open_session(cluster, keyspace, cassandra_settings.request_timeout_seconds)
    finally:
        cluster.shutdown()
