"""DeleteModel while a training or a score refresh of the model runs, over the real Cassandra registry.

Profile is replaced by an in-memory source and a trait store that keeps, as profile does, the latest write
of each trait by event time; the delete's timing is forced (at a chosen write or stage), so each race the
tests cover happens every time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from onecdp.prediction.v1 import prediction_service_pb2 as pb

from services.prediction.history import InMemoryProfileSource, PersonHistory
from services.prediction.jobs import (
    TrainingRequest,
    run_refresh,
    run_training,
    score_trait_names,
    start_refresh,
    start_training,
)
from services.prediction.online import OnlineHistories
from services.prediction.registry import ModelRegistry, Operation
from services.prediction.scoring import PersonScore
from services.prediction.server import PredictionServicer
from services.prediction.serving import Predictor, ScorerCache, ScoringVersion
from services.prediction.spec import PredictionKind, resolve_spec
from services.prediction.training import STAGE_FEATURES, STAGE_SAVING
from services.prediction.worker import BackgroundWorker
from shared.errors import NotFound
from tests.services.prediction.synthetic import day, synthetic_events

pytestmark = pytest.mark.integration

MODEL = "conv-r"
EVENTS = synthetic_events(500)
AS_OF = day("2024-07-01")
REQUEST = TrainingRequest(model_id=MODEL, training_cutoffs=(day("2024-01-01"), day("2024-03-01")),
                          validation_cutoff=day("2024-06-01"), activate=True)


class ShardedSource(InMemoryProfileSource):
    """The in-memory source in `count` shards (a refresh writes and checks once per shard at least), each read
    after `delay` seconds (a refresh long enough to delete its model meanwhile)."""

    def __init__(self, count: int, delay: float = 0.0) -> None:
        super().__init__(EVENTS)
        self._count = count
        self._delay = delay

    def shards(self) -> list[str]:
        return [str(index) for index in range(self._count)]

    def histories_of_shard(self, shard: str, before: datetime) -> Iterator[PersonHistory]:
        time.sleep(self._delay)
        histories = list(self.histories(before))
        yield from histories[int(shard)::self._count]


class TraitStore:
    """Profile's score traits: the latest write of each by event time wins; a None value deletes it. Like
    GrpcScoreWriter, a clear writes deletes only for the persons holding a score when it reads them."""

    def __init__(self) -> None:
        self._traits: dict[tuple[str, str], tuple[datetime, float | None]] = {}
        self._lock = threading.Lock()
        self.before_write: Callable[[int], None] = lambda writes: None
        self.writes = 0

    def _put(self, person_id: str, values: dict[str, float | None], at: datetime) -> None:
        with self._lock:
            for name, value in values.items():
                current = self._traits.get((person_id, name))
                if current is None or at >= current[0]:
                    self._traits[(person_id, name)] = (at, value)

    def holders(self, model_id: str) -> set[str]:
        names = score_trait_names(model_id)
        with self._lock:
            return {person for (person, name), (_, value) in self._traits.items()
                    if name in names and value is not None}

    # ---- jobs.ScoreWriter

    def write_scores(self, model_id: str, scores: Sequence[PersonScore], written_at: datetime) -> None:
        self.writes += 1
        self.before_write(self.writes)
        score, percentile = score_trait_names(model_id)
        for person in scores:
            self._put(person.person_id, {score: person.probability, percentile: person.percentile}, written_at)

    def clear_scores(self, model_id: str, person_ids: Sequence[str], cleared_at: datetime) -> int:
        holders = [p for p in person_ids if p in self.holders(model_id)]
        for person_id in holders:
            self._put(person_id, dict.fromkeys(score_trait_names(model_id)), cleared_at)
        return len(holders)

    def clear_all_scores(self, model_id: str, cleared_at: datetime) -> int:
        return self.clear_scores(model_id, sorted(self.holders(model_id)), cleared_at)


def trained(registry: ModelRegistry) -> ScoringVersion:
    """MODEL, created, trained on EVENTS and active; the version a refresh scores with."""
    spec = resolve_spec(PredictionKind.CONVERSION, [], 60, eligibility_days=0, min_class_count=20)
    registry.create_model(MODEL, "", spec, datetime.now(UTC))
    finished = run_training(registry, InMemoryProfileSource(EVENTS), start_training(registry, REQUEST), REQUEST)
    assert finished.error_code is None, finished.error_message
    return Predictor(registry, InMemoryProfileSource(EVENTS), ScorerCache(registry)).scoring_version(MODEL)


def assert_ended_by_the_delete(operation: Operation) -> None:
    assert operation.done and (operation.error_code, operation.error_reason) == ("ABORTED", "MODEL_DELETED")
    assert f"models/{MODEL} was deleted while" in operation.error_message
    assert operation.error_metadata["model"] == f"models/{MODEL}"


# ---- refresh -------------------------------------------------------------------------------------

def test_a_refresh_whose_model_is_deleted_midway_removes_the_scores_it_wrote_and_ends_aborted(
        registry: ModelRegistry) -> None:
    """The tester's race: the delete clears the scores it finds and deletes the model while a batch of scores is
    on its way; the batch lands after the clearing passed its persons (dated earlier than the clearing, but no
    delete was ever written for them), and the refresh went on scoring a model that no longer existed."""
    scoring = trained(registry)
    store = TraitStore()

    def delete_as_delete_model_does(writes: int) -> None:
        if writes == 2:
            store.clear_all_scores(MODEL, datetime.now(UTC))
            registry.delete_model(MODEL)

    store.before_write = delete_as_delete_model_does
    finished = run_refresh(registry, ShardedSource(4), store, scoring, start_refresh(registry, scoring), as_of=AS_OF)
    assert_ended_by_the_delete(finished)
    assert "the scores it wrote were removed" in finished.error_message
    assert store.writes == 2  # it stopped at the deletion, instead of scoring every shard
    assert store.holders(MODEL) == set()


def test_a_refresh_queued_behind_its_models_delete_writes_nothing(registry: ModelRegistry) -> None:
    scoring = trained(registry)
    store = TraitStore()
    operation = start_refresh(registry, scoring)
    registry.delete_model(MODEL)
    finished = run_refresh(registry, ShardedSource(2), store, scoring, operation, as_of=AS_OF)
    assert_ended_by_the_delete(finished)
    assert store.writes == 0 and "wrote no score" in finished.error_message


def test_a_refresh_of_a_model_deleted_and_created_again_stops_and_leaves_the_new_models_scores(
        registry: ModelRegistry) -> None:
    scoring = trained(registry)
    store = TraitStore()
    newer = datetime(2100, 1, 1, tzinfo=UTC)  # a score the model created again writes (later, by event time)

    def recreate(writes: int) -> None:
        if writes == 1:
            registry.delete_model(MODEL)
            registry.create_model(MODEL, "", scoring.model.spec, datetime.now(UTC))
            store._put("p99999", dict.fromkeys(score_trait_names(MODEL), 0.5), newer)

    store.before_write = recreate
    finished = run_refresh(registry, ShardedSource(3), store, scoring, start_refresh(registry, scoring), as_of=AS_OF)
    assert_ended_by_the_delete(finished)
    assert store.holders(MODEL) == {"p99999"}


def test_delete_model_returns_once_the_running_refresh_ended_and_no_profile_holds_a_score(
        registry: ModelRegistry) -> None:
    """Through the servicer, as the tester called it: RefreshScores, then DeleteModel while it runs. The
    refresh must not end as a success, and once DeleteModel has returned no profile may hold a score."""
    trained(registry)
    store = TraitStore()
    source = ShardedSource(8, delay=0.3)
    worker = BackgroundWorker("test-jobs")
    servicer = PredictionServicer(registry, source, OnlineHistories(source), store, worker)  # type: ignore[arg-type]
    first_write = threading.Event()
    store.before_write = lambda writes: first_write.set()
    try:
        started = servicer.RefreshScores(pb.RefreshScoresRequest(name=f"models/{MODEL}"), None)
        assert first_write.wait(timeout=30)
        servicer.DeleteModel(pb.DeleteModelRequest(name=f"models/{MODEL}"), None)
        assert store.holders(MODEL) == set()
        operation = registry.get_operation(started.name.removeprefix("operations/"))
        assert_ended_by_the_delete(operation)
        writes = store.writes
        time.sleep(1.0)
        assert store.writes == writes and store.holders(MODEL) == set()
    finally:
        worker.stop()


# ---- training ------------------------------------------------------------------------------------

class DeletingRegistry(ModelRegistry):
    """The real registry, deleting the model (as DeleteModel does) when training reaches `stage` (a progress
    stage, or "activate": after the version became READY, before it is activated)."""

    def __init__(self, registry: ModelRegistry, stage: str) -> None:
        super().__init__(registry._session)
        self._stage = stage
        self.deleted = False

    def _delete_at(self, stage: str) -> None:
        if stage == self._stage and not self.deleted:
            self.deleted = True
            self.delete_model(MODEL)

    def report_progress(self, operation_id: str, now: datetime, **progress: Any) -> None:
        self._delete_at(progress["stage"])
        super().report_progress(operation_id, now, **progress)

    def activate(self, model_id: str, version_id: int, now: datetime) -> Any:
        self._delete_at("activate")
        return super().activate(model_id, version_id, now)


@pytest.mark.parametrize("stage", [STAGE_FEATURES, STAGE_SAVING, "activate"])
def test_a_training_whose_model_is_deleted_ends_aborted_and_leaves_no_version(registry: ModelRegistry,
                                                                              stage: str) -> None:
    """The tester's case is `saving`: finish_version found no version, failing it found none either, and the
    operation stayed at that stage, not done, until the process restarted."""
    spec = resolve_spec(PredictionKind.CONVERSION, [], 60, eligibility_days=0, min_class_count=20)
    registry.create_model(MODEL, "", spec, datetime.now(UTC))
    deleting = DeletingRegistry(registry, stage)
    operation = start_training(deleting, REQUEST)
    finished = run_training(deleting, InMemoryProfileSource(EVENTS), operation, REQUEST)
    assert deleting.deleted
    assert_ended_by_the_delete(finished)
    assert registry.get_operation(operation.operation_id).done
    with pytest.raises(NotFound):
        registry.get_version(MODEL, 1)
    with pytest.raises(NotFound):
        registry.load_booster(MODEL, 1)
    # A model created again with the same id starts with no version.
    registry.create_model(MODEL, "", spec, datetime.now(UTC))
    assert registry.list_versions(MODEL, 10) == ([], None)
