"""Prediction's operations through the standard google.longrunning.Operations service, over real gRPC against the
real Cassandra: the same answers as PredictionService/GetOperation, WaitOperation, and UNIMPLEMENTED (saying
what to use instead) for what the stored operations cannot support."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.longrunning import operations_proto_pb2 as lro_pb
from google.longrunning.operations_pb2_grpc import OperationsStub
from google.protobuf import timestamp_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from onecdp.prediction.v1 import prediction_service_pb2 as pb
from onecdp.prediction.v1 import prediction_service_pb2_grpc as pb_grpc

from services.prediction.registry import ModelRegistry, OperationKind
from services.prediction.server import DEFINITION
from shared.config import CassandraSettings, GrpcSettings
from shared.errors import StatusCode
from shared.runner import RunningService, start_service
from tests.shared.longrunning_calls import seconds, settled_answers, status_of

pytestmark = pytest.mark.integration

OPERATIONS = "google.longrunning.Operations"


@dataclass
class Stubs:
    channel: grpc.Channel
    prediction: pb_grpc.PredictionServiceStub
    operations: OperationsStub


def _stubs(service: RunningService) -> Iterator[Stubs]:
    with grpc.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        yield Stubs(channel, pb_grpc.PredictionServiceStub(channel), OperationsStub(channel))  # type: ignore[no-untyped-call]


def _serving(grpc_settings: GrpcSettings, cassandra_settings: CassandraSettings,
             profile_target: str) -> Iterator[Stubs]:
    settings = grpc_settings.model_copy(update={"profile_target": profile_target})
    service = start_service(DEFINITION, settings, cassandra_settings, port=0)
    try:
        yield from _stubs(service)
    finally:
        service.stop(None)


@pytest.fixture
def alone(grpc_settings: GrpcSettings, cassandra_settings: CassandraSettings) -> Iterator[Stubs]:
    """Prediction in front of a profile address nobody answers (port 9): enough for operations made by a registry."""
    yield from _serving(grpc_settings, cassandra_settings, "127.0.0.1:9")


@pytest.fixture
def over_profile(grpc_settings: GrpcSettings, cassandra_settings: CassandraSettings,
                 profile_service: RunningService) -> Iterator[Stubs]:
    """Prediction with the real (empty) profile service behind it: a training ends."""
    yield from _serving(grpc_settings, cassandra_settings, f"127.0.0.1:{profile_service.port}")


def _timestamp(text: str) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromJsonString(text)
    return stamp


def train(stubs: Stubs) -> lro_pb.Operation:
    stubs.prediction.CreateModel(pb.CreateModelRequest(model_id="buyers", model=pb.Model(spec=pb.ModelSpec(
        kind=pb.PREDICTION_KIND_CONVERSION, horizon_days=30))), timeout=10)
    operation: lro_pb.Operation = stubs.prediction.TrainModel(pb.TrainModelRequest(
        name="models/buyers", training_cutoffs=[_timestamp("2024-01-01T00:00:00Z")],
        validation_cutoff=_timestamp("2024-04-01T00:00:00Z")), timeout=10)
    return operation








def test_a_finished_training_reads_the_same_through_both_services(over_profile: Stubs) -> None:
    started = train(over_profile)
    waited = over_profile.operations.WaitOperation(lro_pb.WaitOperationRequest(
        name=started.name, timeout=seconds(30)), timeout=40)
    assert waited.done  # the empty profile service has nothing to train on: it ends, with an error
    own, standard = settled_answers(over_profile.prediction.GetOperation, over_profile.operations.GetOperation,
                                    started.name)
    assert standard == own == waited and own.HasField("error")
    metadata = pb.TrainModelMetadata()
    assert standard.metadata.Unpack(metadata) and metadata.model_version == "models/buyers/versions/1"

    again = time.monotonic()
    assert over_profile.operations.WaitOperation(lro_pb.WaitOperationRequest(name=started.name), timeout=10) == own
    assert time.monotonic() - again < 1


def test_a_running_training_reads_the_same_and_a_wait_ends_at_its_timeout_or_its_end(
        alone: Stubs, registry: ModelRegistry) -> None:
    """A training in progress, recorded by a registry that holds its lease (the service's worker would end it
    at once here, profile being unreachable), then ended while a caller waits on it."""
    alone.prediction.CreateModel(pb.CreateModelRequest(model_id="buyers", model=pb.Model(spec=pb.ModelSpec(
        kind=pb.PREDICTION_KIND_CONVERSION, horizon_days=30))), timeout=10)
    now = datetime.now(UTC)
    operation_id = registry.own_new_operation()
    version = registry.start_version("buyers", [now - timedelta(days=90)], now - timedelta(days=30), now,
                                     operation_id=operation_id)
    registry.create_operation(OperationKind.TRAIN, "buyers", now, version_id=version.version_id, stage="features",
                              operation_id=operation_id)
    registry.report_progress(operation_id, now, stage="features", persons_processed=200, persons_total=400)
    name = f"operations/{operation_id}"

    own, standard = settled_answers(alone.prediction.GetOperation, alone.operations.GetOperation, name)
    assert standard == own and not own.done
    metadata = pb.TrainModelMetadata()
    assert standard.metadata.Unpack(metadata) and (metadata.stage, metadata.persons_processed) == ("features", 200)
    begun = time.monotonic()
    waited = alone.operations.WaitOperation(lro_pb.WaitOperationRequest(name=name, timeout=seconds(1)), timeout=10)
    assert waited == own and 1 <= time.monotonic() - begun < 2.5
    # Under a shorter deadline than its timeout, a wait answers (the latest state) before the deadline.
    begun = time.monotonic()
    waited = alone.operations.WaitOperation(lro_pb.WaitOperationRequest(name=name, timeout=seconds(30)), timeout=1.5)
    assert not waited.done and time.monotonic() - begun < 1.5

    def end_it() -> None:
        registry.fail_version("buyers", version.version_id, "stopped by the test", datetime.now(UTC))
        registry.finish_operation(operation_id, datetime.now(UTC), elapsed_seconds=1.0,
                                  error_code=StatusCode.FAILED_PRECONDITION.value, error_message="stopped by the test")

    threading.Timer(0.5, end_it).start()
    begun = time.monotonic()
    waited = alone.operations.WaitOperation(lro_pb.WaitOperationRequest(name=name, timeout=seconds(30)), timeout=40)
    assert waited.done and waited.error.message == "stopped by the test" and time.monotonic() - begun < 5
    own, standard = settled_answers(alone.prediction.GetOperation, alone.operations.GetOperation, name)
    assert standard == own == waited


def test_unknown_and_malformed_names_fail_the_same_through_both_services(alone: Stubs) -> None:
    for name in ["operations/" + "0" * 32, "ops/1", ""]:
        request = lro_pb.GetOperationRequest(name=name)
        own = status_of(alone.prediction.GetOperation, request)
        assert own[0] == (grpc.StatusCode.NOT_FOUND if name.startswith("operations/")
                          else grpc.StatusCode.INVALID_ARGUMENT)
        assert status_of(alone.operations.GetOperation, request) == own
        assert status_of(alone.operations.WaitOperation, lro_pb.WaitOperationRequest(name=name)) == own
        assert name in own[1]


def test_what_stored_operations_cannot_support_is_unimplemented(alone: Stubs) -> None:
    name = "operations/" + "0" * 32
    for method, request_message, instead in [
            ("ListOperations", lro_pb.ListOperationsRequest(), "GetOperation or WaitOperation"),
            ("CancelOperation", lro_pb.CancelOperationRequest(name=name), "activate"),
            ("DeleteOperation", lro_pb.DeleteOperationRequest(name=name), "30 days")]:
        code, message, _ = status_of(getattr(alone.operations, method), request_message)
        assert code == grpc.StatusCode.UNIMPLEMENTED
        assert f"{OPERATIONS}/{method} is not supported by onecdp.prediction.v1.PredictionService" in message
        assert instead in message


def test_the_standard_service_is_reflected_and_healthy(alone: Stubs) -> None:
    assert OPERATIONS in set(ProtoReflectionDescriptorDatabase(alone.channel).get_services())
    response = health_pb2_grpc.HealthStub(alone.channel).Check(health_pb2.HealthCheckRequest(service=OPERATIONS),
                                                               timeout=5)
    assert response.status == health_pb2.HealthCheckResponse.SERVING
