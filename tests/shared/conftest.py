"""Fixtures for the shared runtime's tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.cassandra import CassandraSession
from shared.config import CassandraSettings
from tests.shared.keyspaces import keyspace_of_its_own


@pytest.fixture
def lease_session(tmp_path: Path, admin_session: CassandraSession,
                  cassandra_settings: CassandraSettings) -> Iterator[CassandraSession]:
    """A session on a keyspace of this test's own holding the table shared.leases documents."""
    with keyspace_of_its_own(tmp_path, admin_session, cassandra_settings, "profile",
                             "CREATE TABLE IF NOT EXISTS {keyspace}.follower_leases "
                             "(name text PRIMARY KEY, owner text);") as session:
        yield session
