"""A prediction service per test, in process, on a free port, against the test's own keyspace."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import pytest
from onecdp.prediction.v1 import prediction_service_pb2_grpc as pb_grpc

from services.prediction.registry import ModelRegistry
from services.prediction.server import DEFINITION
from shared.cassandra import CassandraSession, connect_cluster, open_session
from shared.config import CassandraSettings, GrpcSettings
from shared.migrations import migrate_service
from shared.runner import RunningService, start_service


@contextmanager
def _running(grpc_settings: GrpcSettings, cassandra_settings: CassandraSettings) -> Iterator[RunningService]:
    service = start_service(DEFINITION, grpc_settings, cassandra_settings, port=0)
    try:
        yield service
    finally:
        service.stop(None)


@contextmanager
def _stub(service: RunningService) -> Iterator[pb_grpc.PredictionServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        yield pb_grpc.PredictionServiceStub(channel)


@pytest.fixture
def prediction_service(grpc_settings: GrpcSettings,
                       cassandra_settings: CassandraSettings) -> Iterator[RunningService]:
    """The service alone: for calls that never reach profile (models, versions, operations, bad requests)."""
    with _running(grpc_settings, cassandra_settings) as service:
        yield service


@pytest.fixture
def prediction(prediction_service: RunningService) -> Iterator[pb_grpc.PredictionServiceStub]:
    with _stub(prediction_service) as stub:
        yield stub


@pytest.fixture
def prediction_over_profile(grpc_settings: GrpcSettings, cassandra_settings: CassandraSettings,
                            profile_service: RunningService) -> Iterator[pb_grpc.PredictionServiceStub]:
    """The service with the real profile service behind it (DeleteModel clears scores from profiles)."""
    settings = grpc_settings.model_copy(update={"profile_target": f"127.0.0.1:{profile_service.port}"})
    with _running(settings, cassandra_settings) as service, _stub(service) as stub:
        yield stub


@pytest.fixture
def prediction_session(cassandra_settings: CassandraSettings) -> Iterator[CassandraSession]:
    """A session on the test's migrated prediction keyspace."""
    cluster = connect_cluster(cassandra_settings)
    try:
        timeout = cassandra_settings.request_timeout_seconds
        migrate_service(open_session(cluster, None, timeout), "prediction", cassandra_settings)
        yield open_session(cluster, cassandra_settings.keyspace("prediction"), timeout)
    finally:
        cluster.shutdown()


@pytest.fixture
def registry(prediction_session: CassandraSession) -> ModelRegistry:
    return ModelRegistry(prediction_session)
