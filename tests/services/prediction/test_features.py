"""The feature function: values by hand on a small history, missing values, and nothing at or after the cutoff."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest

from services.prediction.features import FEATURE_NAMES, LIFECYCLE_ACTIVE, LIFECYCLE_NONE, features_as_of
from services.prediction.history import ActivityEvent

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


def test_events_at_or_after_the_cutoff_are_invisible() -> None:
    later = [*HISTORY, ActivityEvent("order", CUTOFF, 999.0, "games"),
             ActivityEvent("order", CUTOFF + timedelta(days=5), 1.0)]
    assert features_as_of(later, CUTOFF) == pytest.approx(features_as_of(HISTORY, CUTOFF), nan_ok=True)
    # One microsecond earlier, the event counts.
    just_before = [*HISTORY, ActivityEvent("order", CUTOFF - timedelta(microseconds=1), 999.0)]
    assert features_as_of(just_before, CUTOFF)["order_count"] == 4
