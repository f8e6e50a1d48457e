"""Evaluating rules for one person: every condition kind, windows at their edges, typed comparisons, reasons."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest

from services.segmentation.evaluation import (
    EventFact,
    ProfileFacts,
    aggregate_of,
    compare,
    comparer,
    evaluate,
    matches,
)
from services.segmentation.realtime import next_change_time
from services.segmentation.rules import Aggregation, Comparison, Operator, Rule, Scalar
from services.segmentation.text import parse

pytestmark = pytest.mark.unit

AS_OF = datetime(1997, 6, 1, tzinfo=UTC)


def ago(days: float) -> datetime:
    return AS_OF - timedelta(days=days)


FACTS = ProfileFacts(
    person_id="p1",
    traits={"plan": "pro", "age": 34.0, "vip": True, "tags": ["early", "beta"], "note": "likes jazz",
            "score_churn-90d": 0.82, "score_churn-90d_percentile": 95.0},
    computed={"frequency": 4.0, "monetary": 130.5, "lifecycle_stage": "active", "rfm.segment": "loyal",
              "first_seen_time": datetime(1997, 1, 3, tzinfo=UTC), "top_categories": ["music", "books"]},
    events=[
        EventFact("order", ago(200), {"amount": 10.0, "category": "music"}),
        EventFact("order", ago(90), {"amount": 20.5, "category": "books"}),  # exactly at the 90-day edge: outside
        EventFact("order", ago(89.9), {"amount": 40.0, "category": "books"}),
        EventFact("order", ago(0), {"amount": 60.0, "category": "music"}),  # exactly at as_of: inside
        EventFact("order", AS_OF + timedelta(seconds=1), {"amount": 999.0}),  # after as_of: never counts
        EventFact("page_view", ago(3), {"url": "/pricing", "seconds": "12"}),
    ],
)
NO_SEGMENTS: dict[str, Rule] = {}


def holds(text: str, facts: ProfileFacts = FACTS, segments: dict[str, Rule] | None = None) -> bool:
    lookup = (segments or NO_SEGMENTS).get
    rule = parse(text)
    fast = matches(rule, facts, AS_OF, lookup)
    explained = evaluate(rule, facts, AS_OF, lookup)
    assert fast == explained.matched  # the short-circuiting and the explaining paths agree
    return fast


@pytest.mark.parametrize(("text", "expected"), [
    ('traits.plan = "pro"', True),
    ('traits.plan != "pro"', False),
    ('traits.missing != "pro"', True),  # a missing field is not equal
    ('traits.missing = "pro"', False),
    ("traits.missing < 3", False),
    ("traits.plan EXISTS", True),
    ("traits.missing EXISTS", False),
    ("traits.age > 30", True),
    ("traits.age >= 34", True),
    ("traits.age < 34", False),
    ("traits.age <= 34", True),
    ('traits.age = "34"', False),  # typed: a number is never a string
    ('traits.plan > "a"', True),  # strings order
    ("traits.plan > 3", False),
    ("traits.vip = true", True),
    ("traits.vip = 1", False),  # typed: true is not 1
    ('traits.plan IN ["free", "pro"]', True),
    ('traits.plan IN ["free"]', False),
    ("traits.age BETWEEN 34 AND 40", True),
    ("traits.age BETWEEN 35 AND 40", False),
    ('traits.tags CONTAINS "beta"', True),
    ('traits.tags CONTAINS "gamma"', False),
    ('traits.note CONTAINS "jazz"', True),
    ('traits.age CONTAINS "3"', False),
    ("computed.frequency >= 4", True),
    ("computed.monetary BETWEEN 100 AND 130.5", True),
    ('computed.lifecycle_stage = "active"', True),
    ('computed.rfm.segment IN ["champions", "loyal"]', True),
    ('computed.first_seen_time < "1997-01-03T00:00:01Z"', True),
    ('computed.first_seen_time > "1997-01-03T00:00:00Z"', False),
    ('computed.first_seen_time = "1997-01-03"', True),
    ('computed.top_categories CONTAINS "books"', True),
    ("computed.recency_days < 10", False),  # absent (no orders known to the view): fails
])
def test_trait_comparisons(text: str, expected: bool) -> None:
    assert holds(text) is expected


@pytest.mark.parametrize(("text", "expected"), [
    ('event("order").count(last 90d) = 2', True),  # 89.9 days ago and as_of itself; 90 days ago is outside
    ('event("order").count(last 91d) = 3', True),
    ('event("order").count(last 3650d) = 4', True),  # the event after as_of never counts
    ('event("order").count(last 90d) >= 3', False),
    ('event("order").count(last 90d) BETWEEN 1 AND 2', True),
    ('event("order").count(last 90d) != 2', False),
    ('event("order", category = "books").count(last 90d) = 1', True),
    ('event("order", category = "books", amount > 40).count(last 90d) = 0', True),
    ('event("signup").count(last 30d) = 0', True),  # did not do
    ('event("page_view", url CONTAINS "pricing").count(last 7d) >= 1', True),
    ('event("order").count(from 1997-02-01 to 1997-03-03T00:00:00Z) = 0', True),  # the end is exclusive
    ('event("order").count(from 1997-02-01 to 1997-03-03T00:00:01Z) = 1', True),
    ('event("order").count(from 1997-03-03T00:00:00Z to 1997-12-31) = 3', True),  # the start is inclusive
    ('event("order").count(from 1997-03-04 to 1997-12-31) = 1', True),  # the event after as_of never counts
])
def test_event_counts(text: str, expected: bool) -> None:
    assert ago(90) == datetime(1997, 3, 3, tzinfo=UTC)
    assert holds(text) is expected


@pytest.mark.parametrize(("text", "expected"), [
    ('event("order").sum(amount, last 90d) = 100', True),
    ('event("order").sum(amount, last 365d) > 130', True),  # 10 + 20.5 + 40 + 60
    ('event("order").avg(amount, last 90d) = 50', True),
    ('event("order").min(amount, last 3650d) = 10', True),
    ('event("order").max(amount, last 3650d) = 60', True),  # the 999 after as_of is ignored
    ('event("order", category = "music").sum(amount, last 3650d) = 70', True),
    ('event("refund").sum(amount, last 30d) = 0', True),  # sum of nothing is 0
    ('event("refund").avg(amount, last 30d) = 0', False),  # avg of nothing has no value
    ('event("refund").avg(amount, last 30d) != 0', False),
    ('event("page_view").sum(seconds, last 30d) = 0', True),  # a string property is not a number
    ('event("page_view").max(seconds, last 30d) >= 0', False),
])
def test_event_aggregates(text: str, expected: bool) -> None:
    assert holds(text) is expected


@pytest.mark.parametrize(("text", "expected"), [
    ('score("models/churn-90d") >= 0.7', True),
    ('score("models/churn-90d") >= 0.9', False),
    ('score("models/churn-90d").percentile BETWEEN 90 AND 100', True),
    ('score("models/conversion") >= 0', False),  # never scored
])
def test_scores_are_traits_written_back(text: str, expected: bool) -> None:
    assert holds(text) is expected


def test_segment_membership_evaluates_the_other_rule() -> None:
    segments = {"buyers": parse('event("order").count(last 90d) >= 1'), "pros": parse('traits.plan = "pro"'),
                "pro-buyers": parse('segment("buyers") AND segment("pros")')}
    assert holds('segment("pro-buyers")', segments=segments)
    assert not holds('NOT segment("buyers")', segments=segments)
    assert not holds('segment("deleted")', segments=segments)  # an unknown segment has no members
    lapsed = ProfileFacts("p2", {"plan": "pro"}, {}, [EventFact("order", ago(100), {"amount": 1.0})])
    assert not holds('segment("pro-buyers")', lapsed, segments)


def test_groups_and_negation() -> None:
    assert holds('traits.plan = "free" OR traits.age > 30')
    assert not holds('traits.plan = "free" AND traits.age > 30')
    assert holds('NOT (traits.plan = "free" OR traits.age > 40)')


def test_reasons_list_every_condition_with_what_it_saw() -> None:
    evaluation = evaluate(parse('traits.plan = "free" OR (event("order").count(last 90d) >= 2 '
                                'AND NOT traits.missing EXISTS)'), FACTS, AS_OF, NO_SEGMENTS.get)
    assert evaluation.matched
    assert [(c.text, c.matched, c.observed) for c in evaluation.conditions] == [
        ('traits.plan = "free"', False, "pro"),
        ('event("order").count(last 90d) >= 2', True, 2),
        ("traits.missing EXISTS", False, None),
    ]


def test_windows_move_with_time() -> None:
    rule = parse('event("page_view").count(last 7d) >= 1')
    assert matches(rule, FACTS, AS_OF, NO_SEGMENTS.get)
    assert not matches(rule, FACTS, AS_OF + timedelta(days=4, seconds=1), NO_SEGMENTS.get)  # expired without events


HUGE = ProfileFacts(
    person_id="p3",
    traits={"big": 10**400, "nan": float("nan"), "inf": float("inf")},
    computed={"recency_days": float("inf")},
    events=[EventFact("buy", ago(1), {"amount": 1.7e308}), EventFact("buy", ago(2), {"amount": 1.7e308}),
            EventFact("sell", ago(1), {"amount": -1.7e308}), EventFact("sell", ago(2), {"amount": -1.7e308}),
            EventFact("sell", ago(3), {"amount": 1.7e308}),
            EventFact("odd", ago(1), {"amount": float("nan")}), EventFact("odd", ago(2), {"amount": float("inf")}),
            EventFact("odd", ago(3), {"amount": 10**400}), EventFact("odd", ago(4), {"amount": 2.5})],
)


@pytest.mark.parametrize(("text", "expected"), [
    # Two doubles whose sum is beyond a double: +inf, above every bound, never an error.
    ('event("buy").sum(amount, last 30d) > 9223372036854775807', True),
    ('event("buy").sum(amount, last 30d) < 0', False),
    ('event("buy").avg(amount, last 30d) > 1', True),
    ('event("sell").sum(amount, last 30d) < -1', True),  # -1.7e308: partial sums overflowed, the total did not
    ('event("sell").sum(amount, last 2d) < -9223372036854775807', True),  # -inf
    # NaN, inf and ints beyond a double are skipped, like any value that is not a finite number.
    ('event("odd").sum(amount, last 30d) = 2.5', True),
    ('event("odd").max(amount, last 30d) = 2.5', True),
    # Comparisons with huge or non-finite traits are well defined.
    ("traits.big > 9223372036854775807", True),
    ("traits.big = 1", False),
    ("traits.nan = 1", False),
    ("traits.nan != 1", True),
    ("traits.nan > 1 OR traits.nan <= 1", False),
    ("traits.nan BETWEEN 1 AND 2", False),
    ("traits.inf > 9223372036854775807", True),
    ("computed.recency_days > 30", True),
])
def test_huge_and_non_finite_numbers_never_raise(text: str, expected: bool) -> None:
    assert holds(text, HUGE) is expected


def test_aggregates_of_huge_numbers_are_exact_or_infinite() -> None:
    assert aggregate_of(Aggregation.SUM, [1.7e308, 1.7e308]) == math.inf
    assert aggregate_of(Aggregation.SUM, [-1.7e308, -1.7e308, 1e308]) == -math.inf
    assert aggregate_of(Aggregation.SUM, [1.7e308, 1.7e308, -1.7e308, 0.5]) == 1.7e308  # exact, once rounded
    assert aggregate_of(Aggregation.AVERAGE, [1.7e308, 1.7e308]) == 1.7e308  # an average is finite
    assert aggregate_of(Aggregation.SUM, [math.nan, math.inf, -math.inf, 10**400, True, "3", 1]) == 1.0


def test_huge_numbers_do_not_stop_the_next_change_time() -> None:
    rule = parse("computed.recency_days < 30")
    assert next_change_time(rule, HUGE, AS_OF, NO_SEGMENTS.get) is None


def test_reasons_say_which_conditions_are_under_a_not() -> None:
    segments = {"pros": parse('traits.plan = "pro"')}
    evaluation = evaluate(parse('traits.age > 30 AND NOT segment("pros") AND NOT (traits.vip = false OR '
                                'NOT traits.note EXISTS)'), FACTS, AS_OF, segments.get)
    assert not evaluation.matched
    # segment("pros") held, under a NOT: that is why the person is out.
    assert [(c.text, c.matched, c.negated) for c in evaluation.conditions] == [
        ("traits.age > 30", True, False),
        ('segment("pros")', True, True),
        ("traits.vip = false", False, True),
        ("traits.note EXISTS", True, False),  # under two NOTs
    ]


def test_compiled_comparisons_are_compare_for_every_type() -> None:
    """`comparer` (what compiled rules compare with) answers as `compare` does, its shortcut for floats included:
    ints beyond a double compared exactly, NaN and infinities, bools, strings, times and missing values."""
    values = [1.0, 2.0, -0.0, 2.0 ** 53, math.nan, math.inf, -math.inf, 2, 2 ** 53 + 1, 10 ** 400, True, False, "2",
              None, datetime(1997, 1, 1, tzinfo=UTC), ["2"]]
    operands: list[Scalar] = [2, 2.0, 2 ** 53 + 1, -(10 ** 400), math.nan, math.inf, True, "2", "1997-01-01T00:00:00Z"]
    for operator in Operator:
        if operator.operand_count == 0:
            comparisons = [Comparison(operator)]
        elif operator.operand_count == 1:
            comparisons = [Comparison(operator, (operand,)) for operand in operands]
        else:
            comparisons = [Comparison(operator, (low, high)) for low in operands for high in operands]
        for comparison in comparisons:
            compiled = comparer(comparison)
            for value in values:
                assert compiled(value) is compare(value, comparison), (value, comparison)
