"""A bad person selector is the request's error, not a person's: BatchScorePersons (and a batch streamed in
StreamScorePersons) fails INVALID_ARGUMENT naming every bad selector as `persons[i]`, whether its form is wrong
(checked before any read) or only profile can tell (an identifier type identity's rules do not know, a value
its type refuses); a person's own error is only NOT_FOUND or FAILED_PRECONDITION. Over real gRPC, through
the real profile and identity services (test_serving.py's trained world)."""

from __future__ import annotations

import grpc
import pytest
from onecdp.common.v1 import common_pb2
from onecdp.prediction.v1 import prediction_service_pb2 as pb

from tests.services.prediction.test_server import error_of
from tests.services.prediction.test_serving import MODEL, World, by_id, by_identifier, world

pytestmark = pytest.mark.integration
__all__ = ["world"]  # the module-scoped fixture, used by name

UNKNOWN_TYPE = common_pb2.PersonSelector(identifier=common_pb2.Identifier(type="nosuch", value="v"))
BAD_EMAIL = common_pb2.PersonSelector(identifier=common_pb2.Identifier(type="email", value="not-an-email"))


def _batch(world: World, *persons: common_pb2.PersonSelector) -> pb.BatchScorePersonsRequest:
    return pb.BatchScorePersonsRequest(model=f"models/{MODEL}", persons=persons)


def test_a_batch_with_bad_selectors_fails_naming_each(world: World) -> None:
    predictions = world.stack.predictions
    first, second = sorted(world.events)[:2]
    # Malformed: named before profile is read.
    code, reason, fields, message = error_of(predictions.BatchScorePersons, _batch(
        world, by_identifier(first), by_id("bad!"), UNKNOWN_TYPE,
        common_pb2.PersonSelector(identifier=common_pb2.Identifier(type="No Such", value="v"))))
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["persons[1]", "persons[3]"])
    assert "'bad!' is not a person id" in message
    # Person ids read from the request's bytes (one length): a malformed one is named the same way.
    good = world.person_ids[first]
    code, _, fields, _ = error_of(predictions.BatchScorePersons, _batch(
        world, by_id(good), by_id(good.upper()), by_id(world.person_ids[second])))
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["persons[1]"])
    # Well formed, but profile refuses them (identity's rules): the call fails naming each, not a person.
    code, reason, fields, message = error_of(predictions.BatchScorePersons, _batch(
        world, by_identifier(first), UNKNOWN_TYPE, by_id("p_nobody"), BAD_EMAIL, by_identifier(second)))
    assert (code, reason, fields) == (grpc.StatusCode.INVALID_ARGUMENT, "BAD_PERSON_SELECTOR",
                                      ["persons[1]", "persons[3]"])
    assert "profile refused the selector" in message
    # Without them the batch is scored, and nobody's error is INVALID_ARGUMENT.
    response = predictions.BatchScorePersons(_batch(world, by_identifier(first), by_id("p_nobody")), timeout=30)
    assert [r.WhichOneof("outcome") for r in response.results] == ["score", "error"]
    assert response.results[1].error.code == "NOT_FOUND"
    assert response.results[1].error.message == "no person 'p_nobody' (never issued, or erased)"  # as identity says


def test_a_streamed_batch_or_person_with_a_bad_selector_names_it_in_the_stream(world: World) -> None:
    predictions = world.stack.predictions
    first = sorted(world.events)[0]
    answers = list(predictions.StreamScorePersons(iter([
        pb.StreamScorePersonsRequest(batch=_batch(world, by_identifier(first), UNKNOWN_TYPE)),
        pb.StreamScorePersonsRequest(model=f"models/{MODEL}", person=UNKNOWN_TYPE),
        pb.StreamScorePersonsRequest(model=f"models/{MODEL}", person=by_id("bad!")),
        pb.StreamScorePersonsRequest(model=f"models/{MODEL}", person=by_identifier(first))]), timeout=30))
    assert [a.result.WhichOneof("outcome") for a in answers] == ["error", "error", "error", "score"]
    assert [a.result.error.code for a in answers[:3]] == ["INVALID_ARGUMENT"] * 3
    assert "requests[0].batch.persons[1]: profile refused the selector" in answers[0].result.error.message
    assert answers[1].result.error.message.startswith("requests[1].person: profile refused the selector")
    assert "requests[2].person: 'bad!' is not a person id" in answers[2].result.error.message
    assert not answers[0].HasField("batch")

