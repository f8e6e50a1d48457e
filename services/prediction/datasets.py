"""Point-in-time correct training sets.

For a cutoff T and horizon H, a person's row has features from events strictly before T
(`features.features_at`) and a label from events in [T, T+H) only. Who gets a row at T is decided
from events before T too: conversion needs some history before T (a person who did not exist yet
cannot be scored), churn needs qualifying activity within `eligibility_days` before T. Several
rolling cutoffs give one row per (person, cutoff).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np
import numpy.typing as npt

from services.prediction.features import FEATURE_NAMES, feature_matrix, features_at
from services.prediction.history import ORDER_EVENT, ActivityEvent, EventRuns, PersonHistory, columns_of, micros_of
from services.prediction.spec import ModelSpec, PredictionKind

# Persons whose features are computed together while training sets are built (also the progress step).
FEATURE_BATCH = 1000


def horizon_of(spec: ModelSpec) -> timedelta:
    return timedelta(days=spec.horizon_days)


def _index_at(events: Sequence[ActivityEvent], time: datetime) -> int:
    """Index of the first event at or after `time` in a time-sorted history."""
    return bisect_left(events, time, key=lambda e: e.time)


def _qualifies(spec: ModelSpec, event: ActivityEvent) -> bool:
    """Churn: does this event count as activity? Conversion: is it a target event?

    A refund (an order event with a negative amount) is no conversion: "did they order" means a purchase.
    For churn it is still activity (the person did something).
    """
    if spec.kind is PredictionKind.CHURN:
        return not spec.event_names or event.name in spec.event_names
    return event.name in spec.event_names and not is_refund(event)


def is_refund(event: ActivityEvent) -> bool:
    return event.name == ORDER_EVENT and (event.amount or 0.0) < 0.0


def is_eligible(spec: ModelSpec, events: Sequence[ActivityEvent], cutoff: datetime) -> bool:
    """Whether the person can be scored at `cutoff`, judged from events strictly before it."""
    return bool(eligible_at(spec, EventRuns.of([columns_of(events)]), cutoff)[0])


def reads_names(spec: ModelSpec) -> bool:
    """Whether `eligible_at` reads the events' names: only for churn that names its qualifying events (runs
    for it are built `with_names`)."""
    return spec.kind is PredictionKind.CHURN and bool(spec.event_names)


def eligible_at(spec: ModelSpec, runs: EventRuns, cutoff: datetime) -> npt.NDArray[np.bool_]:
    """`is_eligible` of every person in `runs` at once (one flag per run)."""
    events = runs.columns
    before = events.micros < micros_of(cutoff)
    if spec.kind is PredictionKind.CONVERSION:
        return runs.count(before) > 0
    window = before & (events.micros >= micros_of(cutoff - timedelta(days=spec.eligibility_days)))
    if reads_names(spec):
        if events.names is None:
            raise ValueError("a spec that names its events needs runs built with_names")
        window &= np.isin(events.names, list(spec.event_names))
    return runs.count(window) > 0


def label_of(spec: ModelSpec, events: Sequence[ActivityEvent], cutoff: datetime) -> int:
    """1 when the predicted outcome happened in [cutoff, cutoff + horizon), else 0."""
    window = events[_index_at(events, cutoff):_index_at(events, cutoff + horizon_of(spec))]
    happened = any(_qualifies(spec, e) for e in window)
    # Conversion: a target event happened. Churn: no qualifying activity happened.
    return int(happened) if spec.kind is PredictionKind.CONVERSION else int(not happened)


@dataclass
class TrainingSet:
    """Rows of (person, cutoff): features in FEATURE_NAMES order and 0/1 labels."""

    person_ids: list[str] = field(default_factory=list)
    cutoffs: list[datetime] = field(default_factory=list)
    rows: list[list[float]] = field(default_factory=list)
    label_list: list[int] = field(default_factory=list)

    @property
    def features(self) -> npt.NDArray[np.float64]:
        return feature_matrix(self.rows)

    @property
    def labels(self) -> npt.NDArray[np.int8]:
        return np.asarray(self.label_list, dtype=np.int8)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return FEATURE_NAMES

    @property
    def positives(self) -> int:
        return sum(self.label_list)

    @property
    def negatives(self) -> int:
        return len(self.label_list) - self.positives

    def __len__(self) -> int:
        return len(self.label_list)


def build_training_sets(spec: ModelSpec, histories: Iterable[PersonHistory], training_cutoffs: Sequence[datetime],
                        validation_cutoff: datetime,
                        progress: Callable[[int], None] | None = None) -> tuple[TrainingSet, TrainingSet]:
    """The training rows (one per eligible person and training cutoff) and the validation rows, in one pass.

    `progress` is called with the number of persons processed so far, every 1,000 persons and at the end.
    """
    training, validation = TrainingSet(), TrainingSet()
    processed = 0
    chunk: list[PersonHistory] = []

    def add_chunk(persons: Sequence[PersonHistory]) -> None:
        for cutoff in training_cutoffs:
            add_examples(training, spec, persons, cutoff)
        add_examples(validation, spec, persons, validation_cutoff)

    for history in histories:
        chunk.append(history)
        if len(chunk) == FEATURE_BATCH:
            add_chunk(chunk)
            processed += len(chunk)
            chunk = []
            if progress is not None:
                progress(processed)
    add_chunk(chunk)
    processed += len(chunk)
    if progress is not None:
        progress(processed)
    return training, validation


def add_examples(dataset: TrainingSet, spec: ModelSpec, histories: Sequence[PersonHistory], cutoff: datetime) -> int:
    """Add the row at `cutoff` of each person eligible then (their features computed together); returns how
    many rows were added."""
    flags = eligible_at(spec, EventRuns.of([h.columns for h in histories], with_names=reads_names(spec)), cutoff)
    eligible = [h for h, flag in zip(histories, flags.tolist(), strict=True) if flag]
    if not eligible:
        return 0
    dataset.person_ids += [h.person_id for h in eligible]
    dataset.cutoffs += [cutoff] * len(eligible)
    dataset.rows += features_at([h.columns for h in eligible], cutoff).tolist()
    dataset.label_list += [label_of(spec, h.events, cutoff) for h in eligible]
    return len(eligible)


def add_example(dataset: TrainingSet, spec: ModelSpec, history: PersonHistory, cutoff: datetime) -> bool:
    """Add the person's row at `cutoff` when they are eligible; returns whether a row was added."""
    return add_examples(dataset, spec, [history], cutoff) == 1
