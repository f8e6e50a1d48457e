"""All four services start against the real Cassandra and answer over real gRPC sockets."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from onecdp.prediction.v1 import prediction_service_pb2, prediction_service_pb2_grpc
from onecdp.segmentation.v1 import segmentation_service_pb2, segmentation_service_pb2_grpc

from services.identity.server import DEFINITION as IDENTITY
from services.prediction.server import DEFINITION as PREDICTION
from services.profile.server import DEFINITION as PROFILE
from services.segmentation.server import DEFINITION as SEGMENTATION
from shared.cassandra import CassandraSession
from shared.config import CassandraSettings, GrpcSettings
from shared.runner import RunningService, ServiceDefinition, start_service

pytestmark = pytest.mark.integration

DEFINITIONS: list[ServiceDefinition] = [IDENTITY, PROFILE, SEGMENTATION, PREDICTION]
FULL_NAMES = {
    "identity": "onecdp.identity.v1.IdentityService",
    "profile": "onecdp.profile.v1.ProfileService",
    "segmentation": "onecdp.segmentation.v1.SegmentationService",
    "prediction": "onecdp.prediction.v1.PredictionService",
}


@pytest.fixture
def services(grpc_settings: GrpcSettings, cassandra_settings: CassandraSettings) -> Iterator[dict[str, RunningService]]:
    started: dict[str, RunningService] = {}
    try:
        for definition in DEFINITIONS:
            started[definition.name] = start_service(definition, grpc_settings, cassandra_settings, port=0)
        yield started
    finally:
        for service in started.values():
            service.stop(None)


def test_each_service_is_healthy_reflected_and_owns_its_keyspace(
        services: dict[str, RunningService], cassandra_settings: CassandraSettings,
        admin_session: CassandraSession) -> None:
    ports = {service.port for service in services.values()}
    assert len(ports) == 4 and 0 not in ports
    for name, service in services.items():
        with grpc.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for checked in ("", FULL_NAMES[name]):
                response = health.Check(health_pb2.HealthCheckRequest(service=checked), timeout=5)
                assert response.status == health_pb2.HealthCheckResponse.SERVING
            listed = set(ProtoReflectionDescriptorDatabase(channel).get_services())
            assert listed == {FULL_NAMES[name], "grpc.health.v1.Health",
                              "grpc.reflection.v1alpha.ServerReflection"}
    keyspaces = {row.keyspace_name for row in admin_session.execute(
        "SELECT keyspace_name FROM system_schema.keyspaces")}
    assert {cassandra_settings.keyspace(name) for name in services} <= keyspaces


def test_methods_not_built_yet_say_so(services: dict[str, RunningService]) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{services['prediction'].port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.BatchScorePersons(prediction_service_pb2.BatchScorePersonsRequest(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "PredictionService/BatchScorePersons is not implemented yet" in caught.value.details()
    with grpc.insecure_channel(f"127.0.0.1:{services['segmentation'].port}") as channel:
        segmentation = segmentation_service_pb2_grpc.SegmentationServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            segmentation.EstimateSegmentSize(segmentation_service_pb2.EstimateSegmentSizeRequest(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "SegmentationService/EstimateSegmentSize is not implemented yet" in caught.value.details()
