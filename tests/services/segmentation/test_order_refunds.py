"""Orders and refunds mean in segmentation what they mean in profile and prediction (README, "orders and refunds"):
an `order` event is a signed money movement, a refund a negative amount under the order id it refunds. Counts of
orders count purchases only, `sum(amount)` is net, min/max read purchases, avg is the net sum over the purchases;
the same in real time, after a recompute and in explanations. Real gRPC, real profile, real Cassandra."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from google.protobuf import json_format, struct_pb2
from onecdp.common.v1 import common_pb2
from onecdp.profile.v1 import profile_service_pb2 as profile_pb
from onecdp.profile.v1 import profile_service_pb2_grpc as profile_grpc
from onecdp.segmentation.v1 import segmentation_service_pb2 as pb
from onecdp.segmentation.v1 import segmentation_service_pb2_grpc as pb_grpc

from services.segmentation.evaluation import EventFact, ProfileFacts, compile_rule, evaluate
from services.segmentation.realtime import events_read
from services.segmentation.rules import Rule
from services.segmentation.text import parse
from tests.services.segmentation.conftest import eventually, identify, ingest, order
from tests.services.segmentation.test_batch import finished, members_of, wait_ready

pytestmark = pytest.mark.integration

RULES = {
    "pro-twice": 'traits.plan = "pro" AND event("order").count(last 30d) >= 2',
    "once": 'event("order").count(last 30d) = 1',
    "net-half": 'event("order").sum(amount, last 30d) BETWEEN 24 AND 25',
    "no-negative-order": 'event("order").min(amount, last 30d) >= 0',
    "big-order": 'event("order").max(amount, last 30d) >= 48',
    "net-average": 'event("order").avg(amount, last 30d) BETWEEN 24 AND 25',
    "filtered-purchase": 'event("order", amount >= 0).count(last 30d) = 1',
}


def plain(value: struct_pb2.Value) -> Any:
    """An observed value as Python (a number as a float)."""
    return json_format.MessageToDict(value)


def stamp(when: datetime) -> str:
    return when.astimezone(UTC).replace(tzinfo=None).isoformat()


def test_a_refund_is_no_order_counted_and_nets_out_of_sums(stack: pb_grpc.SegmentationServiceStub,
                                                          profiles: profile_grpc.ProfileServiceStub) -> None:
    for segment_id, text in RULES.items():
        stack.CreateSegment(pb.CreateSegmentRequest(segment_id=segment_id, segment=pb.Segment(rule_text=text)),
                            timeout=10)
    for segment_id in RULES:
        assert wait_ready(stack, f"segments/{segment_id}").member_count == 0
    now = datetime.now(UTC)
    persons = ingest(profiles, identify("p59", stamp(now - timedelta(days=10)), {"plan": "pro"}),
                     identify("two", stamp(now - timedelta(days=10)), {"plan": "pro"}),
                     order("p59", "o59-0", 48.48, stamp(now - timedelta(days=5))),
                     order("p59", "o59-0", -24.24, stamp(now - timedelta(days=4))),
                     order("two", "t-0", 10, stamp(now - timedelta(days=5))),
                     order("two", "t-1", 10, stamp(now - timedelta(days=4))))
    p59, two = persons["p59"], persons["two"]
    profile = profiles.GetProfile(profile_pb.GetProfileRequest(person=common_pb2.PersonSelector(person_id=p59)),
                                  timeout=10)
    assert profile.computed.frequency == 1  # profile's own count: the segment must agree with it
    expected = {"pro-twice": [two], "once": [p59], "net-half": [p59], "no-negative-order": sorted([p59, two]),
                "big-order": [p59], "net-average": [p59], "filtered-purchase": [p59]}

    def memberships() -> dict[str, list[str]]:
        return {segment_id: sorted(members_of(stack, f"segments/{segment_id}")) for segment_id in RULES}

    assert eventually(memberships, expected) == expected  # real time

    explained = stack.EvaluatePersonSegments(pb.EvaluatePersonSegmentsRequest(
        person=common_pb2.PersonSelector(person_id=p59), segments=[f"segments/{s}" for s in RULES]), timeout=10)
    observed = {e.segment: [(c.condition_text, plain(c.observed_value)) for c in e.conditions]
                for e in explained.evaluations}
    assert observed["segments/pro-twice"][1] == ('event("order").count(last 30d) >= 2', 1)
    assert observed["segments/net-half"][0][1] == pytest.approx(24.24)
    assert observed["segments/no-negative-order"][0][1] == pytest.approx(48.48)  # the purchase, not the refund
    assert observed["segments/big-order"][0][1] == pytest.approx(48.48)
    assert observed["segments/net-average"][0][1] == pytest.approx(24.24)  # net sum over one purchase
    assert observed["segments/filtered-purchase"][0][1] == 1
    assert all(e.matched == e.stored_member for e in explained.evaluations)

    for segment_id in RULES:  # a recompute agrees: nothing to repair
        operation = finished(stack, stack.RecomputeSegment(pb.RecomputeSegmentRequest(name=f"segments/{segment_id}"),
                                                           timeout=10))
        response = pb.RecomputeSegmentResponse()
        assert operation.response.Unpack(response)
        assert (response.entered_count, response.exited_count) == (0, 0), segment_id
    assert memberships() == expected


def test_a_count_of_orders_reads_their_amounts_and_the_rule_is_the_same_for_every_caller() -> None:
    """A count of orders needs `amount` to tell a refund (so a recompute or real-time round of that rule alone
    converts properties), and evaluate (explanations) and compile_rule (recompute, real time) agree."""
    now = datetime.now(UTC)
    no_rules: dict[str, Rule] = {}
    count = parse('event("order").count(last 30d) >= 2')
    assert events_read([count], no_rules, now).properties
    assert not events_read([parse('event("visit").count(last 30d) >= 2')], no_rules, now).properties
    facts = ProfileFacts("p", {}, {}, [
        EventFact("order", now - timedelta(days=2), {"amount": 48.48, "order_id": "o"}),
        EventFact("order", now - timedelta(days=1), {"amount": -24.24, "order_id": "o"}),
        EventFact("order", now - timedelta(hours=1), {"order_id": "no-amount"}),  # no number: not a refund
    ])
    expected = {'event("order").count(last 30d) >= 2': (True, 2),
                'event("order").count(last 30d) >= 3': (False, 2),
                'event("order", amount < 0).count(last 30d) >= 1': (False, 0),  # refunds are never counted
                'event("order").sum(amount, last 30d) = 24.24': (True, 24.24),
                'event("order").min(amount, last 30d) = 48.48': (True, 48.48),
                'event("order").max(amount, last 30d) = 48.48': (True, 48.48),
                'event("order").avg(amount, last 30d) = 24.24': (True, 24.24),
                'event("order", amount < 0).avg(amount, last 30d) < 0': (False, None),  # no purchase: no value
                'event("order", amount < 0).sum(amount, last 30d) = -24.24': (True, -24.24)}
    for text, (matched, observed) in expected.items():
        rule = parse(text)
        evaluation = evaluate(rule, facts, now, no_rules.get)
        assert (evaluation.matched, evaluation.conditions[0].observed) == (matched, observed), text
        assert compile_rule(rule, now, no_rules.get)(facts) is matched, text
