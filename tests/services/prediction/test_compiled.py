"""The compiled forest: LightGBM's probabilities bit for bit, compiled only for a version in use, never required."""

from __future__ import annotations

import threading

import lightgbm as lgb
import numpy as np
import pytest

from services.prediction.compiled import BackgroundCompile, CompiledForest
from services.prediction.features import FEATURE_NAMES, features_at
from services.prediction.scoring import Scorer
from services.prediction.spec import PredictionKind, resolve_spec
from services.prediction.training import TrainedModel, train_version
from tests.services.prediction.synthetic import day, synthetic_source

pytestmark = pytest.mark.unit

SOURCE = synthetic_source(800, seed=3)


@pytest.fixture(scope="module")
def model() -> TrainedModel:
    spec = resolve_spec(PredictionKind.CONVERSION, [], 60, eligibility_days=0, min_class_count=30)
    return train_version(spec, SOURCE, [day("2024-01-01"), day("2024-03-01")], day("2024-06-01"))


@pytest.fixture(scope="module")
def forest(model: TrainedModel) -> CompiledForest:
    compiled = CompiledForest.compile(model.model_string, lgb.Booster(model_str=model.model_string))
    assert compiled is not None
    return compiled


def feature_rows(as_of_days: list[str]) -> np.ndarray:
    histories = list(SOURCE.histories(day("2025-01-01")))
    return np.concatenate([features_at([h.columns for h in histories], day(d)) for d in as_of_days])


def test_the_compiled_forest_gives_lightgbms_probabilities_bit_for_bit(model: TrainedModel,
                                                                        forest: CompiledForest) -> None:
    booster = lgb.Booster(model_str=model.model_string)
    rows = feature_rows(["2023-06-01", "2024-06-01", "2024-10-01"])
    assert np.isnan(rows).any()  # missing values (no order yet, one order) are in there
    assert np.array_equal(forest.probabilities(rows), booster.predict(rows, num_threads=1))
    # One row at a time (ScorePerson), and odd values: negative, huge, and LightGBM's zero band.
    rng = np.random.default_rng(5)
    odd = rows[:64].copy()
    odd[rng.random(odd.shape) < 0.2] = -3.5
    odd[rng.random(odd.shape) < 0.1] = 1e300
    odd[rng.random(odd.shape) < 0.1] = 1e-36
    odd[rng.random(odd.shape) < 0.1] = -1e-36
    odd[rng.random(odd.shape) < 0.1] = 0.0
    assert np.array_equal(forest.probabilities(odd), booster.predict(odd, num_threads=1))
    for row in odd[:8]:
        assert forest.probabilities(row[None, :])[0] == booster.predict(row[None, :], num_threads=1)[0]


def test_a_scorer_compiles_once_its_version_scored_enough_rows_and_its_scores_do_not_change(
        model: TrainedModel) -> None:
    scorer = Scorer(model.model_string, FEATURE_NAMES, model.score_quantiles, name="models/m/versions/1",
                    rows_before_compile=1_000)
    rows = feature_rows(["2024-06-01"])[:600]
    assert scorer.compiling is not None
    before = scorer.probabilities(rows)
    assert not scorer.compiling.done.wait(0.5)  # 600 rows: not yet
    assert np.array_equal(scorer.probabilities(rows), before)  # 1,200 rows: compiling starts
    assert scorer.compiling.done.wait(300) and scorer.compiling.forest is not None
    assert np.array_equal(scorer.probabilities(rows), before)
    assert np.array_equal(scorer.score_matrix(["p"] * 600, rows, day("2024-06-01")).percentiles,
                          scorer.percentiles(before))
    one_off = Scorer(model.model_string, FEATURE_NAMES, model.score_quantiles)
    assert one_off.compiling is None and np.array_equal(one_off.probabilities(rows), before)


def test_a_failed_or_refused_compile_leaves_lightgbm_scoring(model: TrainedModel) -> None:
    booster = lgb.Booster(model_str=model.model_string)
    calls: list[str] = []

    def failing(model_string: str, _: lgb.Booster) -> CompiledForest | None:
        calls.append(threading.current_thread().name)
        raise RuntimeError("no LLVM here")

    compiling = BackgroundCompile(model.model_string, booster, 10, "models/m/versions/1", failing)
    compiling.scored(9)
    assert not compiling.done.wait(0.2) and calls == []
    compiling.scored(1)
    compiling.scored(50)  # already started: not again
    assert compiling.done.wait(30) and compiling.forest is None and calls == ["prediction-compile"]

    # A model of more trees than compiling is worth, or whose probability is not the logistic of its raw score,
    # is not compiled at all.
    assert booster.num_trees() > 5 and CompiledForest.compile(model.model_string, booster, max_trees=5) is None
    rng = np.random.default_rng(1)
    data = rng.random((200, 3))
    regression = lgb.train({"objective": "regression", "verbosity": -1, "num_threads": 1},
                           lgb.Dataset(data, label=data.sum(axis=1)), num_boost_round=3)
    assert CompiledForest.compile(regression.model_to_string(), regression) is None

