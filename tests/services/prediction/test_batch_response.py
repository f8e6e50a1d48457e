"""BatchScorePersons' results encoded for the whole batch are the messages set field by field, for every shape
of batch: both views, errors among the scores, ids of one or many lengths, ids the bulk path leaves alone."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

import numpy as np
import pytest
from onecdp.prediction.v1 import prediction_service_pb2 as pb

from services.prediction.batch_response import (
    _encoded_results,
    add_score_results,
    add_score_results_by_field,
    batch_response_bytes,
    streamed_batch_response_bytes,
)
from services.prediction.features import FEATURE_NAMES
from services.prediction.scoring import ScoreBatch
from services.prediction.serving import ScoredBatch
from shared.errors import DomainError, FailedPrecondition, NotFound

pytestmark = pytest.mark.unit

AS_OF = datetime(2026, 11, 24, 4, 5, 6, 789_012, tzinfo=UTC)
VERSION = "models/buyers/versions/3"


def scored_batch(person_ids: Sequence[str], errors: dict[int, DomainError] | None = None, *,
                 explained: bool = False, seed: int = 1) -> ScoredBatch:
    """A batch of `person_ids` scored, with `errors` at those request positions (the scores fill the others)."""
    rng = np.random.default_rng(seed)
    errors = errors or {}
    total = len(person_ids) + len(errors)
    rows, row = [], 0
    for index in range(total):
        rows.append(-1 if index in errors else row)
        row += index not in errors
    probabilities = rng.random(len(person_ids))
    probabilities[:2] = [0.0, 1.0][:len(probabilities[:2])]  # a zero is absent on the wire, a one is not
    percentiles = np.floor(probabilities * 1000) / 10
    features = rng.random((len(person_ids), len(FEATURE_NAMES)))
    contributions = rng.normal(size=(len(person_ids), len(FEATURE_NAMES) + 1)) if explained else None
    top = (np.argsort(-np.abs(contributions[:, :-1]), axis=1)[:, :3] if contributions is not None
           else np.empty((0, 0), dtype=np.intp))
    return ScoredBatch(ScoreBatch(list(person_ids), probabilities, percentiles, features, contributions, top, AS_OF),
                       rows, errors)


def responses(scored: ScoredBatch, full: bool) -> tuple[pb.BatchScorePersonsResponse, pb.BatchScorePersonsResponse]:
    """The response built by add_score_results, and the one built field by field."""
    built = []
    for add in (add_score_results, add_score_results_by_field):
        response = pb.BatchScorePersonsResponse(model_version=VERSION)
        response.as_of_time.FromDatetime(AS_OF)
        add(response, scored, VERSION, full)
        built.append(response)
    return built[0], built[1]


def uuids(count: int) -> list[str]:
    return [str(uuid.UUID(int=index * 7919 + 1)) for index in range(count)]


@pytest.mark.parametrize("full", [True, False], ids=["FULL", "BASIC"])
@pytest.mark.parametrize("person_ids", [
    uuids(400),  # one length: rows as they are
    [f"p{index}" for index in range(1, 300, 7)],  # several lengths: rows cut to their used bytes
    ["x"],
], ids=["uuids", "lengths", "one"])
def test_the_bulk_encoding_is_the_field_by_field_message(person_ids: list[str], full: bool) -> None:
    scored = scored_batch(person_ids)
    assert _encoded_results(scored, VERSION, full, pb.BatchScorePersonsResponse().as_of_time) is not None
    bulk, by_field = responses(scored, full)
    assert bulk == by_field
    assert bulk.SerializeToString(deterministic=True) == by_field.SerializeToString(deterministic=True)
    assert [r.score.person_id for r in bulk.results] == person_ids
    assert [r.score.probability for r in bulk.results] == scored.batch.probabilities.tolist()
    if full:
        assert bulk.results[-1].score.as_of_time.ToDatetime(tzinfo=UTC) == AS_OF
        assert bulk.results[-1].score.model_version == VERSION


@pytest.mark.parametrize("full", [True, False], ids=["FULL", "BASIC"])
def test_errors_keep_their_places_among_the_scores(full: bool) -> None:
    long_message = "no person matches the selector " + "x" * 300  # a length of two bytes on the wire
    errors: dict[int, DomainError] = {0: NotFound(long_message, reason="PERSON_NOT_FOUND"),
                                      5: FailedPrecondition("not eligible", reason="PERSON_NOT_ELIGIBLE"),
                                      6: NotFound("gone", reason="PERSON_NOT_FOUND")}
    scored = scored_batch(uuids(20), errors)
    assert _encoded_results(scored, VERSION, full, pb.BatchScorePersonsResponse().as_of_time) is not None
    bulk, by_field = responses(scored, full)
    assert bulk == by_field
    outcomes = [result.WhichOneof("outcome") for result in bulk.results]
    assert [index for index, outcome in enumerate(outcomes) if outcome == "error"] == [0, 5, 6]
    assert bulk.results[0].error.message == long_message
    assert bulk.results[5].error.code == "FAILED_PRECONDITION"


def test_a_batch_of_errors_only() -> None:
    scored = scored_batch([], {0: NotFound("gone", reason="PERSON_NOT_FOUND")})
    bulk, by_field = responses(scored, True)
    assert bulk == by_field
    assert len(bulk.results) == 1


@pytest.mark.parametrize("person_ids", [["p1", "pé2"], ["p1", "p" * 120]], ids=["non-ascii", "long"])
def test_batches_the_bulk_path_leaves_are_built_field_by_field(person_ids: list[str]) -> None:
    scored = scored_batch(person_ids)
    assert _encoded_results(scored, VERSION, True, pb.BatchScorePersonsResponse().as_of_time) is None
    bulk, by_field = responses(scored, True)
    assert bulk == by_field
    assert [r.score.person_id for r in bulk.results] == person_ids


def test_explained_scores_carry_their_top_features() -> None:
    scored = scored_batch(uuids(5), {2: NotFound("gone", reason="PERSON_NOT_FOUND")}, explained=True)
    bulk, by_field = responses(scored, True)
    assert bulk == by_field
    first = bulk.results[0].score
    assert len(first.top_features) == 3
    assert first.base_value == pytest.approx(float(scored.batch.contributions[0, -1]))  # type: ignore[index]


@pytest.mark.parametrize("full", [True, False], ids=["FULL", "BASIC"])
def test_the_response_bytes_are_the_response_built_field_by_field(full: bool) -> None:
    errors: dict[int, DomainError] = {1: NotFound("no person matches the selector")}
    for scored in (scored_batch(uuids(50)), scored_batch(uuids(9), errors),
                   scored_batch(uuids(7), explained=full), scored_batch([])):
        expected = pb.BatchScorePersonsResponse(model_version=VERSION)
        expected.as_of_time.FromDatetime(AS_OF)
        add_score_results_by_field(expected, scored, VERSION, full)
        assert pb.BatchScorePersonsResponse.FromString(batch_response_bytes(scored, VERSION, AS_OF, full)) == expected


def test_a_streamed_batch_response_carries_the_batch_response_bytes() -> None:
    scored = scored_batch(uuids(300), {5: NotFound("no person matches the selector")})
    expected = pb.BatchScorePersonsResponse.FromString(batch_response_bytes(scored, VERSION, AS_OF, True))
    streamed = pb.StreamScorePersonsResponse.FromString(
        streamed_batch_response_bytes(batch_response_bytes(scored, VERSION, AS_OF, True)))
    assert streamed == pb.StreamScorePersonsResponse(batch=expected)
    assert len(streamed.batch.results) == len(scored) > 2  # a length of more than one byte on the wire
