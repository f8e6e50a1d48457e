"""TrainModelMetadata.stage of an ended training says its last stage truthfully (the proto's comment): `done`
once the version is saved, the stage it failed in for a failed one; never `saving` on a finished operation.
Real Cassandra, the operation as GetOperation gives it."""

from __future__ import annotations

import pytest
from onecdp.prediction.v1 import prediction_service_pb2 as pb

from services.prediction.jobs import TrainingRequest, run_training, start_training
from services.prediction.registry import ModelRegistry
from services.prediction.server import operation_message
from services.prediction.spec import PredictionKind, resolve_spec
from tests.services.prediction.synthetic import day, synthetic_source

pytestmark = pytest.mark.integration

SOURCE = synthetic_source(300)
REQUEST = TrainingRequest(model_id="buyers", training_cutoffs=(day("2024-01-01"), day("2024-03-01")),
                          validation_cutoff=day("2024-06-01"))


def _stage_shown(registry: ModelRegistry, min_class_count: int) -> tuple[bool, bool, str]:
    spec = resolve_spec(PredictionKind.CONVERSION, [], 60, eligibility_days=0, min_class_count=min_class_count)
    registry.create_model("buyers", "", spec, day("2025-01-01"))
    finished = run_training(registry, SOURCE, start_training(registry, REQUEST), REQUEST)
    message = operation_message(registry.get_operation(finished.operation_id), registry)
    metadata = pb.TrainModelMetadata()
    assert message.metadata.Unpack(metadata)
    return message.done, message.HasField("error"), metadata.stage


def test_a_finished_training_says_done(registry: ModelRegistry) -> None:
    assert _stage_shown(registry, min_class_count=5) == (True, False, "done")


def test_a_failed_training_keeps_the_stage_it_failed_in(registry: ModelRegistry) -> None:
    # Too few examples of a class is found when fitting begins: the `training` stage.
    assert _stage_shown(registry, min_class_count=100_000) == (True, True, "training")
