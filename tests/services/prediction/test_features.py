"""The feature function: values by hand on a small history, missing values, and nothing at or after the cutoff."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest

from services.prediction.features import (
    FEATURE_NAMES,
    LIFECYCLE_ACTIVE,
    LIFECYCLE_NONE,
    features_as_of,
    features_at,
)
from services.prediction.history import ActivityEvent, columns_of
from tests.services.prediction.synthetic import day, synthetic_events

pytestmark = pytest.mark.unit

CUTOFF = datetime(2024, 7, 1, tzinfo=UTC)


def ago(days: float) -> datetime:
    return CUTOFF - timedelta(days=days)


HISTORY = [
    ActivityEvent("signup", ago(400)),
    ActivityEvent("order", ago(200), 30.0, "books"),
    ActivityEvent("page_view", ago(100), None, "music"),
    ActivityEvent("order", ago(60), 10.0, "books"),
    ActivityEvent("order", ago(20), 50.0, "music"),
    ActivityEvent("page_view", ago(3)),
]


def test_values_of_a_known_history() -> None:
    values = features_as_of(HISTORY, CUTOFF)
    assert list(values) == list(FEATURE_NAMES)
    assert values["days_since_last_event"] == pytest.approx(3)
    assert values["tenure_days"] == pytest.approx(400)
    assert values["event_count"] == 6
    assert values["event_count_7d"] == 1 and values["event_count_30d"] == 2 and values["event_count_90d"] == 3
    assert values["event_count_180d"] == 4 and values["event_count_365d"] == 5
    assert values["days_since_last_order"] == pytest.approx(20)
    assert values["days_since_first_order"] == pytest.approx(200)
    assert values["order_count"] == 3 and values["order_amount_sum"] == pytest.approx(90)
    assert values["average_order_value"] == pytest.approx(30) and values["max_order_amount"] == 50
    assert values["order_count_30d"] == 1 and values["order_amount_30d"] == pytest.approx(50)
    assert values["order_count_90d"] == 2 and values["order_amount_90d"] == pytest.approx(60)
    assert values["order_count_365d"] == 3
    assert values["mean_days_between_orders"] == pytest.approx(90)  # (200 - 20) / 2
    assert values["order_overdue_ratio"] == pytest.approx(20 / 90)
    assert values["orders_per_30d_of_tenure"] == pytest.approx(3 / (400 / 30))
    # Last 90 days: orders at 60 and 20 days; the 90 before: none (the order at 200 days is older).
    assert values["order_count_trend_90d"] == 2
    assert values["event_count_trend_90d"] == 3 - 1
    assert values["distinct_categories"] == 2
    assert values["lifecycle_stage"] == LIFECYCLE_ACTIVE


def test_no_history_is_missing_not_zero() -> None:
    values = features_as_of([], CUTOFF)
    for name in ("days_since_last_event", "tenure_days", "days_since_last_order", "average_order_value",
                 "mean_days_between_orders", "orders_per_30d_of_tenure"):
        assert math.isnan(values[name]), name
    assert values["event_count"] == 0 and values["order_count"] == 0
    assert values["lifecycle_stage"] == LIFECYCLE_NONE


def test_one_order_has_no_gap() -> None:
    values = features_as_of([ActivityEvent("order", ago(10), 5.0)], CUTOFF)
    assert values["order_count"] == 1
    assert math.isnan(values["mean_days_between_orders"]) and math.isnan(values["order_overdue_ratio"])


def test_a_refund_nets_the_amounts_but_is_not_an_order() -> None:
    # The outside review's case: an order of 100, then a refund of 30 under the same order id.
    values = features_as_of([ActivityEvent("order", ago(5), 100.0), ActivityEvent("order", ago(4), -30.0)], CUTOFF)
    assert values["order_amount_sum"] == pytest.approx(70) and values["order_count"] == 1
    assert values["average_order_value"] == pytest.approx(70) and values["max_order_amount"] == 100
    assert values["order_amount_7d"] == pytest.approx(70) and values["order_count_7d"] == 1
    assert values["days_since_last_order"] == pytest.approx(5)  # the refund is no later order
    assert values["order_days"] == 1
    assert values["event_count"] == 2 and values["days_since_last_event"] == pytest.approx(4)  # but it is activity
    # A full refund: the order still happened, the money did not stay.
    full = features_as_of([ActivityEvent("order", ago(5), 100.0), ActivityEvent("order", ago(4), -100.0)], CUTOFF)
    assert full["order_amount_sum"] == 0 and full["order_count"] == 1


def test_events_at_or_after_the_cutoff_are_invisible() -> None:
    later = [*HISTORY, ActivityEvent("order", CUTOFF, 999.0, "games"),
             ActivityEvent("order", CUTOFF + timedelta(days=5), 1.0)]
    assert features_as_of(later, CUTOFF) == pytest.approx(features_as_of(HISTORY, CUTOFF), nan_ok=True)
    # One microsecond earlier, the event counts.
    just_before = [*HISTORY, ActivityEvent("order", CUTOFF - timedelta(microseconds=1), 999.0)]
    assert features_as_of(just_before, CUTOFF)["order_count"] == 4


def reference_row(events: list[ActivityEvent], cutoff: datetime) -> list[float]:
    """The features one event at a time in plain Python (what features_at computed before it was vectorized):
    an independent statement of every definition, to check the batch computation against."""
    past = [e for e in events if e.time < cutoff]
    ages = [(cutoff - e.time).total_seconds() / 86_400 for e in past]
    money = [(age, e.amount or 0.0) for age, e in zip(ages, past, strict=True) if e.name == "order"]
    orders = [(age, amount) for age, amount in money if amount >= 0]  # purchases; refunds are negative
    order_ages = [age for age, _ in orders]
    nan = math.nan

    def trend(values: list[float]) -> float:
        return float(sum(1 for a in values if a < 90) - sum(1 for a in values if 90 <= a < 180))

    row = [min(ages, default=nan), max(ages, default=nan), float(len(ages))]
    row += [float(sum(1 for a in ages if a < d)) for d in (7, 30, 90, 180, 365)]
    row += [float(len({math.floor(a) for a in ages if a < 90})), trend(ages)]
    total = sum(amount for _, amount in money)  # net of refunds
    row += [min(order_ages, default=nan), max(order_ages, default=nan), float(len(orders)), total,
            total / len(orders) if orders else nan, max((amount for _, amount in orders), default=nan)]
    row += [float(sum(1 for a in order_ages if a < d)) for d in (7, 30, 90, 180, 365)]
    row += [sum(amount for a, amount in money if a < d) for d in (7, 30, 90, 180, 365)]
    row.append(float(len({math.floor(a) for a in order_ages})))
    gap = ((max(order_ages) - min(order_ages)) / (len(orders) - 1)
           if len(orders) >= 2 and max(order_ages) > min(order_ages) else nan)
    row += [gap, min(order_ages) / gap if not math.isnan(gap) else nan]
    row.append(len(orders) / max(max(ages) / 30, 1.0) if ages else nan)
    row.append(trend(order_ages))
    row.append(float(len({e.category for e in past if e.category})))
    stage = (LIFECYCLE_NONE if not ages else 1.0 if max(ages) < 30 else LIFECYCLE_ACTIVE if min(ages) < 30
             else 3.0 if min(ages) < 90 else 4.0)
    row.append(stage)
    return row


def test_the_batch_computation_is_the_per_event_definition_for_every_person_and_cutoff() -> None:
    histories = synthetic_events(300, seed=5)
    # Extra shapes: same-day orders, a refund (money, not an order), a refund alone, empty categories, ties in time.
    histories["edge"] = [ActivityEvent("order", ago(10), 5.0, ""), ActivityEvent("order", ago(10), 7.0, "books"),
                         ActivityEvent("order", ago(9), -5.0, "books"), ActivityEvent("order", ago(1), None)]
    histories["refund only"] = [ActivityEvent("page_view", ago(200)), ActivityEvent("order", ago(3), -20.0)]
    histories["nobody"] = []
    for days in (7, 30, 90, 180, 365):  # an event on each window's edge at CUTOFF, and a microsecond either side
        histories[f"edge {days}d"] = [ActivityEvent("order", ago(days) + timedelta(microseconds=shift), 2.0, "books")
                                      for shift in (-1, 0, 1)]
    names = sorted(histories)
    columns = [columns_of(histories[n]) for n in names]
    for cutoff in (day("2023-03-01"), day("2024-01-01"), day("2024-06-01") + timedelta(microseconds=1), CUTOFF,
                   day("2026-01-01")):
        matrix = features_at(columns, cutoff)
        assert matrix.shape == (len(names), len(FEATURE_NAMES))
        for row, name in zip(matrix, names, strict=True):
            assert row.tolist() == pytest.approx(reference_row(histories[name], cutoff), nan_ok=True, rel=1e-12)
        # A person's row does not depend on who else is in the batch.
        assert features_at(columns[5:6], cutoff)[0].tolist() == pytest.approx(matrix[5].tolist(), nan_ok=True)
