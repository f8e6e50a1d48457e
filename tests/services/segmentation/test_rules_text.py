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
    # The whole word written is quoted, not its first token (`30x` is the number 30 and the name x).
    ('event("order").count(last 30x) >= 1', 26, "expected a number of days like 90d, found '30x'"),
    ('event("order").count(last 30dd) >= 1', 26, "found '30dd'"),
    ('event("order").total(amount, last 9d) > 1', 15, "count, sum, avg, min or max"),
    ('event("order").count(since 1997-01-01) > 1', 21, "expected a window"),
    ('score("models/m").odds > 1', 18, "probability or a percentile"),
    ("traits.a ~ 1", 9, "unexpected character '~'"),
    ('traits.since > 1997-01-01', 15, "quote times"),
    ("traits.a", 8, "expected an operator"),
    # Nesting is bounded (MAX_RULE_DEPTH) instead of recursing until Python gives up.
    ("(" * 33 + "traits.a = 1" + ")" * 33, 32, "nest at most 32 levels deep"),
    ("NOT " * 33 + "traits.a = 1", 128, "nest at most 32 levels deep"),
    ("traits.a = 1 AND (" + "NOT (" * 16 + "traits.b = 2" + ")" * 17, 97, "nest at most 32 levels deep"),
    ("(" * 400 + "traits.a = 1" + ")" * 400, 32, "nest at most 32 levels deep"),
    ("NOT " * 1200 + "traits.a = 1", 128, "nest at most 32 levels deep"),
    # Strings are JSON strings holding UTF-8 text; times stay in the years 1-9999 in UTC.
    ('traits.a = "a\tb"', 13, "not a valid string (invalid control character"),
    ('traits.a = "\\x"', 12, "not a valid string (invalid \\escape"),
    ('event("\\ud800").count(last 9d) > 1', 6, "lone surrogate"),
    ('event("e").count(from 9999-12-31T23:00:00-02:00 to 9999-12-31T23:30:00Z) > 1', 22, "years 1-9999 in UTC"),
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


# `pointed`: the text from the reported position on starts with it (the offending part, not the condition).
@pytest.mark.parametrize(("text", "path", "pointed", "fragment"), [
    ("computed.favourite_colour = 1", "trait.field", "computed.favourite_colour", "unknown field "
                                                                                  "'computed.favourite_colour'"),
    ("profile.name = 1", "trait.field", "profile.name", "unknown field"),
    ('traits.a = 1 AND computed.frequency = "many"', "all.rules[1].trait.value", '"many"',
     "computed.frequency is a number; it cannot be compared with a string"),
    ("computed.lifecycle_stage = 3", "trait.value", "3", "is a string"),
    ('computed.lifecycle_stage = "zombie"', "trait.value", '"zombie"', "not a value of computed.lifecycle_stage"),
    ('computed.top_categories = "music"', "trait.operator", '= "music"', "use CONTAINS or EXISTS"),
    ('computed.frequency CONTAINS 3', "trait.operator", "CONTAINS 3", "CONTAINS does not apply"),
    ('computed.first_seen_time < "last tuesday"', "trait.value", '"last tuesday"', "not an RFC 3339 time"),
    ('traits.vip > true', "trait.operator", "> true", "does not apply to true/false"),
    ('traits.a IN [1, "x"]', "trait.values", '1, "x"]', "must share a type"),
    ('traits.a BETWEEN 5 AND 1', "trait.values", "5 AND 1", "lower bound first"),
    ('event("order").count(last 0d) >= 1', "event_count.window.last_days", "0d)", "must be 1-3650 days"),
    ('event("order").count(last 4000d) >= 1', "event_count.window.last_days", "4000d", "must be 1-3650 days"),
    ('NOT event("order").count(from 1997-02-01 to 1997-01-01) >= 1', "negate.event_count.window.between.end_time",
     "1997-01-01)", "the window is empty"),
    ('event("order").count(last 9d) >= 1.5', "event_count.count", "1.5", "whole number"),
    ('event("order").count(last 9d) BETWEEN 1 AND 2.5', "event_count.count_upper", "2.5", "whole number"),
    # Counts are int64 in the Rule message: larger ones are refused, not left to fail its conversion.
    ('event("order").count(last 9d) >= 1e30', "event_count.count", "1e30", "at most 9223372036854775807"),
    ('event("order").count(last 9d) BETWEEN 1 AND 99999999999999999999', "event_count.count_upper",
     "99999999999999999999", "at most 9223372036854775807"),
    ('event("order").count(last 9d) = 9223372036854775807', "event_count.count", "9223372036854775807",
     "at most 9223372036854775807"),  # rounds to 2**63 as a float
    ('event("order").count(last 9d) >= "x"', "event_count.count", '"x"', "expected a number"),
    ('event("order").count(last 9d) BETWEEN 1 AND 1e999', "event_count.count_upper", "1e999", "must be finite"),
    ('event("order").count(from 0999-12-31 to 1997-01-01) >= 1', "event_count.window.between.start_time",
     "0999-12-31", "in the years 1000-9999"),
    ('event("order").count(last 9d) >= -1', "event_count.count", "-1", "at least 0"),
    ('event("order").count(last 9d) BETWEEN -1 AND 1', "event_count.count", "-1 AND", "at least 0"),
    ('event("order").count(last 9d) CONTAINS 1', "event_count.operator", "CONTAINS", "does not apply to a number"),
    ('event("order").sum(amount, last 9d) > "lots"', "event_aggregate.value", '"lots"', "expected a number"),
    ('event("order").sum(amount, last 9d) BETWEEN 9 AND 1', "event_aggregate.value_upper", "1", "lower <= upper"),
    ('event("order", paid > true).count(last 9d) > 1', "event_count.filters[0].operator", "> true)",
     "does not apply to true/false"),
    ('event("").count(last 9d) > 1', "event_count.event_name", '"")', "an event name of 1-128 characters"),
    ('score("models/churn") > 1.5', "score.value", "1.5", "at most 1"),
    ('score("Churn") > 0.5', "score.model", '"Churn"', "not a model name"),
    ('score("models/churn").percentile > 101', "score.value", "101", "at most 100"),
    ('score("models/churn") BETWEEN 0.5 AND 2', "score.value_upper", "2", "at most 1"),
    ('traits.a IN [1, 1e999]', "trait.values[1]", "1, 1e999", "must be finite"),
    ('(traits.a = 1 AND ' * 32 + 'traits.b = 2' + ')' * 32 + ' AND traits.c = 3',
     "all.rules[0]" + ".all.rules[1]" * 31, "traits.a = 1 AND traits.b = 2)", "nest at most 32 levels deep"),
    ('computed.lifecycle_stage > "new"', "trait.operator", '> "new"', "is categorical: > does not apply"),
    ('computed.rfm.segment BETWEEN "at_risk" AND "loyal"', "trait.operator", "BETWEEN", "is categorical"),
    ('computed.lifecycle_stage >= 2', "trait.value", "2", "cannot be compared with a number"),
    ('segment("nope")', "segment.segment", '"nope"', "segments/nope does not exist"),
    ('segment("Bad_Id")', "segment.segment", '"Bad_Id"', "not a segment id"),
])
def test_validation_names_the_offending_part(text: str, path: str, pointed: str, fragment: str) -> None:
    problems = problems_of(text)
    assert len(problems) == 1, problems
    assert problems[0][0] == path
    assert text[problems[0][1]:].startswith(pointed)
    assert fragment in problems[0][2]


def test_a_segment_reference_may_be_its_id_or_its_name() -> None:
    # The tree form documents `segments/{id}`, the text form writes the id: each accepts both spellings.
    assert parse('segment("segments/vip")') == parse('segment("vip")') == SegmentCondition("vip")
    assert format_rule(parse('NOT segment("segments/vip")')) == 'NOT segment("vip")'
    assert problems_of('segment("segments/nope")') == [("segment.segment", 8, "segments/nope does not exist")]
    assert problems_of('segment("segments/")')[0][2].startswith("'' is not a segment id")


def test_a_score_on_an_unknown_model_is_refused_when_that_is_known() -> None:
    text = 'traits.a = 1 AND score("models/nope") >= 0.7 AND score("models/churn").percentile > 50'
    asked: list[str] = []

    def model_exists(model: str) -> bool:
        asked.append(model)
        return model == "models/churn"

    problems = validate(parse(text), model_exists=model_exists)
    assert [(p.path, p.description) for p in problems] == [
        ("all.rules[1].score.model", "models/nope does not exist in the prediction service")]
    assert asked == ["models/nope", "models/churn"]
    # Prediction unreachable (None): the shape alone is checked.
    assert validate(parse(text), model_exists=lambda _: None) == []
    assert [p.path for p in validate(parse('score("nope") > 0.5'), model_exists=model_exists)] == ["score.model"]


def test_cycles_and_self_references_are_refused() -> None:
    # vip <- loyal <- outer: vip referring to outer closes a cycle.
    assert problems_of('segment("outer")', segment_id="vip") == [
        ("segment.segment", 8, "cycle of segment references: segments/vip -> segments/outer -> segments/loyal -> "
                               "segments/vip")]
    assert problems_of('traits.a = 1 OR segment("vip")', segment_id="vip")[0][:2] == ("any.rules[1].segment.segment",
                                                                                       24)
    assert problems_of('segment("vip")', segment_id="outer") == []


def test_every_problem_is_reported() -> None:
    problems = problems_of('computed.nope = 1 AND event("").count(last 0d) >= 1')
    assert [p[0] for p in problems] == ["all.rules[0].trait.field", "all.rules[1].event_count.event_name",
                                        "all.rules[1].event_count.window.last_days"]


AT_LEAST_ONE = Comparison(Operator.GREATER_OR_EQUAL, (1.0,))
IS_ONE = Comparison(Operator.EQUAL, (1.0,))


def count_with_filter(property_name: str) -> EventCountCondition:
    return EventCountCondition("order", (PropertyFilter(property_name, IS_ONE),), LastDays(9), AT_LEAST_ONE)


def sum_of(property_name: str) -> EventAggregateCondition:
    return EventAggregateCondition("order", property_name, Aggregation.SUM, (), LastDays(9), AT_LEAST_ONE)


# Names profile accepts are written quoted when they are not plain (test_rule_names.py); only the names
# profile would refuse (no trait name, 129 characters) and an empty property name are refused.
@pytest.mark.parametrize(("rule", "path", "fragment"), [
    (TraitCondition("traits.", IS_ONE), "trait.field", "'traits.' names no trait: a trait name is 1-128 characters"),
    (TraitCondition("traits." + "x" * 129, IS_ONE), "trait.field", "the trait name has 129 characters"),
    (count_with_filter(""), "event_count.filters[0].property", "a property name is required"),
    (sum_of(""), "event_aggregate.property", "a property name is required"),
])
def test_names_profile_would_refuse_are_refused(rule: EventCountCondition, path: str, fragment: str) -> None:
    problems = validate(rule)
    assert [p.path for p in problems] == [path]
    assert fragment in problems[0].description


def test_window_times_stay_in_four_digit_years() -> None:
    def window_from(year: int) -> EventCountCondition:
        return EventCountCondition("order", (), FixedRange(datetime(year, 1, 1, tzinfo=UTC),
                                                           datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)),
                                   AT_LEAST_ONE)

    # Year 1 printed as `1-01-01T...` once; it is written in four digits now, and still refused: readers
    # subtract margins from window starts.
    assert format_rule(window_from(1)).startswith('event("order").count(from 0001-01-01T00:00:00Z to ')
    for year in (1, 999):
        assert [(p.path, p.description) for p in validate(window_from(year))] == [
            ("event_count.window.between.start_time",
             f"must be in the years 1000-9999, got {year:04d}-01-01T00:00:00+00:00")]
    edge = window_from(1000)
    assert validate(edge) == []
    assert format_rule(edge) == 'event("order").count(from 1000-01-01T00:00:00Z to 9999-12-31T23:59:59Z) >= 1'
    assert parse(format_rule(edge)) == edge


def test_names_and_nesting_at_the_limits_round_trip() -> None:
    deepest = "NOT " * 32 + "traits.a = 1"
    grouped = "(traits.a = 1 AND " * 31 + "traits.b = 2" + ")" * 31 + " AND traits.c = 3"
    names = 'event("order", _in-stock.v2 = true).sum(in_, last 9d) > 1 AND traits.a-b.c_d.Not EXISTS'
    for text in (deepest, grouped, names):
        rule = parse(text)
        assert validate(rule) == []
        assert format_rule(rule) == text
        assert parse(format_rule(rule)) == rule
