"""Training as an operation, end to end over the real Cassandra with an in-memory ProfileSource."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from services.prediction.history import InMemoryProfileSource, PersonHistory
from services.prediction.jobs import TrainingRequest, run_training, start_training
from services.prediction.registry import ModelRegistry, Operation, VersionState
from services.prediction.serving import ScorerCache
from services.prediction.spec import PredictionKind, resolve_spec
from shared.errors import InvalidArgument, NotFound
from tests.services.prediction.synthetic import day, synthetic_source

pytestmark = pytest.mark.integration

SOURCE = synthetic_source(500)
REQUEST = TrainingRequest(model_id="buyers", training_cutoffs=(day("2024-01-01"), day("2024-03-01")),
                          validation_cutoff=day("2024-06-01"), activate=True)


def create(registry: ModelRegistry, min_class_count: int = 20) -> None:
    spec = resolve_spec(PredictionKind.CONVERSION, [], 60, eligibility_days=0, min_class_count=min_class_count)
    registry.create_model("buyers", "", spec, day("2025-01-01"))


def test_a_training_operation_ends_with_an_active_ready_version(registry: ModelRegistry) -> None:
    create(registry)
    operation = start_training(registry, REQUEST)
    assert operation.version_id == 1 and not operation.done
    assert registry.get_version("buyers", 1).state is VersionState.TRAINING
    finished = run_training(registry, SOURCE, operation, REQUEST)
    assert finished.done and finished.error_code is None and finished.stage == "done"
    version = registry.get_version("buyers", 1)
    assert version.state is VersionState.READY and version.metrics is not None
    assert version.metrics.roc_auc > 0.8
    assert registry.get_model("buyers").active_version == 1
    assert registry.load_booster("buyers", 1)


class ProgressRecorder(ModelRegistry):
    """The real registry, also keeping every operation state it wrote (what GetOperation showed meanwhile)."""

    def __init__(self, registry: ModelRegistry) -> None:
        super().__init__(registry._session)
        self.seen: list[Operation] = []

    def report_progress(self, operation_id: str, now: datetime, **progress: Any) -> None:
        super().report_progress(operation_id, now, **progress)
        self.seen.append(self.get_operation(operation_id))


def test_training_progress_has_a_stage_from_the_queue_on_and_counts_that_never_go_back(
        registry: ModelRegistry) -> None:
    create(registry)
    recorder = ProgressRecorder(registry)
    operation = start_training(recorder, REQUEST)
    assert (operation.stage, operation.persons_processed, operation.persons_total) == ("queued", 0, 0)
    finished = run_training(recorder, SOURCE, operation, REQUEST)
    assert finished.error_code is None
    seen = [operation, *recorder.seen, finished]
    stages = [state.stage for state in seen]
    order = ["queued", "features", "training", "saving", "done"]
    assert sorted(stages, key=order.index) == stages and set(stages) == set(order)
    processed = [state.persons_processed for state in seen]
    assert processed == sorted(processed)
    persons = len(list(SOURCE.histories(REQUEST.validation_cutoff)))  # every person, eligible or not
    assert finished.persons_processed == finished.persons_total == persons
    for state in seen:
        # The total is unknown (0) until the scan ends, then it is every person scanned.
        assert state.persons_total == (persons if state.stage in ("training", "saving", "done") else 0)


def test_too_few_examples_fail_the_version_and_say_how_many(registry: ModelRegistry) -> None:
    create(registry, min_class_count=100_000)
    operation = start_training(registry, REQUEST)
    finished = run_training(registry, SOURCE, operation, REQUEST)
    assert finished.done and finished.error_code == "FAILED_PRECONDITION"
    assert "positives and" in finished.error_message and "100000" in finished.error_message
    version = registry.get_version("buyers", 1)
    assert version.state is VersionState.FAILED and version.failure_message == finished.error_message
    assert registry.get_model("buyers").active_version is None


class BrokenSource(InMemoryProfileSource):
    def __init__(self) -> None:
        super().__init__({})

    def histories(self, before: datetime) -> Iterator[PersonHistory]:
        raise RuntimeError("disk on fire")


def test_a_bug_ends_the_operation_as_internal_without_details(registry: ModelRegistry) -> None:
    create(registry)
    operation = start_training(registry, REQUEST)
    finished = run_training(registry, BrokenSource(), operation, REQUEST)
    assert finished.done and finished.error_code == "INTERNAL" and "disk on fire" not in finished.error_message
    assert registry.get_version("buyers", 1).state is VersionState.FAILED


def test_bad_requests_fail_before_any_version_exists(registry: ModelRegistry) -> None:
    with pytest.raises(NotFound):
        start_training(registry, REQUEST)
    create(registry)
    with pytest.raises(InvalidArgument):
        start_training(registry, TrainingRequest("buyers", (day("2024-05-01"),), day("2024-06-01")))
    assert registry.list_versions("buyers", 10) == ([], None)


def test_a_trained_version_is_compiled_before_it_is_activated(registry: ModelRegistry) -> None:
    create(registry)
    cache = ScorerCache(registry)
    compiled: list[tuple[str, int, int | None]] = []

    def compile_version(model_id: str, version_id: int) -> None:
        model = registry.get_model(model_id)
        cache.compile_now(model, version_id)
        compiled.append((model_id, version_id, model.active_version))

    operation = start_training(registry, REQUEST)
    finished = run_training(registry, SOURCE, operation, REQUEST, compile_version=compile_version)
    assert finished.error_code is None and compiled == [("buyers", 1, None)]  # before activation
    _, scorer = cache.get(registry.get_model("buyers"), 1)
    # Compiled without a single row scored: the first scores of the version are the compiled forest's.
    assert scorer.compiling is not None and scorer.compiling.forest is not None


def test_a_failed_compile_leaves_the_version_trained_and_active(registry: ModelRegistry) -> None:
    create(registry)

    def failing(model_id: str, version_id: int) -> None:
        raise RuntimeError("no compiler here")

    operation = start_training(registry, REQUEST)
    finished = run_training(registry, SOURCE, operation, REQUEST, compile_version=failing)
    assert finished.error_code is None
    assert registry.get_model("buyers").active_version == 1
