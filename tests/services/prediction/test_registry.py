"""The model registry against the real Cassandra."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import cast

import lightgbm as lgb
import pytest

from services.prediction.registry import Model, ModelRegistry, OperationKind, VersionState
from services.prediction.serving import ActiveModels
from services.prediction.spec import PredictionKind, resolve_spec
from services.prediction.training import TrainedModel, train_version
from shared.errors import AlreadyExists, FailedPrecondition, NotFound, StatusCode
from tests.services.prediction.synthetic import day, synthetic_source

pytestmark = pytest.mark.integration

SPEC = resolve_spec(PredictionKind.CONVERSION, [], 60, eligibility_days=0, min_class_count=20)
CUTOFFS = (day("2024-01-01"), day("2024-03-01"))
VALIDATION = day("2024-06-01")
NOW = datetime(2025, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)


@pytest.fixture(scope="module")
def trained() -> TrainedModel:
    return train_version(SPEC, synthetic_source(400), CUTOFFS, VALIDATION, seed=1)


def test_models_create_get_list_delete(registry: ModelRegistry) -> None:
    created = registry.create_model("churn-90", "Churn", SPEC, NOW)
    assert created.spec == SPEC and created.display_name == "Churn" and created.active_version is None
    assert created.create_time == NOW == created.update_time
    with pytest.raises(AlreadyExists):
        registry.create_model("churn-90", "again", SPEC, NOW)
    for model_id in ("b", "a", "c"):
        registry.create_model(model_id, "", SPEC, NOW)
    page, after = registry.list_models(2)
    assert [m.model_id for m in page] == ["a", "b"] and after == "b"
    page, after = registry.list_models(2, after)
    assert [m.model_id for m in page] == ["c", "churn-90"] and after is None
    registry.delete_model("b")
    with pytest.raises(NotFound):
        registry.get_model("b")
    with pytest.raises(NotFound):
        registry.delete_model("b")
    assert [m.model_id for m in registry.list_models(10)[0]] == ["a", "c", "churn-90"]


def test_versions_store_everything_training_produced(registry: ModelRegistry, trained: TrainedModel) -> None:
    registry.create_model("conv", "", SPEC, NOW)
    started = registry.start_version("conv", CUTOFFS, VALIDATION, NOW)
    assert started.version_id == 1 and started.state is VersionState.TRAINING
    assert started.training_cutoffs == CUTOFFS and started.validation_cutoff == VALIDATION
    assert started.spec == SPEC and started.metrics is None
    with pytest.raises(FailedPrecondition) as caught:
        registry.activate("conv", 1, NOW)
    assert caught.value.reason == "MODEL_VERSION_NOT_READY"

    done = registry.finish_version("conv", 1, trained, NOW + timedelta(minutes=1))
    assert done.state is VersionState.READY and done.metrics == trained.metrics
    assert done.feature_names == trained.feature_names and done.importance == trained.importance
    assert done.best_iteration == trained.best_iteration
    assert done.score_quantiles == ()  # only read when asked for
    assert registry.get_version("conv", 1, with_quantiles=True).score_quantiles == trained.score_quantiles
    booster = registry.load_booster("conv", 1)
    assert booster == trained.model_string
    assert lgb.Booster(model_str=booster).num_trees() == trained.best_iteration

    second = registry.start_version("conv", CUTOFFS, VALIDATION, NOW)
    failed = registry.fail_version("conv", second.version_id, "too few positives", NOW)
    assert failed.version_id == 2 and failed.state is VersionState.FAILED
    assert failed.failure_message == "too few positives"
    versions, before = registry.list_versions("conv", 1)
    assert [v.version_id for v in versions] == [2] and before == 2
    versions, before = registry.list_versions("conv", 1, before)
    assert [v.version_id for v in versions] == [1] and before is None

    activated = registry.activate("conv", 1, NOW + timedelta(hours=1))
    assert activated.active_version == 1 and activated.update_time == NOW + timedelta(hours=1)
    with pytest.raises(FailedPrecondition):
        registry.activate("conv", 2, NOW)
    with pytest.raises(NotFound):
        registry.activate("conv", 3, NOW)
    with pytest.raises(NotFound):
        registry.list_versions("nope", 10)
    with pytest.raises(NotFound):
        registry.start_version("nope", CUTOFFS, VALIDATION, NOW)


def test_deleting_a_model_deletes_its_versions(registry: ModelRegistry, trained: TrainedModel) -> None:
    registry.create_model("gone", "", SPEC, NOW)
    registry.start_version("gone", CUTOFFS, VALIDATION, NOW)
    registry.finish_version("gone", 1, trained, NOW)
    registry.delete_model("gone")
    with pytest.raises(NotFound):
        registry.get_version("gone", 1)
    with pytest.raises(NotFound):
        registry.load_booster("gone", 1)
    # A new model under the same id starts from version 1 with no history.
    registry.create_model("gone", "", SPEC, NOW)
    assert registry.list_versions("gone", 10) == ([], None)
    assert registry.start_version("gone", CUTOFFS, VALIDATION, NOW).version_id == 1


def test_version_numbers_are_never_handed_out_twice(registry: ModelRegistry) -> None:
    registry.create_model("busy", "", SPEC, NOW)
    with ThreadPoolExecutor(4) as pool:
        numbers = list(pool.map(lambda _: registry.start_version("busy", CUTOFFS, VALIDATION, NOW).version_id,
                                range(8)))
    assert sorted(numbers) == list(range(1, 9))


def test_operations_record_progress_and_outcome(registry: ModelRegistry) -> None:
    operation = registry.create_operation(OperationKind.TRAIN, "m", NOW, version_id=3, stage="features")
    assert not operation.done and operation.stage == "features" and operation.version_id == 3
    registry.report_progress(operation.operation_id, NOW, stage="training", persons_processed=10, persons_total=10)
    progressed = registry.get_operation(operation.operation_id)
    assert (progressed.stage, progressed.persons_processed, progressed.persons_total) == ("training", 10, 10)
    finished = registry.finish_operation(operation.operation_id, NOW, elapsed_seconds=1.5,
                                         error_code=StatusCode.FAILED_PRECONDITION.value, error_message="too few")
    assert finished.done and finished.error_code == StatusCode.FAILED_PRECONDITION.value
    assert finished.error_message == "too few" and finished.elapsed_seconds == 1.5
    with pytest.raises(NotFound):
        registry.get_operation("0" * 32)


def test_active_models_are_read_again_after_the_refresh_time_or_when_forgotten(registry: ModelRegistry,
                                                                                trained: TrainedModel) -> None:
    clock = [0.0]
    background: list[Callable[[], None]] = []  # reads started in the background, run when the test says
    models = ActiveModels(registry, refresh_seconds=1.0, stale_seconds=5.0, monotonic=lambda: clock[0],
                          start=background.append)
    registry.create_model("kept", "", SPEC, NOW)
    assert models.get("kept").active_version is None
    for version_id in (1, 2):
        registry.start_version("kept", CUTOFFS, VALIDATION, NOW)
        registry.finish_version("kept", version_id, trained, NOW)
    registry.activate("kept", 1, NOW)
    assert models.get("kept").active_version == 1  # a model without an active version is never kept
    registry.activate("kept", 2, NOW)  # by another replica
    clock[0] = 0.9
    assert models.get("kept").active_version == 1 and background == []
    clock[0] = 1.0  # due: the kept model answers while one background read replaces it
    assert models.get("kept").active_version == 1 and models.get("kept").active_version == 1
    assert len(background) == 1
    background.pop()()
    assert models.get("kept").active_version == 2
    registry.activate("kept", 1, NOW)  # by another replica, and nothing asks for 6 s: read inline
    clock[0] = 7.0
    assert models.get("kept").active_version == 1 and background == []
    registry.delete_model("kept")  # through another replica: the background read drops it
    clock[0] = 8.5
    assert models.get("kept").active_version == 1
    background.pop()()
    with pytest.raises(NotFound):
        models.get("kept")
    registry.create_model("kept", "", SPEC, NOW)
    for version_id in (1, 2):
        registry.start_version("kept", CUTOFFS, VALIDATION, NOW)
        registry.finish_version("kept", version_id, trained, NOW)
    registry.activate("kept", 1, NOW)
    models.forget("kept")  # activated through this replica
    assert models.get("kept").active_version == 1
    registry.delete_model("kept")
    models.forget("kept")
    with pytest.raises(NotFound):
        models.get("kept")


def test_a_model_read_that_an_activation_through_this_replica_overtakes_is_not_kept(
        registry: ModelRegistry, trained: TrainedModel) -> None:
    registry.create_model("raced", "", SPEC, NOW)
    for version_id in (1, 2):
        registry.start_version("raced", CUTOFFS, VALIDATION, NOW)
        registry.finish_version("raced", version_id, trained, NOW)
    registry.activate("raced", 1, NOW)

    class ActivatedDuringTheRead:
        """The registry, with this replica activating version 2 while a read of version 1 is on its way."""

        def get_model(self, model_id: str) -> Model:
            model = registry.get_model(model_id)
            if model.active_version == 1:
                registry.activate(model_id, 2, NOW)
                models.forget(model_id)
            return model

    models = ActiveModels(cast(ModelRegistry, ActivatedDuringTheRead()), monotonic=lambda: 0.0)
    assert models.get("raced").active_version == 1  # what that read saw ...
    assert models.get("raced").active_version == 2  # ... was not kept over the activation
