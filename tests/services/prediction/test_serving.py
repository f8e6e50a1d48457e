"""Training, scoring, features and score refresh over real gRPC, through the real profile and identity services.

One stack per module: 150 synthetic shoppers (about 1,800 track and order events) are ingested
through profile's IngestEvents, and one conversion model is trained through TrainModel (four rolling
cutoffs give it more than 100 positives and negatives). The tests then check the service's answers
against the same computation done locally on the synthetic events: what profile stores and returns
must be exactly what was generated, and a score must be exactly the stored booster's prediction on
the features of those events.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast

import grpc
import lightgbm as lgb
import numpy as np
import pytest
from google.longrunning import operations_pb2
from google.protobuf import field_mask_pb2, timestamp_pb2
from google.rpc import code_pb2
from onecdp.common.v1 import common_pb2
from onecdp.prediction.v1 import prediction_service_pb2 as pb
from onecdp.profile.v1 import profile_service_pb2 as profile_pb

from services.prediction.datasets import is_eligible
from services.prediction.features import FEATURE_NAMES, features_as_of
from services.prediction.history import ORDER_EVENT, ActivityEvent, InMemoryProfileSource, PersonHistory, PersonRef
from services.prediction.profile_source import GrpcProfileSource
from services.prediction.registry import ModelRegistry
from services.prediction.spec import PredictionKind, resolve_spec
from shared.cassandra import CassandraSession, connect_cluster, open_session
from shared.config import CassandraSettings
from shared.errors import DomainError, InvalidArgument, NotFound
from tests.services.prediction.stack import (
    IDENTIFIER_TYPE,
    Stack,
    identifier_of,
    ingest,
    profile_events,
    running_stack,
)
from tests.services.prediction.synthetic import day, synthetic_events
from tests.services.prediction.test_server import create, error_of

pytestmark = pytest.mark.integration

PERSONS = 150
SEED = 11
TRAINING_CUTOFFS = [day(d) for d in ("2023-10-01", "2023-12-01", "2024-02-01", "2024-04-01")]
VALIDATION_CUTOFF = day("2024-06-01")
AS_OF = day("2024-10-01")
MODEL = "buyers"
ALL_FEATURES = len(FEATURE_NAMES)
# Profile's feed settles for a second and the online store polls it; well above that, for a loaded machine.
FRESHNESS_SECONDS = 10.0
T = TypeVar("T")


@dataclass
class World:
    stack: Stack
    events: dict[str, list[ActivityEvent]]  # by synthetic name
    person_ids: dict[str, str]  # synthetic name -> profile's person id
    registry: ModelRegistry  # the prediction service's own registry, to read the stored booster
    training: operations_pb2.Operation  # the finished TrainModel operation of MODEL
    progress: list[pb.TrainModelMetadata]  # metadata seen while it ran


def timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    message = timestamp_pb2.Timestamp()
    message.FromDatetime(value)
    return message


def wait_done(world_stack: Stack, name: str, seen: list[Any] | None = None,
              metadata_type: Callable[[], Any] = pb.TrainModelMetadata) -> operations_pb2.Operation:
    deadline = time.monotonic() + 60
    while True:
        request = operations_pb2.GetOperationRequest(name=name)
        operation: operations_pb2.Operation = world_stack.predictions.GetOperation(request, timeout=10)
        if seen is not None:
            metadata = metadata_type()
            assert operation.metadata.Unpack(metadata)
            seen.append(metadata)
        if operation.done:
            return operation
        assert time.monotonic() < deadline, f"{name} did not finish in 60 s"
        time.sleep(0.05)


def train(stack: Stack, model_id: str, activate: bool = True) -> operations_pb2.Operation:
    request = pb.TrainModelRequest(name=f"models/{model_id}", training_cutoffs=[timestamp(t) for t in TRAINING_CUTOFFS],
                                   validation_cutoff=timestamp(VALIDATION_CUTOFF), activate=activate)
    started: operations_pb2.Operation = stack.predictions.TrainModel(request, timeout=10)
    return started


@pytest.fixture(scope="module")
def world(cassandra_base_settings: CassandraSettings, admin_session: CassandraSession) -> Iterator[World]:
    events = synthetic_events(PERSONS, seed=SEED)
    with running_stack(cassandra_base_settings, admin_session) as stack:
        person_ids = ingest(stack.profiles, events)
        create(stack.predictions, MODEL, pb.ModelSpec(kind=pb.PREDICTION_KIND_CONVERSION, horizon_days=60))
        started = train(stack, MODEL)
        progress: list[pb.TrainModelMetadata] = []
        finished = wait_done(stack, started.name, progress)
        cassandra = cassandra_base_settings.model_copy(
            update={"keyspace_prefix": stack.keyspace_prefix})
        cluster = connect_cluster(cassandra)
        try:
            registry = ModelRegistry(open_session(cluster, cassandra.keyspace("prediction"), 10))
            yield World(stack, events, person_ids, registry, finished, progress)
        finally:
            cluster.shutdown()


def local_probability(world: World, name: str, as_of: datetime = AS_OF) -> float:
    booster = lgb.Booster(model_str=world.registry.load_booster(MODEL, 1))
    row = features_as_of(world.events[name], as_of)
    return float(booster.predict(np.asarray([[row[f] for f in FEATURE_NAMES]]), num_threads=1)[0])


def same_features(left: dict[str, float], right: dict[str, float]) -> bool:
    return left.keys() == right.keys() and all(
        (math.isnan(left[k]) and math.isnan(right[k])) or left[k] == pytest.approx(right[k]) for k in left)


def eventually(read: Callable[[], T], expected: T, seconds: float = FRESHNESS_SECONDS) -> bool:
    """Whether `read()` returns `expected` within `seconds` (what the online store promises after a change)."""
    deadline = time.monotonic() + seconds
    while read() != expected:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def by_id(person_id: str) -> common_pb2.PersonSelector:
    return common_pb2.PersonSelector(person_id=person_id)


def by_identifier(name: str) -> common_pb2.PersonSelector:
    return common_pb2.PersonSelector(identifier=identifier_of(name))


# ---- the ProfileSource against the real profile service -------------------------------------------

def _as_tuples(history: PersonHistory | DomainError) -> list[tuple[str, datetime, float | None, str | None]]:
    assert isinstance(history, PersonHistory)
    return [(e.name, e.time, e.amount, e.category) for e in history.events]


def test_the_profile_source_reads_back_exactly_what_was_ingested(world: World) -> None:
    source = GrpcProfileSource(world.stack.profiles)
    before = day("2024-03-15")
    expected = InMemoryProfileSource(world.events)
    scanned = {h.person_id: h for h in source.histories(before)}
    assert set(scanned) == set(world.person_ids.values())
    for name, person_id in world.person_ids.items():
        assert _as_tuples(scanned[person_id]) == _as_tuples(expected.history(PersonRef(person_id=name), before))

    names = sorted(world.events)[:20]
    refs = [PersonRef(identifier_type=IDENTIFIER_TYPE, identifier_value=n) for n in names[:10]]
    refs += [PersonRef(person_id=world.person_ids[n]) for n in names[10:]]
    refs.insert(5, PersonRef(person_id="p_nobody"))
    refs.insert(7, PersonRef(identifier_type=IDENTIFIER_TYPE, identifier_value="never-seen"))
    refs.insert(9, PersonRef(identifier_type="email", identifier_value="not-an-email"))
    histories = source.histories_of(refs, before)
    assert isinstance(histories[5], NotFound) and isinstance(histories[7], NotFound)
    # A bad identifier fails profile's whole batch read; only that person's read fails in the end.
    assert isinstance(histories[9], InvalidArgument) and histories[9].reason == "BAD_PERSON_SELECTOR"
    del histories[9], histories[7], histories[5]
    for name, history in zip(names, histories, strict=True):
        assert isinstance(history, PersonHistory) and history.person_id == world.person_ids[name]
        assert _as_tuples(history) == _as_tuples(expected.history(PersonRef(person_id=name), before))

    # Someone known by an identifier but without events before the time: found, with no history.
    first = min(world.events, key=lambda n: world.events[n][0].time)
    early = source.history(PersonRef(identifier_type=IDENTIFIER_TYPE, identifier_value=first),
                           world.events[first][0].time)
    assert early.person_id == world.person_ids[first] and early.events == []
    with pytest.raises(NotFound):
        source.history(PersonRef(person_id="p_nobody"), before)


# ---- training as an operation ---------------------------------------------------------------------

def test_training_runs_as_an_operation_and_activates_a_ready_version(world: World) -> None:
    finished = world.training
    version = pb.ModelVersion()
    assert finished.done and finished.response.Unpack(version), finished.error
    assert version.name == f"models/{MODEL}/versions/1" and version.state == pb.MODEL_VERSION_STATE_READY
    assert version.metrics.training_examples >= 200 and version.metrics.roc_auc > 0.7
    assert world.stack.predictions.GetModel(pb.GetModelRequest(name=f"models/{MODEL}"),
                                            timeout=10).active_version == version.name
    stages = [m.stage for m in world.progress]
    assert stages[-1] == "done" and all(m.model_version == version.name for m in world.progress)
    assert world.progress[-1].persons_processed > 0 and world.progress[0].start_time.seconds > 0


def test_too_few_examples_fail_the_operation_saying_how_many(world: World) -> None:
    predictions = world.stack.predictions
    create(predictions, "picky", pb.ModelSpec(kind=pb.PREDICTION_KIND_CONVERSION, horizon_days=60,
                                              min_class_count=100_000))
    finished = wait_done(world.stack, train(world.stack, "picky").name)
    assert finished.done and finished.error.code == code_pb2.FAILED_PRECONDITION
    assert "positives and" in finished.error.message and "at least 100000 of each" in finished.error.message
    version = predictions.GetModelVersion(pb.GetModelVersionRequest(name="models/picky/versions/1"), timeout=10)
    assert version.state == pb.MODEL_VERSION_STATE_FAILED and version.failure_message == finished.error.message

    code, reason, _, _ = error_of(predictions.TrainModel, pb.TrainModelRequest(
        name="models/absent", training_cutoffs=[timestamp(TRAINING_CUTOFFS[0])],
        validation_cutoff=timestamp(VALIDATION_CUTOFF)))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")
    code, _, fields, _ = error_of(predictions.TrainModel, pb.TrainModelRequest(name="model/x", seed=-1))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert fields == ["name", "training_cutoffs", "validation_cutoff", "seed"]
    code, _, fields, _ = error_of(predictions.TrainModel, pb.TrainModelRequest(
        name="models/picky", training_cutoffs=[timestamp(day("2024-05-01"))],
        validation_cutoff=timestamp(VALIDATION_CUTOFF)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and fields == ["training_cutoffs[0]"]


# ---- scoring --------------------------------------------------------------------------------------

def test_score_person_by_identifier_or_id_is_the_booster_on_the_persons_features(world: World) -> None:
    predictions = world.stack.predictions
    name = sorted(world.events)[3]
    score = predictions.ScorePerson(pb.ScorePersonRequest(
        model=f"models/{MODEL}", person=by_identifier(name), top_features=50, as_of_time=timestamp(AS_OF)), timeout=10)
    assert score.person_id == world.person_ids[name] and score.model_version == f"models/{MODEL}/versions/1"
    assert score.probability == pytest.approx(local_probability(world, name), abs=1e-12)
    assert 0 <= score.percentile <= 100 and score.as_of_time.ToDatetime(tzinfo=UTC) == AS_OF
    # All contributions plus the base value are the raw score (log-odds) of the probability.
    assert len(score.top_features) == ALL_FEATURES
    raw = score.base_value + sum(c.contribution for c in score.top_features)
    assert 1 / (1 + math.exp(-raw)) == pytest.approx(score.probability, abs=1e-9)
    magnitudes = [abs(c.contribution) for c in score.top_features]
    assert magnitudes == sorted(magnitudes, reverse=True)
    features = features_as_of(world.events[name], AS_OF)
    assert all(c.value == pytest.approx(features[c.feature]) or math.isnan(features[c.feature])
               for c in score.top_features)

    again = predictions.ScorePerson(pb.ScorePersonRequest(
        model=f"models/{MODEL}", person=by_id(world.person_ids[name]), model_version=f"models/{MODEL}/versions/1",
        as_of_time=timestamp(AS_OF)), timeout=10)
    assert again.probability == score.probability and len(again.top_features) == 5
    assert [c.feature for c in again.top_features] == [c.feature for c in score.top_features[:5]]


def test_score_person_errors(world: World) -> None:
    predictions = world.stack.predictions
    model = f"models/{MODEL}"
    name = sorted(world.events)[0]

    def score_error(**fields: Any) -> tuple[grpc.StatusCode, str, list[str], str]:
        request = pb.ScorePersonRequest(**{"model": model, "person": by_identifier(name), **fields})
        return error_of(predictions.ScorePerson, request)

    assert score_error(person=by_id("p_nobody"))[:2] == (grpc.StatusCode.NOT_FOUND, "PERSON_NOT_FOUND")
    assert score_error(model="models/absent")[:2] == (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")
    code, reason, _, message = score_error(as_of_time=timestamp(world.events[name][0].time))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "PERSON_NOT_ELIGIBLE")
    assert world.person_ids[name] in message
    create(predictions, "untrained")
    code, reason, _, _ = score_error(model="models/untrained")
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "NO_ACTIVE_VERSION")
    code, _, fields, _ = score_error(person=common_pb2.PersonSelector(), top_features=51,
                                     model_version="models/other/versions/1")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and fields == ["person", "model_version", "top_features"]
    assert score_error(model="nope")[:3:2] == (grpc.StatusCode.INVALID_ARGUMENT, ["model"])
    assert score_error(model_version=f"models/{MODEL}/versions/7")[0] == grpc.StatusCode.NOT_FOUND


def test_batch_and_stream_answer_in_request_order_with_an_error_per_person(world: World) -> None:
    predictions = world.stack.predictions
    names = sorted(world.events)[:30]
    selectors = [by_identifier(n) if i % 2 else by_id(world.person_ids[n]) for i, n in enumerate(names)]
    selectors.insert(4, by_id("p_nobody"))
    response = predictions.BatchScorePersons(pb.BatchScorePersonsRequest(
        model=f"models/{MODEL}", persons=selectors, top_features=3), timeout=30)
    assert len(response.results) == 31
    missing = response.results[4]
    assert missing.WhichOneof("outcome") == "error" and missing.error.code == "NOT_FOUND"
    scored = [r.score for i, r in enumerate(response.results) if i != 4]
    assert [s.person_id for s in scored] == [world.person_ids[n] for n in names]
    assert all(len(s.top_features) == 3 and s.model_version == f"models/{MODEL}/versions/1" for s in scored)
    # Scored as of now, every event of the synthetic shop (which ended in 2025) counts.
    now = datetime.now(UTC)
    for name, score in zip(names[:5], scored[:5], strict=True):
        assert score.probability == pytest.approx(local_probability(world, name, now), abs=1e-12)

    stream_requests = [pb.StreamScorePersonsRequest(model=f"models/{MODEL}", person=by_identifier(n))
                       for n in names[:3]]
    stream_requests.insert(1, pb.StreamScorePersonsRequest(model=f"models/{MODEL}"))
    stream_requests.append(pb.StreamScorePersonsRequest(model="models/absent", person=by_identifier(names[0])))
    streamed = [r.result for r in predictions.StreamScorePersons(iter(stream_requests), timeout=30)]
    assert [r.WhichOneof("outcome") for r in streamed] == ["score", "error", "score", "score", "error"]
    assert (streamed[1].error.code, streamed[4].error.code) == ("INVALID_ARGUMENT", "NOT_FOUND")
    assert [streamed[i].score.probability for i in (0, 2, 3)] == pytest.approx([s.probability for s in scored[:3]])

    code, _, fields, _ = error_of(predictions.BatchScorePersons, pb.BatchScorePersonsRequest(model=f"models/{MODEL}"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and fields == ["persons"]
    code, reason, _, _ = error_of(predictions.BatchScorePersons, pb.BatchScorePersonsRequest(
        model=f"models/{MODEL}", persons=[by_id("p1")] * 10_001))
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "BATCH_TOO_LARGE")
    code, _, fields, _ = error_of(predictions.BatchScorePersons, pb.BatchScorePersonsRequest(
        model=f"models/{MODEL}", persons=[by_id("p_1"), common_pb2.PersonSelector()]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and fields == ["persons[1]"]


def test_a_streamed_batch_is_answered_exactly_as_batch_score_persons_answers_it(world: World) -> None:
    predictions = world.stack.predictions
    names = sorted(world.events)
    model = f"models/{MODEL}"
    by_ids = pb.BatchScorePersonsRequest(model=model, persons=[by_id(world.person_ids[n]) for n in names],
                                         as_of_time=timestamp(AS_OF))  # ids of one length: read from the bytes
    mixed = pb.BatchScorePersonsRequest(
        model=model, top_features=3, as_of_time=timestamp(AS_OF),
        persons=[by_identifier(n) if i % 2 else by_id(world.person_ids[n]) for i, n in enumerate(names[:40])])
    mixed.persons.insert(5, by_id("p_nobody"))
    basic = pb.BatchScorePersonsRequest(model=model, persons=by_ids.persons[::-1], view=pb.SCORE_VIEW_BASIC,
                                        as_of_time=timestamp(AS_OF + timedelta(days=30)))
    empty = pb.BatchScorePersonsRequest(model=model)
    single = pb.StreamScorePersonsRequest(model=model, person=by_identifier(names[0]))
    requests = [pb.StreamScorePersonsRequest(batch=by_ids), single, pb.StreamScorePersonsRequest(batch=mixed),
                pb.StreamScorePersonsRequest(batch=empty), pb.StreamScorePersonsRequest(batch=basic),
                pb.StreamScorePersonsRequest(batch=pb.BatchScorePersonsRequest(
                    model=model, persons=[by_id("p1")] * 10_001)),
                pb.StreamScorePersonsRequest(batch=by_ids, person=single.person, top_features=2)]
    streamed = list(predictions.StreamScorePersons(iter(requests), timeout=60))

    assert len(streamed) == len(requests)
    for index in (0, 2, 4):
        expected = predictions.BatchScorePersons(requests[index].batch, timeout=30)
        assert streamed[index] == pb.StreamScorePersonsResponse(batch=expected)
    assert len(streamed[0].batch.results) == PERSONS
    assert [r.WhichOneof("outcome") for r in streamed[2].batch.results[4:7]] == ["score", "error", "score"]
    assert all(len(r.score.top_features) == 3 for i, r in enumerate(streamed[2].batch.results) if i != 5)
    assert streamed[1].result.score.person_id == world.person_ids[names[0]]
    # A streamed person is scored as of now, as before.
    assert streamed[1].result.score.probability == pytest.approx(
        local_probability(world, names[0], datetime.now(UTC)), abs=1e-12)
    invalid, too_large = streamed[3].result.error, streamed[5].result.error
    assert invalid.code == "INVALID_ARGUMENT" and "requests[3].batch.persons" in invalid.message
    assert too_large.code == "RESOURCE_EXHAUSTED" and "10001 persons" in too_large.message
    assert not streamed[3].HasField("batch") and not streamed[5].HasField("batch")
    both = streamed[6].result.error
    assert both.code == "INVALID_ARGUMENT" and not streamed[6].HasField("batch")
    assert "requests[6].person" in both.message and "requests[6].top_features" in both.message


def test_a_batch_above_profiles_read_limit_is_scored_in_request_order(world: World) -> None:
    names = sorted(world.events)
    # 2,500 selectors (profile reads at most 1,000 per call), every person many times, by id and identifier.
    selectors = [by_identifier(names[i % PERSONS]) if i % 3 else by_id(world.person_ids[names[i % PERSONS]])
                 for i in range(2_500)]
    response = world.stack.predictions.BatchScorePersons(pb.BatchScorePersonsRequest(
        model=f"models/{MODEL}", persons=selectors), timeout=120)
    assert [r.score.person_id for r in response.results] == [world.person_ids[names[i % PERSONS]]
                                                             for i in range(2_500)]
    first_round = [r.score.probability for r in response.results[:PERSONS]]
    assert all(r.score.probability == first_round[i % PERSONS] for i, r in enumerate(response.results))
    assert all(r.score.top_features == [] and r.score.base_value == 0 for r in response.results)


def test_the_basic_view_carries_the_same_probabilities_and_nothing_per_person_that_the_batch_shares(
        world: World) -> None:
    predictions = world.stack.predictions
    names = sorted(world.events)[:20]
    selectors = [by_identifier(n) if i % 2 else by_id(world.person_ids[n]) for i, n in enumerate(names)]
    selectors.insert(3, by_id("p_nobody"))

    def batch(view: pb.ScoreView.ValueType) -> pb.BatchScorePersonsResponse:
        response: pb.BatchScorePersonsResponse = predictions.BatchScorePersons(pb.BatchScorePersonsRequest(
            model=f"models/{MODEL}", persons=selectors, as_of_time=timestamp(AS_OF), view=view), timeout=30)
        return response

    full, basic, default = batch(pb.SCORE_VIEW_FULL), batch(pb.SCORE_VIEW_BASIC), batch(pb.SCORE_VIEW_UNSPECIFIED)
    assert default == full
    for response in (full, basic):
        assert response.model_version == f"models/{MODEL}/versions/1"
        assert response.as_of_time.ToDatetime(tzinfo=UTC) == AS_OF
        assert response.results[3].error.code == "NOT_FOUND"
    scored_full = [r.score for i, r in enumerate(full.results) if i != 3]
    scored_basic = [r.score for i, r in enumerate(basic.results) if i != 3]
    assert [s.person_id for s in scored_basic] == [s.person_id for s in scored_full]
    assert [s.probability for s in scored_basic] == [s.probability for s in scored_full]
    assert all(s.probability == pytest.approx(local_probability(world, n), abs=1e-12)
               for n, s in zip(names, scored_basic, strict=True))
    assert all(s.model_version == f"models/{MODEL}/versions/1" and s.as_of_time == full.as_of_time
               for s in scored_full)
    assert any(s.percentile > 0 for s in scored_full)
    assert all(pb.Score(person_id=s.person_id, probability=s.probability) == s for s in scored_basic)

    code, _, fields, message = error_of(predictions.BatchScorePersons, pb.BatchScorePersonsRequest(
        model=f"models/{MODEL}", persons=selectors, view=pb.SCORE_VIEW_BASIC, top_features=3))
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["top_features"]) and "FULL" in message
    code, _, fields, _ = error_of(predictions.BatchScorePersons, pb.BatchScorePersonsRequest(
        model=f"models/{MODEL}", persons=selectors, view=cast(pb.ScoreView.ValueType, 9)))
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["view"])


def test_batch_scores_as_of_a_time_cannot_be_changed_by_a_later_event(world: World) -> None:
    predictions = world.stack.predictions
    name = sorted(world.events)[40]
    person_id = world.person_ids[name]

    def batch_as_of(as_of: datetime) -> list[pb.Score]:
        response = predictions.BatchScorePersons(pb.BatchScorePersonsRequest(
            model=f"models/{MODEL}", persons=[by_id(person_id), by_identifier(name)], top_features=ALL_FEATURES,
            as_of_time=timestamp(as_of)), timeout=30)
        assert [r.WhichOneof("outcome") for r in response.results] == ["score", "score"]
        return [r.score for r in response.results]

    before = batch_as_of(AS_OF)
    assert all(s.as_of_time.ToDatetime(tzinfo=UTC) == AS_OF for s in before)
    assert before[0].probability == pytest.approx(local_probability(world, name, AS_OF), abs=1e-12)

    # Orders at the cutoff itself and a day after it: neither is strictly before AS_OF.
    late = [ActivityEvent(ORDER_EVENT, AS_OF, 50.0, "books"), ActivityEvent(ORDER_EVENT, AS_OF + timedelta(days=1),
                                                                            70.0, "music")]
    messages = profile_events(name, late)
    for index, message in enumerate(messages):
        message.message_id, message.order.order_id = f"{name}-late-{index}", f"{name}-late-o{index}"
    response = world.stack.profiles.IngestEvents(profile_pb.IngestEventsRequest(events=messages), timeout=30)
    assert all(r.status == profile_pb.EVENT_STATUS_ACCEPTED for r in response.results), response
    world.events[name] = sorted([*world.events[name], *late], key=lambda e: e.time)  # later tests see them too

    after = batch_as_of(AS_OF)
    for old, new in zip(before, after, strict=True):
        assert new.probability == old.probability and new.base_value == old.base_value
        assert [(c.feature, c.value, c.contribution) for c in new.top_features] == \
            [(c.feature, c.value, c.contribution) for c in old.top_features]
    # The orders were stored and do count for a later time (once the online store has followed profile's
    # change), so the equality above is not vacuous.
    later = AS_OF + timedelta(days=2)

    def order_count_later() -> float:
        features: pb.PersonFeatures = predictions.GetPersonFeatures(pb.GetPersonFeaturesRequest(
            person=by_id(person_id), as_of_time=timestamp(later)), timeout=10)
        return features.values["order_count"]

    assert eventually(order_count_later, features_as_of(world.events[name], later)["order_count"])
    assert features_as_of(world.events[name], later)["order_count"] == \
        features_as_of(world.events[name], AS_OF)["order_count"] + 2
    assert batch_as_of(later)[0].probability == pytest.approx(local_probability(world, name, later), abs=1e-12)
    after_follow = batch_as_of(AS_OF)
    assert [s.probability for s in after_follow] == [s.probability for s in before]


def test_person_features_are_what_training_computes(world: World) -> None:
    predictions = world.stack.predictions
    name = sorted(world.events)[7]
    for selector in (by_identifier(name), by_id(world.person_ids[name])):
        features = predictions.GetPersonFeatures(pb.GetPersonFeaturesRequest(
            person=selector, as_of_time=timestamp(AS_OF)), timeout=10)
        assert features.person_id == world.person_ids[name]
        assert features.as_of_time.ToDatetime(tzinfo=UTC) == AS_OF
        assert same_features(dict(features.values), features_as_of(world.events[name], AS_OF))
    code, _, _, _ = error_of(predictions.GetPersonFeatures, pb.GetPersonFeaturesRequest(person=by_id("p_nobody")))
    assert code == grpc.StatusCode.NOT_FOUND
    code, _, fields, _ = error_of(predictions.GetPersonFeatures, pb.GetPersonFeaturesRequest())
    assert code == grpc.StatusCode.INVALID_ARGUMENT and fields == ["person"]


# ---- refreshing scores into profile ---------------------------------------------------------------

def test_refresh_scores_writes_every_eligible_persons_score_back_to_profile(world: World) -> None:
    stack = world.stack
    started = stack.predictions.RefreshScores(pb.RefreshScoresRequest(
        name=f"models/{MODEL}", as_of_time=timestamp(AS_OF)), timeout=10)
    seen: list[pb.RefreshScoresMetadata] = []
    finished = wait_done(stack, started.name, seen, pb.RefreshScoresMetadata)
    response = pb.RefreshScoresResponse()
    assert finished.response.Unpack(response), finished.error
    assert response.model_version == f"models/{MODEL}/versions/1"
    # Everyone's first event is before AS_OF, so every person is eligible for conversion.
    assert (response.persons_scored, response.persons_ineligible) == (PERSONS, 0)
    assert (seen[-1].shards_done, seen[-1].shards_total, seen[-1].persons_scored) == (16, 16, PERSONS)

    for name in sorted(world.events)[:3]:
        profile = stack.profiles.GetProfile(profile_pb.GetProfileRequest(person=by_identifier(name)), timeout=10)
        score = stack.predictions.ScorePerson(pb.ScorePersonRequest(
            model=f"models/{MODEL}", person=by_identifier(name), as_of_time=timestamp(AS_OF)), timeout=10)
        trait, percentile = profile.traits[f"score_{MODEL}"], profile.traits[f"score_{MODEL}_percentile"]
        assert trait.value.number_value == pytest.approx(score.probability)
        assert percentile.value.number_value == pytest.approx(score.percentile)
        assert trait.source == "onecdp-prediction"

    code, reason, _, _ = error_of(stack.predictions.RefreshScores, pb.RefreshScoresRequest(name="models/untrained2"))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")
    create(stack.predictions, "untrained2")
    code, reason, _, _ = error_of(stack.predictions.RefreshScores, pb.RefreshScoresRequest(name="models/untrained2"))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "NO_ACTIVE_VERSION")


# ---- churn: eligibility, refresh and deletion clear the scores that must not stay -----------------

CHURN_MODEL = "churners"
CHURN = pb.ModelSpec(kind=pb.PREDICTION_KIND_CHURN, horizon_days=60, eligibility_days=90, min_class_count=20)


def score_traits_by_person(world: World, model_id: str) -> dict[str, float]:
    """Profile's `score_<model_id>` trait of every synthetic person holding one, by person id."""
    trait = f"score_{model_id}"
    response = world.stack.profiles.BatchGetProfiles(profile_pb.BatchGetProfilesRequest(
        persons=[by_id(p) for p in world.person_ids.values()],
        read_mask=field_mask_pb2.FieldMask(paths=["person_id", f"traits.{trait}"])), timeout=30)
    return {r.profile.person_id: r.profile.traits[trait].value.number_value
            for r in response.results if r.found and trait in r.profile.traits}


def refresh(world: World, model_id: str, as_of: datetime) -> pb.RefreshScoresResponse:
    started = world.stack.predictions.RefreshScores(pb.RefreshScoresRequest(
        name=f"models/{model_id}", as_of_time=timestamp(as_of)), timeout=10)
    finished = wait_done(world.stack, started.name)
    response = pb.RefreshScoresResponse()
    assert finished.response.Unpack(response), finished.error
    return response


def test_churn_scores_only_the_eligible_and_refresh_and_delete_clear_scores_that_must_not_stay(
        world: World) -> None:
    predictions = world.stack.predictions
    create(predictions, CHURN_MODEL, CHURN)
    trained = wait_done(world.stack, train(world.stack, CHURN_MODEL).name)
    assert trained.response.Is(pb.ModelVersion.DESCRIPTOR), trained.error
    spec = resolve_spec(PredictionKind.CHURN, [], 60, eligibility_days=90, min_class_count=20)
    earlier = AS_OF - timedelta(days=120)

    def eligible_ids(as_of: datetime) -> set[str]:
        return {world.person_ids[n] for n, events in world.events.items() if is_eligible(spec, events, as_of)}

    eligible_earlier, eligible_now = eligible_ids(earlier), eligible_ids(AS_OF)
    gone_silent = eligible_earlier - eligible_now  # scored at the earlier refresh, ineligible at the later one
    assert gone_silent and eligible_now, "the synthetic shop must have both kinds of persons"

    # Scoring someone inactive for more than the eligibility window is refused, as the proto says.
    silent_name = next(n for n, p in world.person_ids.items() if p in gone_silent)
    code, reason, _, message = error_of(predictions.ScorePerson, pb.ScorePersonRequest(
        model=f"models/{CHURN_MODEL}", person=by_identifier(silent_name), as_of_time=timestamp(AS_OF)))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "PERSON_NOT_ELIGIBLE")
    assert "was not active within 90 days" in message
    active_name = next(n for n, p in world.person_ids.items() if p in eligible_now)
    score = predictions.ScorePerson(pb.ScorePersonRequest(
        model=f"models/{CHURN_MODEL}", person=by_identifier(active_name), as_of_time=timestamp(AS_OF)), timeout=10)
    assert score.model_version == f"models/{CHURN_MODEL}/versions/1" and 0 <= score.probability <= 1

    first = refresh(world, CHURN_MODEL, earlier)
    assert (first.persons_scored, first.persons_ineligible) == (len(eligible_earlier), PERSONS - len(eligible_earlier))
    assert set(score_traits_by_person(world, CHURN_MODEL)) == eligible_earlier
    # A later refresh scores fewer persons: those gone silent lose their score instead of keeping the old one.
    second = refresh(world, CHURN_MODEL, AS_OF)
    assert (second.persons_scored, second.persons_ineligible) == (len(eligible_now), PERSONS - len(eligible_now))
    assert second.persons_ineligible > 0
    assert set(score_traits_by_person(world, CHURN_MODEL)) == eligible_now

    # Deleting the model deletes its scores; a model created again with the same id starts without any.
    predictions.DeleteModel(pb.DeleteModelRequest(name=f"models/{CHURN_MODEL}"), timeout=60)
    assert score_traits_by_person(world, CHURN_MODEL) == {}
    create(predictions, CHURN_MODEL, CHURN)
    assert score_traits_by_person(world, CHURN_MODEL) == {}
    code, reason, _, _ = error_of(predictions.ScorePerson, pb.ScorePersonRequest(
        model=f"models/{CHURN_MODEL}", person=by_identifier(active_name)))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "NO_ACTIVE_VERSION")
    # Times whose windows would overflow are refused before any arithmetic (churn subtracts its window).
    code, _, fields, _ = error_of(predictions.ScorePerson, pb.ScorePersonRequest(
        model=f"models/{MODEL}", person=by_identifier(active_name),
        as_of_time=timestamp(datetime(1, 1, 1, tzinfo=UTC))))
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["as_of_time"])


# ---- versions: scoring follows activation and rollback ---------------------------------------------

def test_score_person_follows_activation_and_rollback(world: World) -> None:
    predictions = world.stack.predictions
    name = sorted(world.events)[5]

    def scored() -> pb.Score:
        score: pb.Score = predictions.ScorePerson(pb.ScorePersonRequest(
            model=f"models/{MODEL}", person=by_identifier(name), as_of_time=timestamp(AS_OF)), timeout=10)
        return score

    def booster_probability(version_id: int) -> float:
        booster = lgb.Booster(model_str=world.registry.load_booster(MODEL, version_id))
        row = features_as_of(world.events[name], AS_OF)
        return float(booster.predict(np.asarray([[row[f] for f in FEATURE_NAMES]]), num_threads=1)[0])

    version_1 = scored()
    assert version_1.model_version == f"models/{MODEL}/versions/1"
    request = pb.TrainModelRequest(name=f"models/{MODEL}", training_cutoffs=[timestamp(t) for t in TRAINING_CUTOFFS],
                                   validation_cutoff=timestamp(VALIDATION_CUTOFF), activate=True, seed=2)
    trained = wait_done(world.stack, predictions.TrainModel(request, timeout=10).name)
    version = pb.ModelVersion()
    assert trained.response.Unpack(version) and version.name == f"models/{MODEL}/versions/2", trained.error
    try:
        version_2 = scored()
        assert version_2.model_version == f"models/{MODEL}/versions/2"
        assert version_2.probability == pytest.approx(booster_probability(2), abs=1e-12)
        assert booster_probability(2) != booster_probability(1)  # a rollback must be visible in the score
    finally:
        model = predictions.ActivateModelVersion(pb.ActivateModelVersionRequest(
            name=f"models/{MODEL}/versions/1"), timeout=10)
    assert model.active_version == f"models/{MODEL}/versions/1"
    rolled_back = scored()
    assert rolled_back.model_version == f"models/{MODEL}/versions/1"
    assert rolled_back.probability == version_1.probability == pytest.approx(booster_probability(1), abs=1e-12)
