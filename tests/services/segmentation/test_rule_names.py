"""Names in rules: every trait name profile accepts (1-128 characters of any kind) and every non-empty property
name can be written in both forms; the text form writes the names that are not plain identifiers quoted, as
JSON strings, and round-trips them; what profile would refuse is refused saying the rule."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.segmentation.evaluation import EventFact, ProfileFacts, matches
from services.segmentation.messages import rule_from_message, rule_to_message
from services.segmentation.profile_source import read_mask
from services.segmentation.realtime import ProfileReads
from services.segmentation.rules import (
    Aggregation,
    Comparison,
    EventAggregateCondition,
    EventCountCondition,
    LastDays,
    Operator,
    PropertyFilter,
    Rule,
    ScoreCondition,
    ScoreField,
    SegmentCondition,
    TraitCondition,
    validate,
)
from services.segmentation.text import RuleSyntaxError, format_rule, parse
from shared.errors import Violations
from shared.trait_names import MAX_TRAIT_NAME_LENGTH, trait_name_problem

pytestmark = pytest.mark.unit

IS_ONE = Comparison(Operator.EQUAL, (1.0,))
AT_LEAST_ONE = Comparison(Operator.GREATER_OR_EQUAL, (1.0,))


CANONICAL = [
    'traits."会员等级" = "金卡"',
    'traits."Plan Name" = "pro"',
    'event("o", "say \\"hi\\" \\\\ to\\tme\\n" EXISTS).count(last 9d) = 0',
    'event("o", "\\u0000" = 1).count(last 9d) = 0',
    'traits."x.1" = 2 OR traits."1st" = 1 OR traits."a..b" = 1 OR traits."a." = 1 OR traits."-a" = 1',
    'traits."é" IN ["a", "b"] AND NOT traits."🙂" EXISTS',
    'event("order", "商品 类别" = "书", "in" = 1, "NOT" EXISTS).sum("单价", last 30d) >= 30',
    'event("o", "a b" IN ["x"], "Between" BETWEEN 1 AND 2).max("in", last 9d) > 1',
    'event("o", "x.1" CONTAINS "y").count(last 9d) = 0',
    # Plain names stay plain, keywords inside a trait name too (traits.in is one name).
    'traits.in = 1 AND traits.a-b.c_d = 2 AND event("o", true = true, last = 1).avg(count, last 9d) > 1',
    'score("models/churn") >= 0.5',
]


@pytest.mark.parametrize("text", CANONICAL)
def test_canonical_text_with_quoted_names_round_trips(text: str) -> None:
    rule = parse(text)
    assert validate(rule) == []
    assert format_rule(rule) == text
    assert parse(format_rule(rule)) == rule
    violations = Violations()
    assert rule_from_message(rule_to_message(rule), "rule", violations) == rule
    assert not violations.items


@pytest.mark.parametrize(("text", "canonical"), [
    ('traits."plan" = 1', "traits.plan = 1"),
    ('traits."a.b" = 1', "traits.a.b = 1"),
    ('traits."\\u4f1a\\u5458\\u7b49\\u7ea7" = "金卡"', 'traits."会员等级" = "金卡"'),
    ('traits."a\\/b" = 1', 'traits."a/b" = 1'),
    ('event("o", "category" = 1).sum("amount", last 9d) > 1', 'event("o", category = 1).sum(amount, last 9d) > 1'),
    ('event("o", "In" = 1).count(last 9d) > 1', 'event("o", "In" = 1).count(last 9d) > 1'),
    ('score("churn") >= 0.5 AND score("churn-90d").percentile > 90',
     'score("models/churn") >= 0.5 AND score("models/churn-90d").percentile > 90'),
])
def test_names_are_written_quoted_exactly_when_they_are_not_plain(text: str, canonical: str) -> None:
    assert format_rule(parse(text)) == canonical
    assert parse(canonical) == parse(text)


def test_quoted_names_are_the_stored_names() -> None:
    assert parse('traits."Plan Name" = "pro"') == TraitCondition("traits.Plan Name", Comparison(Operator.EQUAL,
                                                                                                 ("pro",)))
    assert parse('traits."a\\"b\\\\c" EXISTS') == TraitCondition('traits.a"b\\c', Comparison(Operator.EXISTS))
    assert parse('event("o", "单 价" >= 1).sum("in", last 9d) >= 1') == EventAggregateCondition(
        "o", "in", Aggregation.SUM, (PropertyFilter("单 价", AT_LEAST_ONE),), LastDays(9), AT_LEAST_ONE)
    # A bare model id is the model's name, in either form.
    assert ScoreCondition("churn", ScoreField.PROBABILITY, IS_ONE).model == "models/churn"
    assert parse('score("churn") = 1') == ScoreCondition("models/churn", ScoreField.PROBABILITY, IS_ONE)


@pytest.mark.parametrize("name", ["会员等级", "Plan Name", 'a"b', "\\", "\n\t\x00\x7f", "\u2028", "in", "1", " ",
                                  "traits.x", "等" * MAX_TRAIT_NAME_LENGTH])
def test_every_name_round_trips_as_a_tree_and_trait_names_are_profiles(name: str) -> None:
    rules: list[Rule] = [
        TraitCondition(f"traits.{name}", IS_ONE),
        EventCountCondition("o", (PropertyFilter(name, IS_ONE),), LastDays(9), AT_LEAST_ONE),
        EventAggregateCondition("o", name, Aggregation.MAX, (), LastDays(9), AT_LEAST_ONE),
    ]
    for rule in rules:
        if isinstance(rule, TraitCondition) and trait_name_problem(name):
            # Profile refuses control characters in trait names (not in event property names): no profile could
            # hold such a trait, and a read naming one fails, so a rule naming one is refused too.
            assert [p.path for p in validate(rule)] == ["trait.field"]
        else:
            assert validate(rule) == []
        assert parse(format_rule(rule)) == rule
        assert format_rule(parse(format_rule(rule))) == format_rule(rule)


@pytest.mark.parametrize(("text", "position", "message"), [
    ('traits.会员等级 = "金卡"', 7, "unexpected character '会': a name with characters other than ASCII letters, "
                                "digits, _ and - is written quoted, e.g. traits.\"会员等级\""),
    ('traits.vip会员 = 1', 10, "unexpected character '会': a name with characters other than ASCII letters, digits, _ "
                            "and - is written quoted, e.g. traits.\"vip会员\""),
    ('event("o", 商品类别 = "书").count(last 9d) > 1', 11, "unexpected character '商': a name with characters other "
                                                       'than ASCII letters, digits, _ and - is written quoted, e.g. '
                                                       '"商品类别"'),
    ('traits.Plan Name = "pro"', 12, "expected an operator (=, !=, <, <=, >, >=, IN, CONTAINS, EXISTS, BETWEEN), "
                                     "found 'Name' (a name with spaces or other characters outside A-Z, a-z, 0-9, _ "
                                     "and - is written quoted, e.g. traits.\"Plan Name\")"),
    ('traits. "x" = 1', 6, 'write a quoted name right after its dot, without spaces: traits."x"'),
    ('traits ."x" = 1', 7, 'write a quoted name right after its dot, without spaces: traits."x"'),
    ('traits."x = 1', 7, "unexpected character '\"'"),
    ('traits."\\x" = 1', 8, "not a valid string (invalid \\escape"),
    ('event("o", in = 1).count(last 9d) > 1', 11,
     "expected a property name, found the keyword 'in': a property of that name is written quoted, \"in\""),
    ('event("o").sum(Not, last 9d) > 1', 15,
     "expected the property to aggregate, found the keyword 'Not': a property of that name is written quoted, "
     "\"Not\""),
    ('traits."a" . "b" = 1', 11, "expected an operator"),
])
def test_names_written_wrong_are_syntax_errors_saying_how_to_write_them(text: str, position: int,
                                                                       message: str) -> None:
    with pytest.raises(RuleSyntaxError) as caught:
        parse(text)
    assert caught.value.position == position
    assert caught.value.message.startswith(message)


RULE_TEXT = ("a trait name is 1-128 characters of any kind, as the profile service accepts them (traits.plan; in "
             "the rule text a name that is not plain is quoted: traits.\"Plan Name\")")


@pytest.mark.parametrize(("rule", "path", "description"), [
    (TraitCondition("traits.", IS_ONE), "trait.field", f"'traits.' names no trait: {RULE_TEXT}"),
    ('traits."" = 1', "trait.field", f"'traits.' names no trait: {RULE_TEXT}"),
    (TraitCondition("traits." + "等" * 129, IS_ONE), "trait.field", f"the trait name has 129 characters: {RULE_TEXT}"),
    (TraitCondition("traits", IS_ONE), "trait.field", "unknown field 'traits': use traits.<name> (any trait name of "
                                                      "1-128 characters) or computed.<name> with one of "),
    (EventCountCondition("o", (PropertyFilter("", IS_ONE),), LastDays(9), AT_LEAST_ONE),
     "event_count.filters[0].property",
     "a property name is required (any text; the rule text quotes names that are not plain, e.g. \"unit price\")"),
    ('event("o").sum("", last 9d) > 1', "event_aggregate.property", "a property name is required"),
    (ScoreCondition("Churn", ScoreField.PROBABILITY, IS_ONE), "score.model",
     "'models/Churn' is not a model name like models/churn-90d or id like churn-90d (1-63 lower-case letters, "
     "digits and hyphens, starting with a letter)"),
    (ScoreCondition("models/churn\n", ScoreField.PROBABILITY, IS_ONE), "score.model", "'models/churn\\n' is not"),
    (ScoreCondition("", ScoreField.PROBABILITY, IS_ONE), "score.model", "'' is not a model name"),
    (SegmentCondition("vip\n"), "segment.segment", "'vip\\n' is not a segment id"),
])
def test_names_profile_would_refuse_are_refused_stating_the_rule(rule: Rule | str, path: str,
                                                                 description: str) -> None:
    problems = validate(parse(rule) if isinstance(rule, str) else rule)
    assert [p.path for p in problems] == [path]
    assert problems[0].description.startswith(description)


def test_rules_on_quoted_names_match_the_stored_names() -> None:
    facts = ProfileFacts("p1", {"会员等级": "金卡", "Plan Name": "pro", 'a"b': True}, {},
                         [EventFact("purchase", datetime(1997, 5, 30, tzinfo=UTC), {"商品 类别": "书", "in": 1.0,
                                                                                    "单价": 30.0})])
    as_of = datetime(1997, 6, 1, tzinfo=UTC)
    no_segments: dict[str, Rule] = {}
    for text, expected in [
        ('traits."会员等级" = "金卡"', True),
        ('traits."会员等级" = "银卡"', False),
        ('traits."Plan Name" IN ["pro", "team"]', True),
        ('traits."a\\"b" = true', True),
        ('traits.Plan = "pro"', False),
        ('event("purchase", "商品 类别" = "书", "in" = 1).sum("单价", last 30d) >= 30', True),
        ('event("purchase", "商品 类别" = "书", "in" = 2).count(last 30d) >= 1', False),
    ]:
        assert matches(parse(text), facts, as_of, no_segments.get) is expected, text


def test_a_stored_rule_naming_a_trait_profile_refuses_reads_it_as_absent() -> None:
    """Rules stored before control characters were refused in trait names: a read naming such a trait fails at
    profile (INVALID_READ_MASK), which would stop real time for every segment evaluated with it. No profile holds
    such a trait: it is left out of the read, and the condition sees it absent, as before."""
    mask = read_mask(ProfileReads(frozenset({"plan", "a\x07b"}), computed=False))
    assert list(mask.paths) == ["person_id", "traits.plan"]
    assert validate(parse('traits."a\\u0007b" = 1'))[0].description.startswith(
        "the trait name must not contain control characters; found control character U+0007")
