"""Scoring with a stored model version: probability, percentile and the features behind each score.

A `Scorer` is built once per model version (parsing a model string costs milliseconds) and reused.
Every predict call uses one thread: single-row calls are dominated by per-call overhead, and threads
of concurrent RPCs fighting over two cores make it far worse.

A batch is scored with one `predict` (and, when explanations are asked for, one `pred_contrib`) call
and stays columnar (`ScoreBatch`): per-person Python objects cost more than the booster itself on
batches, so a `PersonScore` is only built when a caller asks for one.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import lightgbm as lgb
import numpy as np
import numpy.typing as npt

from services.prediction.compiled import BackgroundCompile
from services.prediction.datasets import eligible_at
from services.prediction.features import FEATURE_NAMES, feature_matrix, features_of_runs
from services.prediction.history import EventRuns, PersonHistory
from services.prediction.spec import ModelSpec, PredictionKind
from shared.errors import FailedPrecondition

PREDICT_THREADS = 1
_NO_TOP = np.empty((0, 0), dtype=np.intp)


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


@dataclass(frozen=True)
class ScoreBatch:
    """Scores of many persons as columns: row i is `person_ids[i]`.

    `top_features[i]` are the indexes (into FEATURE_NAMES) of row i's largest contributions, largest
    absolute effect first; `contributions` has one column per feature plus the base value last.
    Both are empty when no explanations were asked for.
    """

    person_ids: Sequence[str]
    probabilities: npt.NDArray[np.float64]
    percentiles: npt.NDArray[np.float64]
    features: npt.NDArray[np.float64]
    contributions: npt.NDArray[np.float64] | None
    top_features: npt.NDArray[np.intp]
    as_of: datetime

    def __len__(self) -> int:
        return len(self.person_ids)

    def base_value(self, row: int) -> float:
        return float(self.contributions[row, -1]) if self.contributions is not None else 0.0

    def top_contributions(self, row: int) -> tuple[FeatureContribution, ...]:
        if self.contributions is None:
            return ()
        values, contributions = self.features[row], self.contributions[row]
        return tuple(FeatureContribution(FEATURE_NAMES[i], float(values[i]), float(contributions[i]))
                     for i in self.top_features[row].tolist())

    def score(self, row: int) -> PersonScore:
        return PersonScore(person_id=self.person_ids[row], probability=float(self.probabilities[row]),
                           percentile=float(self.percentiles[row]), base_value=self.base_value(row),
                           top_features=self.top_contributions(row), as_of=self.as_of)

    def scores(self) -> list[PersonScore]:
        return [self.score(row) for row in range(len(self))]


class Scorer:
    """One model version, ready to score feature rows."""

    def __init__(self, model_string: str, feature_names: Sequence[str], score_quantiles: Sequence[float], *,
                 name: str = "", rows_before_compile: int | None = None) -> None:
        """`rows_before_compile`: compile the forest (`compiled.py`) in the background once this many rows were
        scored with LightGBM; None never compiles (what one-off scorers want)."""
        if tuple(feature_names) != FEATURE_NAMES:
            # Scoring with a different feature function than training saw would silently skew every score.
            raise FailedPrecondition(
                "the model version was trained on a different feature list than this release computes; "
                "train a new version", reason="FEATURES_CHANGED")
        self._booster = lgb.Booster(model_str=model_string)
        self._quantiles = list(score_quantiles)
        self._quantile_array = np.asarray(self._quantiles, dtype=np.float64)
        self.compiling = (BackgroundCompile(model_string, self._booster, rows_before_compile, name)
                          if rows_before_compile is not None else None)

    def percentile(self, probability: float) -> float:
        """Share of the validation scores at or below `probability`, in percent."""
        if not self._quantiles:
            return 0.0
        return 100.0 * bisect_right(self._quantiles, probability) / len(self._quantiles)

    def percentiles(self, probabilities: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """`percentile` of every probability at once."""
        if not self._quantiles:
            return np.zeros(len(probabilities))
        return 100.0 * np.searchsorted(self._quantile_array, probabilities, side="right") / len(self._quantiles)

    def probabilities(self, features: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """LightGBM's predict of every row, by the compiled forest once it is ready (the same numbers)."""
        if len(features) == 0:
            return np.empty(0, dtype=np.float64)
        compiling = self.compiling
        if compiling is not None:
            forest = compiling.forest
            if forest is not None:
                return forest.probabilities(features)
            compiling.scored(len(features))
        return np.asarray(self._booster.predict(features, num_threads=PREDICT_THREADS), dtype=np.float64)

    def contributions(self, features: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Per-row feature contributions (log-odds), with the base value as the last column."""
        return np.asarray(self._booster.predict(features, pred_contrib=True, num_threads=PREDICT_THREADS),
                          dtype=np.float64)

    def score_matrix(self, person_ids: Sequence[str], features: npt.NDArray[np.float64], as_of: datetime,
                     top_features: int = 0) -> ScoreBatch:
        """One predict call for the whole matrix, one pred_contrib call when `top_features` > 0.

        The probability always comes from predict, never from the contributions' sum: the sum can differ in
        the last bit, and a percentile among tied validation scores would then jump (the score quantiles
        were computed with predict)."""
        probabilities = self.probabilities(features)
        contributions = None
        top = _NO_TOP
        if top_features > 0 and len(features):
            contributions = self.contributions(features)
            # Largest absolute effect first; a stable sort keeps equal effects in feature order.
            top = np.argsort(-np.abs(contributions[:, :-1]), axis=1, kind="stable")[:, :top_features]
        return ScoreBatch(person_ids, probabilities, self.percentiles(probabilities), features, contributions, top,
                          as_of)

    def score_rows(self, person_ids: Sequence[str], rows: Sequence[Sequence[float]], as_of: datetime,
                   top_features: int = 0) -> list[PersonScore]:
        return self.score_matrix(person_ids, feature_matrix(rows), as_of, top_features).scores()


def not_eligible(spec: ModelSpec, person_id: str, as_of: datetime) -> FailedPrecondition:
    what = ("has no activity before" if spec.kind is PredictionKind.CONVERSION
            else f"was not active within {spec.eligibility_days} days before")
    return FailedPrecondition(f"person {person_id} {what} {as_of.isoformat()}, so the model does not score them",
                              reason="PERSON_NOT_ELIGIBLE", metadata={"person_id": person_id})


def score_history(scorer: Scorer, spec: ModelSpec, history: PersonHistory, as_of: datetime,
                  top_features: int) -> PersonScore:
    """Score one person as of a time; FailedPrecondition when the spec does not cover them then."""
    runs = EventRuns.of([history.columns])
    if not eligible_at(spec, runs, as_of)[0]:
        raise not_eligible(spec, history.person_id, as_of)
    return scorer.score_matrix([history.person_id], features_of_runs(runs, as_of), as_of, top_features).score(0)
