"""Models, versions and operations over real gRPC against the real Cassandra (training and scoring through
the real profile service: test_serving.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any, cast

import grpc
import pytest
from google.longrunning import operations_pb2
from google.protobuf import timestamp_pb2
from google.rpc import code_pb2, error_details_pb2
from grpc_status import rpc_status
from onecdp.common.v1 import common_pb2
from onecdp.prediction.v1 import prediction_service_pb2 as pb
from onecdp.prediction.v1 import prediction_service_pb2_grpc as pb_grpc

from services.prediction.registry import ModelRegistry, OperationKind
from services.prediction.server import PredictionServicer, _add_to_server, _version_position
from services.prediction.spec import PredictionKind, resolve_spec
from services.prediction.training import TrainedModel, train_version
from shared.cassandra import connect_cluster, open_session
from shared.config import CassandraSettings
from shared.errors import InvalidArgument, StatusCode
from shared.runner import RunningService
from tests.services.prediction.synthetic import day, synthetic_source

pytestmark = pytest.mark.integration

Stub = pb_grpc.PredictionServiceStub
CONVERSION = pb.ModelSpec(kind=pb.PREDICTION_KIND_CONVERSION, horizon_days=30)


@pytest.fixture(scope="module")
def trained() -> TrainedModel:
    spec = resolve_spec(PredictionKind.CONVERSION, [], 30, eligibility_days=0, min_class_count=20)
    return train_version(spec, synthetic_source(400), [day("2024-01-01")], day("2024-04-01"), seed=1)


@pytest.fixture
def service_registry(prediction_service: RunningService,
                     cassandra_settings: CassandraSettings) -> Iterator[ModelRegistry]:
    """The registry behind the running service, to set up versions and operations without training."""
    cluster = connect_cluster(cassandra_settings)
    try:
        yield ModelRegistry(open_session(cluster, cassandra_settings.keyspace("prediction"), 10))
    finally:
        cluster.shutdown()


def create(stub: Stub, model_id: str, spec: pb.ModelSpec = CONVERSION, display_name: str = "") -> pb.Model:
    model: pb.Model = stub.CreateModel(pb.CreateModelRequest(
        model_id=model_id, model=pb.Model(display_name=display_name, spec=spec)), timeout=10)
    return model


def error_of(call: Callable[..., Any], request: Any) -> tuple[grpc.StatusCode, str, list[str], str]:
    """(code, reason, violated fields, message) of a failing call."""
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=10)
    error: Any = caught.value  # a grpc.Call as well as an RpcError
    status = rpc_status.from_call(error)
    assert status is not None
    reason, fields = "", []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
            assert info.domain == "onecdp.prediction"
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields = [v.field for v in bad.field_violations]
    return error.code(), reason, fields, error.details()


def test_create_get_list_delete(prediction_over_profile: Stub) -> None:
    prediction = prediction_over_profile
    model = create(prediction, "buyers-30", display_name="Will buy in 30 days")
    assert model.name == "models/buyers-30" and model.display_name == "Will buy in 30 days"
    # Defaults are resolved and shown: conversion targets `order`, 100 of each class.
    assert list(model.spec.event_names) == ["order"] and model.spec.min_class_count == 100
    assert model.active_version == "" and model.create_time.seconds > 0
    churn = create(prediction, "churn", pb.ModelSpec(kind=pb.PREDICTION_KIND_CHURN, horizon_days=60))
    assert churn.spec.eligibility_days == 90 and list(churn.spec.event_names) == []
    assert prediction.GetModel(pb.GetModelRequest(name="models/buyers-30"), timeout=10) == model

    for model_id in ("m-c", "m-a", "m-b"):
        create(prediction, model_id)
    names, token = [], ""
    while True:
        page = prediction.ListModels(pb.ListModelsRequest(page_size=2, page_token=token), timeout=10)
        names += [m.name for m in page.models]
        token = page.next_page_token
        if not token:
            break
    assert names == ["models/buyers-30", "models/churn", "models/m-a", "models/m-b", "models/m-c"]

    prediction.DeleteModel(pb.DeleteModelRequest(name="models/m-b"), timeout=10)
    code, reason, _, _ = error_of(prediction.GetModel, pb.GetModelRequest(name="models/m-b"))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")
    code, _, _, _ = error_of(prediction.DeleteModel, pb.DeleteModelRequest(name="models/m-b"))
    assert code == grpc.StatusCode.NOT_FOUND
    listed = prediction.ListModels(pb.ListModelsRequest(), timeout=10)
    assert [m.name for m in listed.models] == ["models/buyers-30", "models/churn", "models/m-a", "models/m-c"]
    assert listed.next_page_token == ""


def test_create_twice_is_already_exists(prediction: Stub) -> None:
    create(prediction, "dup")
    code, reason, _, _ = error_of(prediction.CreateModel, pb.CreateModelRequest(
        model_id="dup", model=pb.Model(spec=CONVERSION)))
    assert (code, reason) == (grpc.StatusCode.ALREADY_EXISTS, "MODEL_EXISTS")


def test_a_bad_model_names_every_bad_field(prediction: Stub) -> None:
    request = pb.CreateModelRequest(model_id="Bad_Id", model=pb.Model(
        display_name="x" * 300,
        spec=pb.ModelSpec(horizon_days=0, event_names=["order", "", "order"], eligibility_days=5,
                          min_class_count=-1)))
    code, reason, fields, _ = error_of(prediction.CreateModel, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and reason == "INVALID_MODEL"
    assert fields == ["model_id", "model.display_name", "model.spec.kind", "model.spec.horizon_days",
                      "model.spec.event_names[1]", "model.spec.event_names[2]", "model.spec.eligibility_days",
                      "model.spec.min_class_count"]
    code, _, fields, _ = error_of(prediction.CreateModel, pb.CreateModelRequest(model_id="ok"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and fields[:2] == ["model", "model.spec"]
    code, _, fields, _ = error_of(prediction.CreateModel, pb.CreateModelRequest(
        model_id="long", model=pb.Model(spec=pb.ModelSpec(kind=pb.PREDICTION_KIND_CHURN, horizon_days=731))))
    assert fields == ["model.spec.horizon_days"]
    assert prediction.ListModels(pb.ListModelsRequest(), timeout=10).models == []


@pytest.mark.parametrize(("call", "request_message", "field"), [
    ("GetModel", pb.GetModelRequest(name="model/x"), "name"),
    ("GetModel", pb.GetModelRequest(name="models/X"), "name"),
    ("DeleteModel", pb.DeleteModelRequest(name=""), "name"),
    ("GetModelVersion", pb.GetModelVersionRequest(name="models/x/versions/0"), "name"),
    ("GetModelVersion", pb.GetModelVersionRequest(name="models/x/versions/one"), "name"),
    ("ActivateModelVersion", pb.ActivateModelVersionRequest(name="models/x"), "name"),
    ("ListModelVersions", pb.ListModelVersionsRequest(parent="models/x/versions/1"), "parent"),
    ("ListModels", pb.ListModelsRequest(page_token="garbage!"), "page_token"),
    ("ListModels", pb.ListModelsRequest(page_size=-1), "page_size"),
    ("GetOperation", operations_pb2.GetOperationRequest(name="ops/1"), "name"),
])
def test_bad_names_and_tokens_are_invalid_argument(prediction: Stub, call: str, request_message: object,
                                                   field: str) -> None:
    code, _, fields, _ = error_of(getattr(prediction, call), request_message)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and fields == [field]


def _at(text: str) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromJsonString(text)
    return stamp


def test_times_outside_the_supported_range_are_invalid_argument_naming_the_field(prediction: Stub) -> None:
    """Times a grpcurl user can type (years 1 and 9999) and ones only a binary client can send (beyond year
    9999, bad nanos) are refused before any date arithmetic could overflow on them."""
    create(prediction, "churners", pb.ModelSpec(kind=pb.PREDICTION_KIND_CHURN, horizon_days=90))
    model, person = "models/churners", common_pb2.PersonSelector(person_id="p_1")
    year_1, year_9999 = _at("0001-01-01T00:00:00Z"), _at("9999-12-01T00:00:00Z")
    beyond_9999 = timestamp_pb2.Timestamp(seconds=253_402_300_800)  # 10000-01-01
    bad_nanos = timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=-1)

    code, reason, fields, message = error_of(prediction.TrainModel, pb.TrainModelRequest(
        name=model, training_cutoffs=[year_9999, _at("2024-01-01T00:00:00Z"), year_1],
        validation_cutoff=_at("9999-12-31T00:00:00Z")))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_TRAINING_REQUEST")
    assert fields == ["training_cutoffs[0]", "training_cutoffs[2]", "validation_cutoff"]
    assert "from 1990-01-01T00:00:00Z" in message and "to 9000-01-01T00:00:00Z, got 9999-12-01T00:00:00Z" in message
    code, _, fields, message = error_of(prediction.TrainModel, pb.TrainModelRequest(
        name=model, training_cutoffs=[beyond_9999], validation_cutoff=bad_nanos))
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["training_cutoffs[0]", "validation_cutoff"])
    assert "got 253402300800 seconds from 1970-01-01" in message and "nanos must be 0-999999999" in message

    for call, request in [
        (prediction.ScorePerson, pb.ScorePersonRequest(model=model, person=person, as_of_time=year_1)),
        (prediction.ScorePerson, pb.ScorePersonRequest(model=model, person=person, as_of_time=bad_nanos)),
        (prediction.BatchScorePersons, pb.BatchScorePersonsRequest(model=model, persons=[person],
                                                                   as_of_time=year_1)),
        (prediction.RefreshScores, pb.RefreshScoresRequest(name=model, as_of_time=year_1)),
        (prediction.RefreshScores, pb.RefreshScoresRequest(name=model, as_of_time=year_9999)),
        (prediction.GetPersonFeatures, pb.GetPersonFeaturesRequest(person=person, as_of_time=beyond_9999)),
    ]:
        code, _, fields, _ = error_of(call, request)
        assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["as_of_time"]), request
    streamed = list(prediction.StreamScorePersons(iter([pb.StreamScorePersonsRequest(
        batch=pb.BatchScorePersonsRequest(model=model, persons=[person], as_of_time=year_9999))]), timeout=10))
    assert streamed[0].result.error.code == "INVALID_ARGUMENT"
    assert "requests[0].batch.as_of_time" in streamed[0].result.error.message


def test_versions_list_get_activate_and_roll_back(prediction_over_profile: Stub, registry: ModelRegistry,
                                                  trained: TrainedModel) -> None:
    prediction, service_registry = prediction_over_profile, registry
    create(prediction, "conv")
    cutoffs, validation = [day("2024-01-01")], day("2024-04-01")
    for _ in range(3):
        version = service_registry.start_version("conv", cutoffs, validation, day("2025-01-01"))
        service_registry.finish_version("conv", version.version_id, trained, day("2025-01-02"))
    training = service_registry.start_version("conv", cutoffs, validation, day("2025-01-03"))
    assert training.version_id == 4

    got = prediction.GetModelVersion(pb.GetModelVersionRequest(name="models/conv/versions/2"), timeout=10)
    assert got.state == pb.MODEL_VERSION_STATE_READY and got.spec.horizon_days == 30
    assert list(got.feature_names) == list(trained.feature_names)
    assert got.metrics.roc_auc == pytest.approx(trained.metrics.roc_auc)
    assert got.metrics.validation_examples == trained.metrics.validation_examples
    assert [f.feature for f in got.feature_importance] == [name for name, _ in trained.importance]
    assert got.best_iteration == trained.best_iteration
    assert [t.ToDatetime().date().isoformat() for t in got.training_cutoffs] == ["2024-01-01"]
    assert got.validation_cutoff.ToDatetime().date().isoformat() == "2024-04-01"

    names, token = [], ""
    while True:
        page = prediction.ListModelVersions(pb.ListModelVersionsRequest(parent="models/conv", page_size=3,
                                                                        page_token=token), timeout=10)
        names += [v.name for v in page.model_versions]
        token = page.next_page_token
        if not token:
            break
    assert names == [f"models/conv/versions/{n}" for n in (4, 3, 2, 1)]
    # A token of one model's list is no token for another's.
    first = prediction.ListModelVersions(pb.ListModelVersionsRequest(parent="models/conv", page_size=1), timeout=10)
    create(prediction, "other")
    code, _, fields, _ = error_of(prediction.ListModelVersions, pb.ListModelVersionsRequest(
        parent="models/other", page_token=first.next_page_token))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and fields == ["page_token"]

    model = prediction.ActivateModelVersion(pb.ActivateModelVersionRequest(name="models/conv/versions/3"),
                                            timeout=10)
    assert model.active_version == "models/conv/versions/3"
    rolled_back = prediction.ActivateModelVersion(pb.ActivateModelVersionRequest(name="models/conv/versions/1"),
                                                  timeout=10)
    assert rolled_back.active_version == "models/conv/versions/1"
    assert rolled_back.update_time.ToDatetime() >= model.update_time.ToDatetime()
    code, reason, _, _ = error_of(prediction.ActivateModelVersion,
                                  pb.ActivateModelVersionRequest(name="models/conv/versions/4"))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "MODEL_VERSION_NOT_READY")
    code, _, _, _ = error_of(prediction.ActivateModelVersion,
                             pb.ActivateModelVersionRequest(name="models/conv/versions/9"))
    assert code == grpc.StatusCode.NOT_FOUND
    code, _, _, _ = error_of(prediction.ListModelVersions, pb.ListModelVersionsRequest(parent="models/none"))
    assert code == grpc.StatusCode.NOT_FOUND

    prediction.DeleteModel(pb.DeleteModelRequest(name="models/conv"), timeout=10)
    code, _, _, _ = error_of(prediction.GetModelVersion, pb.GetModelVersionRequest(name="models/conv/versions/1"))
    assert code == grpc.StatusCode.NOT_FOUND


def test_operations_report_progress_then_the_version_or_the_error(
        prediction: Stub, service_registry: ModelRegistry, trained: TrainedModel) -> None:
    create(prediction, "conv")
    version = service_registry.start_version("conv", [day("2024-01-01")], day("2024-04-01"), day("2025-01-01"))
    operation = service_registry.create_operation(OperationKind.TRAIN, "conv", day("2025-01-01"),
                                                  version_id=version.version_id, stage="features")
    service_registry.report_progress(operation.operation_id, day("2025-01-01"), stage="features",
                                     persons_processed=200, persons_total=400)
    name = f"operations/{operation.operation_id}"
    running = prediction.GetOperation(operations_pb2.GetOperationRequest(name=name), timeout=10)
    assert running.name == name and not running.done
    metadata = pb.TrainModelMetadata()
    assert running.metadata.Unpack(metadata)
    assert (metadata.model_version, metadata.stage, metadata.persons_processed, metadata.persons_total) == (
        "models/conv/versions/1", "features", 200, 400)

    service_registry.finish_version("conv", version.version_id, trained, day("2025-01-01"))
    service_registry.finish_operation(operation.operation_id, day("2025-01-01"), elapsed_seconds=2.0)
    finished = prediction.GetOperation(operations_pb2.GetOperationRequest(name=name), timeout=10)
    response = pb.ModelVersion()
    assert finished.done and finished.response.Unpack(response)
    assert response.name == "models/conv/versions/1" and response.state == pb.MODEL_VERSION_STATE_READY

    failing = service_registry.create_operation(OperationKind.TRAIN, "conv", day("2025-01-01"), version_id=2)
    service_registry.finish_operation(failing.operation_id, day("2025-01-01"), elapsed_seconds=1.0,
                                      error_code=StatusCode.FAILED_PRECONDITION.value,
                                      error_message="the training set has 3 positives and 90 negatives")
    failed = prediction.GetOperation(operations_pb2.GetOperationRequest(
        name=f"operations/{failing.operation_id}"), timeout=10)
    assert failed.done and failed.error.code == code_pb2.FAILED_PRECONDITION
    assert "3 positives and 90 negatives" in failed.error.message

    code, reason, _, _ = error_of(prediction.GetOperation, operations_pb2.GetOperationRequest(
        name="operations/" + "0" * 32))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "OPERATION_NOT_FOUND")



class WireOrMessage:
    """Answers BatchScorePersons both ways, saying which way was called (no other method is called)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, method: str) -> Callable[..., Any]:
        return lambda request, context: None

    def batch_score_persons_wire(self, request: pb.BatchScorePersonsRequest, context: grpc.ServicerContext) -> bytes:
        self.calls.append("wire")
        return pb.BatchScorePersonsResponse(model_version="from the bytes").SerializeToString()

    def BatchScorePersons(self, request: pb.BatchScorePersonsRequest,
                          context: grpc.ServicerContext) -> pb.BatchScorePersonsResponse:
        self.calls.append("message")
        return pb.BatchScorePersonsResponse(model_version="from the message")


def test_batch_scores_leave_the_server_as_the_bytes_the_service_encoded() -> None:
    servicer = WireOrMessage()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    _add_to_server(cast(PredictionServicer, servicer), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            response = pb_grpc.PredictionServiceStub(channel).BatchScorePersons(pb.BatchScorePersonsRequest(),
                                                                                timeout=10)
    finally:
        server.stop(None)
    assert response.model_version == "from the bytes" and servicer.calls == ["wire"]


def test_a_versions_page_position_beyond_a_version_number_is_an_invalid_token() -> None:
    """A position (checksum and all: the format is open) that no int column holds, or that int() refuses,
    is INVALID_ARGUMENT, not a bind error answered INTERNAL."""
    assert _version_position(("7",)) == 7
    for position in ("4294967296", "9" * 5000, "0", "٣"):
        with pytest.raises(InvalidArgument):
            _version_position((position,))
