"""Versioned schema migrations, one keyspace per service.

A service's migrations are the files `services/<name>/schema/NNNN_<what>.cql`, applied in version
order. Each applied version is recorded (with a checksum) in the keyspace's `schema_migrations`
table, so re-applying is a no-op and an edited, already-applied file is refused instead of silently
diverging. Statements must themselves be idempotent (`IF NOT EXISTS`), which makes two processes
migrating at once harmless.

    python -m shared.migrations identity profile ...   # apply (what the launcher and the k8s Job run)
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.resources
import logging
import re
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from shared.cassandra import CassandraSession, connect_cluster, open_session
from shared.config import SERVICE_NAMES, CassandraSettings
from shared.errors import FailedPrecondition

log = logging.getLogger(__name__)

# Schema changes wait for every node to agree on the new schema; on a busy or small cluster that takes
# longer than an ordinary query may, and a timed-out DDL statement is ambiguous, so they get longer.
SCHEMA_TIMEOUT_SECONDS = 60.0
_FILE_NAME = re.compile(r"(\d{4})_([a-z0-9_]+)\.cql")  # fullmatch, as _IDENTIFIER
_IDENTIFIER = re.compile(r"[a-z][a-z0-9_]{0,47}")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]
    checksum: str


def split_statements(cql: str) -> list[str]:
    """Split a CQL script on `;` at line ends, dropping `--` comment lines."""
    lines = [line for line in cql.splitlines() if not line.strip().startswith("--")]
    statements = [part.strip() for part in re.split(r";\s*(?:\n|$)", "\n".join(lines))]
    return [statement for statement in statements if statement]


def load_migrations(schema_dir: Path) -> list[Migration]:
    migrations = []
    for path in sorted(schema_dir.glob("*.cql")):
        match = _FILE_NAME.fullmatch(path.name)
        if not match:
            raise ValueError(f"{path}: migration files are named NNNN_lower_snake.cql")
        text = path.read_text(encoding="utf-8")
        migrations.append(Migration(
            version=int(match.group(1)),
            name=match.group(2),
            statements=tuple(split_statements(text)),
            checksum=hashlib.sha256(text.encode()).hexdigest(),
        ))
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise ValueError(f"{schema_dir}: two migrations share a version number")
    return migrations


def service_schema_dir(service: str) -> Path:
    return Path(str(importlib.resources.files(f"services.{service}") / "schema"))


def create_keyspace(session: CassandraSession, keyspace: str, settings: CassandraSettings) -> None:
    # Names cannot be bind markers in CQL, so they are checked against strict patterns instead.
    if not _IDENTIFIER.fullmatch(keyspace):
        raise ValueError(f"unsafe keyspace name {keyspace!r}")
    if not re.fullmatch(r"[A-Za-z0-9_\-]{1,48}", settings.local_dc):
        raise ValueError(f"unsafe datacenter name {settings.local_dc!r}")
    session.execute(
        f"CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = "
        f"{{'class': 'NetworkTopologyStrategy', '{settings.local_dc}': {settings.replication_factor}}}",
        timeout=SCHEMA_TIMEOUT_SECONDS)
    session.execute(
        f"CREATE TABLE IF NOT EXISTS {keyspace}.schema_migrations ("
        "version int PRIMARY KEY, name text, checksum text, applied_at timestamp)", timeout=SCHEMA_TIMEOUT_SECONDS)


def apply_migrations(session: CassandraSession, keyspace: str, migrations: list[Migration],
                     settings: CassandraSettings) -> list[Migration]:
    """Create the keyspace if needed and apply the migrations not yet recorded; returns those applied."""
    create_keyspace(session, keyspace, settings)
    rows = session.execute(f"SELECT version, name, checksum FROM {keyspace}.schema_migrations")
    recorded = {row.version: row for row in rows}
    applied = []
    for migration in migrations:
        known = recorded.get(migration.version)
        if known is not None:
            if known.checksum != migration.checksum:
                raise FailedPrecondition(
                    f"migration {migration.version:04d}_{migration.name} of keyspace {keyspace} was edited after it "
                    "was applied; add a new migration instead of changing an applied one",
                    reason="MIGRATION_CHECKSUM_MISMATCH")
            continue
        for statement in migration.statements:
            session.execute(statement.replace("{keyspace}", keyspace), timeout=SCHEMA_TIMEOUT_SECONDS)
        session.execute(
            f"INSERT INTO {keyspace}.schema_migrations (version, name, checksum, applied_at) "
            "VALUES (?, ?, ?, ?) IF NOT EXISTS",
            (migration.version, migration.name, migration.checksum, datetime.now(UTC)),
        )
        applied.append(migration)
        log.info("applied migration", extra={"keyspace": keyspace, "version": migration.version,
                                              "migration": migration.name})
    return applied


def migrate_service(session: CassandraSession, service: str, settings: CassandraSettings) -> list[Migration]:
    return apply_migrations(session, settings.keyspace(service), load_migrations(service_schema_dir(service)),
                            settings)


def add_services_argument(parser: argparse.ArgumentParser) -> None:
    """The positional `service ...` argument of the commands that migrate (see `chosen_services`)."""
    # Checked in chosen_services, not with `choices`: argparse (3.11) checks the empty list of a bare
    # `nargs="*"` against the choices as one value and refuses it, so no arguments would be an error.
    parser.add_argument("services", nargs="*", metavar="service",
                        help=f"services to migrate: {', '.join(SERVICE_NAMES)} (default: all)")


def chosen_services(parser: argparse.ArgumentParser, services: list[str]) -> list[str]:
    """The services named on the command line; all of them when none is; a usage error for others."""
    unknown = [s for s in services if s not in SERVICE_NAMES]
    if unknown:
        parser.error(f"unknown service {', '.join(unknown)}; expected some of {', '.join(SERVICE_NAMES)}")
    return services or list(SERVICE_NAMES)


def services_to_migrate(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description="Apply OneCDP schema migrations.")
    add_services_argument(parser)
    return chosen_services(parser, parser.parse_args(argv).services)


def main(argv: list[str] | None = None) -> int:
    services = services_to_migrate(argv)
    settings = CassandraSettings()
    cluster = connect_cluster(settings)
    try:
        session = open_session(cluster, None, settings.request_timeout_seconds)
        for service in services:
            applied = migrate_service(session, service, settings)
            names = ", ".join(f"{m.version:04d}_{m.name}" for m in applied) or "already current"
            print(f"{settings.keyspace(service)}: {names}")
    finally:
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
