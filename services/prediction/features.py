"""The one feature function: what training sees is what scoring sees.

`features_as_of(events, cutoff)` reads only events strictly before `cutoff`, so a training row built
for cutoff T and a score computed "as of T" are the same numbers, and nothing from the label window
[T, T+H) can leak into a feature. Values that do not exist (recency of a person who never ordered,
mean gap with fewer than two orders) are NaN, which LightGBM treats as missing rather than as zero.

Orders and refunds (the project's one meaning, docs in the proto's ModelSpec): every `order` event is a
money movement with a signed amount, a refund being a negative one under the order's id. Amount sums
(`order_amount_sum`, `order_amount_{D}d`) are net: they add every order event, refunds included. Every
count and time of orders (`order_count*`, `days_since_*_order`, `order_days`, the gaps, `max_order_amount`)
reads purchases only (amount >= 0): a refund is not an order placed. `average_order_value` is the net sum
over the purchases. Activity (`event_count*`, `days_since_last_event`, `tenure_days`, the lifecycle stage)
is every event the history holds, refunds included; identify and alias events are not in it (state, not
behaviour: profile_source.py skips them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from services.prediction.history import ActivityEvent, EventColumns, EventRuns, columns_of, micros_of

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
_MICROS_PER_DAY = 86_400_000_000
_WINDOW_MICROS = np.asarray(WINDOWS_DAYS, dtype=np.int64) * _MICROS_PER_DAY
# Age classes of an event: 0 within the shortest window ... len(WINDOWS_DAYS) beyond the longest.
_AGE_CLASSES = len(WINDOWS_DAYS) + 1
# The trend's two windows are windows of their own (the last TREND_DAYS, and twice that).
_TREND, _TREND_TWICE = WINDOWS_DAYS.index(TREND_DAYS), WINDOWS_DAYS.index(2 * TREND_DAYS)


def _window_columns(prefix: str) -> slice:
    """The feature columns `{prefix}_{D}d` of every window, which FEATURE_NAMES lists together in window order."""
    first = FEATURE_INDEX[f"{prefix}_{WINDOWS_DAYS[0]}d"]
    if [FEATURE_INDEX[f"{prefix}_{days}d"] for days in WINDOWS_DAYS] != list(range(first, first + len(WINDOWS_DAYS))):
        raise AssertionError(f"{prefix}_*d columns must be adjacent in FEATURE_NAMES")
    return slice(first, first + len(WINDOWS_DAYS))


_EVENT_WINDOWS, _ORDER_WINDOWS, _AMOUNT_WINDOWS = (
    _window_columns("event_count"), _window_columns("order_count"), _window_columns("order_amount"))
# Without any event before the cutoff these are missing (NaN); every other feature is 0.
_MISSING_WITHOUT_HISTORY = np.asarray([FEATURE_INDEX[name] for name in (
    "days_since_last_event", "tenure_days", "days_since_last_order", "days_since_first_order", "average_order_value",
    "max_order_amount", "mean_days_between_orders", "order_overdue_ratio", "orders_per_30d_of_tenure")])

NAN = math.nan
T = TypeVar("T", bound=np.generic)


def features_as_of(events: Sequence[ActivityEvent], cutoff: datetime) -> dict[str, float]:
    """The feature values of a person at `cutoff`, by name, from events strictly before it.

    `events` must be sorted by time (ProfileSource guarantees it); later events are ignored.
    """
    return dict(zip(FEATURE_NAMES, feature_row(events, cutoff), strict=True))


def feature_row(events: Sequence[ActivityEvent], cutoff: datetime) -> list[float]:
    """The feature values in FEATURE_NAMES order (one person: `features_at` for many)."""
    row: list[float] = features_at([columns_of(events)], cutoff)[0].tolist()
    return row


def features_at(histories: Sequence[EventColumns], cutoff: datetime) -> npt.NDArray[np.float64]:
    """The feature matrix of many persons at one cutoff, row i for `histories[i]`, columns in FEATURE_NAMES
    order: the one feature function, computed for the whole batch at once (events at or after `cutoff`
    are ignored). A missing value is NaN."""
    return features_of_runs(EventRuns.of(histories), cutoff)


def features_of_runs(runs: EventRuns, cutoff: datetime) -> npt.NDArray[np.float64]:
    """`features_at` of persons whose histories are already laid end to end (row i for run i).

    Every count and sum is one segment reduction over one indicator matrix, and every "distinct"
    count one sort, whatever the batch size: no Python step per person or per event.
    """
    persons = len(runs)
    past = runs.before(cutoff)
    counts = past.sizes
    active = counts > 0  # persons with a history before the cutoff
    if not active.all():
        matrix = np.zeros((persons, len(FEATURE_NAMES)))
        matrix[np.ix_(~active, _MISSING_WITHOUT_HISTORY)] = NAN  # lifecycle stage 0: LIFECYCLE_NONE
        if active.any():
            matrix[active] = _features_of_histories(past.select(active), micros_of(cutoff))
        return matrix
    return _features_of_histories(past, micros_of(cutoff))


def _features_of_histories(past: EventRuns, cutoff_micros: int) -> npt.NDArray[np.float64]:
    """The feature rows of runs that each hold at least one event, all before the cutoff."""
    column = FEATURE_INDEX
    events = past.columns
    micros, amounts = events.micros, events.amounts  # amounts: 0 for every event but an order
    sizes = past.sizes
    persons = len(sizes)
    rows = np.empty((persons, len(FEATURE_NAMES)))
    ends = np.cumsum(sizes)
    starts = ends - sizes
    owner = np.repeat(np.arange(persons), sizes)
    # Purchases by position: a refund (negative amount) moves money but is no order placed.
    purchases = np.flatnonzero(events.is_order & (amounts >= 0.0))

    # Every count and sum over a window from one histogram per person: the windows are nested, so an event's
    # age class (how many windows, shortest first, it is too old for: 0 within the shortest, len(WINDOWS_DAYS)
    # beyond the longest) says every window it is in, and "within D days" is the running total of the classes
    # up to D's. Three bincounts instead of a segment reduction per window and indicator. The class compares
    # integer microseconds: an event is within D days exactly when its age in microseconds is below D days'
    # (the float age in days, as timedelta.total_seconds() / SECONDS_PER_DAY gives it, is below D exactly
    # then: both divisions are monotonic and exact at D).
    age_class = np.zeros(len(micros), dtype=np.int64)
    for oldest in cutoff_micros - _WINDOW_MICROS:
        age_class += micros <= oldest
    # One row per class, one column per person: the running totals go down contiguous rows.
    bins = age_class * persons + owner
    shape = (_AGE_CLASSES, persons)
    bin_count = persons * _AGE_CLASSES
    events_within = _running_totals(np.bincount(bins, minlength=bin_count).reshape(shape))
    purchases_within = _running_totals(np.bincount(bins[purchases], minlength=bin_count).reshape(shape))
    amounts_within = _running_totals(np.bincount(bins, weights=amounts, minlength=bin_count).reshape(shape))
    windows = len(WINDOWS_DAYS)  # row `windows` of the running totals is every event
    rows[:, _EVENT_WINDOWS] = events_within[:windows].T
    rows[:, _ORDER_WINDOWS] = purchases_within[:windows].T
    rows[:, _AMOUNT_WINDOWS] = amounts_within[:windows].T
    order_counts, amount_sum = purchases_within[windows], amounts_within[windows]
    rows[:, column["event_count"]] = events_within[windows]
    rows[:, column["order_count"]] = order_counts
    rows[:, column["order_amount_sum"]] = amount_sum
    # The trend: the last TREND_DAYS minus the TREND_DAYS before them (within 2 * TREND_DAYS, not within TREND_DAYS).
    rows[:, column["event_count_trend_90d"]] = 2 * events_within[_TREND] - events_within[_TREND_TWICE]
    rows[:, column["order_count_trend_90d"]] = 2 * purchases_within[_TREND] - purchases_within[_TREND_TWICE]

    # A run is oldest first: its first event is the tenure, its last the recency, and the same holds for the
    # purchases of each person, which `purchases` lists person by person (order_counts of each).
    latest, tenure = _ages(cutoff_micros, micros[ends - 1]), _ages(cutoff_micros, micros[starts])
    rows[:, column["days_since_last_event"]] = latest
    rows[:, column["tenure_days"]] = tenure
    has_orders = order_counts > 0
    purchase_ends = np.cumsum(order_counts)
    purchase_starts = (purchase_ends - order_counts)[has_orders]
    last_order = np.full(persons, NAN)
    first_order = np.full(persons, NAN)
    max_amount = np.full(persons, NAN)
    if len(purchases):
        last_order[has_orders] = _ages(cutoff_micros, micros[purchases[purchase_ends[has_orders] - 1]])
        first_order[has_orders] = _ages(cutoff_micros, micros[purchases[purchase_starts]])
        # Each person's purchases up to the next buyer's: persons between them have none.
        max_amount[has_orders] = np.maximum.reduceat(amounts[purchases], purchase_starts)
    rows[:, column["days_since_last_order"]] = last_order
    rows[:, column["days_since_first_order"]] = first_order
    rows[:, column["max_order_amount"]] = max_amount
    with np.errstate(divide="ignore", invalid="ignore"):
        rows[:, column["average_order_value"]] = np.where(has_orders, amount_sum / order_counts, NAN)
        gapped = (order_counts >= 2) & (first_order > last_order)
        mean_gap = np.where(gapped, (first_order - last_order) / (order_counts - 1), NAN)
        rows[:, column["mean_days_between_orders"]] = mean_gap
        rows[:, column["order_overdue_ratio"]] = np.where(gapped, last_order / mean_gap, NAN)
    rows[:, column["orders_per_30d_of_tenure"]] = order_counts / np.maximum(tenure / 30.0, 1.0)

    # Distinct values per person. Days: a run is oldest first, so its whole days of age never increase and equal
    # days are neighbours; a day is new where it differs from the one before it. Several orders on one day are
    # one purchase occasion (the BG/NBD view of frequency). Categories are numbered in order of first
    # appearance (EventColumns), and the past is a prefix of each run: it holds codes 0 to its largest, one more
    # category than the largest code (0 when none has a category: the largest is -1).
    recent = np.flatnonzero(age_class <= _TREND)
    rows[:, column["active_days_90d"]] = _distinct_days(cutoff_micros, micros[recent], owner[recent], persons)
    rows[:, column["order_days"]] = _distinct_days(cutoff_micros, micros[purchases], owner[purchases], persons)
    rows[:, column["distinct_categories"]] = np.maximum.reduceat(events.categories, starts) + 1
    rows[:, column["lifecycle_stage"]] = np.where(
        tenure < NEW_DAYS, LIFECYCLE_NEW,
        np.where(latest < ACTIVE_DAYS, LIFECYCLE_ACTIVE, np.where(latest < SILENT_DAYS, LIFECYCLE_SILENT,
                                                                   LIFECYCLE_CHURNED)))
    return rows


def _ages(cutoff_micros: int, micros: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    """Ages in days at the cutoff, as timedelta.total_seconds() / SECONDS_PER_DAY gives them: exact
    microseconds, then the divisions."""
    ages: npt.NDArray[np.float64] = (cutoff_micros - micros) / 1e6 / SECONDS_PER_DAY
    return ages


def _running_totals(by_class: npt.NDArray[T]) -> npt.NDArray[T]:
    """Each row plus every row above it, in place (np.cumsum along the short axis costs twice this)."""
    for row in range(1, len(by_class)):
        np.add(by_class[row], by_class[row - 1], out=by_class[row])
    return by_class


def _distinct_days(cutoff_micros: int, micros: npt.NDArray[np.int64], owners: npt.NDArray[np.int64],
                   persons: int) -> npt.NDArray[np.int64]:
    """How many distinct whole days of age each person's events (`micros`, in order within each person, persons
    in order) fall on: equal days are neighbours."""
    days = (cutoff_micros - micros) // _MICROS_PER_DAY
    new = np.ones(len(days), dtype=np.bool_)
    np.not_equal(days[1:], days[:-1], out=new[1:])
    new[1:] |= owners[1:] != owners[:-1]
    distinct: npt.NDArray[np.int64] = np.bincount(owners[new], minlength=persons)
    return distinct


def feature_matrix(rows: Sequence[Sequence[float]]) -> npt.NDArray[np.float64]:
    """Rows of feature_row as the float matrix LightGBM takes (NaN stays NaN: missing)."""
    if not rows:
        return np.empty((0, len(FEATURE_NAMES)), dtype=np.float64)
    return np.asarray(rows, dtype=np.float64)
