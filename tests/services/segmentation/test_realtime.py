"""Real time over the real stack: profile changes move people in and out of segments without a recompute,
time windows expire people without any new event, and size estimates say how big their sample was."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf import struct_pb2
from onecdp.profile.v1 import profile_service_pb2 as profile_pb
from onecdp.profile.v1 import profile_service_pb2_grpc as profile_grpc
from onecdp.segmentation.v1 import segmentation_service_pb2 as pb
from onecdp.segmentation.v1 import segmentation_service_pb2_grpc as pb_grpc

from tests.services.segmentation.conftest import eventually, identify, ingest, order, track
from tests.services.segmentation.test_batch import finished, members_of, wait_ready

pytestmark = pytest.mark.integration


def stamp(when: datetime) -> str:
    return when.astimezone(UTC).replace(tzinfo=None).isoformat()


def changes_of(stub: pb_grpc.SegmentationServiceStub, segment_id: str) -> list[tuple[str, int, str]]:
    # Everything through now in one page (the settled default stops a second short of now).
    page = stub.ListSegmentMembershipChanges(pb.ListSegmentMembershipChangesRequest(
        parent=f"segments/{segment_id}", page_size=1000, include_unsettled=True), timeout=10)
    return [(c.person_id, c.type, c.cause) for c in page.changes]


ENTER, EXIT = pb.MEMBERSHIP_CHANGE_TYPE_ENTER, pb.MEMBERSHIP_CHANGE_TYPE_EXIT


def test_profile_changes_and_passing_time_move_members_without_a_recompute(
        stack: pb_grpc.SegmentationServiceStub, profiles: profile_grpc.ProfileServiceStub) -> None:
    rules = {
        "week-buyers": 'event("order").count(last 7d) >= 2',
        "pros": 'traits.plan = "pro"',
        "risky": 'score("models/churn-90d") >= 0.7',
        "pro-week-buyers": 'segment("pros") AND segment("week-buyers")',
        "not-pro": 'NOT segment("pros")',
        "just-visited": 'event("visit").count(last 1d) >= 1',
    }
    for segment_id, text in rules.items():
        stack.CreateSegment(pb.CreateSegmentRequest(segment_id=segment_id, segment=pb.Segment(rule_text=text)),
                            timeout=10)
    for segment_id in rules:  # nobody exists yet: every initial recompute is empty
        assert wait_ready(stack, f"segments/{segment_id}").member_count == 0

    now = datetime.now(UTC)
    persons = ingest(profiles, identify("ann", stamp(now - timedelta(days=40)), {"plan": "pro"}),
                     identify("bob", stamp(now - timedelta(days=40)), {"plan": "free"}),
                     order("ann", "a1", 10, stamp(now - timedelta(days=2))),
                     order("ann", "a2", 10, stamp(now - timedelta(days=1))),
                     order("bob", "b1", 10, stamp(now - timedelta(days=3))))
    ann, bob = persons["ann"], persons["bob"]
    members = {"week-buyers": [ann], "pros": [ann], "pro-week-buyers": [ann], "not-pro": [bob]}
    for segment_id in rules:
        assert eventually(lambda s=segment_id: members_of(stack, f"segments/{s}"),  # type: ignore[misc]
                          members.get(segment_id, [])) == members.get(segment_id, []), segment_id
    assert changes_of(stack, "pro-week-buyers") == [(ann, ENTER, "realtime")]

    # A second order moves bob in; a score written back by prediction moves him into "risky".
    ingest(profiles, order("bob", "b2", 10, stamp(now - timedelta(hours=1))))
    assert eventually(lambda: members_of(stack, "segments/week-buyers"), sorted([ann, bob])) == sorted([ann, bob])
    scores = struct_pb2.Struct()
    scores.update({"score_churn-90d": 0.9})
    profiles.BatchWriteTraits(profile_pb.BatchWriteTraitsRequest(writes=[profile_pb.TraitWrite(
        person_id=bob, traits=scores, source="prediction")]), timeout=10)
    assert eventually(lambda: members_of(stack, "segments/risky"), [bob]) == [bob]
    # Bob turning pro moves him across three segments at once, consistently.
    ingest(profiles, identify("bob", stamp(datetime.now(UTC)), {"plan": "pro"}))
    assert eventually(lambda: members_of(stack, "segments/pro-week-buyers"), sorted([ann, bob])) == sorted([ann, bob])
    assert members_of(stack, "segments/not-pro") == []
    assert changes_of(stack, "not-pro") == [(bob, ENTER, "realtime"), (bob, EXIT, "realtime")]

    # A visit just inside the 1-day window: in at once, out when the window passes it, with no new event.
    leaves_at = datetime.now(UTC) + timedelta(seconds=6)
    ingest(profiles, track("ann", "visit", stamp(leaves_at - timedelta(days=1))))
    assert eventually(lambda: members_of(stack, "segments/just-visited"), [ann]) == [ann]
    assert eventually(lambda: members_of(stack, "segments/just-visited"), [], timeout=20) == []
    assert datetime.now(UTC) >= leaves_at
    assert changes_of(stack, "just-visited") == [(ann, ENTER, "realtime"), (ann, EXIT, "expiry")]

    # Real time agrees with a batch recompute: nothing to repair.
    for segment_id in rules:
        operation = finished(stack, stack.RecomputeSegment(pb.RecomputeSegmentRequest(name=f"segments/{segment_id}"),
                                                           timeout=10))
        response = pb.RecomputeSegmentResponse()
        assert operation.response.Unpack(response)
        assert (response.entered_count, response.exited_count) == (0, 0), segment_id


def test_size_estimates_say_how_big_their_sample_was(stack: pb_grpc.SegmentationServiceStub,
                                                     profiles: profile_grpc.ProfileServiceStub) -> None:
    now = datetime.now(UTC)
    people = [f"e{i:02d}" for i in range(30)]
    ingest(profiles, *[identify(p, stamp(now - timedelta(days=1)), {"tier": i % 3}) for i, p in enumerate(people)])
    stack.CreateSegment(pb.CreateSegmentRequest(segment_id="tier-zero", segment=pb.Segment(
        rule_text="traits.tier = 0")), timeout=10)
    assert wait_ready(stack, "segments/tier-zero").member_count == 10

    # A sample as large as everything is a full count: exact, no margin.
    exact = stack.EstimateSegmentSize(pb.EstimateSegmentSizeRequest(segment="segments/tier-zero",
                                                                    sample_size=1000), timeout=30)
    assert (exact.estimated_count, exact.sample_size, exact.sample_matches, exact.estimated_total_profiles,
            exact.margin_of_error) == (10, 30, 10, 30, 0)
    by_text = stack.EstimateSegmentSize(pb.EstimateSegmentSizeRequest(rule_text="traits.tier >= 1"), timeout=30)
    assert (by_text.estimated_count, by_text.sample_size) == (20, 30)

    # A small sample scans a few shards only and says so, with a margin. The shards are small (30 profiles
    # over 256 shards: 0-2 each) and scanned in parallel only as far as needed, so the sample is close to
    # the size asked (64 shards, 4 at a time, gave 1,329 profiles for 200 asked).
    small = stack.EstimateSegmentSize(pb.EstimateSegmentSizeRequest(segment="segments/tier-zero", sample_size=3),
                                      timeout=30)
    assert 3 <= small.sample_size <= 6 and small.sample_matches <= small.sample_size
    half = stack.EstimateSegmentSize(pb.EstimateSegmentSizeRequest(segment="segments/tier-zero", sample_size=15),
                                     timeout=30)
    assert 15 <= half.sample_size <= 19
    assert small.margin_of_error > 0 and small.estimated_total_profiles >= small.sample_size

    for request, code in [
        (pb.EstimateSegmentSizeRequest(segment="segments/nope"), grpc.StatusCode.NOT_FOUND),
        (pb.EstimateSegmentSizeRequest(rule_text="traits.tier >="), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.EstimateSegmentSizeRequest(rule_text='segment("nope")'), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.EstimateSegmentSizeRequest(rule_text="traits.tier = 0", sample_size=100_001),
         grpc.StatusCode.INVALID_ARGUMENT),
        (pb.EstimateSegmentSizeRequest(), grpc.StatusCode.INVALID_ARGUMENT),
    ]:
        with pytest.raises(grpc.RpcError) as caught:
            stack.EstimateSegmentSize(request, timeout=30)
        assert caught.value.code() == code, request
