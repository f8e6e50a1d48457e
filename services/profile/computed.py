"""Computed traits: everything a profile derives from its stored events, as of a point in time.

One pure function over the timeline, so the numbers are always derivable again from the events
(a replayed event is stored once, so it is counted once) and the same at any replica. Only events
at or before `as_of` count, which makes the result point-in-time correct for historical views.

RFM scores use fixed thresholds rather than population quantiles: a person's score then depends on
that person alone and can be recomputed on every change without scanning everyone.

Money adds up in one currency only, the deployment's reporting currency: monetary, lifetime value,
average order value, the RFM monetary score and window sums count the amounts in it. Amounts in other
currencies are not converted (no exchange rates are assumed) and not dropped: they are summed
per currency apart (`other_currency_amounts`). Orders in any currency are orders placed (frequency,
recency).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import IntEnum

from services.profile.model import EventType, TimelineEvent
from shared.config import DEFAULT_REPORTING_CURRENCY

WINDOW_DAYS = (7, 30, 90)
TOP_PREFERENCES = 5
RECENT_TRANSACTIONS = 20
# Upper bounds (inclusive) of recency days for scores 5, 4, 3, 2; beyond them the score is 1.
RECENCY_DAYS_BY_SCORE = (30.0, 90.0, 180.0, 365.0)
# Lower bounds of frequency (orders) for scores 5, 4, 3, 2.
FREQUENCY_BY_SCORE = (10, 5, 3, 2)
# Lower bounds of monetary (sum of order amounts in the reporting currency) for scores 5, 4, 3, 2.
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
    """An order as its events leave it: the net of its purchase and refund events (each event a movement)."""

    order_id: str
    amount: float  # net: the sum of the amounts of the order's events
    currency_code: str  # its first purchase's (its first event's when it has only refunds); "" when it gave none
    item_count: int  # the items of its purchase events
    event_time: datetime  # its first purchase (its first event when it has only refunds)
    message_id: str  # the event of `event_time`
    update_time: datetime  # its latest event
    purchased: bool  # whether it has a purchase event (amount >= 0): only then is it an order placed
    # The net per currency code of its events, in the order the codes first appear ("": an event without one).
    # One entry unless its events disagree on the currency (a refund in another currency than the purchase).
    amounts: tuple[tuple[str, float], ...] = ()


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
    monetary: float  # in `currency_code`
    average_order_value: float  # monetary / orders placed in `currency_code`
    rfm: Rfm | None
    windows: list[WindowAggregate]
    lifetime_value: float
    lifecycle_stage: LifecycleStage
    event_count: int
    transactions: list[Transaction]
    top_categories: list[str]
    top_brands: list[str]
    # The reporting currency, and the net amounts of the orders in every other currency (unconverted), by code.
    currency_code: str = DEFAULT_REPORTING_CURRENCY
    other_currency_amounts: dict[str, float] = field(default_factory=dict)


def is_purchase(event: TimelineEvent) -> bool:
    """A purchase is an order event with an amount of zero or more (a free order is an order); below zero, a refund."""
    return (event.amount or 0.0) >= 0.0


def currency_of(event: TimelineEvent, reporting_currency: str) -> str:
    """The currency of an event's amount: an order's own code, or the reporting currency for an order that gave
    none and for a `revenue` property (which has no currency)."""
    if event.event_type == EventType.ORDER and event.currency_code:
        return event.currency_code
    return reporting_currency


def _net_by_currency(events: Iterable[TimelineEvent]) -> tuple[tuple[str, float], ...]:
    amounts: dict[str, float] = {}
    for event in events:
        amounts[event.currency_code] = amounts.get(event.currency_code, 0.0) + (event.amount or 0.0)
    return tuple(amounts.items())


def transactions_of(events: Iterable[TimelineEvent]) -> list[Transaction]:
    """One transaction per order id, newest first (by its first purchase): every event of an order is a money
    movement, so a refund (a negative amount with the order's id) nets out of the order instead of replacing it."""
    by_order: dict[str, list[TimelineEvent]] = {}
    for event in events:
        if event.event_type == EventType.ORDER and event.order_id:
            by_order.setdefault(event.order_id, []).append(event)
    transactions = []
    for order_id, order_events in by_order.items():
        order_events.sort(key=lambda e: (e.event_time, e.message_id))
        purchases = [e for e in order_events if is_purchase(e)]
        first = (purchases or order_events)[0]
        transactions.append(Transaction(
            order_id, sum(e.amount or 0.0 for e in order_events), first.currency_code,
            sum(e.item_count for e in purchases), first.event_time, first.message_id,
            order_events[-1].event_time, bool(purchases), _net_by_currency(order_events)))
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


def _days_before(when: datetime, days: float) -> datetime:
    """`when` minus `days`, or the earliest datetime when that is before year 1: the service refuses such as-of
    times, but a window reaching before year 1 simply starts at the beginning."""
    try:
        return when - timedelta(days=days)
    except OverflowError:
        return datetime.min.replace(tzinfo=when.tzinfo)


def lifecycle_stage(first_seen: datetime | None, last_seen: datetime | None, as_of: datetime,
                    policy: LifecyclePolicy) -> LifecycleStage:
    if first_seen is None or last_seen is None:
        return LifecycleStage.UNSPECIFIED
    if first_seen > _days_before(as_of, policy.new_days):
        return LifecycleStage.NEW
    if last_seen > _days_before(as_of, policy.active_days):
        return LifecycleStage.ACTIVE
    if last_seen > _days_before(as_of, policy.churn_days):
        return LifecycleStage.SILENT
    return LifecycleStage.CHURNED


def window_aggregates(events: Sequence[TimelineEvent], as_of: datetime,
                      reporting_currency: str = DEFAULT_REPORTING_CURRENCY) -> list[WindowAggregate]:
    """Count and amount sum per event name over (as_of - D days, as_of], for every name seen in the widest window.
    The count is of every event; the sum only of amounts in the reporting currency (see `currency_of`)."""
    widest = _days_before(as_of, max(WINDOW_DAYS))
    names = sorted({e.event_name for e in events if widest < e.event_time <= as_of})
    aggregates = []
    for name in names:
        for days in WINDOW_DAYS:
            start = _days_before(as_of, days)
            inside = [e for e in events if e.event_name == name and start < e.event_time <= as_of]
            total = sum(e.amount or 0.0 for e in inside if currency_of(e, reporting_currency) == reporting_currency)
            aggregates.append(WindowAggregate(name, days, len(inside), total))
    return aggregates


def top_weights(weights: dict[str, int]) -> list[str]:
    ranked = sorted(weights.items(), key=lambda item: (-item[1], item[0]))
    return [name for name, _ in ranked[:TOP_PREFERENCES]]


def money_by_currency(transactions: Iterable[Transaction], reporting_currency: str) -> dict[str, float]:
    """The net amount of the transactions per currency code, an event without a code in the reporting currency.
    Summed transaction by transaction, like the single-currency total always was, so its figures stay the same."""
    totals: dict[str, float] = {}
    for transaction in transactions:
        for code, amount in transaction.amounts:
            currency = code or reporting_currency
            totals[currency] = totals.get(currency, 0.0) + amount
    return totals


def compute(events: Sequence[TimelineEvent], as_of: datetime,
            policy: LifecyclePolicy = LifecyclePolicy(),
            reporting_currency: str = DEFAULT_REPORTING_CURRENCY) -> ComputedTraits:
    """The computed traits of a person's events as of `as_of` (later events are ignored); money in
    `reporting_currency`, an ISO 4217 code, with the other currencies' amounts apart."""
    seen = [e for e in events if e.event_time <= as_of]
    first_seen = min((e.event_time for e in seen), default=None)
    last_seen = max((e.event_time for e in seen), default=None)
    transactions = transactions_of(seen)
    # Refunds lower the money but are not orders: an order id with only refunds adds none, and a fully
    # refunded order still counts as an order placed.
    purchases = [e for e in seen if e.event_type == EventType.ORDER and e.order_id and is_purchase(e)]
    frequency = sum(t.purchased for t in transactions)
    money = money_by_currency(transactions, reporting_currency)
    monetary = money.pop(reporting_currency, 0.0)
    # Orders placed in the reporting currency: the average of an order is over the orders `monetary` holds.
    reporting_orders = sum(t.purchased and (t.currency_code or reporting_currency) == reporting_currency
                           for t in transactions)
    recency_days = None
    rfm = None
    if purchases:
        last_order = max(e.event_time for e in purchases)
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
        average_order_value=monetary / reporting_orders if reporting_orders else 0.0,
        rfm=rfm, windows=window_aggregates(seen, as_of, reporting_currency), lifetime_value=monetary,
        lifecycle_stage=lifecycle_stage(first_seen, last_seen, as_of, policy), event_count=len(seen),
        transactions=transactions[:RECENT_TRANSACTIONS], top_categories=top_weights(categories),
        top_brands=top_weights(brands), currency_code=reporting_currency,
        other_currency_amounts=dict(sorted(money.items())))
