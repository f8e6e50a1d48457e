"""The floor of any lookup that reads Cassandra, as its own process: `python -m bench.read_echo_server`.

The server bootstrap every service uses (shared.server.create_server, as bench.echo_server) with one
method, `/onecdp.bench.ReadEcho/Read`: the request's bytes are a person id, and the call makes the one
read a lookup of a known identifier makes (services.identity.graph: a person's partition of
`person_identifiers`, its static columns and members) through shared.cassandra, and answers the number
of rows. No protobuf, no validation, no identity logic: what is left of a lookup's cost is gRPC plus one
Cassandra read. bench.identity compares LookupPerson with it and it with the bare echo, so a lookup's
figure can be read as "gRPC + Cassandra + the service's own work".

Port in ONECDP_READ_ECHO_PORT; Cassandra and keyspaces from the same settings as the services.
"""

from __future__ import annotations

import os

import grpc

from shared.cassandra import CassandraSession, connect_cluster, open_session
from shared.config import CassandraSettings, GrpcSettings
from shared.server import ServiceRegistration, create_server, serve_until_signalled
from shared.telemetry import configure_logging

PORT_VARIABLE = "ONECDP_READ_ECHO_PORT"
SERVICE_NAME = "onecdp.bench.ReadEcho"
METHOD = f"/{SERVICE_NAME}/Read"
# The read a lookup by a known identifier makes (graph.IdentityGraph._read_person_rows).
_READ_PERSON = ("SELECT person_id, merged_into, merged_from, erased, create_time, update_time, id_type, id_value "
                "FROM person_identifiers WHERE person_id = ?")


def registration(session: CassandraSession) -> ServiceRegistration:
    def read(request: bytes, context: grpc.ServicerContext) -> bytes:
        rows = session.execute(_READ_PERSON, (request.decode(),)).all()
        return str(len(rows)).encode()

    handler = grpc.method_handlers_generic_handler(SERVICE_NAME, {"Read": grpc.unary_unary_rpc_method_handler(read)})
    return ServiceRegistration(SERVICE_NAME, lambda server: server.add_generic_rpc_handlers((handler,)))


def main() -> None:
    settings = GrpcSettings()
    cassandra = CassandraSettings()
    configure_logging("read-echo", settings)
    cluster = connect_cluster(cassandra)
    session = open_session(cluster, cassandra.keyspace("identity"), cassandra.request_timeout_seconds)
    server = create_server([registration(session)], settings, port=int(os.environ.get(PORT_VARIABLE, "0")),
                           error_domain="onecdp.bench")
    try:
        serve_until_signalled(server, settings.grace_period_seconds)
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
