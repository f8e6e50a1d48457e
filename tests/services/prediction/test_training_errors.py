"""A failed training's Operation.error carries an ErrorInfo (reason, domain, metadata) like a synchronous
error: the reason the training failed with is stored with the operation (schema 0003) and given back by
GetOperation, over real gRPC and in the conversion itself. Real Cassandra."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.longrunning import operations_proto_pb2 as lro_pb
from google.protobuf import timestamp_pb2
from google.rpc import code_pb2
from grpc_status import rpc_status
from onecdp.prediction.v1 import prediction_service_pb2 as pb
from onecdp.prediction.v1 import prediction_service_pb2_grpc as pb_grpc

from services.prediction.jobs import TrainingRequest, abandon_operation, run_training, start_training
from services.prediction.registry import ModelRegistry
from services.prediction.server import operation_message
from services.prediction.spec import PredictionKind, resolve_spec
from tests.services.prediction.synthetic import day, synthetic_source
from tests.status_details import error_info, field_violations

pytestmark = pytest.mark.integration

REQUEST = TrainingRequest(model_id="buyers", training_cutoffs=(day("2024-01-01"), day("2024-03-01")),
                          validation_cutoff=day("2024-06-01"))


def _create(registry: ModelRegistry, min_class_count: int) -> None:
    spec = resolve_spec(PredictionKind.CONVERSION, [], 60, eligibility_days=0, min_class_count=min_class_count)
    registry.create_model("buyers", "", spec, day("2025-01-01"))


def test_a_failed_training_gives_its_reason_and_metadata(registry: ModelRegistry) -> None:
    _create(registry, min_class_count=100_000)
    finished = run_training(registry, synthetic_source(200), start_training(registry, REQUEST), REQUEST)
    error = operation_message(registry.get_operation(finished.operation_id), registry).error
    assert error.code == code_pb2.FAILED_PRECONDITION and error.message == finished.error_message
    info = error_info(error)
    assert (info.reason, info.domain) == ("TOO_FEW_EXAMPLES", "onecdp.prediction")
    assert info.metadata["minimum"] == "100000" and set(info.metadata) == {"set", "positives", "negatives", "minimum"}


def test_an_operation_that_never_ran_says_so(registry: ModelRegistry) -> None:
    _create(registry, min_class_count=20)
    operation = start_training(registry, REQUEST)
    abandon_operation(registry, operation)
    error = operation_message(registry.get_operation(operation.operation_id), registry).error
    assert error.code == code_pb2.ABORTED
    info = error_info(error)
    assert (info.reason, info.domain, dict(info.metadata)) == (
        "OPERATION_NOT_STARTED", "onecdp.prediction", {"model": "models/buyers"})


def _timestamp(text: str) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromJsonString(text)
    return stamp


def test_get_operation_of_a_failed_training_has_error_info(
        prediction_over_profile: pb_grpc.PredictionServiceStub) -> None:
    stub = prediction_over_profile
    stub.CreateModel(pb.CreateModelRequest(model_id="buyers", model=pb.Model(spec=pb.ModelSpec(
        kind=pb.PREDICTION_KIND_CONVERSION, horizon_days=30))), timeout=10)
    started = stub.TrainModel(pb.TrainModelRequest(
        name="models/buyers", training_cutoffs=[_timestamp("2024-01-01T00:00:00Z")],
        validation_cutoff=_timestamp("2024-04-01T00:00:00Z")), timeout=10)
    end = time.monotonic() + 30
    operation: lro_pb.Operation = stub.GetOperation(lro_pb.GetOperationRequest(name=started.name), timeout=10)
    while not operation.done and time.monotonic() < end:
        time.sleep(0.1)
        operation = stub.GetOperation(lro_pb.GetOperationRequest(name=started.name), timeout=10)
    # The empty profile service has nothing to train on: the training fails, saying why.
    assert operation.done and operation.HasField("error"), operation
    info = error_info(operation.error)
    assert (info.domain, info.reason, info.metadata["latest_event_time"]) == (
        "onecdp.prediction", "VALIDATION_HORIZON_BEYOND_DATA", "none"), info


def test_a_validation_horizon_no_data_can_reach_yet_is_refused_before_any_operation(
        prediction: pb_grpc.PredictionServiceStub) -> None:
    """Events are stamped at most a day ahead of now, so a validation horizon ending later can only fail: the
    call says so at once instead of answering an operation that fails after scanning every profile."""
    stub = prediction
    stub.CreateModel(pb.CreateModelRequest(model_id="buyers", model=pb.Model(spec=pb.ModelSpec(
        kind=pb.PREDICTION_KIND_CONVERSION, horizon_days=30))), timeout=10)
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    cutoffs = [today - timedelta(days=90), today + timedelta(days=5)]
    with pytest.raises(grpc.RpcError) as raised:
        stub.TrainModel(pb.TrainModelRequest(
            name="models/buyers", training_cutoffs=[_timestamp(f"{c:%Y-%m-%dT%H:%M:%SZ}") for c in cutoffs],
            validation_cutoff=_timestamp(f"{today + timedelta(days=40):%Y-%m-%dT%H:%M:%SZ}")), timeout=10)
    assert raised.value.code() is grpc.StatusCode.FAILED_PRECONDITION, raised.value
    status = rpc_status.from_call(raised.value)
    assert status is not None
    info = error_info(status)
    assert (info.domain, info.reason) == ("onecdp.prediction", "VALIDATION_HORIZON_BEYOND_DATA"), info
    assert info.metadata["validation_horizon_end"] == (today + timedelta(days=70)).isoformat()
    assert [field for field, _ in field_violations(raised.value)] == ["validation_cutoff", "training_cutoffs[1]"]
    assert "choose an earlier validation cutoff" in (raised.value.details() or "")
    # No version was started (nor its operation).
    versions = stub.ListModelVersions(pb.ListModelVersionsRequest(parent="models/buyers"), timeout=10)
    assert list(versions.model_versions) == []
