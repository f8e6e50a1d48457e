"""Evaluating a rule for one person: `evaluate(rule, facts, as_of, rule_of) -> Evaluation`.

Pure: the facts (traits, computed traits, events) are read by the caller, so batch recompute,
real-time updates, size estimates and "why is this person in" all run the same function and agree.

Semantics, the same everywhere:
- only events at or before `as_of` count; `last N days` is (as_of - N days, as_of], a fixed range
  is [start, end);
- comparisons are typed: a number never equals a string, true never equals 1; a missing value fails
  every comparison except `!=` ("a missing field is not equal") and `EXISTS` is false;
- sum over no events is 0, avg/min/max over no events has no value and the condition is false;
- orders and refunds mean what they mean in profile and prediction: every `order` event is a signed money
  movement, a refund being one whose `amount` is below zero (under the order id it refunds). A count of
  `order` events (`count`, so every "did / did not do N times") counts purchases only (amount >= 0, or no
  number: not a refund), whatever the filters; `sum` is net (refunds included); `min`/`max` read purchases
  only (prediction's max_order_amount); `avg` is the net sum over the number of purchases with a value
  (prediction's average_order_value), no value without one. Explanations observe the same numbers;
- aggregates use the property values that are finite numbers a double holds: NaN, +/-inf, integers beyond
  a double's range (older data may hold them) and non-numbers are skipped; a sum whose exact value is
  beyond a double's range is +inf or -inf (above, or below, every bound), never an error; avg/min/max of
  finite values are finite. Comparisons never raise: numbers compare exactly (an int as an int), a NaN
  trait equals nothing and is neither below nor above any bound;
- a prediction score is the trait `score_<model_id>` (`..._percentile` for the percentile);
- `segment("x")` evaluates x's rule on the same facts, so a person's memberships are consistent
  with each other at one instant; a rule that reaches a cycle of references (which validation refuses,
  but two concurrent rule changes could close) matches nobody.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from operator import ge, gt, le, lt
from typing import Any

from services.segmentation.rules import (
    Aggregation,
    AllOf,
    AnyOf,
    Comparison,
    EventAggregateCondition,
    EventCountCondition,
    LastDays,
    Not,
    Operator,
    PropertyFilter,
    Rule,
    Scalar,
    ScoreCondition,
    SegmentCondition,
    TraitCondition,
    Window,
    conditions,
    parse_time,
    score_trait,
)
from services.segmentation.text import format_condition

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EventFact:
    """One event of a person: its name (`order` for orders without one), time and properties.

    Order events carry their order as properties too: `amount`, `currency_code`, `order_id`.
    """

    name: str
    time: datetime
    properties: Mapping[str, Any]


@dataclass(frozen=True)
class ProfileFacts:
    """What a rule can look at. Computed trait names as in `rules.COMPUTED_FIELDS`; times are datetimes."""

    person_id: str
    traits: Mapping[str, Any]
    computed: Mapping[str, Any]
    events: Sequence[EventFact] = ()


@dataclass(frozen=True)
class ConditionOutcome:
    text: str
    matched: bool  # the condition's own outcome, whatever NOTs it is under
    observed: Any  # what was compared: a trait value, a count, an aggregate; None when missing
    # Under an odd number of NOTs: the rule needs the condition not to hold there (`matched` counts against).
    negated: bool = False


@dataclass(frozen=True)
class Evaluation:
    matched: bool
    conditions: list[ConditionOutcome]


RuleLookup = Callable[[str], Rule | None]
# Whether one person's facts match a rule compiled for one evaluation time (see `compile_rule`).
Predicate = Callable[[ProfileFacts], bool]


def evaluate(rule: Rule, facts: ProfileFacts, as_of: datetime, rule_of: RuleLookup) -> Evaluation:
    """Whether the person matches `rule` at `as_of`, and the outcome of every condition in rule order."""
    outcomes: list[ConditionOutcome] = []
    matched = _evaluate(rule, facts, as_of, rule_of, outcomes, negated=False)
    return Evaluation(matched, outcomes)


def matches(rule: Rule, facts: ProfileFacts, as_of: datetime, rule_of: RuleLookup) -> bool:
    return compile_rule(rule, as_of, rule_of)(facts)


def compile_rule(rule: Rule, as_of: datetime, rule_of: RuleLookup) -> Predicate:
    """`matches(rule, facts, as_of, rule_of)` as a function of the facts alone: the tree is walked, the
    segments referred to are looked up and the windows placed once, not per person (a recompute evaluates
    one rule for every profile). Groups short-circuit: nothing is recorded. A rule that reaches a cycle of
    references matches nobody (see `reference_cycle`)."""
    if reported_cycle(rule, rule_of) is not None:
        return lambda facts: False
    return _compile(rule, as_of, rule_of)


def _compile(rule: Rule, as_of: datetime, rule_of: RuleLookup) -> Predicate:
    if isinstance(rule, AllOf | AnyOf):
        # Conditions on events last: what decides without them saves looking at (and converting) the events.
        ordered = sorted(rule.rules, key=lambda child: _reads_events(child, rule_of))
        children = tuple(_compile(child, as_of, rule_of) for child in ordered)
        if isinstance(rule, AllOf):
            return lambda facts: all(child(facts) for child in children)
        return lambda facts: any(child(facts) for child in children)
    if isinstance(rule, Not):
        negated = _compile(rule.rule, as_of, rule_of)
        return lambda facts: not negated(facts)
    if isinstance(rule, SegmentCondition):
        other = rule_of(rule.segment_id)
        return (lambda facts: False) if other is None else _compile(other, as_of, rule_of)
    observe = _observer(rule, as_of)
    holds = comparer(rule.comparison)

    def condition(facts: ProfileFacts) -> bool:
        observed = observe(facts)
        return observed is not _NO_VALUE and holds(observed)
    return condition


def reference_cycle(rule: Rule, rule_of: RuleLookup) -> tuple[str, ...] | None:
    """The segment ids around a cycle of `segment(...)` references reachable from `rule`, if there is one.

    Validation refuses a rule that closes a cycle, but two rule changes validated at the same time can close
    one together (a -> b and b -> a); evaluating such a rule would never end, so every evaluation checks."""
    path: list[str] = []  # the segments being walked, each referring to the next
    on_path: set[str] = set()
    done: set[str] = set()
    # Depth first, without recursion: (segment id, its references not walked yet); None for the root rule.
    stack: list[tuple[str | None, Iterator[str]]] = [(None, _references(rule))]
    while stack:
        segment_id, pending = stack[-1]
        following = next(pending, None)
        if following is None:
            stack.pop()
            if segment_id is not None:
                path.pop()
                on_path.discard(segment_id)
                done.add(segment_id)
            continue
        if following in on_path:
            return (*path[path.index(following):], following)
        other = rule_of(following) if following not in done else None
        if other is not None:
            path.append(following)
            on_path.add(following)
            stack.append((following, _references(other)))
    return None


def _references(rule: Rule) -> Iterator[str]:
    return (condition.segment_id for condition in conditions(rule) if isinstance(condition, SegmentCondition))


_reported_cycles: set[tuple[str, ...]] = set()


def reported_cycle(rule: Rule, rule_of: RuleLookup) -> tuple[str, ...] | None:
    """`reference_cycle`, logged once per process and cycle (evaluations run many times a second)."""
    cycle = reference_cycle(rule, rule_of)
    if cycle is not None and cycle not in _reported_cycles:
        _reported_cycles.add(cycle)
        log.error("segments refer to each other in a cycle: the rules reaching it match nobody until one of "
                  "them changes", extra={"cycle": " -> ".join(f"segments/{s}" for s in cycle)})
    return cycle


def evaluation_failed(segment_id: str, person_id: str, error: Exception) -> None:
    """Contain a person whose evaluation raised (a bug, or data no rule foresaw): logged with the error, their
    membership of the segment left as it was, and the round goes on. Letting it propagate would stop real time
    for every segment and every person behind them (the feed retries the same change forever), and a
    recompute for the whole segment: one person must not."""
    log.error("evaluating a person against a segment failed: their membership is left as it was",
              exc_info=error, extra={"segment": segment_id, "person": person_id,
                                     "error": f"{type(error).__name__}: {error}"})


def reachable_rules(rule: Rule, rule_of: RuleLookup) -> list[Rule]:
    """The rule and every rule it refers to, transitively, each once (references have no cycles); a segment
    that does not exist refers to nothing."""
    found, pending, seen = [], [rule], set()
    while pending:
        current = pending.pop()
        found.append(current)
        for condition in conditions(current):
            if isinstance(condition, SegmentCondition) and condition.segment_id not in seen:
                seen.add(condition.segment_id)
                other = rule_of(condition.segment_id)
                if other is not None:
                    pending.append(other)
    return found


def event_conditions(rule: Rule, rule_of: RuleLookup) -> Iterator[EventCountCondition | EventAggregateCondition]:
    """The conditions on events of the rule and of the rules it refers to: what decides which events it reads
    (realtime.events_read) and whether it reads any (compile_rule puts those last)."""
    for reached in reachable_rules(rule, rule_of):
        for condition in conditions(reached):
            if isinstance(condition, EventCountCondition | EventAggregateCondition):
                yield condition


def _reads_events(rule: Rule, rule_of: RuleLookup) -> bool:
    return next(event_conditions(rule, rule_of), None) is not None


# What an aggregate over no values observes: the condition is false whatever it compares with.
_NO_VALUE: Any = object()


def _observer(rule: TraitCondition | EventCountCondition | EventAggregateCondition | ScoreCondition,
              as_of: datetime) -> Callable[[ProfileFacts], Any]:
    """What a condition compares, as a function of the facts (_NO_VALUE: an aggregate with no value)."""
    if isinstance(rule, TraitCondition):
        head, _, name = rule.field.partition(".")
        if head == "traits":
            return lambda facts: facts.traits.get(name)
        return lambda facts: facts.computed.get(name)
    if isinstance(rule, ScoreCondition):
        trait = score_trait(rule.model, rule.score_field)
        return lambda facts: facts.traits.get(trait)
    orders = rule.event_name == ORDER_EVENT
    if isinstance(rule, EventCountCondition):
        return _counter(rule.event_name, rule.filters, rule.window, as_of, purchases_only=orders)
    selects = event_selector(rule.event_name, rule.filters, rule.window, as_of)
    aggregation, name = rule.aggregation, rule.property
    if orders and aggregation is not Aggregation.SUM:
        def order_aggregate(facts: ProfileFacts) -> Any:
            selected = [e for e in facts.events if selects(e)]
            purchases = [e.properties.get(name) for e in selected if not is_refund(e)]
            if aggregation is Aggregation.AVERAGE:
                value = net_average_of([e.properties.get(name) for e in selected], purchases)
            else:
                value = aggregate_of(aggregation, purchases)
            return _NO_VALUE if value is None else value
        return order_aggregate

    def aggregate(facts: ProfileFacts) -> Any:
        value = aggregate_of(aggregation, [e.properties.get(name) for e in facts.events if selects(e)])
        return _NO_VALUE if value is None else value
    return aggregate


# The event name of orders (and refunds); see the module doc.
ORDER_EVENT = "order"


def is_refund(event: EventFact) -> bool:
    """Whether an event is a refund: an `order` event whose `amount` is a number below zero (profile's
    is_purchase: a purchase is an order with an amount of zero or more, a free order being an order)."""
    if event.name != ORDER_EVENT:
        return False
    amount = event.properties.get("amount")
    if type(amount) is float:  # an order's own amount: what `_finite` returns of it, without the call
        return amount < 0 and math.isfinite(amount)
    amount = _finite(amount)
    return amount is not None and amount < 0


def net_average_of(values: Sequence[Any], purchase_values: Sequence[Any]) -> float | None:
    """The net sum of `values` (refunds included) over the number of purchases among them with a finite value;
    None when no purchase has one."""
    purchases = sum(1 for v in purchase_values if _finite(v) is not None)
    if not purchases:
        return None
    return _sum([n for n in map(_finite, values) if n is not None], purchases)


def event_selector(name: str, filters: Sequence[PropertyFilter], window: Window,
                   as_of: datetime) -> Callable[[EventFact], bool]:
    """Whether an event is one a condition counts: its name, passing its filters, at or before `as_of` and in
    its window: (as_of - N days, as_of] for `last N days`, [start, end) for a fixed range."""
    if isinstance(window, LastDays):
        after = as_of - timedelta(days=window.days)

        def in_place(when: datetime) -> bool:
            return after < when <= as_of
    else:
        start, end = window.start, window.end

        def in_place(when: datetime) -> bool:
            return start <= when < end and when <= as_of
    if not filters:
        return lambda event: event.name == name and in_place(event.time)
    return lambda event: event.name == name and in_place(event.time) and passes(event, filters)


def _counter(name: str, filters: Sequence[PropertyFilter], window: Window, as_of: datetime, *,
             purchases_only: bool) -> Callable[[ProfileFacts], float]:
    """How many events `event_selector(name, filters, window, as_of)` selects (refunds left out when
    `purchases_only`), as a float: the selector's tests in one loop, in its order, with no call per event but the
    filters' and the refund test (a recompute counts every event of every person)."""
    if isinstance(window, LastDays):
        after = as_of - timedelta(days=window.days)

        def count_last_days(facts: ProfileFacts) -> float:
            count = 0
            for event in facts.events:
                if (event.name == name and after < event.time <= as_of and (not filters or passes(event, filters))
                        and not (purchases_only and is_refund(event))):
                    count += 1
            return float(count)
        return count_last_days
    start, end = window.start, window.end

    def count_between(facts: ProfileFacts) -> float:
        count = 0
        for event in facts.events:
            if (event.name == name and start <= (when := event.time) < end and when <= as_of
                    and (not filters or passes(event, filters)) and not (purchases_only and is_refund(event))):
                count += 1
        return float(count)
    return count_between


def _evaluate(rule: Rule, facts: ProfileFacts, as_of: datetime, rule_of: RuleLookup,
              outcomes: list[ConditionOutcome], *, negated: bool) -> bool:
    """The rule's value; each condition's outcome appended to `outcomes`, `negated` when under an odd number of
    NOTs (without it a reader of `... AND NOT segment("x")` sees segment("x") matched and cannot tell why the
    person is out)."""
    if isinstance(rule, AllOf | AnyOf):
        combine = all if isinstance(rule, AllOf) else any
        # Reasons list every condition, so nothing is short-circuited.
        return combine([_evaluate(child, facts, as_of, rule_of, outcomes, negated=negated) for child in rule.rules])
    if isinstance(rule, Not):
        return not _evaluate(rule.rule, facts, as_of, rule_of, outcomes, negated=not negated)
    matched, observed = _condition(rule, facts, as_of, rule_of)
    outcomes.append(ConditionOutcome(format_condition(rule), matched, observed, negated))
    return matched


def _condition(rule: TraitCondition | EventCountCondition | EventAggregateCondition | ScoreCondition
               | SegmentCondition, facts: ProfileFacts, as_of: datetime, rule_of: RuleLookup) -> tuple[bool, Any]:
    if isinstance(rule, SegmentCondition):
        other = rule_of(rule.segment_id)
        member = other is not None and matches(other, facts, as_of, rule_of)
        return member, member
    observed = _observer(rule, as_of)(facts)
    if isinstance(rule, EventCountCondition):
        return compare(observed, rule.comparison), int(observed)
    if observed is _NO_VALUE:
        return False, None
    return compare(observed, rule.comparison), observed


def passes(event: EventFact, filters: Sequence[PropertyFilter]) -> bool:
    return all(compare(event.properties.get(f.property), f.comparison) for f in filters)


def aggregate_of(aggregation: Aggregation, values: Sequence[Any]) -> float | None:
    """The aggregate of the values that are finite numbers (see the module doc); never raises."""
    numbers = [n for n in map(_finite, values) if n is not None]
    if aggregation is Aggregation.SUM:
        return _sum(numbers, 1)
    if not numbers:
        return None
    if aggregation is Aggregation.AVERAGE:
        return _sum(numbers, len(numbers))
    return min(numbers) if aggregation is Aggregation.MIN else max(numbers)


# Numbers are scaled down by this power of two when their partial sums overflow a double: exact (but for
# values below 2**-958, whose bits past a double's subnormal range are lost: nothing against a total this big).
_SCALE = 64


def _finite(value: Any) -> float | None:
    """The value as a finite double, or None (not a number, a bool, NaN, +/-inf, an int beyond a double)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _sum(numbers: Sequence[float], divisor: int) -> float:
    """The exact sum of finite numbers divided by `divisor`, correctly rounded; +/-inf when beyond a double
    (only a sum can be: an average lies between its numbers)."""
    try:
        return math.fsum(numbers) / divisor
    except OverflowError:  # a partial sum overflowed, whatever the total
        scaled = math.fsum(math.ldexp(n, -_SCALE) for n in numbers) / divisor
        try:
            return math.ldexp(scaled, _SCALE)
        except OverflowError:
            return math.copysign(math.inf, scaled)


# What `compare` does for these operators when value and operand are both numbers (neither a bool).
_ORDERINGS = {Operator.LESS: lt, Operator.LESS_OR_EQUAL: le, Operator.GREATER: gt, Operator.GREATER_OR_EQUAL: ge}


def comparer(comparison: Comparison) -> Callable[[Any], bool]:
    """`lambda value: compare(value, comparison)`, with a shortcut for what conditions on events compare most: a
    float (a count, an aggregate) against a number by <, <=, > or >= (what `compare` does then, without its
    dispatch on types). Anything else goes through `compare`."""
    operands = comparison.operands
    ordering = _ORDERINGS.get(comparison.operator)
    if ordering is not None and len(operands) == 1 and type(operands[0]) in (int, float):
        bound = operands[0]
        return lambda value: ordering(value, bound) if type(value) is float else compare(value, comparison)
    return lambda value: compare(value, comparison)


def compare(value: Any, comparison: Comparison) -> bool:
    """`value <operator> operands`, typed (see the module doc)."""
    operator, operands = comparison.operator, comparison.operands
    if operator is Operator.EXISTS:
        return value is not None
    if value is None:
        return operator is Operator.NOT_EQUAL
    if operator is Operator.EQUAL:
        return _equal(value, operands[0])
    if operator is Operator.NOT_EQUAL:
        return not _equal(value, operands[0])
    if operator is Operator.IN:
        return any(_equal(value, operand) for operand in operands)
    if operator is Operator.CONTAINS:
        if isinstance(value, str):
            return isinstance(operands[0], str) and operands[0] in value
        if isinstance(value, list | tuple):
            return any(_equal(item, operands[0]) for item in value)
        return False
    if operator is Operator.BETWEEN:
        low, high = _comparable(value, operands[0]), _comparable(value, operands[1])
        return low is not None and high is not None and low <= _key(value) <= high
    bound = _comparable(value, operands[0])
    if bound is None:
        return False
    key = _key(value)
    if operator is Operator.LESS:
        return bool(key < bound)
    if operator is Operator.LESS_OR_EQUAL:
        return bool(key <= bound)
    if operator is Operator.GREATER:
        return bool(key > bound)
    return bool(key >= bound)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, datetime):
        return "time"
    return "string" if isinstance(value, str) else "other"


def _key(value: Any) -> Any:
    # Numbers as they are: Python compares ints and floats exactly, never raising (float() of an int beyond
    # a double's range would), and NaN is neither equal to, below nor above anything.
    return value


def _comparable(value: Any, operand: Scalar) -> Any:
    """The operand as something `value` orders against, or None when their types differ."""
    kind = _kind(value)
    if kind == "time":
        return parse_time(operand) if isinstance(operand, str) else None
    if kind == "number" and _kind(operand) == "number":
        return operand
    if kind == "string" and isinstance(operand, str):
        return operand
    return None


def _equal(value: Any, operand: Scalar) -> bool:
    if _kind(value) in ("bool", "other") or _kind(operand) == "bool":
        return _kind(value) == _kind(operand) and value == operand
    comparable = _comparable(value, operand)
    return comparable is not None and _key(value) == comparable
