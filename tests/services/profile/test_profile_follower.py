"""Several profile replicas: one follows identity's change feed at a time, another takes over when it stops."""

from __future__ import annotations

import time

import grpc
import pytest
from onecdp.common.v1 import common_pb2
from onecdp.identity.v1 import identity_service_pb2 as identity_pb
from onecdp.identity.v1 import identity_service_pb2_grpc as identity_grpc
from onecdp.profile.v1 import profile_service_pb2 as pb
from onecdp.profile.v1 import profile_service_pb2_grpc as pb_grpc

from services.profile.server import DEFINITION as PROFILE
from services.profile.server import IDENTITY_FEED_LEASE
from shared.cassandra import CassandraSession
from shared.config import CassandraSettings, GrpcSettings
from shared.runner import RunningService, start_service
from tests.services.profile.conftest import eventually, ingest, order, profile_of

pytestmark = pytest.mark.integration

# Longer than a few follower polls (0.5 s each): a second replica applying the same change would show by then.
SETTLE_SECONDS = 3.0


def start_replica(grpc_settings: GrpcSettings, cassandra_settings: CassandraSettings,
                  identity_service: RunningService) -> RunningService:
    """A profile service on the test's keyspaces, as one more replica of the deployment."""
    settings = grpc_settings.model_copy(update={"identity_target": f"127.0.0.1:{identity_service.port}"})
    return start_service(PROFILE, settings, cassandra_settings, port=0)


def test_one_replica_follows_identity_and_another_takes_over_when_it_stops(
        grpc_settings: GrpcSettings, cassandra_settings: CassandraSettings, admin_session: CassandraSession,
        identity_service: RunningService, identity: identity_grpc.IdentityServiceStub) -> None:
    keyspace = cassandra_settings.keyspace("profile")

    def lease_holder() -> str | None:
        row = admin_session.execute(f"SELECT owner FROM {keyspace}.follower_leases WHERE name = ?",
                                    (IDENTITY_FEED_LEASE,)).one()
        return str(row.owner) if row is not None and row.owner else None

    def erase_and_count(stub: pb_grpc.ProfileServiceStub, person_id: str) -> int:
        """Erase the person through identity; how many times a profile replica applied it."""
        identity.ErasePerson(identity_pb.ErasePersonRequest(
            person=common_pb2.PersonSelector(person_id=person_id), reason="privacy request"), timeout=30)

        def erasures() -> int:
            changes = stub.ListProfileChanges(pb.ListProfileChangesRequest(page_size=1000), timeout=10).changes
            return sum(c.type == pb.PROFILE_CHANGE_TYPE_ERASE and c.person_id == person_id for c in changes)
        assert eventually(erasures, timeout=30), f"no replica applied the erasure of {person_id}"
        time.sleep(SETTLE_SECONDS)
        return erasures()

    first = start_replica(grpc_settings, cassandra_settings, identity_service)
    first_running = True
    try:
        # The first replica up takes the lease; a second one started after it waits.
        first_owner = eventually(lease_holder)
        assert first_owner is not None
        with grpc.insecure_channel(f"127.0.0.1:{first.port}") as channel:
            stub = pb_grpc.ProfileServiceStub(channel)
            kept = ingest(stub, order("email:kept@example.com", order_id="o1", amount=5.0))[0].person_id
            gone = ingest(stub, order("email:gone@example.com", order_id="o2", amount=7.0))[0].person_id
        second = start_replica(grpc_settings, cassandra_settings, identity_service)
        try:
            with grpc.insecure_channel(f"127.0.0.1:{second.port}") as channel:
                stub = pb_grpc.ProfileServiceStub(channel)
                assert erase_and_count(stub, gone) == 1
                assert lease_holder() == first_owner
                # The first replica stops (giving the lease back); the second takes over and applies the
                # next change, once.
                first.stop(None)
                first_running = False
                assert eventually(lambda: lease_holder() not in (None, first_owner), timeout=30)
                assert erase_and_count(stub, kept) == 1
                with pytest.raises(grpc.RpcError) as erased:
                    profile_of(stub, "email:kept@example.com")
                assert erased.value.code() == grpc.StatusCode.NOT_FOUND
        finally:
            second.stop(None)
    finally:
        if first_running:
            first.stop(None)


def _connections_to(port: int) -> int:
    """Connections the server listening on loopback port `port` has accepted and not yet seen closed, from the
    kernel's socket tables (gRPC may use IPv6 sockets with v4-mapped addresses, so both tables count)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            for row in [line.split() for line in list(rows)[1:]]:
                count += row[1].endswith(f":{port:04X}") and row[3] == "01"  # 01: ESTABLISHED
    return count


def test_a_stopped_replica_closes_its_channel_to_identity(
        grpc_settings: GrpcSettings, cassandra_settings: CassandraSettings,
        identity_service: RunningService) -> None:
    """A replica that stops leaves no connection behind: in a process that starts services again (tests, a
    supervisor) a leaked channel would keep connecting to an address another server may take next."""
    replica = start_replica(grpc_settings, cassandra_settings, identity_service)
    with grpc.insecure_channel(f"127.0.0.1:{replica.port}") as channel:
        ingest(pb_grpc.ProfileServiceStub(channel), order("crm_id:closing", order_id="c1", amount=1.0))
    assert _connections_to(identity_service.port) >= 1
    replica.stop(None)
    assert eventually(lambda: _connections_to(identity_service.port) == 0, timeout=5)
