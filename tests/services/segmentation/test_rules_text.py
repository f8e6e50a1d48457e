"""The rule text form (round trips, error positions) and rule validation (naming the offending part)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.segmentation.rules import (
    Aggregation,
    AllOf,
    AnyOf,
    Comparison,
    EventAggregateCondition,
    EventCountCondition,
    FixedRange,
    LastDays,
    Not,
    Operator,
    PropertyFilter,
    ScoreCondition,
    ScoreField,
    SegmentCondition,
    TraitCondition,
    validate,
)
from services.segmentation.text import RuleSyntaxError, format_rule, parse

pytestmark = pytest.mark.unit

CANONICAL = [
    'computed.frequency >= 3 AND event("order").count(last 90d) >= 1 AND NOT segment("vip")',
    'traits.plan IN ["pro", "team"] OR (traits.age BETWEEN 18 AND 30 AND traits.email EXISTS)',
    'traits.plan = "pro" AND (traits.country = "CN" OR traits.country = "SG")',
    '(traits.a = 1 AND traits.b = 2) OR traits.c = 3',
    'traits.a = 1 AND (traits.b = 2 AND traits.c = 3)',
    'NOT (traits.a = true OR traits.tags CONTAINS "vip")',
    'NOT NOT traits.a != false',
    'event("order", category = "books", amount > 10.5).count(from 1997-01-01T00:00:00Z to 1997-04-01T00:00:00Z)'
    ' BETWEEN 1 AND 3',
    'event("order").sum(amount, last 90d) > 100',
    'event("order").avg(amount, from 1997-01-01T00:00:00Z to 1997-02-01T12:30:00.25Z) <= 20',
    'event("page_view", url CONTAINS "/pricing").min(duration, last 7d) < 3',
    'event("order").max(amount, last 3650d) = 0',
    'event("signup").count(last 30d) = 0',
    'score("models/churn-90d") >= 0.7 AND score("models/churn-90d").percentile BETWEEN 90 AND 100',
    'computed.rfm.segment IN ["champions", "loyal"]',
    'computed.first_seen_time < "1997-03-01T00:00:00Z"',
    'traits.name = "Zoë \\"Z\\" Li"',
    'traits.balance >= -12.25',
]


@pytest.mark.parametrize("text", CANONICAL)
def test_canonical_text_round_trips(text: str) -> None:
    rule = parse(text)
    assert format_rule(rule) == text
    assert parse(format_rule(rule)) == rule


def test_parse_builds_the_tree_with_precedence() -> None:
    rule = parse('traits.a = 1 OR traits.b = "x" AND NOT segment("vip")')
    assert rule == AnyOf((
        TraitCondition("traits.a", Comparison(Operator.EQUAL, (1.0,))),
        AllOf((TraitCondition("traits.b", Comparison(Operator.EQUAL, ("x",))), Not(SegmentCondition("vip")))),
    ))
    assert format_rule(rule) == 'traits.a = 1 OR (traits.b = "x" AND NOT segment("vip"))'


def test_parse_reads_every_condition_kind() -> None:
    rule = parse('event("order", category IN ["a", "b"]).count(from 1997-01-01 to 1997-02-01T00:00:00+08:00) >= 2 '
                 'and event("order").avg(amount, last 30d) between 1 and 5 and score("models/m").percentile > 50')
    january = datetime(1997, 1, 1, tzinfo=UTC)
    assert rule == AllOf((
        EventCountCondition("order", (PropertyFilter("category", Comparison(Operator.IN, ("a", "b"))),),
                            FixedRange(january, datetime(1997, 1, 31, 16, tzinfo=UTC)),
                            Comparison(Operator.GREATER_OR_EQUAL, (2.0,))),
        EventAggregateCondition("order", "amount", Aggregation.AVERAGE, (), LastDays(30),
                                Comparison(Operator.BETWEEN, (1.0, 5.0))),
        ScoreCondition("models/m", ScoreField.PERCENTILE, Comparison(Operator.GREATER, (50.0,))),
    ))
    # Lower-case keywords, a bare date and an offset are accepted; the canonical text normalizes them.
    assert format_rule(rule) == (
        'event("order", category IN ["a", "b"]).count(from 1997-01-01T00:00:00Z to 1997-01-31T16:00:00Z) >= 2 '
        'AND event("order").avg(amount, last 30d) BETWEEN 1 AND 5 AND score("models/m").percentile > 50')


@pytest.mark.parametrize(("text", "position", "message"), [
    ("traits.a = ", 11, "expected a value"),
    ("traits.a == 1", 10, "expected a value"),
    ("traits.a = 1 AND", 16, "expected a condition"),
    ('traits.a = 1 traits.b = 2', 13, "expected AND, OR or the end"),
    ("(traits.a = 1", 13, "expected ')'"),
    ('event("order").count(last 90) >= 1', 26, "a number of days"),
    ('event("order").total(amount, last 9d) > 1', 15, "count, sum, avg, min or max"),
    ('event("order").count(since 1997-01-01) > 1', 21, "expected a window"),
    ('score("models/m").odds > 1', 18, "probability or a percentile"),
    ("traits.a ~ 1", 9, "unexpected character '~'"),
    ('traits.since > 1997-01-01', 15, "quote times"),
    ("traits.a", 8, "expected an operator"),
])
def test_syntax_errors_point_at_the_offending_character(text: str, position: int, message: str) -> None:
    with pytest.raises(RuleSyntaxError) as caught:
        parse(text)
    assert caught.value.position == position
    assert message in caught.value.message
    assert f"at character {position + 1}" in str(caught.value)


SEGMENTS = {"vip": frozenset[str](), "loyal": frozenset({"vip"}), "outer": frozenset({"loyal"})}


def problems_of(text: str, segment_id: str | None = None) -> list[tuple[str, int, str]]:
    return [(p.path, p.position, p.description)
            for p in validate(parse(text), segment_id=segment_id, references_of=SEGMENTS.get)]


def test_a_valid_rule_has_no_problems() -> None:
    assert problems_of('computed.frequency >= 3 AND event("order").count(last 90d) >= 1 AND NOT segment("vip") '
                       'AND score("models/churn-90d") >= 0.7 AND computed.lifecycle_stage = "active"') == []


@pytest.mark.parametrize(("text", "path", "position", "fragment"), [
    ("computed.favourite_colour = 1", "trait.field", 0, "unknown field 'computed.favourite_colour'"),
    ("profile.name = 1", "trait.field", 0, "unknown field"),
    ('traits.a = 1 AND computed.frequency = "many"', "all.rules[1].trait.value", 17,
     "computed.frequency is a number; it cannot be compared with a string"),
    ("computed.lifecycle_stage = 3", "trait.value", 0, "is a string"),
    ('computed.lifecycle_stage = "zombie"', "trait.value", 0, "not a value of computed.lifecycle_stage"),
    ('computed.top_categories = "music"', "trait.operator", 0, "use CONTAINS or EXISTS"),
    ('computed.frequency CONTAINS 3', "trait.operator", 0, "CONTAINS does not apply"),
    ('computed.first_seen_time < "last tuesday"', "trait.value", 0, "not an RFC 3339 time"),
    ('traits.vip > true', "trait.operator", 0, "does not apply to true/false"),
    ('traits.a IN [1, "x"]', "trait.values", 0, "must share a type"),
    ('traits.a BETWEEN 5 AND 1', "trait.values", 0, "lower bound first"),
    ('event("order").count(last 0d) >= 1', "event_count.window.last_days", 0, "must be 1-3650 days"),
    ('event("order").count(last 4000d) >= 1', "event_count.window.last_days", 0, "must be 1-3650 days"),
    ('NOT event("order").count(from 1997-02-01 to 1997-01-01) >= 1', "negate.event_count.window.between.end_time",
     4, "the window is empty"),
    ('event("order").count(last 9d) >= 1.5', "event_count.count", 0, "whole number"),
    ('event("order").count(last 9d) >= -1', "event_count.value", 0, "at least 0"),
    ('event("order").count(last 9d) CONTAINS 1', "event_count.operator", 0, "does not apply to a number"),
    ('event("order").sum(amount, last 9d) > "lots"', "event_aggregate.value", 0, "expected a number"),
    ('event("order").sum(amount, last 9d) BETWEEN 9 AND 1', "event_aggregate.value_upper", 0, "lower <= upper"),
    ('score("models/churn") > 1.5', "score.value", 0, "at most 1"),
    ('score("churn") > 0.5', "score.model", 0, "not a model name"),
    ('score("models/churn").percentile > 101', "score.value", 0, "at most 100"),
    ('segment("nope")', "segment.segment", 0, "segments/nope does not exist"),
    ('segment("Bad_Id")', "segment.segment", 0, "not a segment id"),
])
def test_validation_names_the_offending_part(text: str, path: str, position: int, fragment: str) -> None:
    problems = problems_of(text)
    assert len(problems) == 1, problems
    assert problems[0][0] == path
    assert problems[0][1] == position
    assert fragment in problems[0][2]


def test_a_segment_reference_may_be_its_id_or_its_name() -> None:
    # The tree form documents `segments/{id}`, the text form writes the id: each accepts both spellings.
    assert parse('segment("segments/vip")') == parse('segment("vip")') == SegmentCondition("vip")
    assert format_rule(parse('NOT segment("segments/vip")')) == 'NOT segment("vip")'
    assert problems_of('segment("segments/nope")') == [("segment.segment", 0, "segments/nope does not exist")]
    assert problems_of('segment("segments/")')[0][2].startswith("'' is not a segment id")


def test_cycles_and_self_references_are_refused() -> None:
    # vip <- loyal <- outer: vip referring to outer closes a cycle.
    assert problems_of('segment("outer")', segment_id="vip") == [
        ("segment.segment", 0, "cycle of segment references: segments/vip -> segments/outer -> segments/loyal -> "
                               "segments/vip")]
    assert problems_of('traits.a = 1 OR segment("vip")', segment_id="vip")[0][:2] == ("any.rules[1].segment.segment",
                                                                                       16)
    assert problems_of('segment("vip")', segment_id="outer") == []


def test_every_problem_is_reported() -> None:
    problems = problems_of('computed.nope = 1 AND event("").count(last 0d) >= 1')
    assert [p[0] for p in problems] == ["all.rules[0].trait.field", "all.rules[1].event_count.event_name",
                                        "all.rules[1].event_count.window.last_days"]
