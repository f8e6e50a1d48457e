"""Batch over the real stack (identity + profile + segmentation, real gRPC and Cassandra): recompute as an
operation, members (pages and export), membership changes and per-person explanations, all checked against an
independent pandas evaluation of the same events."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pandas as pd
import pytest
from google.longrunning import operations_pb2
from google.protobuf import field_mask_pb2
from onecdp.common.v1 import common_pb2
from onecdp.profile.v1 import profile_service_pb2 as profile_pb
from onecdp.profile.v1 import profile_service_pb2_grpc as profile_grpc
from onecdp.segmentation.v1 import segmentation_service_pb2 as pb
from onecdp.segmentation.v1 import segmentation_service_pb2_grpc as pb_grpc

from tests.services.segmentation.conftest import eventually, identify, ingest, order, track

pytestmark = pytest.mark.integration
NOW = datetime.now(UTC).replace(microsecond=0)
PERSONS = [f"p{i:02d}" for i in range(14)]


def days_ago(days: float) -> str:
    return (NOW - timedelta(days=days)).isoformat().replace("+00:00", "")


def synthetic_events() -> tuple[list[profile_pb.Event], pd.DataFrame, pd.DataFrame]:
    """Events of 14 persons, and the same facts as two frames (traits; events) for the reference."""
    events: list[profile_pb.Event] = []
    traits, rows = [], []
    for i, person in enumerate(PERSONS):
        plan = "pro" if i % 3 == 0 else "free"
        events.append(identify(person, days_ago(200), {"plan": plan, "age": 20 + i}))
        traits.append({"person": person, "plan": plan, "age": 20 + i})
        for k in range(i % 5):
            when, amount = days_ago(3 + 11 * k + i), 10.0 + 7 * i + k
            events.append(order(person, f"{person}-o{k}", amount, when))
            rows.append({"person": person, "name": "order", "days_ago": 3 + 11 * k + i, "amount": amount, "url": ""})
        if i % 4 == 1:
            url = "/pricing" if i % 8 == 1 else "/home"
            events.append(track(person, "page_view", days_ago(2), {"url": url}))
            rows.append({"person": person, "name": "page_view", "days_ago": 2, "amount": None, "url": url})
    return events, pd.DataFrame(traits).set_index("person"), pd.DataFrame(rows)


def reference(traits: pd.DataFrame, events: pd.DataFrame) -> dict[str, set[str]]:
    """The members each segment should have, by pandas over the ingested facts."""
    orders = events[events.name == "order"]
    purchases = orders[orders.amount >= 0]  # counts count purchases only (a refund is negative); sums are net
    count_30 = purchases[purchases.days_ago < 30].groupby("person").size().reindex(traits.index, fill_value=0)
    sum_60 = orders[orders.days_ago < 60].groupby("person").amount.sum().reindex(traits.index, fill_value=0.0)
    frequency = purchases.groupby("person").size().reindex(traits.index, fill_value=0)
    pricing = events[(events.name == "page_view") & events.url.str.contains("pricing") & (events.days_ago < 7)]
    saw_pricing = traits.index.isin(pricing.person)
    pros = set(traits.index[traits.plan == "pro"])
    return {
        "pros": pros,
        "recent-buyers": set(count_30.index[count_30 >= 2]),
        "spenders": set(sum_60.index[sum_60 > 100]),
        "frequent-free": set(frequency.index[frequency >= 3]) - pros,
        "young-no-pricing": set(traits.index[~saw_pricing & traits.age.between(22, 28)]),
    }


RULES = {
    "pros": 'traits.plan = "pro"',
    "recent-buyers": 'event("order").count(last 30d) >= 2',
    "spenders": 'event("order").sum(amount, last 60d) > 100',
    "frequent-free": 'computed.frequency >= 3 AND NOT segment("pros")',
    "young-no-pricing": 'event("page_view", url CONTAINS "pricing").count(last 7d) = 0 '
                        'AND traits.age BETWEEN 22 AND 28',
}


def wait_ready(stub: pb_grpc.SegmentationServiceStub, name: str, timeout: float = 60) -> pb.Segment:
    end = time.monotonic() + timeout
    while True:
        segment: pb.Segment = stub.GetSegment(pb.GetSegmentRequest(name=name), timeout=10)
        if segment.state == pb.SEGMENT_STATE_READY or time.monotonic() > end:
            return segment
        time.sleep(0.3)


def finished(stub: pb_grpc.SegmentationServiceStub, operation: operations_pb2.Operation,
             timeout: float = 60) -> operations_pb2.Operation:
    end = time.monotonic() + timeout
    while not operation.done and time.monotonic() < end:
        time.sleep(0.3)
        operation = stub.GetOperation(operations_pb2.GetOperationRequest(name=operation.name), timeout=10)
    return operation


def members_of(stub: pb_grpc.SegmentationServiceStub, name: str) -> list[str]:
    members, token = [], ""
    while True:
        page = stub.ListSegmentMembers(pb.ListSegmentMembersRequest(parent=name, page_size=3, page_token=token),
                                       timeout=10)
        members += [m.person_id for m in page.members]
        token = page.next_page_token
        if not token:
            return members


def test_recompute_matches_an_independent_evaluation(stack: pb_grpc.SegmentationServiceStub,
                                                     profiles: profile_grpc.ProfileServiceStub) -> None:
    events, traits, facts = synthetic_events()
    person_ids = ingest(profiles, *events)
    expected = {segment: {person_ids[p] for p in persons} for segment, persons in reference(traits, facts).items()}
    assert all(expected.values()) and len({frozenset(v) for v in expected.values()}) == len(expected)  # distinct

    for segment_id, text in RULES.items():  # creating computes at once
        stack.CreateSegment(pb.CreateSegmentRequest(segment_id=segment_id, segment=pb.Segment(rule_text=text)),
                            timeout=10)
    for segment_id, persons in expected.items():
        segment = wait_ready(stack, f"segments/{segment_id}")
        assert segment.state == pb.SEGMENT_STATE_READY and segment.HasField("last_recompute_time")
        assert segment.member_count == len(persons), segment_id
        assert members_of(stack, segment.name) == sorted(persons), segment_id
        exported = [m.person_id for chunk in stack.ExportSegmentMembers(
            pb.ExportSegmentMembersRequest(parent=segment.name), timeout=10) for m in chunk.members]
        assert exported == sorted(persons)

    # An explicit recompute as an operation: nothing changed, so nobody enters or leaves.
    started = stack.RecomputeSegment(pb.RecomputeSegmentRequest(name="segments/spenders", parallelism=3), timeout=10)
    operation = finished(stack, started)
    assert operation.done and not operation.HasField("error")
    metadata, response = pb.RecomputeSegmentMetadata(), pb.RecomputeSegmentResponse()
    operation.metadata.Unpack(metadata)
    operation.response.Unpack(response)
    assert (metadata.shards_done, metadata.shards_total, metadata.profiles_scanned) == (6, 6, len(PERSONS))
    assert (response.member_count, response.entered_count, response.exited_count) == (len(expected["spenders"]), 0, 0)

    # A person's evaluation explains every condition and agrees with the stored membership.
    someone = sorted(expected["frequent-free"])[0]
    explained = stack.EvaluatePersonSegments(pb.EvaluatePersonSegmentsRequest(
        person=common_pb2.PersonSelector(person_id=someone)), timeout=10)
    by_segment = {e.segment: e for e in explained.evaluations}
    assert set(by_segment) == {f"segments/{s}" for s in RULES}
    for segment_id, persons in expected.items():
        evaluation = by_segment[f"segments/{segment_id}"]
        assert evaluation.matched == evaluation.stored_member == (someone in persons)
    frequent = by_segment["segments/frequent-free"].conditions
    assert [c.condition_text for c in frequent] == ["computed.frequency >= 3", 'segment("pros")']
    assert frequent[0].matched and frequent[0].observed_value.number_value >= 3 and not frequent[1].matched
    # A trait the person does not have is an unset value, not an empty one (which protojson cannot print).
    stack.CreateSegment(pb.CreateSegmentRequest(segment_id="nicknamed",
                                                segment=pb.Segment(rule_text='traits.nickname = "ace"')), timeout=10)
    missing = stack.EvaluatePersonSegments(pb.EvaluatePersonSegmentsRequest(
        person=common_pb2.PersonSelector(person_id=someone), segments=["segments/nicknamed"]), timeout=10)
    [condition] = missing.evaluations[0].conditions
    assert not condition.matched and not condition.HasField("observed_value")

    # New orders move a person in real time (at once); a recompute afterwards has nothing to record.
    buyer = next(p for p in PERSONS if person_ids[p] not in expected["recent-buyers"])

    def changes_after(token: str) -> pb.ListSegmentMembershipChangesResponse:
        page: pb.ListSegmentMembershipChangesResponse = stack.ListSegmentMembershipChanges(
            pb.ListSegmentMembershipChangesRequest(parent="segments/recent-buyers", page_token=token, page_size=1000),
            timeout=10)
        return page

    # Real time follows the same ingest as the recompute: either may record a person's enter first. A page
    # holds a change once it has settled (a second after it was stamped).
    entered_before = [(p, pb.MEMBERSHIP_CHANGE_TYPE_ENTER) for p in sorted(expected["recent-buyers"])]
    assert eventually(lambda: sorted((c.person_id, c.type) for c in changes_after("").changes),
                      entered_before) == entered_before
    before = changes_after("")
    assert {c.cause for c in before.changes} <= {"recompute", "realtime"}
    ingest(profiles, order(buyer, f"{buyer}-late-1", 5.0, days_ago(1)), order(buyer, f"{buyer}-late-2", 5.0,
                                                                            days_ago(0.5)))

    entered = [(person_ids[buyer], pb.MEMBERSHIP_CHANGE_TYPE_ENTER, "realtime")]
    assert eventually(lambda: [(c.person_id, c.type, c.cause) for c in changes_after(before.next_page_token).changes],
                      entered) == entered
    operation = finished(stack, stack.RecomputeSegment(pb.RecomputeSegmentRequest(name="segments/recent-buyers"),
                                                       timeout=10))
    operation.response.Unpack(response)
    assert (response.entered_count, response.exited_count) == (0, 0)

    # A rule change is computed at once: exactly the difference enters and leaves, enters first, oldest first.
    late = pd.DataFrame([{"person": buyer, "name": "order", "days_ago": d, "amount": 5.0, "url": ""} for d in (1, 0.5)])
    now_expected = {segment: {person_ids[p] for p in persons}
                    for segment, persons in reference(traits, pd.concat([facts, late])).items()}
    old = now_expected["recent-buyers"]
    assert old == expected["recent-buyers"] | {person_ids[buyer]}
    # Another segment's rule, one that some members do not meet and some non-members do.
    target = next(s for s in RULES if now_expected[s] - old and old - now_expected[s])
    new = now_expected[target]
    seen = changes_after(before.next_page_token).next_page_token
    stack.UpdateSegment(pb.UpdateSegmentRequest(segment=pb.Segment(name="segments/recent-buyers",
                                                                   rule_text=RULES[target]),
                                                update_mask=field_mask_pb2.FieldMask(paths=["rule_text"])), timeout=10)
    assert wait_ready(stack, "segments/recent-buyers").member_count == len(new)
    difference = [*[(p, pb.MEMBERSHIP_CHANGE_TYPE_ENTER, "recompute") for p in sorted(new - old)],
                  *[(p, pb.MEMBERSHIP_CHANGE_TYPE_EXIT, "recompute") for p in sorted(old - new)]]
    assert eventually(lambda: [(c.person_id, c.type, c.cause) for c in changes_after(seen).changes],
                      difference) == difference  # once settled
    assert changes_after(seen).next_page_token  # a poller can always resume


def test_batch_errors(stack: pb_grpc.SegmentationServiceStub) -> None:
    for call, request in [
        (stack.RecomputeSegment, pb.RecomputeSegmentRequest(name="segments/nope")),
        (stack.ListSegmentMembers, pb.ListSegmentMembersRequest(parent="segments/nope")),
        (stack.GetOperation, operations_pb2.GetOperationRequest(name="operations/nope")),
    ]:
        with pytest.raises(grpc.RpcError) as caught:
            call(request, timeout=10)
        error: Any = caught.value
        assert error.code().name == "NOT_FOUND"
