"""Every rule validation accepts survives being stored: its canonical text parses back to the same rule,
and its Rule message converts back to it (property-based, over seeded random rule trees and texts).

A saved segment is stored as its canonical text and parsed again on every read (real time, recompute,
Get, List), and every response carries its Rule message; one accepted rule that fails either way breaks
reads for every segment. Hypothesis is not among the dev dependencies, so the cases come from seeded
random generators that lean on the edges (keywords as names, digits after dots, int64 and timestamp
limits, nesting near the limit, bad enum values).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable
from typing import TypeVar

import pytest
from google.protobuf import struct_pb2, timestamp_pb2
from onecdp.segmentation.v1 import segmentation_service_pb2 as pb

from services.segmentation.messages import rule_from_message, rule_to_message
from services.segmentation.rules import (
    MAX_RULE_DEPTH,
    Comparison,
    Operator,
    Rule,
    ScoreCondition,
    ScoreField,
    validate,
)
from services.segmentation.text import RuleSyntaxError, format_rule, parse
from shared.errors import Violations

pytestmark = pytest.mark.unit

CASES = 4000
Choice = TypeVar("Choice")

# The first few of each list are ordinary; the rest sit on or past an edge.
NAMES = ["amount", "plan", "category", "a-b.c_d", "_x", "in_", "true", "last", "event", "in", "In", "NOT", "exists",
         "Between", "and", "or", "contains", "x.1", "a.-b", "1a", "-a", "a..b", "a.", "", "é", "a b", "a.b.C9",
         "会员等级", "Plan Name", 'a"b\\c', "\t\n", "x" * 128, "x" * 129]
COMPUTED = ["computed.frequency", "computed.lifecycle_stage", "computed.top_categories", "computed.first_seen_time",
            "computed.rfm.segment", "computed.nope", "profile.x", "traits"]
STRINGS = ["pro", "active", "new", "1997-03-01T00:00:00Z", "", 'a"b', "\\", "\n\t\x00", "Zoë", "🙂", "null", "NOT"]
NUMBERS = [0.0, 1.0, 3.0, 0.5, 0.7, 90.0, -0.0, -1.0, 1.5, 100.0, 101.0, 1e15, 1e16, 1e-7, 123456.789, 2.0**53,
           2.0**63 - 1024, 2.0**63, 1e30, math.inf, -math.inf, math.nan, 5e-324, 1.7976931348623157e308]
COUNTS = [0, 1, 3, 90, -1, 2**53 + 1, 2**63 - 1024, 2**63 - 1, -(2**63)]
YEAR_1 = -62135596800
YEAR_1000 = -30610224000
SECONDS = [852076800, 860000000, 0, YEAR_1000, YEAR_1000 - 1, YEAR_1, 253402300799, YEAR_1 - 1, 253402300800]
NANOS = [0, 0, 250_000_000, 999_999_999, 1, -1, 1_000_000_000]
DAYS = [7, 30, 90, 1, 3650, 0, 3651, -5, 2**31 - 1]
SEGMENTS = ["vip", "segments/vip", "loyal", "Bad_Id", "", "segments/"]
MODELS = ["models/churn-90d", "models/m", "churn", "models/", "models/Bad"]


def edgy(rng: random.Random, choices: list[Choice], ordinary: int = 3) -> Choice:
    """Mostly one of the first `ordinary` choices, a third of the time any of them."""
    return rng.choice(choices) if rng.random() < 0.35 else rng.choice(choices[:ordinary])


def value_of(rng: random.Random, numeric: bool | None = None) -> struct_pb2.Value:
    roll = rng.random()
    if roll < 0.02:
        return struct_pb2.Value(null_value=struct_pb2.NULL_VALUE)
    if numeric is True or (numeric is None and roll < 0.45):
        return struct_pb2.Value(number_value=edgy(rng, NUMBERS, 7))
    if roll < 0.55:
        return struct_pb2.Value(bool_value=rng.random() < 0.5)
    return struct_pb2.Value(string_value=edgy(rng, STRINGS, 4))


def operator_of(rng: random.Random, numeric: bool) -> pb.Operator.ValueType:
    if rng.random() < 0.05:
        return pb.Operator.ValueType(rng.choice([0, 11, 99]))  # unspecified or unknown
    ordinary = [1, 2, 3, 4, 5, 6, 10] if numeric else list(range(1, 11))
    return pb.Operator.ValueType(rng.choice(ordinary) if rng.random() < 0.9 else rng.randint(1, 10))


def comparison_into(rng: random.Random, target: pb.TraitCondition | pb.PropertyFilter) -> None:
    target.operator = operator_of(rng, False)
    numeric = rng.random() < 0.5
    if target.operator in (7, 10):
        count = 2 if target.operator == 10 and rng.random() < 0.9 else rng.randint(0, 3)
        target.values.extend(value_of(rng, numeric) for _ in range(count))
    elif target.operator != 9 or rng.random() < 0.1:
        target.value.CopyFrom(value_of(rng, numeric))


def window_into(rng: random.Random, window: pb.TimeWindow) -> None:
    if rng.random() < 0.5:
        window.last_days = edgy(rng, DAYS)
        return
    start, end = sorted(edgy(rng, SECONDS, 2) for _ in range(2))
    for timestamp, seconds in ((window.between.start_time, start), (window.between.end_time, end)):
        if rng.random() < 0.97:
            timestamp.CopyFrom(timestamp_pb2.Timestamp(seconds=seconds, nanos=edgy(rng, NANOS, 3)))


def condition_of(rng: random.Random) -> pb.Rule:
    kind = rng.choice(["trait", "trait", "event_count", "event_aggregate", "score", "segment"])
    if kind == "trait":
        name = edgy(rng, NAMES, 4)
        trait = pb.TraitCondition(field=f"traits.{name}" if rng.random() < 0.7 else edgy(rng, COMPUTED, 2))
        comparison_into(rng, trait)
        return pb.Rule(trait=trait)
    if kind == "segment":
        return pb.Rule(segment=pb.SegmentMembershipCondition(segment=edgy(rng, SEGMENTS, 2)))
    if kind == "score":
        low, high = sorted(edgy(rng, NUMBERS, 5) for _ in range(2))
        return pb.Rule(score=pb.ScoreCondition(
            model=edgy(rng, MODELS, 2), score_field=pb.ScoreField.ValueType(rng.choice([0, 1, 2, 2, 1, 0, 3])),
            operator=operator_of(rng, True), value=low if rng.random() < 0.9 else high, value_upper=high))
    filters = []
    for _ in range(rng.choice([0, 0, 1, 2])):
        item = pb.PropertyFilter(property=edgy(rng, NAMES, 4))
        comparison_into(rng, item)
        filters.append(item)
    event_name = "order" if rng.random() < 0.9 else rng.choice(["", "x" * 129, "page view", "🙂"])
    if kind == "event_count":
        low, high = sorted(edgy(rng, COUNTS, 4) for _ in range(2))
        count = pb.EventCountCondition(event_name=event_name, filters=filters, operator=operator_of(rng, True),
                                       count=low, count_upper=high)
        window_into(rng, count.window)
        return pb.Rule(event_count=count)
    low, high = sorted(edgy(rng, NUMBERS, 7) for _ in range(2))
    aggregate = pb.EventAggregateCondition(
        event_name=event_name, property=edgy(rng, NAMES, 4),
        aggregation=pb.Aggregation.ValueType(rng.choice([1, 2, 3, 4, 4, 0, 5])),
        filters=filters, operator=operator_of(rng, True), value=low, value_upper=high)
    window_into(rng, aggregate.window)
    return pb.Rule(event_aggregate=aggregate)


def rule_of(rng: random.Random, depth: int = 0) -> pb.Rule:
    if rng.random() < 0.04:
        return pb.Rule()  # no node
    if depth < 4 and rng.random() < 0.4:
        if rng.random() < 0.3:
            return pb.Rule(negate=rule_of(rng, depth + 1))
        children = [rule_of(rng, depth + 1) for _ in range(rng.choice([2, 2, 3, 1, 0]))]
        group = pb.RuleGroup(rules=children)
        return pb.Rule(all=group) if rng.random() < 0.5 else pb.Rule(any=group)
    return condition_of(rng)


def nested(rng: random.Random, rule: pb.Rule, levels: int) -> pb.Rule:
    """`rule` under `levels` groups and NOTs (a group is two message levels: protobuf refuses beyond 100)."""
    for _ in range(levels):
        if rng.random() < 0.5:
            rule = pb.Rule(negate=rule)
        else:
            group = pb.RuleGroup(rules=[rule, condition_of(rng)] if rng.random() < 0.5 else [condition_of(rng), rule])
            rule = pb.Rule(all=group) if rng.random() < 0.5 else pb.Rule(any=group)
    return rule


def everything_exists(_: str) -> frozenset[str]:
    return frozenset()


def outcome(message: pb.Rule) -> str:
    """What becomes of a Rule message given to Create; fails the test when an accepted rule does not survive
    being stored and read back."""
    violations = Violations()
    rule = rule_from_message(message, "rule", violations)
    if rule is None:
        assert violations.items, "a refused message names its fields"
        return "malformed"
    assert not violations.items
    if validate(rule, references_of=everything_exists):
        return "invalid"
    assert_survives_storage(rule)
    return "valid"


def assert_survives_storage(rule: Rule) -> None:
    text = format_rule(rule)
    read_back = parse(text)
    assert read_back == rule, text
    assert format_rule(read_back) == text
    assert validate(read_back, references_of=everything_exists) == []
    violations = Violations()
    assert rule_from_message(rule_to_message(rule), "rule", violations) == rule
    assert not violations.items


def test_every_valid_rule_tree_round_trips_through_its_text_and_its_message() -> None:
    rng = random.Random(20261124)
    outcomes: Counter[str] = Counter()
    for case in range(CASES):
        message = rule_of(rng)
        if case % 10 == 0:
            message = nested(rng, message, rng.randint(MAX_RULE_DEPTH - 3, MAX_RULE_DEPTH + 2))
        try:
            outcomes[outcome(message)] += 1
        except Exception as error:
            raise AssertionError(f"case {case}: {message}") from error
    # The generator reaches every outcome often enough for the property to mean something.
    assert outcomes["valid"] >= CASES // 5, outcomes
    assert outcomes["invalid"] >= CASES // 5, outcomes
    assert outcomes["malformed"] >= CASES // 20, outcomes


# Conditions that parse (the first ones valid, the rest not), and pieces that break a text.
CONDITIONS = [
    "traits.a = 1", 'traits.plan IN ["pro", "team"]', "computed.frequency >= 3", "traits.t EXISTS",
    'event("order").count(last 90d) >= 1', 'event("order", category = "books").sum(amount, last 9d) > 100',
    'event("o").count(from 1997-01-01 to 1997-02-01T00:00:00+08:00) BETWEEN 1 AND 3', 'segment("vip")',
    'score("models/churn-90d").percentile > 90', 'traits.name = "\\u00e9\\n"', "traits.in CONTAINS \"x\"",
    'event("order").count(last 9d) >= 1e30', "traits.a = 1e999", 'event("o").count(last 9d) BETWEEN 1 AND 1e20',
    'event("o").count(from 0999-12-31 to 1997-01-01) >= 1', 'segment("Bad_Id")', "computed.frequency = \"x\"",
]
VALID_CONDITIONS = 11
BREAKERS = [
    "AND", "OR", "NOT", "(", ")", "[", "]", ",", ".", "=", "BETWEEN", '"a\tb"', '"\\x"', '"\\ud800"', "-0", "1e999",
    "99999999999999999999", "0999-12-31", "9999-12-31T23:00:00-02:00", "0001-01-01T00:00:00+01:00", "0000-01-01",
    "99999999999d", 'event("o", in = 1).count(last 9d) > 1', 'event("o").avg(not, last 9d) > 1', "traits.x.1 = 2",
    "NOT " * 40,
]


def text_of(rng: random.Random) -> str:
    """A rule text: mostly valid conditions under AND, OR, NOT and parentheses, sometimes with a piece spliced
    in that breaks it."""
    def part(depth: int) -> str:
        roll = rng.random()
        if depth < 3 and roll < 0.3:
            joiner = rng.choice([" AND ", " OR ", " and "])
            return "(" + joiner.join(part(depth + 1) for _ in range(rng.randint(1, 3))) + ")"
        if depth < 3 and roll < 0.4:
            return "NOT " + part(depth + 1)
        return rng.choice(CONDITIONS) if rng.random() < 0.4 else rng.choice(CONDITIONS[:VALID_CONDITIONS])

    words = part(0).split(" ")
    if rng.random() < 0.4:
        words.insert(rng.randint(0, len(words)), rng.choice(BREAKERS))
    return " ".join(words)


def text_outcome(text: str, check: Callable[[Rule], None]) -> str:
    try:
        rule = parse(text)
    except RuleSyntaxError as error:
        return "syntax error" if 0 <= error.position <= len(text) else f"syntax error at {error.position}"
    if validate(rule, references_of=everything_exists):
        return "invalid"
    check(rule)
    return "valid"


def test_any_text_parses_or_is_a_syntax_error_and_valid_text_round_trips() -> None:
    rng = random.Random(5)
    outcomes: Counter[str] = Counter()
    for case in range(CASES):
        text = text_of(rng)
        try:
            outcomes[text_outcome(text, assert_survives_storage)] += 1
        except Exception as error:
            raise AssertionError(f"case {case}: {text!r}") from error
    assert set(outcomes) == {"syntax error", "invalid", "valid"}, outcomes  # errors point inside the text
    assert min(outcomes.values()) >= CASES // 10, outcomes


def converted(message: pb.Rule) -> tuple[Rule | None, list[tuple[str, str]]]:
    violations = Violations()
    rule = rule_from_message(message, "rule", violations)
    return rule, [(v.field, v.description) for v in violations.items]


def score_message(score_field: int) -> pb.Rule:
    return pb.Rule(score=pb.ScoreCondition(model="models/m", score_field=pb.ScoreField.ValueType(score_field),
                                           operator=pb.OPERATOR_GREATER, value=0.5))


def test_score_fields_outside_the_enum_are_refused() -> None:
    above = Comparison(Operator.GREATER, (0.5,))
    assert converted(score_message(pb.SCORE_FIELD_UNSPECIFIED)) == (
        ScoreCondition("models/m", ScoreField.PROBABILITY, above), [])  # documented as the probability
    assert converted(score_message(pb.SCORE_FIELD_PERCENTILE)) == (
        ScoreCondition("models/m", ScoreField.PERCENTILE, above), [])
    # Once read as the probability, silently.
    assert converted(score_message(7)) == (None, [
        ("rule.score.score_field", "unknown score field 7: SCORE_FIELD_PROBABILITY or SCORE_FIELD_PERCENTILE")])


@pytest.mark.parametrize(("start", "end", "path", "fragment"), [
    (timestamp_pb2.Timestamp(seconds=YEAR_1 - 1), timestamp_pb2.Timestamp(seconds=0), "start_time",
     "Seconds -62135596801 must be in range"),
    (timestamp_pb2.Timestamp(seconds=0), timestamp_pb2.Timestamp(seconds=253402300800), "end_time",
     "Seconds 253402300800 must be in range"),
    (timestamp_pb2.Timestamp(seconds=0, nanos=-1), timestamp_pb2.Timestamp(seconds=9), "start_time", "Nanos -1"),
])
def test_window_timestamps_outside_the_timestamp_range_are_refused(start: timestamp_pb2.Timestamp,
                                                                   end: timestamp_pb2.Timestamp, path: str,
                                                                   fragment: str) -> None:
    window = pb.TimeWindow(between=pb.FixedRange(start_time=start, end_time=end))
    rule, violations = converted(pb.Rule(event_count=pb.EventCountCondition(
        event_name="order", operator=pb.OPERATOR_GREATER, count=1, window=window)))
    assert rule is None
    assert [field for field, _ in violations] == [f"rule.event_count.window.between.{path}"]
    assert violations[0][1].startswith("not a valid time: ")
    assert fragment in violations[0][1]


def test_a_malformed_filter_refuses_the_condition_instead_of_dropping_the_filter() -> None:
    sound = pb.PropertyFilter(property="category", operator=pb.OPERATOR_EQUAL, value=struct_pb2.Value(string_value="a"))
    unspecified = pb.PropertyFilter(property="amount", value=struct_pb2.Value(number_value=1))
    rule, violations = converted(pb.Rule(event_count=pb.EventCountCondition(
        event_name="order", filters=[sound, unspecified], operator=pb.OPERATOR_GREATER, count=1,
        window=pb.TimeWindow(last_days=9))))
    assert (rule, violations) == (None, [("rule.event_count.filters[1].operator", "an operator is required")])
