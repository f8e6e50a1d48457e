"""The one feature function: what training sees is what scoring sees.

`features_as_of(events, cutoff)` reads only events strictly before `cutoff`, so a training row built
for cutoff T and a score computed "as of T" are the same numbers, and nothing from the label window
[T, T+H) can leak into a feature. Values that do not exist (recency of a person who never ordered,
mean gap with fewer than two orders) are NaN, which LightGBM treats as missing rather than as zero.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Sequence
from datetime import datetime

import numpy as np
import numpy.typing as npt

from services.prediction.history import ORDER_EVENT, ActivityEvent

WINDOWS_DAYS = (7, 30, 90, 180, 365)
TREND_DAYS = 90
SECONDS_PER_DAY = 86_400.0

# Lifecycle stages as profile defines them (new/active within 30 days, silent within 90, churned beyond);
# 0 means no history at all. Ordinal on purpose: the stages are ordered by how recently someone was active.
NEW_DAYS = 30.0
ACTIVE_DAYS = 30.0
SILENT_DAYS = 90.0
LIFECYCLE_NONE, LIFECYCLE_NEW, LIFECYCLE_ACTIVE, LIFECYCLE_SILENT, LIFECYCLE_CHURNED = 0.0, 1.0, 2.0, 3.0, 4.0

FEATURE_NAMES: tuple[str, ...] = (
    "days_since_last_event",
    "tenure_days",
    "event_count",
    *(f"event_count_{days}d" for days in WINDOWS_DAYS),
    "active_days_90d",
    "event_count_trend_90d",
    "days_since_last_order",
    "days_since_first_order",
    "order_count",
    "order_amount_sum",
    "average_order_value",
    "max_order_amount",
    *(f"order_count_{days}d" for days in WINDOWS_DAYS),
    *(f"order_amount_{days}d" for days in WINDOWS_DAYS),
    "order_days",
    "mean_days_between_orders",
    "order_overdue_ratio",
    "orders_per_30d_of_tenure",
    "order_count_trend_90d",
    "distinct_categories",
    "lifecycle_stage",
)
FEATURE_INDEX = {name: index for index, name in enumerate(FEATURE_NAMES)}

NAN = math.nan


def _days_before(cutoff: datetime, time: datetime) -> float:
    return (cutoff - time).total_seconds() / SECONDS_PER_DAY


def events_before(events: Sequence[ActivityEvent], cutoff: datetime) -> Sequence[ActivityEvent]:
    """The prefix of a time-sorted history strictly before `cutoff`."""
    return events[:bisect_left(events, cutoff, key=lambda e: e.time)]


def features_as_of(events: Sequence[ActivityEvent], cutoff: datetime) -> dict[str, float]:
    """The feature values of a person at `cutoff`, by name, from events strictly before it.

    `events` must be sorted by time (ProfileSource guarantees it); later events are ignored.
    """
    return dict(zip(FEATURE_NAMES, feature_row(events, cutoff), strict=True))


def feature_row(events: Sequence[ActivityEvent], cutoff: datetime) -> list[float]:
    """The feature values in FEATURE_NAMES order; the hot path of training-set building and scoring."""
    past = events_before(events, cutoff)
    # Ages in days, oldest event first (largest age first).
    ages = [_days_before(cutoff, e.time) for e in past]
    order_ages = [age for age, e in zip(ages, past, strict=True) if e.name == ORDER_EVENT]
    order_amounts = [e.amount or 0.0 for e in past if e.name == ORDER_EVENT]

    row: list[float] = []
    if ages:
        row += [ages[-1], ages[0], float(len(ages))]
    else:
        row += [NAN, NAN, 0.0]
    row += [float(sum(1 for age in ages if age < days)) for days in WINDOWS_DAYS]
    row.append(float(len({math.floor(age) for age in ages if age < 90})))
    row.append(_trend(ages))

    order_count = len(order_ages)
    amount_sum = float(sum(order_amounts))
    if order_count:
        row += [order_ages[-1], order_ages[0], float(order_count), amount_sum, amount_sum / order_count,
                max(order_amounts)]
    else:
        row += [NAN, NAN, 0.0, 0.0, NAN, NAN]
    row += [float(sum(1 for age in order_ages if age < days)) for days in WINDOWS_DAYS]
    row += [float(sum(amount for age, amount in zip(order_ages, order_amounts, strict=True) if age < days))
            for days in WINDOWS_DAYS]
    # Several orders on one day are one purchase occasion (the BG/NBD view of frequency).
    order_days = len({math.floor(age) for age in order_ages})
    row.append(float(order_days))
    if order_count >= 2 and order_ages[0] > order_ages[-1]:
        mean_gap = (order_ages[0] - order_ages[-1]) / (order_count - 1)
        row += [mean_gap, order_ages[-1] / mean_gap]
    else:
        row += [NAN, NAN]
    tenure = ages[0] if ages else NAN
    row.append(order_count / max(tenure / 30.0, 1.0) if ages else NAN)
    row.append(_trend(order_ages))
    row.append(float(len({e.category for e in past if e.category})))
    row.append(_lifecycle(ages))
    return row


def _trend(ages: Sequence[float]) -> float:
    """Events in the last 90 days minus events in the 90 days before those: positive means speeding up."""
    recent = sum(1 for age in ages if age < TREND_DAYS)
    prior = sum(1 for age in ages if TREND_DAYS <= age < 2 * TREND_DAYS)
    return float(recent - prior)


def _lifecycle(ages: Sequence[float]) -> float:
    if not ages:
        return LIFECYCLE_NONE
    if ages[0] < NEW_DAYS:
        return LIFECYCLE_NEW
    if ages[-1] < ACTIVE_DAYS:
        return LIFECYCLE_ACTIVE
    if ages[-1] < SILENT_DAYS:
        return LIFECYCLE_SILENT
    return LIFECYCLE_CHURNED


def feature_matrix(rows: Sequence[Sequence[float]]) -> npt.NDArray[np.float64]:
    """Rows of feature_row as the float matrix LightGBM takes (NaN stays NaN: missing)."""
    if not rows:
        return np.empty((0, len(FEATURE_NAMES)), dtype=np.float64)
    return np.asarray(rows, dtype=np.float64)
