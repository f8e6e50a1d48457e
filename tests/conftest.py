"""Test session fixtures: one real Cassandra per session, one keyspace prefix per test.

The session uses the cluster named by CASSANDRA_CONTACT_POINTS when set; otherwise it reuses a node
already answering on 127.0.0.1:9042, or starts one with the project's launcher (fast mode: no fsync)
in an empty state directory of its own, which the last session using it deletes. Tests isolate
themselves by keyspace prefix, so they never see each other's rows and need no cleanup order.
"""

from __future__ import annotations

import os
import uuid
import warnings
from collections.abc import Iterator

import grpc
import pytest
from onecdp.profile.v1 import profile_service_pb2_grpc

from deploy import cassandra as launcher
from services.identity.server import DEFINITION as IDENTITY
from services.profile.server import DEFINITION as PROFILE
from shared.cassandra import CassandraSession, connect_cluster, open_session
from shared.config import CassandraSettings, GrpcSettings
from shared.errors import Unavailable
from shared.migrations import SCHEMA_TIMEOUT_SECONDS
from shared.runner import RunningService, start_service
from tests.node_users import NodeUsers


@pytest.fixture(scope="session")
def cassandra_base_settings() -> Iterator[CassandraSettings]:
    if os.environ.get("CASSANDRA_CONTACT_POINTS"):
        yield CassandraSettings()
        return
    # A node test sessions start lives in a state directory of its own, emptied when the first session
    # starts it and when the last one still using it ends: a developer's data dir (thousands of keyspaces
    # from benchmarks and killed runs) takes minutes to open, and a test run must not depend on what
    # earlier runs left behind. Sessions running side by side (two checkouts) share the node.
    test_state = launcher.state_dir().parent / "test-session"
    with pytest.MonkeyPatch.context() as environment:
        environment.setenv("ONECDP_STATE_DIR", str(test_state))
        if launcher.is_running() and not launcher.running_nodes():
            # Someone's own node (e.g. `make up`) answers on 9042: reuse it; tests isolate by keyspace prefix.
            environment.undo()
            yield CassandraSettings(contact_points=["127.0.0.1"])
            return
        users = NodeUsers(test_state / "sessions")
        with users.deciding():
            if users.use() and not launcher.running_nodes():
                launcher.wipe()
            ready_seconds = launcher.ensure_running(nodes=1, fast=True)
        if ready_seconds is not None:
            print(f"\nCassandra started for the test session, ready in {ready_seconds:.1f} s")
        try:
            yield CassandraSettings(contact_points=["127.0.0.1"])
        finally:
            with users.deciding():
                if users.stop_using():
                    launcher.wipe()


@pytest.fixture(scope="session")
def admin_session(cassandra_base_settings: CassandraSettings) -> Iterator[CassandraSession]:
    """A session without a keyspace, for test setup and inspection."""
    cluster = connect_cluster(cassandra_base_settings)
    try:
        yield open_session(cluster, None, cassandra_base_settings.request_timeout_seconds)
    finally:
        cluster.shutdown()


@pytest.fixture
def cassandra_settings(cassandra_base_settings: CassandraSettings,
                       admin_session: CassandraSession) -> Iterator[CassandraSettings]:
    """Settings with a keyspace prefix of this test's own; its keyspaces are dropped afterwards."""
    prefix = f"t{uuid.uuid4().hex[:12]}"
    yield cassandra_base_settings.model_copy(update={"keyspace_prefix": prefix})
    rows = admin_session.execute("SELECT keyspace_name FROM system_schema.keyspaces")
    for row in rows:
        if row.keyspace_name.startswith(f"{prefix}_"):
            try:
                admin_session.execute(f"DROP KEYSPACE IF EXISTS {row.keyspace_name}", timeout=SCHEMA_TIMEOUT_SECONDS)
            except Unavailable as error:
                # Clean-up, not behaviour: on a loaded node a drop can outlast its timeout (the schema change
                # goes on there). The keyspace has this test's own prefix and the session's wipe removes it.
                warnings.warn(f"could not drop {row.keyspace_name}: {error.message}", stacklevel=1)


@pytest.fixture
def grpc_settings() -> GrpcSettings:
    """gRPC settings for in-process servers: loopback only, short grace, text logs."""
    return GrpcSettings(bind_host="127.0.0.1", grace_period_seconds=2.0, log_format="text")


# ---- services in process, on free ports, against the test's own keyspaces -------------------------

@pytest.fixture
def identity_service(grpc_settings: GrpcSettings, cassandra_settings: CassandraSettings) -> Iterator[RunningService]:
    service = start_service(IDENTITY, grpc_settings, cassandra_settings, port=0)
    try:
        yield service
    finally:
        service.stop(None)


@pytest.fixture
def profile_service(grpc_settings: GrpcSettings, cassandra_settings: CassandraSettings,
                    identity_service: RunningService) -> Iterator[RunningService]:
    settings = grpc_settings.model_copy(update={"identity_target": f"127.0.0.1:{identity_service.port}"})
    service = start_service(PROFILE, settings, cassandra_settings, port=0)
    try:
        yield service
    finally:
        service.stop(None)


@pytest.fixture
def profiles(profile_service: RunningService) -> Iterator[profile_service_pb2_grpc.ProfileServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{profile_service.port}") as channel:
        yield profile_service_pb2_grpc.ProfileServiceStub(channel)
