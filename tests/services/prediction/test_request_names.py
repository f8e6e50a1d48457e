"""Resource names and labels over real gRPC: a version number in non-ASCII digits, a model id ending in a
newline and control characters in a model's labels are INVALID_ARGUMENT naming the field, never INTERNAL and
never read as another name (an outside tester's findings)."""

from __future__ import annotations

import grpc
import pytest
from onecdp.common.v1 import common_pb2
from onecdp.prediction.v1 import prediction_service_pb2 as pb
from onecdp.prediction.v1 import prediction_service_pb2_grpc as pb_grpc

from tests.services.prediction.test_server import create, error_of

pytestmark = pytest.mark.integration

Stub = pb_grpc.PredictionServiceStub
# A superscript two (str.isdigit() takes it, int() does not) and Arabic-Indic one and two (int() reads 1, 2).
NON_ASCII_NUMBERS = ["\u00b2", "\u0661", "\u0662"]
PERSON = common_pb2.PersonSelector(person_id="p_01abc")


def test_a_version_in_non_ascii_digits_is_invalid_argument_in_every_call(prediction: Stub) -> None:
    create(prediction, "conv90")
    for number in NON_ASCII_NUMBERS:
        version = f"models/conv90/versions/{number}"
        for call, request, field in (
                (prediction.GetModelVersion, pb.GetModelVersionRequest(name=version), "name"),
                (prediction.ActivateModelVersion, pb.ActivateModelVersionRequest(name=version), "name"),
                (prediction.ScorePerson, pb.ScorePersonRequest(model="models/conv90", person=PERSON,
                                                               model_version=version), "model_version"),
                (prediction.BatchScorePersons, pb.BatchScorePersonsRequest(
                    model="models/conv90", persons=[PERSON], model_version=version), "model_version")):
            code, reason, fields, _ = error_of(call, request)
            assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, [field]), (number, call)
            if field == "name":
                assert reason == "BAD_RESOURCE_NAME"
    # In a stream, the batch gets its error and the stream goes on.
    batch = pb.BatchScorePersonsRequest(model="models/conv90", persons=[PERSON],
                                        model_version="models/conv90/versions/\u00b2")
    answers = list(prediction.StreamScorePersons(iter([
        pb.StreamScorePersonsRequest(batch=batch),
        pb.StreamScorePersonsRequest(model="models/absent", person=PERSON)]), timeout=10))
    assert [a.result.error.code for a in answers] == ["INVALID_ARGUMENT", "NOT_FOUND"]
    assert "requests[0].batch.model_version" in answers[0].result.error.message


def test_a_model_id_or_name_ending_in_a_newline_is_invalid_argument(prediction: Stub) -> None:
    code, _, fields, _ = error_of(prediction.CreateModel, pb.CreateModelRequest(
        model_id="x1\n", model=pb.Model(spec=pb.ModelSpec(kind=pb.PREDICTION_KIND_CONVERSION, horizon_days=30))))
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["model_id"])
    assert list(prediction.ListModels(pb.ListModelsRequest(), timeout=10).models) == []
    create(prediction, "x1")
    for call, request in ((prediction.GetModel, pb.GetModelRequest(name="models/x1\n")),
                          (prediction.GetModelVersion, pb.GetModelVersionRequest(name="models/x1/versions/1\n")),
                          (prediction.ActivateModelVersion,
                           pb.ActivateModelVersionRequest(name="models/x1\n/versions/1"))):
        code, _, fields, _ = error_of(call, request)
        assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["name"]), request


def test_control_characters_in_event_names_are_invalid_argument(prediction: Stub) -> None:
    for name in ("sign\x00up", "new\nline", "a\x7fb"):
        code, _, fields, message = error_of(prediction.CreateModel, pb.CreateModelRequest(
            model_id="conv", model=pb.Model(spec=pb.ModelSpec(
                kind=pb.PREDICTION_KIND_CONVERSION, horizon_days=30, event_names=["order", name]))))
        assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["model.spec.event_names[1]"]), name
        assert "control character" in message
    assert list(prediction.ListModels(pb.ListModelsRequest(), timeout=10).models) == []


def test_control_characters_in_a_display_name_are_invalid_argument(prediction: Stub) -> None:
    for display_name in ("Buy\x00ers", "Buyers\n", "a\x7fb"):
        code, _, fields, message = error_of(prediction.CreateModel, pb.CreateModelRequest(
            model_id="conv", model=pb.Model(display_name=display_name, spec=pb.ModelSpec(
                kind=pb.PREDICTION_KIND_CONVERSION, horizon_days=30))))
        assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["model.display_name"]), display_name
        assert "control character" in message
    assert list(prediction.ListModels(pb.ListModelsRequest(), timeout=10).models) == []
