"""Computed traits: everything a profile derives from its stored events, as of a point in time.

One pure function over the timeline, so the numbers are always derivable again from the events
(a replayed event is stored once, so it is counted once) and the same at any replica. Only events
at or before `as_of` count, which makes the result point-in-time correct for historical views.

RFM scores use fixed thresholds rather than population quantiles: a person's score then depends on
that person alone and can be recomputed on every change without scanning everyone.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import IntEnum

from services.profile.model import EventType, TimelineEvent

WINDOW_DAYS = (7, 30, 90)
TOP_PREFERENCES = 5
RECENT_TRANSACTIONS = 20
# Upper bounds (inclusive) of recency days for scores 5, 4, 3, 2; beyond them the score is 1.
RECENCY_DAYS_BY_SCORE = (30.0, 90.0, 180.0, 365.0)
# Lower bounds of frequency (orders) for scores 5, 4, 3, 2.
FREQUENCY_BY_SCORE = (10, 5, 3, 2)
# Lower bounds of monetary (sum of order amounts) for scores 5, 4, 3, 2.
MONETARY_BY_SCORE = (1000.0, 250.0, 100.0, 50.0)


class LifecycleStage(IntEnum):
    # Values match onecdp.profile.v1.LifecycleStage.
    UNSPECIFIED = 0
    NEW = 1
    ACTIVE = 2
    SILENT = 3
    CHURNED = 4


@dataclass(frozen=True)
class LifecyclePolicy:
    """Thresholds of the lifecycle stages, in days before `as_of`."""

    new_days: float = 30.0
    active_days: float = 30.0
    churn_days: float = 90.0


@dataclass(frozen=True)
class Transaction:
    order_id: str
    amount: float
    currency_code: str
    item_count: int
    event_time: datetime
    message_id: str


@dataclass(frozen=True)
class Rfm:
    recency_score: int
    frequency_score: int
    monetary_score: int
    segment: str

    @property
    def code(self) -> str:
        return f"R{self.recency_score}F{self.frequency_score}M{self.monetary_score}"


@dataclass(frozen=True)
class WindowAggregate:
    event_name: str
    window_days: int
    count: int
    sum: float


@dataclass(frozen=True)
class ComputedTraits:
    as_of: datetime
    first_seen: datetime | None
    last_seen: datetime | None
    recency_days: float | None
    frequency: int
    monetary: float
    average_order_value: float
    rfm: Rfm | None
    windows: list[WindowAggregate]
    lifetime_value: float
    lifecycle_stage: LifecycleStage
    event_count: int
    transactions: list[Transaction]
    top_categories: list[str]
    top_brands: list[str]


def transactions_of(events: Iterable[TimelineEvent]) -> list[Transaction]:
    """One transaction per order id, newest first: a later event of the same order replaces it (refunds)."""
    latest: dict[str, TimelineEvent] = {}
    for event in events:
        if event.event_type != EventType.ORDER or not event.order_id:
            continue
        known = latest.get(event.order_id)
        if known is None or (event.event_time, event.message_id) > (known.event_time, known.message_id):
            latest[event.order_id] = event
    transactions = [Transaction(e.order_id, e.amount or 0.0, e.currency_code, e.item_count, e.event_time,
                                e.message_id) for e in latest.values()]
    transactions.sort(key=lambda t: (t.event_time, t.order_id), reverse=True)
    return transactions


def score_at_most(value: float, bounds: Sequence[float]) -> int:
    """5 for value <= bounds[0], 4 for <= bounds[1], ... 1 beyond the last bound."""
    for index, bound in enumerate(bounds):
        if value <= bound:
            return 5 - index
    return 1


def score_at_least(value: float, bounds: Sequence[float]) -> int:
    """5 for value >= bounds[0], 4 for >= bounds[1], ... 1 below the last bound."""
    for index, bound in enumerate(bounds):
        if value >= bound:
            return 5 - index
    return 1


def rfm_segment(recency: int, frequency: int) -> str:
    """The named segment of an R and F score (the usual RFM grid, coarsened)."""
    if recency >= 4 and frequency >= 4:
        return "champions"
    if recency >= 3 and frequency >= 3:
        return "loyal"
    if recency >= 4:
        return "new" if frequency == 1 else "promising"
    if recency == 3:
        return "need_attention"
    return "at_risk" if frequency >= 3 else "hibernating"


def rfm_of(recency_days: float, frequency: int, monetary: float) -> Rfm:
    recency = score_at_most(recency_days, RECENCY_DAYS_BY_SCORE)
    frequency_score = score_at_least(frequency, FREQUENCY_BY_SCORE)
    return Rfm(recency, frequency_score, score_at_least(monetary, MONETARY_BY_SCORE),
               rfm_segment(recency, frequency_score))


def lifecycle_stage(first_seen: datetime | None, last_seen: datetime | None, as_of: datetime,
                    policy: LifecyclePolicy) -> LifecycleStage:
    if first_seen is None or last_seen is None:
        return LifecycleStage.UNSPECIFIED
    if first_seen > as_of - timedelta(days=policy.new_days):
        return LifecycleStage.NEW
    if last_seen > as_of - timedelta(days=policy.active_days):
        return LifecycleStage.ACTIVE
    if last_seen > as_of - timedelta(days=policy.churn_days):
        return LifecycleStage.SILENT
    return LifecycleStage.CHURNED


def window_aggregates(events: Sequence[TimelineEvent], as_of: datetime) -> list[WindowAggregate]:
    """Count and amount sum per event name over (as_of - D days, as_of], for every name seen in the widest window."""
    widest = as_of - timedelta(days=max(WINDOW_DAYS))
    names = sorted({e.event_name for e in events if widest < e.event_time <= as_of})
    aggregates = []
    for name in names:
        for days in WINDOW_DAYS:
            start = as_of - timedelta(days=days)
            inside = [e for e in events if e.event_name == name and start < e.event_time <= as_of]
            aggregates.append(WindowAggregate(name, days, len(inside), sum(e.amount or 0.0 for e in inside)))
    return aggregates


def top_weights(weights: dict[str, int]) -> list[str]:
    ranked = sorted(weights.items(), key=lambda item: (-item[1], item[0]))
    return [name for name, _ in ranked[:TOP_PREFERENCES]]


def compute(events: Sequence[TimelineEvent], as_of: datetime,
            policy: LifecyclePolicy = LifecyclePolicy()) -> ComputedTraits:
    """The computed traits of a person's events as of `as_of` (later events are ignored)."""
    seen = [e for e in events if e.event_time <= as_of]
    first_seen = min((e.event_time for e in seen), default=None)
    last_seen = max((e.event_time for e in seen), default=None)
    transactions = transactions_of(seen)
    frequency = len(transactions)
    monetary = sum(t.amount for t in transactions)
    recency_days = None
    rfm = None
    if transactions:
        last_order = max(t.event_time for t in transactions)
        recency_days = (as_of - last_order).total_seconds() / 86400.0
        rfm = rfm_of(recency_days, frequency, monetary)
    categories: dict[str, int] = {}
    brands: dict[str, int] = {}
    for event in seen:
        for source, target in ((event.categories, categories), (event.brands, brands)):
            for name, weight in source.items():
                target[name] = target.get(name, 0) + weight
    return ComputedTraits(
        as_of=as_of, first_seen=first_seen, last_seen=last_seen, recency_days=recency_days,
        frequency=frequency, monetary=monetary,
        average_order_value=monetary / frequency if frequency else 0.0,
        rfm=rfm, windows=window_aggregates(seen, as_of), lifetime_value=monetary,
        lifecycle_stage=lifecycle_stage(first_seen, last_seen, as_of, policy), event_count=len(seen),
        transactions=transactions[:RECENT_TRANSACTIONS], top_categories=top_weights(categories),
        top_brands=top_weights(brands))
