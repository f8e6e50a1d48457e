"""Segmentation's recompute operations through the standard google.longrunning.Operations service, over real gRPC
against the real Cassandra: the same answers as SegmentationService/GetOperation, WaitOperation, UNIMPLEMENTED
(saying what to use instead) for what stored operations cannot support, and each service knowing only its own."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.longrunning import operations_proto_pb2 as lro_pb
from google.longrunning.operations_pb2_grpc import OperationsStub
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from onecdp.prediction.v1 import prediction_service_pb2 as prediction_pb
from onecdp.prediction.v1 import prediction_service_pb2_grpc as prediction_grpc
from onecdp.profile.v1 import profile_service_pb2_grpc as profile_grpc
from onecdp.segmentation.v1 import segmentation_service_pb2 as pb
from onecdp.segmentation.v1 import segmentation_service_pb2_grpc as pb_grpc

from services.prediction.server import DEFINITION as PREDICTION
from services.segmentation.server import DEFINITION as SEGMENTATION
from shared.config import CassandraSettings, GrpcSettings
from shared.runner import RunningService, start_service
from tests.services.segmentation.conftest import identify, ingest
from tests.shared.longrunning_calls import seconds, settled_answers, status_of

pytestmark = pytest.mark.integration

OPERATIONS = "google.longrunning.Operations"


@dataclass
class Stubs:
    channel: grpc.Channel
    segmentation: pb_grpc.SegmentationServiceStub
    operations: OperationsStub


def _stubs(service: RunningService) -> Iterator[Stubs]:
    with grpc.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        yield Stubs(channel, pb_grpc.SegmentationServiceStub(channel),
                    OperationsStub(channel))  # type: ignore[no-untyped-call]


@pytest.fixture
def alone(segmentation_alone: RunningService) -> Iterator[Stubs]:
    """Segmentation in front of a profile address nobody answers: a recompute keeps retrying, running."""
    yield from _stubs(segmentation_alone)


@pytest.fixture
def full(segmentation_service: RunningService) -> Iterator[Stubs]:
    """Segmentation in front of profile and identity: a recompute ends."""
    yield from _stubs(segmentation_service)




def create_pros(stubs: Stubs) -> pb.Segment:
    segment: pb.Segment = stubs.segmentation.CreateSegment(pb.CreateSegmentRequest(
        segment_id="pros", segment=pb.Segment(rule_text='traits.plan = "pro"')), timeout=10)
    return segment






def test_a_finished_recompute_reads_the_same_through_both_services(
        full: Stubs, profiles: profile_grpc.ProfileServiceStub) -> None:
    week_ago = (datetime.now(UTC) - timedelta(days=7)).replace(tzinfo=None).isoformat()
    ingest(profiles, identify("ann", week_ago, {"plan": "pro"}), identify("bob", week_ago, {"plan": "free"}))
    create_pros(full)
    started = full.segmentation.RecomputeSegment(pb.RecomputeSegmentRequest(name="segments/pros"), timeout=10)
    waited = full.operations.WaitOperation(lro_pb.WaitOperationRequest(name=started.name, timeout=seconds(30)),
                                           timeout=40)
    assert waited.done and not waited.HasField("error")
    own, standard = settled_answers(full.segmentation.GetOperation, full.operations.GetOperation, started.name)
    assert standard == own == waited
    response = pb.RecomputeSegmentResponse()
    assert standard.response.Unpack(response) and (response.segment, response.member_count) == ("segments/pros", 1)

    again = time.monotonic()
    assert full.operations.WaitOperation(lro_pb.WaitOperationRequest(name=started.name), timeout=10) == own
    assert time.monotonic() - again < 1


def test_a_running_recompute_reads_the_same_and_a_wait_ends_at_its_timeout(alone: Stubs) -> None:
    name = create_pros(alone).operation  # the first computation, retrying while profile does not answer
    assert name
    own, standard = settled_answers(alone.segmentation.GetOperation, alone.operations.GetOperation, name)
    assert standard == own and not own.done
    begun = time.monotonic()
    waited = alone.operations.WaitOperation(lro_pb.WaitOperationRequest(name=name, timeout=seconds(1)), timeout=10)
    assert not waited.done and 1 <= time.monotonic() - begun < 2.5
    # Under a shorter deadline than its timeout, a wait answers (the latest state) before the deadline.
    begun = time.monotonic()
    waited = alone.operations.WaitOperation(lro_pb.WaitOperationRequest(name=name, timeout=seconds(30)), timeout=1.5)
    assert not waited.done and time.monotonic() - begun < 1.5


def test_unknown_and_malformed_names_fail_the_same_through_both_services(alone: Stubs) -> None:
    for name, code in [("operations/" + "0" * 32, grpc.StatusCode.NOT_FOUND),
                       ("ops/1", grpc.StatusCode.INVALID_ARGUMENT), ("operations/", grpc.StatusCode.INVALID_ARGUMENT),
                       ("", grpc.StatusCode.INVALID_ARGUMENT),
                       # Longer than a Cassandra key may be: refused by name, not INTERNAL from the driver.
                       ("operations/" + "x" * 70_000, grpc.StatusCode.INVALID_ARGUMENT)]:
        request = lro_pb.GetOperationRequest(name=name)
        own = status_of(alone.segmentation.GetOperation, request)
        assert own[0] == code and name[:100] in own[1]
        assert status_of(alone.operations.GetOperation, request) == own
        assert status_of(alone.operations.WaitOperation, lro_pb.WaitOperationRequest(name=name)) == own


def test_what_stored_operations_cannot_support_is_unimplemented(alone: Stubs) -> None:
    name = "operations/" + "0" * 32
    for method, request_message, instead in [
            ("ListOperations", lro_pb.ListOperationsRequest(), "Segment.operation"),
            ("CancelOperation", lro_pb.CancelOperationRequest(name=name), "WaitOperation"),
            ("DeleteOperation", lro_pb.DeleteOperationRequest(name=name), "kept")]:
        code, message, _ = status_of(getattr(alone.operations, method), request_message)
        assert code == grpc.StatusCode.UNIMPLEMENTED
        assert f"{OPERATIONS}/{method} is not supported by onecdp.segmentation.v1.SegmentationService" in message
        assert instead in message


@pytest.fixture
def both(grpc_settings: GrpcSettings, cassandra_settings: CassandraSettings) -> Iterator[tuple[Stubs, Any]]:
    """Segmentation and prediction side by side, neither with a profile service (port 9 answers nothing)."""
    unanswered = {"profile_target": "127.0.0.1:9", "prediction_target": "127.0.0.1:9"}
    prediction = start_service(PREDICTION, grpc_settings.model_copy(update=unanswered), cassandra_settings, port=0)
    try:
        segmentation = start_service(SEGMENTATION, grpc_settings.model_copy(update=unanswered), cassandra_settings,
                                     port=0)
        try:
            with grpc.insecure_channel(f"127.0.0.1:{prediction.port}") as channel:
                for stubs in _stubs(segmentation):
                    yield stubs, (prediction_grpc.PredictionServiceStub(channel),
                                  OperationsStub(channel))  # type: ignore[no-untyped-call]
        finally:
            segmentation.stop(None)
    finally:
        prediction.stop(None)


def _timestamp(text: str) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromJsonString(text)
    return stamp


def test_each_service_knows_only_its_own_operations(both: tuple[Stubs, Any]) -> None:
    segmentation, (prediction, prediction_operations) = both
    recompute = create_pros(segmentation).operation
    prediction.CreateModel(prediction_pb.CreateModelRequest(model_id="buyers", model=prediction_pb.Model(
        spec=prediction_pb.ModelSpec(kind=prediction_pb.PREDICTION_KIND_CONVERSION, horizon_days=30))), timeout=10)
    training = prediction.TrainModel(prediction_pb.TrainModelRequest(
        name="models/buyers", training_cutoffs=[_timestamp("2024-01-01T00:00:00Z")],
        validation_cutoff=_timestamp("2024-04-01T00:00:00Z")), timeout=10).name
    assert recompute and training and recompute != training
    for own, other, name in [(segmentation.operations, prediction_operations, recompute),
                             (prediction_operations, segmentation.operations, training)]:
        assert own.GetOperation(lro_pb.GetOperationRequest(name=name), timeout=10).name == name
        code, message, _ = status_of(other.GetOperation, lro_pb.GetOperationRequest(name=name))
        assert code == grpc.StatusCode.NOT_FOUND and name in message


def test_a_malformed_operation_name_fails_the_same_in_every_service(both: tuple[Stubs, Any]) -> None:
    segmentation, (prediction, prediction_operations) = both
    request = lro_pb.GetOperationRequest(name="ops/1")
    answers = [status_of(call, request) for call in (segmentation.segmentation.GetOperation,
                                                     segmentation.operations.GetOperation,
                                                     prediction.GetOperation, prediction_operations.GetOperation)]
    for code, message, details in answers:
        status = status_pb2.Status.FromString(details)
        info, bad_request = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
        assert [detail.Unpack(info) or detail.Unpack(bad_request) for detail in status.details] == [True, True]
        assert (code, info.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_OPERATION_NAME")
        assert [violation.field for violation in bad_request.field_violations] == ["name"]
        assert "'ops/1'" in message and "expected operations/{id}" in message
    # Each service's own domain, the same answer otherwise.
    assert len({(code, message) for code, message, _ in answers}) == 1


def test_the_standard_service_is_reflected_and_healthy(alone: Stubs) -> None:
    assert OPERATIONS in set(ProtoReflectionDescriptorDatabase(alone.channel).get_services())
    response = health_pb2_grpc.HealthStub(alone.channel).Check(health_pb2.HealthCheckRequest(service=OPERATIONS),
                                                               timeout=5)
    assert response.status == health_pb2.HealthCheckResponse.SERVING
