"""Start a OneCDP service: settings, logs, tracing, Cassandra, migrations, gRPC server, shutdown.

Each service package defines a `ServiceDefinition` (its name and how to build its gRPC servicers
from a `ServiceContext`); `main` runs it as a process and `start_service` runs it in-process on any
port (tests bind port 0 and call it through a real channel).
"""

from __future__ import annotations

import gc
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cassandra.cluster import Cluster

from shared.cassandra import CassandraSession, connect_cluster, open_session
from shared.config import CassandraSettings, GrpcSettings
from shared.errors import error_domain
from shared.migrations import migrate_service
from shared.server import RunningServer, ServiceRegistration, create_server, serve_until_signalled
from shared.telemetry import configure_logging, configure_tracing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceContext:
    """What a service's build function gets: its settings and a session on its own keyspace."""

    service: str
    grpc_settings: GrpcSettings
    cassandra_settings: CassandraSettings
    session: CassandraSession
    stop_callbacks: list[Callable[[], None]] = field(default_factory=list)

    def on_stop(self, callback: Callable[[], None]) -> None:
        """Run `callback` when the service stops, after the server drained and before Cassandra closes
        (background workers such as feed followers stop here). Callbacks run in reverse order of
        registration, like an ExitStack: a channel opened before the worker that calls through it closes
        after that worker stopped."""
        self.stop_callbacks.append(callback)


@dataclass(frozen=True)
class ServiceDefinition:
    name: str
    build: Callable[[ServiceContext], Sequence[ServiceRegistration]]


@dataclass
class RunningService:
    name: str
    server: RunningServer
    cluster: Cluster
    stop_callbacks: list[Callable[[], None]] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.server.port

    def stop(self, grace: float | None = None) -> None:
        self.server.stop(grace).wait()
        self.close()

    def close(self) -> None:
        """Stop background work, then the Cassandra connections (the server has stopped)."""
        for callback in reversed(self.stop_callbacks):
            callback()
        self.cluster.shutdown()


def start_service(
    definition: ServiceDefinition,
    grpc_settings: GrpcSettings,
    cassandra_settings: CassandraSettings,
    *,
    port: int | None = None,
    bind_host: str | None = None,
) -> RunningService:
    """Connect, migrate (if configured), build and start the service; returns once it serves."""
    cluster = connect_cluster(cassandra_settings)
    stop_callbacks: list[Callable[[], None]] = []
    try:
        timeout = cassandra_settings.request_timeout_seconds
        if grpc_settings.migrate_on_start:
            migrate_service(open_session(cluster, None, timeout), definition.name, cassandra_settings)
        session = open_session(cluster, cassandra_settings.keyspace(definition.name), timeout)
        context = ServiceContext(definition.name, grpc_settings, cassandra_settings, session, stop_callbacks)
        registrations = definition.build(context)
        server = create_server(
            registrations, grpc_settings,
            port=grpc_settings.port_of(definition.name) if port is None else port,
            bind_host=bind_host, error_domain=error_domain(definition.name),
        )
    except BaseException:
        for callback in reversed(stop_callbacks):
            callback()
        cluster.shutdown()
        raise
    return RunningService(definition.name, server, cluster, stop_callbacks)


def main(definition: ServiceDefinition) -> None:
    """Run one service as a process until SIGTERM; exit status 0 after a clean shutdown."""
    grpc_settings = GrpcSettings()
    configure_logging(definition.name, grpc_settings)
    configure_tracing(definition.name, grpc_settings)
    cassandra_settings = CassandraSettings()
    try:
        service = start_service(definition, grpc_settings, cassandra_settings)
    except Exception as error:
        log.error("could not start", extra={"error": f"{type(error).__name__}: {error}"})
        sys.exit(1)
    # Everything built so far (modules, the driver's metadata, prepared statements) lives as long as the
    # process: out of the cycle collector's sight, a full collection walks only what requests made since,
    # instead of pausing every request for tens of milliseconds to walk it all again every few seconds.
    # The price: a startup object that later becomes cyclic garbage (driver metadata replaced on a schema
    # refresh) is never collected, a bounded leak of what startup built.
    gc.freeze()
    log.info("serving", extra={"port": service.port, "keyspace": cassandra_settings.keyspace(definition.name),
                               "services": list(service.server.service_names)})
    serve_until_signalled(service.server, grpc_settings.grace_period_seconds)
    service.close()
