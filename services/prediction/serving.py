"""Serving: which version scores, its parsed booster (cached), and scoring persons read from a HistoryReader.

Parsing a model string costs milliseconds, so each version's `Scorer` is built once and kept. A
version is immutable once READY, but a model id can be deleted and created again with new version
1, so the cache key includes the model's create time: a recreated model never gets an old booster.

Which version is active is read from the registry (a Cassandra read, 1-2 ms, tens of ms under load:
more than the rest of a score from the online store) at most once a second per model (`ActiveModels`),
in the background while the kept model goes on answering. Activations, deletions and creations through
this replica are seen at once; through another replica, or by a training job that activates, within
that second and the background read after it. A model without an active version is never kept, so the
first activation is seen at once everywhere.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial

import numpy as np

from services.prediction.datasets import eligible_at, reads_names
from services.prediction.features import FEATURE_NAMES, features_at, features_of_runs
from services.prediction.history import HistoryReader, PersonHistory, PersonRef, ReadRuns
from services.prediction.registry import Model, ModelRegistry, ModelVersion, VersionState
from services.prediction.scoring import PersonScore, ScoreBatch, Scorer, not_eligible, score_history
from services.prediction.spec import model_name, version_name
from shared.errors import DomainError, FailedPrecondition, NotFound

log = logging.getLogger(__name__)

# Versions kept parsed in memory; a booster of a few hundred trees is a few MB at most.
MAX_CACHED_SCORERS = 32
# How long a model (its active version) read from the registry is used before it is read again.
MODEL_REFRESH_SECONDS = 1.0
# How long past MODEL_REFRESH_SECONDS a kept model still answers while a background read replaces it.
MODEL_STALE_SECONDS = 5.0
# A version is compiled to machine code (compiled.py) once it has scored this many rows: a few seconds of
# background compile pay off for a version in use, not for one scored a handful of times.
ROWS_BEFORE_COMPILE = 5_000


@dataclass(frozen=True)
class ScoringVersion:
    """A READY version of a model and its scorer."""

    model: Model
    version: ModelVersion
    scorer: Scorer

    @property
    def name(self) -> str:
        return version_name(self.version.model_id, self.version.version_id)


def _in_background(work: Callable[[], None]) -> None:
    threading.Thread(target=work, name="prediction-model-refresh", daemon=True).start()


class ScorerCache:
    """Parsed boosters per (model, model create time, version), least recently used evicted first."""

    def __init__(self, registry: ModelRegistry, capacity: int = MAX_CACHED_SCORERS) -> None:
        self._registry = registry
        self._capacity = capacity
        self._entries: OrderedDict[tuple[str, datetime, int], tuple[ModelVersion, Scorer]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, model: Model, version_id: int) -> tuple[ModelVersion, Scorer]:
        key = (model.model_id, model.create_time, version_id)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry
        version, scorer = self._build(model, version_id)
        with self._lock:
            self._keep(key, version, scorer)
        return version, scorer

    def compile_now(self, model: Model, version_id: int) -> None:
        """Build the version's scorer and compile its forest before it scores anything (the training job calls it
        before activating: the first scores of a new version are compiled ones, with no compile in the
        background while requests are served); a version already kept compiled is left as it is."""
        key = (model.model_id, model.create_time, version_id)
        with self._lock:
            entry = self._entries.get(key)
        if entry is None:
            entry = self._build(model, version_id)
        compiling = entry[1].compiling
        if compiling is not None:
            compiling.compile_now()
        with self._lock:
            self._keep(key, *entry)

    def _build(self, model: Model, version_id: int) -> tuple[ModelVersion, Scorer]:
        # Built outside the lock: two first calls may both parse, which is cheaper than serialising every miss.
        version = self._registry.get_version(model.model_id, version_id, with_quantiles=True)
        if version.state is not VersionState.READY:
            name = version_name(model.model_id, version_id)
            raise FailedPrecondition(f"model version {name} is {version.state.value}; only a version that finished "
                                     "training can score", reason="MODEL_VERSION_NOT_READY",
                                     metadata={"model_version": name, "state": version.state.value})
        scorer = Scorer(self._registry.load_booster(model.model_id, version_id), version.feature_names,
                        version.score_quantiles, name=version_name(model.model_id, version_id),
                        rows_before_compile=ROWS_BEFORE_COMPILE)
        return version, scorer

    def _keep(self, key: tuple[str, datetime, int], version: ModelVersion, scorer: Scorer) -> None:
        """Under the lock."""
        self._entries[key] = (version, scorer)
        self._entries.move_to_end(key)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)


class ActiveModels:
    """Models with an active version, read from the registry at most every `refresh_seconds` each.

    A kept model past `refresh_seconds` is still answered, for up to `stale_seconds` more, while one
    background read replaces it: a request never waits on the registry (a Cassandra read, tens of ms
    under load) for a model this replica holds. Past that, or for a model not held, the read is inline.
    """

    def __init__(self, registry: ModelRegistry, refresh_seconds: float = MODEL_REFRESH_SECONDS,
                 stale_seconds: float = MODEL_STALE_SECONDS, monotonic: Callable[[], float] = time.monotonic,
                 start: Callable[[Callable[[], None]], None] = _in_background) -> None:
        self._registry = registry
        self._refresh_seconds = refresh_seconds
        self._stale_seconds = stale_seconds
        self._monotonic = monotonic
        self._start = start
        self._models: dict[str, tuple[float, Model]] = {}
        self._refreshing: set[str] = set()
        self._generation = 0  # forget() moves it on, so that a read started before is not kept
        self._lock = threading.Lock()

    def get(self, model_id: str) -> Model:
        now = self._monotonic()
        with self._lock:
            kept = self._models.get(model_id)
            age = now - kept[0] if kept is not None else math.inf
            usable = age < self._refresh_seconds + self._stale_seconds
            refresh = usable and age >= self._refresh_seconds and model_id not in self._refreshing
            if refresh:
                self._refreshing.add(model_id)
        if kept is None or not usable:
            return self._read(model_id)
        if refresh:
            self._start(partial(self._refresh, model_id))
        return kept[1]

    def forget(self, model_id: str) -> None:
        """The model changed through this replica: read it again next time."""
        with self._lock:
            self._models.pop(model_id, None)
            self._generation += 1

    def _read(self, model_id: str) -> Model:
        with self._lock:
            generation = self._generation
        started = self._monotonic()
        model = self._registry.get_model(model_id)
        with self._lock:
            if generation == self._generation:
                if model.active_version is None:
                    self._models.pop(model_id, None)
                else:
                    self._models[model_id] = (started, model)
        return model

    def _refresh(self, model_id: str) -> None:
        try:
            self._read(model_id)
        except NotFound:  # deleted through another replica: the next request reads inline and says so
            with self._lock:
                self._models.pop(model_id, None)
        except Exception as error:  # kept as it is; past the stale time a request reads inline and fails
            log.warning("refreshing a model from the registry failed", extra={
                "model": model_name(model_id), "error": f"{type(error).__name__}: {error}"})
        finally:
            with self._lock:
                self._refreshing.discard(model_id)


class Predictor:
    """Scores persons with a model's active (or a given) version, reading their histories from `source`."""

    def __init__(self, registry: ModelRegistry, source: HistoryReader, scorers: ScorerCache) -> None:
        self._registry = registry
        self._models = ActiveModels(registry)
        self._source = source
        self._scorers = scorers

    def compile_version(self, model_id: str, version_id: int) -> None:
        """Make a READY version's scorer and compile it now (ScorerCache.compile_now), e.g. right after training."""
        self._scorers.compile_now(self._registry.get_model(model_id), version_id)

    def forget_model(self, model_id: str) -> None:
        """The model was activated, deleted or created through this replica."""
        self._models.forget(model_id)

    def scoring_version(self, model_id: str, version_id: int | None = None) -> ScoringVersion:
        """The version to score with: `version_id`, or the active one (FailedPrecondition when none is)."""
        model = self._models.get(model_id)
        if version_id is None:
            if model.active_version is None:
                raise FailedPrecondition(
                    f"model {model_name(model_id)} has no active version; train one with activate, or activate "
                    "a ready version", reason="NO_ACTIVE_VERSION", metadata={"model": model_name(model_id)})
            version_id = model.active_version
        version, scorer = self._scorers.get(model, version_id)
        return ScoringVersion(model, version, scorer)

    def score(self, model_id: str, version_id: int | None, person: PersonRef, as_of: datetime,
              top_features: int) -> tuple[ScoringVersion, PersonScore]:
        """One person with the model's active (or a given) version, and the version that scored.

        The person's history is requested from profile first and the model is read from the registry
        while it travels: the two round trips overlap instead of adding up. Model errors (NotFound, no
        active version) come first; then NotFound for nobody, FailedPrecondition when the spec does not
        cover them at `as_of`.
        """
        pending = self._source.start_histories_of([person], as_of)
        scoring = self.scoring_version(model_id, version_id)
        (history,) = pending.result()
        if isinstance(history, DomainError):
            raise history
        return scoring, score_history(scoring.scorer, scoring.version.spec, history, as_of, top_features)

    def score_many(self, scoring: ScoringVersion, persons: Sequence[PersonRef], as_of: datetime,
                   top_features: int) -> ScoredBatch:
        """Many persons; a person that cannot be scored gets its error instead of a score."""
        # Whole histories: score_runs reads only the events before as_of, without a cut per person.
        read = self._source.whole_runs_of(persons, with_names=reads_names(scoring.version.spec))
        return score_runs(scoring, read, as_of, top_features)

    def features(self, person: PersonRef, as_of: datetime) -> tuple[str, dict[str, float]]:
        """The person id and the feature values as of `as_of`, as training and scoring compute them."""
        history = self._source.history(person, as_of)
        return history.person_id, dict(zip(FEATURE_NAMES, features_at([history.columns], as_of)[0].tolist(),
                                           strict=True))


@dataclass(frozen=True)
class ScoredBatch:
    """The outcome of scoring persons in request order: the eligible ones as one `ScoreBatch`, the others
    as their errors. `rows[i]` is the batch row of request position i, or -1 when `errors[i]` says why not."""

    batch: ScoreBatch
    rows: list[int]
    errors: dict[int, DomainError]

    def __len__(self) -> int:
        return len(self.rows)

    def results(self) -> list[PersonScore | DomainError]:
        return [self.errors[i] if row < 0 else self.batch.score(row) for i, row in enumerate(self.rows)]


def score_histories(scoring: ScoringVersion, histories: Sequence[PersonHistory | DomainError], as_of: datetime,
                    top_features: int) -> ScoredBatch:
    """Scores (or errors) for read histories, in order (`score_runs` of them)."""
    return score_runs(scoring, ReadRuns.of(histories, with_names=reads_names(scoring.version.spec)), as_of,
                      top_features)


def score_runs(scoring: ScoringVersion, read: ReadRuns, as_of: datetime, top_features: int) -> ScoredBatch:
    """Scores (or errors) for persons as read, in request order; ineligible persons get FailedPrecondition.

    Histories may hold events at or after `as_of` (the online store keeps them whole): eligibility and
    features read only the events before it. Both are computed for all persons at once over their
    histories laid end to end, and the eligible go through one booster call.
    """
    spec = scoring.version.spec
    eligible = eligible_at(spec, read.runs, as_of)
    rows = np.full(read.requested, -1, dtype=np.int64)
    rows[read.positions[eligible]] = np.arange(int(np.count_nonzero(eligible)))
    errors = read.errors
    person_ids = read.person_ids
    if not eligible.all():
        errors = dict(errors)
        for index in np.flatnonzero(~eligible).tolist():
            errors[int(read.positions[index])] = not_eligible(spec, person_ids[index], as_of)
        person_ids = [person_ids[index] for index in np.flatnonzero(eligible).tolist()]
    features = features_of_runs(read.runs.select(eligible), as_of)
    return ScoredBatch(scoring.scorer.score_matrix(person_ids, features, as_of, top_features), rows.tolist(), errors)
