"""Training a LightGBM model version: a time-based split, early stopping, metrics, importance.

Determinism: fixed seeds, `deterministic=True`, `force_row_wise` and a fixed small thread count, so
the same training set and seed give the same model string on the same machine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import lightgbm as lgb
import numpy as np

from services.prediction.datasets import TrainingSet, build_training_sets, horizon_of
from services.prediction.features import FEATURE_NAMES
from services.prediction.history import PersonHistory, ProfileSource
from services.prediction.metrics import (
    ModelMetrics,
    expected_calibration_error,
    log_loss,
    roc_auc,
    top_fraction_lift,
)
from services.prediction.spec import ModelSpec
from shared.errors import FailedPrecondition, FieldViolation, Violations
from shared.event_times import MAX_FUTURE_SKEW

MAX_BOOSTING_ROUNDS = 2000
EARLY_STOPPING_ROUNDS = 50
# Quantiles of the validation scores kept with a version, for percentiles at scoring time (0.1 steps).
SCORE_QUANTILES = 1001
# Every cutoff adds a row per person to the training set (held in memory while LightGBM trains): a year of
# weekly cutoffs is as many as a model needs.
MAX_TRAINING_CUTOFFS = 52
# One thread: on a shared 2-core machine a second thread measured 3x slower (13 s vs 4.4 s on CDNOW).
DEFAULT_TRAINING_THREADS = 1
# The data's last event may fall on the horizon's last day (daily data such as CDNOW's).
HORIZON_SLACK = timedelta(days=1)
# The stages of a training operation, in order (TrainModelMetadata.stage documents them for clients): `done`
# once the version is saved; a training that fails keeps the stage it failed in.
STAGE_QUEUED, STAGE_FEATURES, STAGE_TRAINING, STAGE_SAVING = "queued", "features", "training", "saving"
STAGE_DONE = "done"
# Which events the data-coverage check counts (what ListProfileEvents shows includes the others).
ACTIVITY_NOTE = "identify and alias events are state, not activity, and do not count"


@dataclass(frozen=True)
class TrainedModel:
    """Everything a model version stores about its training."""

    model_string: str
    feature_names: tuple[str, ...]
    best_iteration: int
    metrics: ModelMetrics
    importance: tuple[tuple[str, float], ...]  # gain, highest first
    score_quantiles: tuple[float, ...]  # validation probabilities at quantiles 0, 0.001, ..., 1


def booster_params(examples: int, seed: int, num_threads: int) -> dict[str, object]:
    """Small, regularised trees: customer data is noisy and often small, and overfitting shows as poor calibration."""
    return {
        "objective": "binary",
        "metric": "binary_logloss",
        "learning_rate": 0.03,
        "num_leaves": 15,
        "max_depth": 6,
        # Leaves need enough people to mean something; scaled down for small sets so they still learn.
        "min_data_in_leaf": int(min(100, max(5, examples // 200))),
        "min_sum_hessian_in_leaf": 1e-3,
        "lambda_l2": 5.0,
        "feature_fraction": 0.8,
        "bagging_fraction": 0.8,
        "bagging_freq": 1,
        "max_bin": 255,
        "seed": seed,
        "deterministic": True,
        "force_row_wise": True,
        "num_threads": num_threads,
        "verbosity": -1,
    }


def check_class_counts(dataset: TrainingSet, minimum: int, what: str, remedy: str) -> None:
    positives, negatives = dataset.positives, dataset.negatives
    if positives < minimum or negatives < minimum:
        raise FailedPrecondition(
            f"the {what} set has {positives} positives and {negatives} negatives; at least {minimum} of each "
            f"are needed ({remedy})",
            reason="TOO_FEW_EXAMPLES",
            metadata={"set": what, "positives": str(positives), "negatives": str(negatives),
                      "minimum": str(minimum)})


def train_booster(training: TrainingSet, validation: TrainingSet, min_class_count: int, *, seed: int = 1,
                  num_threads: int = DEFAULT_TRAINING_THREADS) -> TrainedModel:
    """Fit on `training`, stop early on `validation` (a later period), and measure on `validation`."""
    check_class_counts(training, min_class_count, "training",
                       "more history, more or earlier cutoffs, or a lower min_class_count")
    # Validation only needs both classes for its metrics to exist (min_class_count does not apply to it).
    check_class_counts(validation, 1, "validation",
                       "the metrics need both outcomes in the validation period: choose a validation cutoff "
                       "whose horizon has persons with and without the outcome")
    names = list(FEATURE_NAMES)
    train_data = lgb.Dataset(training.features, label=training.labels, feature_name=names, free_raw_data=True,
                             params={"verbosity": -1, "max_bin": 255})
    valid_data = lgb.Dataset(validation.features, label=validation.labels, feature_name=names,
                             reference=train_data, free_raw_data=True)
    booster = lgb.train(
        booster_params(len(training), seed, num_threads), train_data, num_boost_round=MAX_BOOSTING_ROUNDS,
        valid_sets=[valid_data], valid_names=["validation"],
        callbacks=[lgb.early_stopping(EARLY_STOPPING_ROUNDS, verbose=False)])
    best_iteration = int(booster.best_iteration or booster.current_iteration())
    probabilities = np.asarray(booster.predict(validation.features, num_iteration=best_iteration,
                                               num_threads=num_threads), dtype=np.float64)
    labels = validation.labels
    metrics = ModelMetrics(
        roc_auc=roc_auc(labels, probabilities),
        log_loss=log_loss(labels, probabilities),
        calibration_error=expected_calibration_error(labels, probabilities),
        top_decile_lift=top_fraction_lift(labels, probabilities),
        training_examples=len(training),
        validation_examples=len(validation),
        training_positive_rate=training.positives / len(training),
        validation_positive_rate=validation.positives / len(validation),
    )
    gains = booster.feature_importance(importance_type="gain", iteration=best_iteration)
    importance = tuple(sorted(((name, float(gain)) for name, gain in zip(names, gains, strict=True)),
                              key=lambda item: (-item[1], item[0])))
    quantiles = np.quantile(probabilities, np.linspace(0.0, 1.0, SCORE_QUANTILES))
    return TrainedModel(
        model_string=booster.model_to_string(num_iteration=best_iteration),
        feature_names=FEATURE_NAMES, best_iteration=best_iteration, metrics=metrics, importance=importance,
        score_quantiles=tuple(float(q) for q in quantiles))


def check_cutoffs(spec: ModelSpec, training_cutoffs: Sequence[datetime], validation_cutoff: datetime) -> None:
    """Training labels must end before the validation period starts, or validation would not be held out."""
    violations = Violations()
    violations.check(bool(training_cutoffs), "training_cutoffs", "at least one training cutoff is required")
    violations.check(len(training_cutoffs) <= MAX_TRAINING_CUTOFFS, "training_cutoffs",
                     f"at most {MAX_TRAINING_CUTOFFS} training cutoffs (each adds a row per person to the training "
                     f"set), got {len(training_cutoffs)}")
    horizon = horizon_of(spec)
    for index, cutoff in enumerate(training_cutoffs):
        violations.check(cutoff + horizon <= validation_cutoff, f"training_cutoffs[{index}]",
                         f"{cutoff.isoformat()} plus the {spec.horizon_days}-day horizon ends after the validation "
                         f"cutoff {validation_cutoff.isoformat()}")
    if len(set(training_cutoffs)) != len(training_cutoffs):
        violations.add("training_cutoffs", "the training cutoffs must be distinct")
    violations.raise_if_any("the training window is invalid", reason="INVALID_TRAINING_WINDOW")


def check_horizon_reachable(spec: ModelSpec, training_cutoffs: Sequence[datetime], validation_cutoff: datetime,
                            now: datetime) -> None:
    """Refuse at once a window whose validation horizon ends where no data can reach yet, which `train_version`
    would refuse only after reading every profile: no event is stamped later than `now` plus MAX_FUTURE_SKEW
    (profile refuses later ones), and train_version wants an event within HORIZON_SLACK of the horizon's end,
    so a horizon ending after `now` + MAX_FUTURE_SKEW + HORIZON_SLACK cannot pass. That one limit is the one
    the message, each field violation and the metadata state. Names the validation cutoff, and each training
    cutoff whose own horizon ends past it too (no window that can pass may hold it)."""
    horizon = horizon_of(spec)
    horizon_end = validation_cutoff + horizon
    latest_possible = now + MAX_FUTURE_SKEW
    limit = latest_possible + HORIZON_SLACK  # the latest end train_version's check lets through
    if horizon_end <= limit:
        return

    def beyond(cutoff: datetime) -> str:
        return (f"{cutoff.isoformat()} plus the {spec.horizon_days}-day horizon ends at "
                f"{(cutoff + horizon).isoformat()}, after {limit.isoformat()}: no data can reach it yet")

    violations = [FieldViolation("validation_cutoff", beyond(validation_cutoff))]
    violations += [FieldViolation(f"training_cutoffs[{index}]", beyond(cutoff))
                   for index, cutoff in enumerate(training_cutoffs) if cutoff + horizon > limit]
    raise FailedPrecondition(
        f"the validation horizon ends at {horizon_end.isoformat()}, after {limit.isoformat()}, the latest end the "
        f"data can cover (now plus the {MAX_FUTURE_SKEW.days}-day clock skew events may have, plus the "
        f"{HORIZON_SLACK.days}-day slack a horizon may end after the latest activity event); choose an earlier "
        "validation cutoff",
        reason="VALIDATION_HORIZON_BEYOND_DATA", field_violations=violations,
        metadata={"latest_possible_horizon_end": limit.isoformat(),
                  "latest_possible_event_time": latest_possible.isoformat(),
                  "validation_horizon_end": horizon_end.isoformat()})


def train_version(spec: ModelSpec, source: ProfileSource, training_cutoffs: Sequence[datetime],
                  validation_cutoff: datetime, *, seed: int = 1, num_threads: int = DEFAULT_TRAINING_THREADS,
                  progress: Callable[[str, int], None] | None = None) -> TrainedModel:
    """Build point-in-time training and validation sets from `source`, then train.

    `progress(stage, persons_scanned)` reports the stages `features` (persons scanned so far) and `training`
    (every person scanned: the count never goes back).
    Raises InvalidArgument for a bad window, FailedPrecondition when the data cannot support the spec.
    """
    check_cutoffs(spec, training_cutoffs, validation_cutoff)
    horizon_end = validation_cutoff + horizon_of(spec)
    latest: list[datetime] = []
    scanned = [0]

    def histories_tracking_latest() -> Iterator[PersonHistory]:
        for history in source.histories(before=horizon_end):
            if history.events:
                last = history.events[-1].time
                if not latest or last > latest[0]:
                    latest[:] = [last]
            yield history

    def on_persons(count: int) -> None:
        scanned[0] = count
        if progress is not None:
            progress(STAGE_FEATURES, count)

    training, validation = build_training_sets(spec, histories_tracking_latest(),
                                               sorted(training_cutoffs), validation_cutoff, on_persons)
    # With the data ending inside the validation horizon, everyone would look like a non-converter.
    if not latest or latest[0] < horizon_end - HORIZON_SLACK:
        seen = latest[0].isoformat() if latest else "none"
        raise FailedPrecondition(
            f"the validation horizon ends at {horizon_end.isoformat()} but the latest activity event before it "
            f"is {seen} ({ACTIVITY_NOTE}); choose an earlier validation cutoff",
            reason="VALIDATION_HORIZON_BEYOND_DATA",
            metadata={"latest_event_time": seen, "validation_horizon_end": horizon_end.isoformat()})
    if progress is not None:
        progress(STAGE_TRAINING, scanned[0])
    return train_booster(training, validation, spec.min_class_count, seed=seed, num_threads=num_threads)

