"""Quality measures of a binary classifier's probabilities, in numpy (scikit-learn is not a dependency)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
LOG_LOSS_EPSILON = 1e-15
CALIBRATION_BINS = 10
TOP_FRACTION = 0.1


@dataclass(frozen=True)
class ModelMetrics:
    roc_auc: float
    log_loss: float
    calibration_error: float
    top_decile_lift: float
    training_examples: int
    validation_examples: int
    training_positive_rate: float
    validation_positive_rate: float


def _average_ranks(values: FloatArray) -> FloatArray:
    """1-based ranks with ties sharing their average rank (what the Mann-Whitney statistic needs)."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # Start index of each run of equal values, and the run each sorted position belongs to.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    average = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    run_of_position = np.repeat(np.arange(len(starts)), ends - starts)
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = average[run_of_position]
    return ranks


def roc_auc(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Area under the ROC curve: the probability that a random positive outranks a random negative."""
    y = np.asarray(labels, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    positives = float(y.sum())
    negatives = float(len(y) - positives)
    if positives == 0 or negatives == 0:
        return math.nan
    ranks = _average_ranks(s)
    return float((ranks[y == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def log_loss(labels: npt.ArrayLike, probabilities: npt.ArrayLike) -> float:
    y = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(probabilities, dtype=np.float64), LOG_LOSS_EPSILON, 1 - LOG_LOSS_EPSILON)
    if len(y) == 0:
        return math.nan
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def expected_calibration_error(labels: npt.ArrayLike, probabilities: npt.ArrayLike,
                               bins: int = CALIBRATION_BINS) -> float:
    """Sum over equal-width probability bins of (share of examples) x |observed rate - mean probability|."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(probabilities, dtype=np.float64)
    if len(y) == 0:
        return math.nan
    # A probability of exactly 1.0 belongs to the last bin, not an eleventh one.
    bin_of = np.minimum((p * bins).astype(np.int64), bins - 1)
    error = 0.0
    for index in range(bins):
        members = bin_of == index
        count = int(members.sum())
        if count:
            error += count / len(y) * abs(float(y[members].mean()) - float(p[members].mean()))
    return error


def top_fraction_lift(labels: npt.ArrayLike, scores: npt.ArrayLike, fraction: float = TOP_FRACTION) -> float:
    """Positive rate among the highest-scored `fraction` of examples over the overall positive rate."""
    y = np.asarray(labels, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    overall = float(y.mean()) if len(y) else 0.0
    if overall == 0:
        return math.nan
    top = max(1, math.ceil(fraction * len(y)))
    # Stable order: equal scores keep their input order, so the result does not depend on the sort algorithm.
    best = np.argsort(-s, kind="mergesort")[:top]
    return float(y[best].mean()) / overall
