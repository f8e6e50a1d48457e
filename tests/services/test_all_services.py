"""All four services start against the real Cassandra and answer over real gRPC sockets."""

from __future__ import annotations

import importlib
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

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
            expected = {FULL_NAMES[name], "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
            if name in {"segmentation", "prediction"}:  # they return long-running operations (AIP-151)
                expected.add("google.longrunning.Operations")
            assert listed == expected
    keyspaces = {row.keyspace_name for row in admin_session.execute(
        "SELECT keyspace_name FROM system_schema.keyspaces")}
    assert {cassandra_settings.keyspace(name) for name in services} <= keyspaces


def unbuilt_methods(definition: ServiceDefinition) -> list[MethodDescriptor]:
    """The methods a service's servicer leaves to the generated base class (which answers UNIMPLEMENTED)."""
    server = importlib.import_module(f"services.{definition.name}.server")
    generated = importlib.import_module(f"onecdp.{definition.name}.v1.{definition.name}_service_pb2_grpc")
    base = next(v for n, v in vars(generated).items() if n.endswith("Servicer") and isinstance(v, type))
    servicer = next(v for v in vars(server).values()
                    if isinstance(v, type) and issubclass(v, base) and v is not base)
    service = importlib.import_module(f"onecdp.{definition.name}.v1.{definition.name}_service_pb2").DESCRIPTOR \
        .services_by_name[FULL_NAMES[definition.name].rpartition(".")[2]]
    return [m for m in service.methods if getattr(servicer, m.name) is getattr(base, m.name)]


def test_every_method_of_every_service_is_built() -> None:
    """No RPC a proto declares is left to the generated base class (which would answer UNIMPLEMENTED).

    A new method in a proto fails this until it is built; how the UNIMPLEMENTED answer of an unbuilt
    method reads is checked in tests/shared/test_errors_over_grpc.py.
    """
    unbuilt = {d.name: [m.name for m in unbuilt_methods(d)] for d in DEFINITIONS}
    assert unbuilt == {d.name: [] for d in DEFINITIONS}
