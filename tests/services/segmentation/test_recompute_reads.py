"""What a recompute asks profile for: only the traits, computed traits and events its rule reads (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from onecdp.profile.v1 import profile_service_pb2 as profile_pb

from services.segmentation.profile_source import FACTS_MASK, facts_of, scan_request
from services.segmentation.realtime import EVERY_FIELD, ProfileReads, events_read, profile_reads
from services.segmentation.rules import Rule
from services.segmentation.text import parse

pytestmark = pytest.mark.unit

AS_OF = datetime(2030, 6, 1, tzinfo=UTC)
RULES: dict[str, Rule] = {
    "pros": parse('traits.plan = "pro"'),
    "buyers": parse('event("order").count(last 30d) >= 2'),
    "pro-buyers": parse('segment("pros") AND segment("buyers") AND score("models/churn") < 0.5'),
    "bookish": parse('computed.top_categories CONTAINS "books" OR traits.country = "FR"'),
}


def test_profile_reads_name_the_traits_of_the_rule_and_the_segments_it_refers_to() -> None:
    assert profile_reads([RULES["pro-buyers"]], RULES, AS_OF) == ProfileReads(
        frozenset({"plan", "score_churn"}), computed=False)
    assert profile_reads([RULES["buyers"]], RULES, AS_OF) == ProfileReads(frozenset(), computed=False)
    assert profile_reads([RULES["bookish"]], RULES, AS_OF) == ProfileReads(frozenset({"country"}), computed=True)


def test_a_scan_request_asks_for_exactly_those_fields_and_events() -> None:
    rule = [RULES["pro-buyers"]]
    request = scan_request("0:1", AS_OF, events_read(rule, RULES, AS_OF), profile_reads(rule, RULES, AS_OF))
    assert list(request.read_mask.paths) == ["person_id", "traits.plan", "traits.score_churn"]
    assert list(request.event_names) == ["order"] and request.include_events
    assert request.events_start_time.ToDatetime(tzinfo=UTC) == AS_OF - timedelta(days=30, milliseconds=1)
    traits_only = [RULES["pros"]]
    request = scan_request("0:1", AS_OF, events_read(traits_only, RULES, AS_OF),
                           profile_reads(traits_only, RULES, AS_OF))
    assert list(request.read_mask.paths) == ["person_id", "traits.plan"]
    assert not request.include_events and not request.event_names and not request.HasField("events_start_time")
    bookish = [RULES["bookish"]]
    request = scan_request("0:1", AS_OF, events_read(bookish, RULES, AS_OF), profile_reads(bookish, RULES, AS_OF))
    assert list(request.read_mask.paths) == ["person_id", "traits.country", "computed", "preferences"]
    # Without a rule to go by (a size estimate), everything an evaluation can read.
    assert scan_request("0:1", AS_OF, events_read(bookish, RULES, AS_OF), EVERY_FIELD).read_mask == FACTS_MASK


def test_facts_carry_event_properties_only_when_a_rule_filters_or_aggregates_them() -> None:
    rules = {**RULES, "big": parse('event("order").sum(amount, last 30d) > 100'),
             "books": parse('event("order", category = "books").count(last 30d) >= 1')}
    order = profile_pb.Event(type=profile_pb.EVENT_TYPE_ORDER, order=profile_pb.Order(order_id="o1", amount=12.5))
    order.properties.update({"category": "books"})
    order.event_time.FromDatetime(AS_OF - timedelta(days=1, microseconds=7))
    old = profile_pb.Event(type=profile_pb.EVENT_TYPE_ORDER, order=profile_pb.Order(order_id="o0", amount=1.0))
    old.event_time.FromDatetime(AS_OF - timedelta(days=40))
    page = profile_pb.Event(type=profile_pb.EVENT_TYPE_TRACK, event_name="page")
    page.event_time.FromDatetime(AS_OF)
    profile = profile_pb.Profile(person_id="p1")
    profile.traits["plan"].value.string_value = "pro"
    stored = [profile_pb.StoredEvent(event=e) for e in (old, order, page)]
    visits = parse('event("page").count(last 30d) >= 1')
    counted = facts_of(profile, stored, events_read([visits], rules, AS_OF))
    assert events_read([visits], rules, AS_OF).properties is False
    # Only the events of the window, with their exact time; no properties: nothing reads them.
    assert [(e.name, e.time, dict(e.properties)) for e in counted.events] == [("page", AS_OF, {})]
    assert counted.traits == {"plan": "pro"}
    # A count of orders reads their amounts: a refund (a negative amount) is not counted.
    for segment in ("buyers", "big", "books"):
        read = events_read([rules[segment]], rules, AS_OF)
        assert read.properties
        assert [dict(e.properties) for e in facts_of(profile, stored, read).events] == [
            {"category": "books", "amount": 12.5, "order_id": "o1", "currency_code": "USD"}]
    # Without a selection (one person's explanation): every event, with its properties.
    assert [e.name for e in facts_of(profile, stored).events] == ["order", "order", "page"]
