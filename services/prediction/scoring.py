"""Scoring with a stored model version: probability, percentile and the features behind each score.

A `Scorer` is built once per model version (parsing a model string costs milliseconds) and reused.
Every predict call uses one thread: single-row calls are dominated by per-call overhead, and threads
of concurrent RPCs fighting over two cores make it far worse.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import lightgbm as lgb
import numpy as np
import numpy.typing as npt

from services.prediction.datasets import is_eligible
from services.prediction.features import FEATURE_NAMES, feature_matrix, feature_row
from services.prediction.history import PersonHistory
from services.prediction.spec import ModelSpec, PredictionKind
from shared.errors import FailedPrecondition

PREDICT_THREADS = 1


@dataclass(frozen=True)
class FeatureContribution:
    feature: str
    value: float
    contribution: float  # log-odds; positive raises the probability


@dataclass(frozen=True)
class PersonScore:
    person_id: str
    probability: float
    percentile: float  # 0-100, among the version's validation scores
    base_value: float  # the SHAP base value (log-odds)
    top_features: tuple[FeatureContribution, ...]
    as_of: datetime


class Scorer:
    """One model version, ready to score feature rows."""

    def __init__(self, model_string: str, feature_names: Sequence[str], score_quantiles: Sequence[float]) -> None:
        if tuple(feature_names) != FEATURE_NAMES:
            # Scoring with a different feature function than training saw would silently skew every score.
            raise FailedPrecondition(
                "the model version was trained on a different feature list than this release computes; "
                "train a new version", reason="FEATURES_CHANGED")
        self._booster = lgb.Booster(model_str=model_string)
        self._quantiles = list(score_quantiles)
        self._quantile_array = np.asarray(self._quantiles, dtype=np.float64)

    def percentile(self, probability: float) -> float:
        """Share of the validation scores at or below `probability`, in percent."""
        if not self._quantiles:
            return 0.0
        return 100.0 * bisect_right(self._quantiles, probability) / len(self._quantiles)

    def probabilities(self, features: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        if len(features) == 0:
            return np.empty(0, dtype=np.float64)
        return np.asarray(self._booster.predict(features, num_threads=PREDICT_THREADS), dtype=np.float64)

    def contributions(self, features: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Per-row feature contributions (log-odds), with the base value as the last column."""
        return np.asarray(self._booster.predict(features, pred_contrib=True, num_threads=PREDICT_THREADS),
                          dtype=np.float64)

    def score_rows(self, person_ids: Sequence[str], rows: Sequence[Sequence[float]], as_of: datetime,
                   top_features: int = 0) -> list[PersonScore]:
        features = feature_matrix(rows)
        probabilities = self.probabilities(features)
        contributions = self.contributions(features) if top_features > 0 and len(rows) else None
        base_values = contributions[:, -1] if contributions is not None else None
        # Vectorised: per-row Python work, not the booster, bounds batch scoring (same result as percentile()).
        percentiles = (100.0 * np.searchsorted(self._quantile_array, probabilities, side="right")
                       / len(self._quantiles)) if self._quantiles else np.zeros(len(probabilities))
        scores = []
        for index, person_id in enumerate(person_ids):
            top: tuple[FeatureContribution, ...] = ()
            base = 0.0
            if contributions is not None and base_values is not None:
                top = _top_contributions(features[index], contributions[index, :-1], top_features)
                base = float(base_values[index])
            scores.append(PersonScore(person_id=person_id, probability=float(probabilities[index]),
                                      percentile=float(percentiles[index]), base_value=base, top_features=top,
                                      as_of=as_of))
        return scores


def _top_contributions(values: npt.NDArray[np.float64], contributions: npt.NDArray[np.float64],
                       count: int) -> tuple[FeatureContribution, ...]:
    # Largest absolute effect first; equal effects in feature order, so the answer is stable.
    order = sorted(range(len(FEATURE_NAMES)), key=lambda i: (-abs(float(contributions[i])), i))[:count]
    return tuple(FeatureContribution(FEATURE_NAMES[i], float(values[i]), float(contributions[i])) for i in order)


def score_history(scorer: Scorer, spec: ModelSpec, history: PersonHistory, as_of: datetime,
                  top_features: int) -> PersonScore:
    """Score one person as of a time; FailedPrecondition when the spec does not cover them then."""
    if not is_eligible(spec, history.events, as_of):
        what = ("has no activity before" if spec.kind is PredictionKind.CONVERSION
                else f"was not active within {spec.eligibility_days} days before")
        raise FailedPrecondition(f"person {history.person_id} {what} {as_of.isoformat()}, so the model does not "
                                 "score them", reason="PERSON_NOT_ELIGIBLE", metadata={"person_id": history.person_id})
    (score,) = scorer.score_rows([history.person_id], [feature_row(history.events, as_of)], as_of, top_features)
    return score
