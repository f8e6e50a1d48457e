"""Identity test helpers; the identity service fixture (in process, own keyspace) is in tests/conftest.py."""

from __future__ import annotations

import itertools
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from cassandra.cluster import Session
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from onecdp.common.v1 import common_pb2
from onecdp.identity.v1 import identity_service_pb2 as pb
from onecdp.identity.v1 import identity_service_pb2_grpc as pb_grpc

from services.identity.graph import IdentityGraph
from services.identity.server import DEFINITION
from shared.cassandra import CassandraSession, connect_cluster, open_session
from shared.config import CassandraSettings, GrpcSettings
from shared.migrations import migrate_service
from shared.runner import RunningService, start_service

_message_ids = itertools.count()


@pytest.fixture
def identity_session(cassandra_settings: CassandraSettings,
                     admin_session: CassandraSession) -> Iterator[CassandraSession]:
    """A session on a migrated identity keyspace of this test's own, for tests of the domain code."""
    migrate_service(admin_session, "identity", cassandra_settings)
    cluster = connect_cluster(cassandra_settings)
    try:
        yield open_session(cluster, cassandra_settings.keyspace("identity"), 10)
    finally:
        cluster.shutdown()


@pytest.fixture
def graph(identity_session: CassandraSession) -> IdentityGraph:
    return IdentityGraph(identity_session)


@pytest.fixture
def identity(identity_service: RunningService) -> Iterator[pb_grpc.IdentityServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{identity_service.port}") as channel:
        yield pb_grpc.IdentityServiceStub(channel)


@pytest.fixture
def other_identity(identity_service: RunningService, grpc_settings: GrpcSettings,
                   cassandra_settings: CassandraSettings) -> Iterator[pb_grpc.IdentityServiceStub]:
    """A second identity process on the same keyspace (another replica), started after the first one."""
    service = start_service(DEFINITION, grpc_settings, cassandra_settings, port=0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            yield pb_grpc.IdentityServiceStub(channel)
    finally:
        service.stop(None)


@pytest.fixture
def reads() -> Iterator[Counter[str]]:
    """Reads of `identifiers` and `person_identifiers` this process sends to Cassandra, by table."""
    counts: Counter[str] = Counter()
    lock = threading.Lock()
    original = Session.execute_async

    def counted(session: Session, query: Any, *args: Any, **kwargs: Any) -> Any:
        prepared = getattr(query, "prepared_statement", query)
        text = str(getattr(prepared, "query_string", query))
        for table in ("identifiers", "person_identifiers"):
            if text.startswith("SELECT") and f" FROM {table} " in text:
                with lock:
                    counts[table] += 1
        return original(session, query, *args, **kwargs)

    Session.execute_async = counted
    try:
        yield counts
    finally:
        Session.execute_async = original


def ids(*pairs: str) -> list[common_pb2.Identifier]:
    """`ids("email:a@b.c", "cookie:x")` -> Identifier messages."""
    result = []
    for pair in pairs:
        type_name, value = pair.split(":", 1)
        result.append(common_pb2.Identifier(type=type_name, value=value))
    return result


def observation(*pairs: str, message_id: str | None = None, source: str = "test") -> pb.Observation:
    return pb.Observation(identifiers=ids(*pairs), provenance=pb.Provenance(
        message_id=message_id or f"m{next(_message_ids)}", source=source))


def link(stub: pb_grpc.IdentityServiceStub, *observations: pb.Observation) -> list[pb.LinkResult]:
    return list(stub.LinkIdentifiers(pb.LinkIdentifiersRequest(observations=observations), timeout=30).results)


def person_of(stub: pb_grpc.IdentityServiceStub, pair: str) -> pb.Person:
    (identifier,) = ids(pair)
    person: pb.Person = stub.LookupPerson(
        pb.LookupPersonRequest(person=common_pb2.PersonSelector(identifier=identifier)), timeout=10)
    return person


def members(person: pb.Person) -> set[str]:
    return {f"{i.type}:{i.value}" for i in person.identifiers}


def failure(call: Callable[[], object]) -> tuple[grpc.StatusCode, str, list[str]]:
    """The status code, ErrorInfo reason and field-violation paths of a call that must fail."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    status = rpc_status.from_call(caught.value)
    assert status is not None, caught.value
    reason, fields = "", []
    for detail in status.details:
        info, bad_request = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
        if detail.Unpack(info):
            reason = info.reason
        elif detail.Unpack(bad_request):
            fields = [v.field for v in bad_request.field_violations]
    return caught.value.code(), reason, fields
