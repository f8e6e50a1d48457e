"""Point-in-time correctness of training sets: features see only the past, labels only [T, T+H)."""

from __future__ import annotations

import math
import random
from datetime import timedelta

import pytest

from services.prediction.datasets import (
    TrainingSet,
    add_example,
    build_training_sets,
    eligible_at,
    is_eligible,
    label_of,
)
from services.prediction.features import FEATURE_NAMES, feature_row
from services.prediction.history import ActivityEvent, EventRuns, PersonHistory, columns_of
from services.prediction.spec import PredictionKind, resolve_spec
from tests.services.prediction.synthetic import day, synthetic_events

pytestmark = pytest.mark.unit

T = day("2024-06-01")
CONVERSION = resolve_spec(PredictionKind.CONVERSION, [], 30, eligibility_days=0, min_class_count=0)
CHURN = resolve_spec(PredictionKind.CHURN, [], 30, eligibility_days=60, min_class_count=0)


def same(a: list[float], b: list[float]) -> bool:
    return all((math.isnan(x) and math.isnan(y)) or x == y for x, y in zip(a, b, strict=True))


def row_of(events: list[ActivityEvent], spec_kind: str = "conversion") -> tuple[list[float], int]:
    dataset = TrainingSet()
    spec = CONVERSION if spec_kind == "conversion" else CHURN
    assert add_example(dataset, spec, PersonHistory("p", sorted(events, key=lambda e: e.time)), T)
    return dataset.rows[0], dataset.label_list[0]


BASE = [ActivityEvent("page_view", T - timedelta(days=50)), ActivityEvent("order", T - timedelta(days=40), 20.0),
        ActivityEvent("order", T - timedelta(days=5), 35.0, "books")]


@pytest.mark.parametrize("later", [
    ActivityEvent("order", T, 100.0, "games"),                       # exactly at the cutoff
    ActivityEvent("order", T + timedelta(days=3), 5.0),             # inside the label window
    ActivityEvent("page_view", T + timedelta(days=29, hours=23)),    # at the end of the label window
    ActivityEvent("order", T + timedelta(days=400), 1e6, "cars"),   # long after
])
def test_an_event_at_or_after_the_cutoff_cannot_change_a_feature(later: ActivityEvent) -> None:
    features, _ = row_of(BASE)
    changed, _ = row_of([*BASE, later])
    assert same(features, changed)


def test_changing_an_event_after_the_cutoff_cannot_change_a_feature() -> None:
    with_order = [*BASE, ActivityEvent("order", T + timedelta(days=2), 10.0)]
    edited = [*BASE, ActivityEvent("order", T + timedelta(days=20), 9999.0, "garden")]
    assert same(row_of(with_order)[0], row_of(edited)[0])


def test_an_event_before_the_cutoff_changes_features() -> None:
    features, _ = row_of(BASE)
    changed, _ = row_of([*BASE, ActivityEvent("order", T - timedelta(microseconds=1), 5.0)])
    assert not same(features, changed)
    edited = [*BASE[:2], ActivityEvent("order", T - timedelta(days=5), 36.0, "books")]
    assert not same(features, row_of(edited)[0])


def test_labels_come_only_from_the_horizon() -> None:
    assert row_of(BASE)[1] == 0
    assert row_of([*BASE, ActivityEvent("order", T, 1.0)])[1] == 1  # the window includes T
    assert row_of([*BASE, ActivityEvent("order", T + timedelta(days=29), 1.0)])[1] == 1
    assert row_of([*BASE, ActivityEvent("order", T + timedelta(days=30), 1.0)])[1] == 0  # ... and excludes T+H
    assert row_of([*BASE, ActivityEvent("page_view", T + timedelta(days=1))])[1] == 0  # not a target event
    # An order just before T is a feature, never a label.
    assert row_of([*BASE, ActivityEvent("order", T - timedelta(seconds=1), 1.0)])[1] == 0


def test_a_refund_is_not_a_conversion() -> None:
    refund = ActivityEvent("order", T + timedelta(days=2), -35.0)  # refunds the order 5 days before T
    assert row_of([*BASE, refund])[1] == 0  # a refund alone inside the horizon
    assert row_of([*BASE, refund, ActivityEvent("order", T + timedelta(days=3), 12.0)])[1] == 1
    assert row_of([*BASE, ActivityEvent("order", T + timedelta(days=3), 0.0)])[1] == 1  # a free order is an order
    assert row_of([*BASE, refund], "churn")[1] == 0  # but it is activity: not churned
    # The same refund before T nets the amounts and leaves the order count alone.
    features, _ = row_of([*BASE, ActivityEvent("order", T - timedelta(days=1), -35.0)])
    values = dict(zip(FEATURE_NAMES, features, strict=True))
    assert values["order_amount_sum"] == 20.0 and values["order_count"] == 2


def test_churn_eligibility_and_label() -> None:
    # Active 5 days before T: eligible; no activity in the window: churned.
    assert row_of(BASE, "churn")[1] == 1
    assert row_of([*BASE, ActivityEvent("page_view", T + timedelta(days=10))], "churn")[1] == 0
    old = [ActivityEvent("order", T - timedelta(days=61), 5.0)]
    assert not is_eligible(CHURN, old, T)
    # Activity after T cannot make someone eligible at T.
    assert not is_eligible(CHURN, [*old, ActivityEvent("order", T + timedelta(days=1), 5.0)], T)
    assert is_eligible(CHURN, [*old, ActivityEvent("page_view", T - timedelta(days=59))], T)
    named = resolve_spec(PredictionKind.CHURN, ["order"], 30, eligibility_days=60, min_class_count=0)
    # With named qualifying events, other activity neither makes eligible nor prevents churn.
    assert not is_eligible(named, [ActivityEvent("page_view", T - timedelta(days=1))], T)
    assert label_of(named, [*BASE, ActivityEvent("page_view", T + timedelta(days=1))], T) == 1


def test_conversion_needs_history_before_the_cutoff() -> None:
    assert not is_eligible(CONVERSION, [ActivityEvent("order", T, 1.0)], T)
    assert is_eligible(CONVERSION, [ActivityEvent("page_view", T - timedelta(days=700))], T)


def test_eligibility_of_a_batch_is_each_persons_by_the_definition() -> None:
    """eligible_at over many persons at once against the definition, one event at a time."""
    events = synthetic_events(200, seed=4)
    events["nobody"] = []
    events["late"] = [ActivityEvent("order", T + timedelta(days=1), 1.0)]
    names = sorted(events)
    runs = EventRuns.of([columns_of(events[n]) for n in names], with_names=True)
    named = resolve_spec(PredictionKind.CHURN, ["page_view"], 30, eligibility_days=45, min_class_count=0)
    for spec in (CONVERSION, CHURN, named):
        for cutoff in (day("2023-02-01"), day("2023-09-01"), T, day("2024-11-01")):
            start = cutoff - timedelta(days=spec.eligibility_days)
            expected = [any(e.time < cutoff for e in events[n]) if spec.kind is PredictionKind.CONVERSION
                        else any(start <= e.time < cutoff and (not spec.event_names or e.name in spec.event_names)
                                 for e in events[n]) for n in names]
            assert eligible_at(spec, runs, cutoff).tolist() == expected
            assert 0 < sum(expected) < len(names) or cutoff == day("2023-02-01")


def test_every_row_equals_features_of_the_truncated_history() -> None:
    """Over a synthetic shop: no row at cutoff T depends on anything at or after T."""
    events = synthetic_events(300)
    cutoffs = [day("2024-01-01"), day("2024-03-01")]
    training, validation = build_training_sets(CONVERSION, (PersonHistory(p, e) for p, e in events.items()),
                                               cutoffs, day("2024-06-01"))
    assert len(training) > 300 and 0 < training.positives < len(training)
    rng = random.Random(1)
    for dataset in (training, validation):
        for index in rng.sample(range(len(dataset)), 100):
            person, cutoff = dataset.person_ids[index], dataset.cutoffs[index]
            past = [e for e in events[person] if e.time < cutoff]
            assert same(dataset.rows[index], feature_row(past, cutoff))
            # Scramble everything at or after the cutoff: the row stays, only the label may move.
            future = [ActivityEvent(e.name, e.time + timedelta(days=rng.uniform(0, 5)), 1.0, "x")
                      for e in events[person] if e.time >= cutoff]
            assert same(dataset.rows[index], feature_row([*past, *future], cutoff))
            assert dataset.label_list[index] == label_of(CONVERSION, events[person], cutoff)
