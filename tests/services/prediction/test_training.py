"""Training and scoring on a synthetic shop through an in-memory ProfileSource."""

from __future__ import annotations

import math
from datetime import timedelta

import lightgbm as lgb
import numpy as np
import pytest

from services.prediction.datasets import build_training_sets
from services.prediction.features import FEATURE_NAMES, feature_row
from services.prediction.history import ActivityEvent, PersonHistory, PersonRef
from services.prediction.metrics import roc_auc
from services.prediction.scoring import Scorer, score_history
from services.prediction.spec import ModelSpec, PredictionKind, resolve_spec
from services.prediction.training import (
    MAX_TRAINING_CUTOFFS,
    SCORE_QUANTILES,
    TrainedModel,
    check_cutoffs,
    train_booster,
    train_version,
)
from shared.errors import FailedPrecondition, InvalidArgument
from tests.services.prediction.synthetic import day, synthetic_source

pytestmark = pytest.mark.unit

TRAINING_CUTOFFS = [day("2024-01-01"), day("2024-03-01"), day("2024-05-01")]
VALIDATION_CUTOFF = day("2024-08-01")
SOURCE = synthetic_source(1500)


def spec(kind: PredictionKind = PredictionKind.CONVERSION, min_class_count: int = 50, horizon: int = 60) -> ModelSpec:
    return resolve_spec(kind, [], horizon, eligibility_days=90 if kind is PredictionKind.CHURN else 0,
                        min_class_count=min_class_count)


@pytest.fixture(scope="module")
def conversion_model() -> TrainedModel:
    return train_version(spec(), SOURCE, TRAINING_CUTOFFS, VALIDATION_CUTOFF, seed=1)


def test_conversion_model_learns_and_reports_its_quality(conversion_model: TrainedModel) -> None:
    metrics = conversion_model.metrics
    assert metrics.roc_auc > 0.85, metrics
    assert 0 < metrics.log_loss < math.log(2)
    assert 0 <= metrics.calibration_error < 0.1
    assert metrics.top_decile_lift > 1.5
    assert metrics.training_examples > metrics.validation_examples > 500
    assert 0 < metrics.training_positive_rate < 1 and 0 < metrics.validation_positive_rate < 1
    assert conversion_model.feature_names == FEATURE_NAMES
    gains = [gain for _, gain in conversion_model.importance]
    assert gains == sorted(gains, reverse=True) and gains[0] > 0
    assert {name for name, _ in conversion_model.importance} == set(FEATURE_NAMES)
    assert 1 <= conversion_model.best_iteration < 2000
    assert lgb.Booster(model_str=conversion_model.model_string).num_trees() == conversion_model.best_iteration
    assert len(conversion_model.score_quantiles) == SCORE_QUANTILES
    assert list(conversion_model.score_quantiles) == sorted(conversion_model.score_quantiles)


def test_the_metrics_are_those_of_the_validation_rows(conversion_model: TrainedModel) -> None:
    training, validation = build_training_sets(spec(), SOURCE.histories(VALIDATION_CUTOFF + timedelta(days=60)),
                                               TRAINING_CUTOFFS, VALIDATION_CUTOFF)
    assert conversion_model.metrics.validation_examples == len(validation)
    assert conversion_model.metrics.training_examples == len(training)
    probabilities = lgb.Booster(model_str=conversion_model.model_string).predict(validation.features)
    assert conversion_model.metrics.roc_auc == pytest.approx(roc_auc(validation.labels, probabilities))


def test_training_is_deterministic(conversion_model: TrainedModel) -> None:
    again = train_version(spec(), SOURCE, TRAINING_CUTOFFS, VALIDATION_CUTOFF, seed=1)
    assert again.model_string == conversion_model.model_string
    assert again.metrics == conversion_model.metrics


def test_churn_model_trains_on_eligible_persons_only() -> None:
    model = train_version(spec(PredictionKind.CHURN), SOURCE, TRAINING_CUTOFFS, VALIDATION_CUTOFF, seed=1)
    assert model.metrics.roc_auc > 0.65
    conversion = train_version(spec(), SOURCE, TRAINING_CUTOFFS, VALIDATION_CUTOFF, seed=1)
    # Churn rows need activity in the 90 days before each cutoff; conversion rows any history.
    assert model.metrics.validation_examples < conversion.metrics.validation_examples


def test_too_few_positives_is_refused_with_the_counts() -> None:
    with pytest.raises(FailedPrecondition) as caught:
        train_version(spec(min_class_count=100_000), SOURCE, TRAINING_CUTOFFS, VALIDATION_CUTOFF)
    error = caught.value
    assert error.reason == "TOO_FEW_EXAMPLES"
    positives, negatives = int(error.metadata["positives"]), int(error.metadata["negatives"])
    assert positives > 0 and negatives > 0
    assert f"{positives} positives and {negatives} negatives" in error.message and "100000" in error.message


def test_training_labels_must_end_before_validation() -> None:
    with pytest.raises(InvalidArgument) as caught:
        train_version(spec(), SOURCE, [day("2024-06-15"), day("2024-01-01")], VALIDATION_CUTOFF)
    assert [v.field for v in caught.value.field_violations] == ["training_cutoffs[0]"]
    with pytest.raises(InvalidArgument):
        train_version(spec(), SOURCE, [], VALIDATION_CUTOFF)


def test_at_most_a_year_of_weekly_training_cutoffs() -> None:
    weekly = [day("2023-01-02") + timedelta(weeks=week) for week in range(MAX_TRAINING_CUTOFFS + 1)]
    with pytest.raises(InvalidArgument) as caught:
        check_cutoffs(spec(horizon=7), weekly, weekly[-1] + timedelta(days=30))
    assert [(v.field, f"got {MAX_TRAINING_CUTOFFS + 1}" in v.description)
            for v in caught.value.field_violations] == [("training_cutoffs", True)]
    check_cutoffs(spec(horizon=7), weekly[:-1], weekly[-1] + timedelta(days=30))  # 52 are fine


def test_validation_horizon_beyond_the_data_is_refused() -> None:
    with pytest.raises(FailedPrecondition) as caught:
        train_version(spec(), SOURCE, [day("2024-10-01")], day("2024-12-01"))
    assert caught.value.reason == "VALIDATION_HORIZON_BEYOND_DATA"
    # It names the date it judged by (the horizon ends 2025-01-30) and which events count (ListProfileEvents
    # also shows identify events).
    latest = caught.value.metadata["latest_event_time"]
    assert latest == max(e.time for h in SOURCE.histories(day("2025-01-30")) for e in h.events).isoformat()
    assert f"latest activity event before it is {latest}" in caught.value.message
    assert "identify and alias events" in caught.value.message


def test_scores_come_with_percentiles_and_contributions(conversion_model: TrainedModel) -> None:
    scorer = Scorer(conversion_model.model_string, conversion_model.feature_names,
                    conversion_model.score_quantiles)
    as_of = day("2024-10-01")
    histories = list(SOURCE.histories(as_of))[:200]
    rows = [feature_row(h.events, as_of) for h in histories]
    scores = scorer.score_rows([h.person_id for h in histories], rows, as_of, top_features=5)
    raw = lgb.Booster(model_str=conversion_model.model_string)
    expected = raw.predict(np.asarray(rows))
    # Explained or not, a probability is exactly the booster's (percentiles among tied scores depend on it).
    assert [s.probability for s in scores] == list(expected)
    unexplained = scorer.score_rows([h.person_id for h in histories], rows, as_of)
    assert [s.probability for s in unexplained] == list(expected)
    for score, row in zip(scores, rows, strict=True):
        assert 0 <= score.percentile <= 100 and score.percentile == scorer.percentile(score.probability)
        assert len(score.top_features) == 5
        magnitudes = [abs(f.contribution) for f in score.top_features]
        assert magnitudes == sorted(magnitudes, reverse=True)
        assert all(f.value == row[FEATURE_NAMES.index(f.feature)] or math.isnan(f.value)
                   for f in score.top_features)
    # Contributions plus the base value add up to the raw log-odds.
    contributions = scorer.contributions(np.asarray(rows[:1]))
    assert contributions.sum() == pytest.approx(float(raw.predict(np.asarray(rows[:1]), raw_score=True)[0]))
    assert scores[0].base_value == pytest.approx(float(contributions[0, -1]))
    # Higher probability, higher (or equal) percentile.
    ordered = sorted(scores, key=lambda s: s.probability)
    assert [s.percentile for s in ordered] == sorted(s.percentile for s in ordered)
    assert scorer.percentile(-1.0) == 0.0 and scorer.percentile(2.0) == 100.0
    assert scorer.score_rows(["x"], rows[:1], as_of)[0].top_features == ()


def test_one_person_by_the_seam(conversion_model: TrainedModel) -> None:
    scorer = Scorer(conversion_model.model_string, conversion_model.feature_names,
                    conversion_model.score_quantiles)
    as_of = day("2024-10-01")
    history = SOURCE.history(PersonRef(person_id="p00001"), as_of)
    score = score_history(scorer, spec(), history, as_of, top_features=3)
    assert score.person_id == "p00001" and len(score.top_features) == 3
    churn = spec(PredictionKind.CHURN)
    idle = PersonHistory("idle", [ActivityEvent("order", as_of - timedelta(days=400), 1.0)])
    with pytest.raises(FailedPrecondition) as caught:
        score_history(scorer, churn, idle, as_of, top_features=0)
    assert caught.value.reason == "PERSON_NOT_ELIGIBLE"


def test_a_model_of_another_feature_list_is_refused(conversion_model: TrainedModel) -> None:
    with pytest.raises(FailedPrecondition):
        Scorer(conversion_model.model_string, [*FEATURE_NAMES, "extra"], conversion_model.score_quantiles)


def test_a_validation_set_with_one_outcome_is_refused_with_advice_that_can_help() -> None:
    training, validation = build_training_sets(spec(), SOURCE.histories(VALIDATION_CUTOFF + timedelta(days=60)),
                                               TRAINING_CUTOFFS, VALIDATION_CUTOFF)
    validation.label_list = [0] * len(validation)  # nobody converted in the validation period
    with pytest.raises(FailedPrecondition) as refused:
        train_booster(training, validation, 50)
    message = refused.value.message
    assert f"the validation set has 0 positives and {len(validation)} negatives" in message
    # min_class_count does not apply to validation: lowering it cannot help, so it is not suggested.
    assert "min_class_count" not in message and "choose a validation cutoff" in message
