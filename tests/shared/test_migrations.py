"""Schema migrations against the real Cassandra: applied once, in order, never silently edited."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.cassandra import CassandraSession
from shared.config import SERVICE_NAMES, CassandraSettings
from shared.errors import FailedPrecondition
from shared.migrations import apply_migrations, load_migrations, services_to_migrate, split_statements


def test_split_statements_drops_comments_and_splits_on_line_end_semicolons() -> None:
    script = "-- a comment\nCREATE TABLE a (k int PRIMARY KEY);\n\nCREATE TABLE b (\n  k text PRIMARY KEY\n);\n"
    assert split_statements(script) == ["CREATE TABLE a (k int PRIMARY KEY)",
                                        "CREATE TABLE b (\n  k text PRIMARY KEY\n)"]


def test_migration_files_must_be_numbered(tmp_path: Path) -> None:
    (tmp_path / "init.cql").write_text("CREATE TABLE IF NOT EXISTS a (k int PRIMARY KEY);")
    with pytest.raises(ValueError, match=r"NNNN_lower_snake\.cql"):
        load_migrations(tmp_path)


def _write(schema: Path, name: str, cql: str) -> None:
    (schema / name).write_text(cql, encoding="utf-8")


@pytest.mark.integration
def test_migrations_apply_once_in_order_and_refuse_edits(
        tmp_path: Path, admin_session: CassandraSession, cassandra_settings: CassandraSettings) -> None:
    keyspace = cassandra_settings.keyspace("identity")
    _write(tmp_path, "0001_people.cql",
           "CREATE TABLE IF NOT EXISTS {keyspace}.people (id text PRIMARY KEY, name text);")
    _write(tmp_path, "0002_email.cql", "ALTER TABLE {keyspace}.people ADD IF NOT EXISTS email text;")

    applied = apply_migrations(admin_session, keyspace, load_migrations(tmp_path), cassandra_settings)
    assert [m.version for m in applied] == [1, 2]
    columns = {row.column_name for row in admin_session.execute(
        "SELECT column_name FROM system_schema.columns WHERE keyspace_name = ? AND table_name = ?",
        (keyspace, "people"))}
    assert columns == {"id", "name", "email"}

    assert apply_migrations(admin_session, keyspace, load_migrations(tmp_path), cassandra_settings) == []

    _write(tmp_path, "0002_email.cql", "ALTER TABLE {keyspace}.people ADD IF NOT EXISTS phone text;")
    with pytest.raises(FailedPrecondition, match="edited after it was applied"):
        apply_migrations(admin_session, keyspace, load_migrations(tmp_path), cassandra_settings)


@pytest.mark.unit
def test_the_command_line_migrates_every_service_unless_told_which() -> None:
    assert services_to_migrate([]) == list(SERVICE_NAMES)
    assert services_to_migrate(["profile", "identity"]) == ["profile", "identity"]
    with pytest.raises(SystemExit):
        services_to_migrate(["nonsense"])
