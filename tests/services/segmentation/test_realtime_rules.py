"""What a change can affect and when time alone changes a membership (pure, no Cassandra)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.segmentation.evaluation import EventFact, ProfileFacts, compile_rule, matches
from services.segmentation.realtime import (
    DAILY,
    NO_EVENTS,
    compile_next_change,
    dependencies_of,
    events_read,
    next_change_time,
)
from services.segmentation.rules import Rule
from services.segmentation.text import parse

pytestmark = pytest.mark.unit

AS_OF = datetime(2030, 6, 1, tzinfo=UTC)


def ago(days: float) -> datetime:
    return AS_OF - timedelta(days=days)


RULES: dict[str, Rule] = {
    "buyers": parse('event("order").count(last 7d) >= 2'),
    "pros": parse('traits.plan = "pro"'),
    "risky": parse('score("models/churn-90d") >= 0.7'),
    "pro-buyers": parse('segment("pros") AND segment("buyers")'),
    "not-pro": parse('NOT segment("pros")'),
    "frequent": parse("computed.frequency >= 3"),
    "lapsing": parse("computed.recency_days > 30"),
    "stage": parse('computed.lifecycle_stage = "active"'),
    "pro-recent": parse('traits.plan = "pro" AND (event("order").count(last 7d) >= 2 OR NOT segment("pros"))'),
    "books": parse('event("view", category = "books").count(from 2030-01-01T00:00:00Z to 2030-07-01T00:00:00Z) >= 1'),
}


def test_dependencies_follow_segment_references_and_name_what_is_read() -> None:
    buyers = dependencies_of(RULES["buyers"], RULES, AS_OF)
    assert (buyers.event_names, buyers.trait_names, buyers.uses_computed) == (frozenset({"order"}), frozenset(), False)
    assert dependencies_of(RULES["risky"], RULES, AS_OF).trait_names == {"score_churn-90d"}
    both = dependencies_of(RULES["pro-buyers"], RULES, AS_OF)
    assert (both.trait_names, both.event_names) == (frozenset({"plan"}), frozenset({"order"}))
    assert dependencies_of(RULES["frequent"], RULES, AS_OF).uses_computed
    read = events_read([RULES["pro-buyers"], RULES["books"]], RULES, AS_OF)
    # The earliest window: "books" from 2030-01-01 (the 7 days of "buyers" start later), less a millisecond.
    assert read.names == {"order", "view"}
    assert read.since == datetime(2030, 1, 1, tzinfo=UTC) - timedelta(milliseconds=1)
    assert events_read([RULES["buyers"]], RULES, AS_OF).since == AS_OF - timedelta(days=7, milliseconds=1)
    assert events_read([RULES["frequent"], RULES["pros"]], RULES, AS_OF) == NO_EVENTS
    assert read.wants("view", datetime(2030, 1, 1, tzinfo=UTC)) and not read.wants("view", datetime(2029, 12, 31,
                                                                                                    tzinfo=UTC))
    assert not read.wants("click", AS_OF)


@pytest.mark.parametrize(("segment", "traits", "events", "affected"), [
    ("buyers", [], ["order"], True),
    ("buyers", ["plan"], ["identify"], False),
    ("pros", ["plan"], ["identify"], True),
    ("pros", ["age"], ["identify"], False),
    ("risky", ["score_churn-90d"], [], True),
    ("pro-buyers", [], ["order"], True),  # through the reference
    ("frequent", [], ["page_view"], True),  # computed traits change with any event
    ("frequent", ["plan"], [], False),  # ... but not with a trait write
    ("not-pro", ["age"], ["identify"], True),  # holds for a new person with no facts: always evaluated
])
def test_a_change_affects_only_segments_that_read_what_it_names(segment: str, traits: list[str], events: list[str],
                                                               affected: bool) -> None:
    assert dependencies_of(RULES[segment], RULES, AS_OF).affected_by(traits, events) is affected


def facts(*events: EventFact, computed: dict[str, object] | None = None) -> ProfileFacts:
    return ProfileFacts("p", {"plan": "pro"}, computed or {}, events)


def test_the_next_change_is_the_first_event_leaving_a_relative_window() -> None:
    person = facts(EventFact("order", ago(1), {}), EventFact("order", ago(5), {}), EventFact("order", ago(30), {}),
                   EventFact("view", ago(0.5), {}))
    assert matches(RULES["buyers"], person, AS_OF, RULES.get)
    # The order 5 days ago leaves the 7-day window in 2 days (the one 30 days ago left long ago).
    assert next_change_time(RULES["buyers"], person, AS_OF, RULES.get) == ago(5) + timedelta(days=7)
    assert not matches(RULES["buyers"], person, ago(5) + timedelta(days=7), RULES.get)
    # Through a reference too; a rule on traits only never changes by itself.
    assert next_change_time(RULES["pro-buyers"], person, AS_OF, RULES.get) == ago(5) + timedelta(days=7)
    assert next_change_time(RULES["pros"], person, AS_OF, RULES.get) is None


def test_fixed_windows_change_only_when_a_future_event_arrives() -> None:
    past = facts(EventFact("view", ago(3), {"category": "books"}))
    assert next_change_time(RULES["books"], past, AS_OF, RULES.get) is None
    future = facts(EventFact("view", AS_OF + timedelta(hours=2), {"category": "books"}),
                   EventFact("view", AS_OF + timedelta(hours=1), {"category": "music"}))  # filtered out
    assert next_change_time(RULES["books"], future, AS_OF, RULES.get) == AS_OF + timedelta(hours=2)


def test_recency_crosses_its_bound_and_profile_owned_thresholds_are_checked_daily() -> None:
    person = facts(computed={"recency_days": 10.0})
    assert next_change_time(RULES["lapsing"], person, AS_OF, RULES.get) == AS_OF + timedelta(days=20)
    assert next_change_time(RULES["stage"], person, AS_OF, RULES.get) == AS_OF + DAILY


def test_no_change_is_due_when_conditions_time_cannot_change_decide_the_rule() -> None:
    orders = (EventFact("order", ago(1), {}), EventFact("order", ago(5), {}))
    free = ProfileFacts("p", {"plan": "free"}, {}, orders)
    # `plan = "pro"` is false whatever the time: the orders leaving their window change nothing.
    assert next_change_time(RULES["pro-buyers"], free, AS_OF, RULES.get) is None
    assert next_change_time(RULES["pro-recent"], free, AS_OF, RULES.get) is None
    assert next_change_time(RULES["not-pro"], facts(*orders), AS_OF, RULES.get) is None
    # Still due when the time-bound part decides: a pro whose orders leave the window, through OR and NOT too.
    assert next_change_time(RULES["pro-recent"], facts(*orders), AS_OF, RULES.get) == ago(5) + timedelta(days=7)
    assert next_change_time(RULES["buyers"], free, AS_OF, RULES.get) == ago(5) + timedelta(days=7)
    lapsing_pro = parse('traits.plan = "pro" AND computed.recency_days > 30')
    assert next_change_time(lapsing_pro, facts(computed={"recency_days": 10.0}), AS_OF, RULES.get) == \
        AS_OF + timedelta(days=20)
    assert next_change_time(lapsing_pro, ProfileFacts("p", {"plan": "free"}, {"recency_days": 10.0}), AS_OF,
                            RULES.get) is None


def test_rules_compiled_once_answer_as_evaluated_per_person() -> None:
    """A recompute compiles its rule once for every profile: the compiled functions give what the per-person
    calls give, whatever the facts."""
    histories: list[tuple[str | None, float | None, list[tuple[str, float, str]]]] = [
        ("pro", 3.0, [("order", 1, "books"), ("order", 6.5, "music"), ("order", -2, "books")]),
        ("pro", None, [("order", 8, "books"), ("view", 10, "books")]),
        ("free", 40.0, [("order", 0.5, "music"), ("order", 2, "music")]),
        (None, None, []),
        ("pro", 12.0, [("view", 200, "books"), ("order", 7, "books"), ("order", 0, "books")]),  # 7 days: outside
    ]
    people = [ProfileFacts(f"p{i}", {"plan": plan} if plan else {}, {"recency_days": recency} if recency else {},
                           [EventFact(name, ago(days), {"category": category}) for name, days, category in events])
              for i, (plan, recency, events) in enumerate(histories)]
    for name, rule in RULES.items():
        member = compile_rule(rule, AS_OF, RULES.get)
        next_change = compile_next_change(rule, AS_OF, RULES.get)
        for facts in people:
            assert member(facts) == matches(rule, facts, AS_OF, RULES.get), (name, facts.person_id)
            assert next_change(facts) == next_change_time(rule, facts, AS_OF, RULES.get), (name, facts.person_id)
    pro_buyers = compile_rule(RULES["pro-buyers"], AS_OF, RULES.get)
    assert [pro_buyers(p) for p in people] == [True, False, False, False, False]
    assert compile_next_change(RULES["pro-buyers"], AS_OF, RULES.get)(people[0]) == AS_OF + timedelta(days=0.5)
