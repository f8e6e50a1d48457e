"""A rule change reaches the segments that refer to the changed one (directly or through others): they are
recomputed too, over the real stack (identity + profile + segmentation, real gRPC and Cassandra)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf import field_mask_pb2
from onecdp.profile.v1 import profile_service_pb2_grpc as profile_grpc
from onecdp.segmentation.v1 import segmentation_service_pb2 as pb
from onecdp.segmentation.v1 import segmentation_service_pb2_grpc as pb_grpc

from shared.changefeed import SETTLE_SECONDS
from tests.services.segmentation.conftest import eventually, identify, ingest
from tests.services.segmentation.test_batch import members_of, wait_ready

pytestmark = pytest.mark.integration

RULES = {
    "pros": 'traits.plan = "pro"',
    "adult-pros": 'segment("pros") AND traits.age >= 18',  # refers to pros
    "not-adult-pros": 'NOT segment("adult-pros")',  # refers to pros through adult-pros
    "adults": "traits.age >= 18",  # refers to nothing: not recomputed
}


def test_a_rule_change_recomputes_the_segments_referring_to_it(
        stack: pb_grpc.SegmentationServiceStub, profiles: profile_grpc.ProfileServiceStub) -> None:
    when = (datetime.now(UTC) - timedelta(days=3)).replace(tzinfo=None).isoformat()
    ids = ingest(profiles, identify("ann", when, {"plan": "pro", "age": 30}),
                 identify("bob", when, {"plan": "free", "age": 40}),
                 identify("cat", when, {"plan": "pro", "age": 10}))
    ann, bob, cat = ids["ann"], ids["bob"], ids["cat"]
    for segment_id, text in RULES.items():
        stack.CreateSegment(pb.CreateSegmentRequest(segment_id=segment_id, segment=pb.Segment(rule_text=text)),
                            timeout=10)
    before = {"pros": sorted([ann, cat]), "adult-pros": [ann], "not-adult-pros": sorted([bob, cat]),
              "adults": sorted([ann, bob])}
    for segment_id, members in before.items():
        assert wait_ready(stack, f"segments/{segment_id}").state == pb.SEGMENT_STATE_READY
        assert eventually(lambda s=segment_id: members_of(stack, f"segments/{s}"),  # type: ignore[misc]
                          members) == members, segment_id
    adults_operation = stack.GetSegment(pb.GetSegmentRequest(name="segments/adults"), timeout=10).operation
    time.sleep(SETTLE_SECONDS)  # the changes so far settle: the cursor below passes them all
    seen = stack.ListSegmentMembershipChanges(pb.ListSegmentMembershipChangesRequest(
        parent="segments/not-adult-pros", page_size=100), timeout=10).next_page_token

    stack.UpdateSegment(pb.UpdateSegmentRequest(
        segment=pb.Segment(name="segments/pros", rule_text='traits.plan = "free"'),
        update_mask=field_mask_pb2.FieldMask(paths=["rule_text"])), timeout=10)
    after = {"pros": [bob], "adult-pros": [bob], "not-adult-pros": sorted([ann, cat]), "adults": sorted([ann, bob])}
    for segment_id, members in after.items():
        assert eventually(lambda s=segment_id: members_of(stack, f"segments/{s}"),  # type: ignore[misc]
                          members) == members, segment_id
    # The dependent's own operation recorded the difference.
    recorded = [(ann, pb.MEMBERSHIP_CHANGE_TYPE_ENTER, "recompute"), (bob, pb.MEMBERSHIP_CHANGE_TYPE_EXIT, "recompute")]
    assert eventually(lambda: [(c.person_id, c.type, c.cause) for c in stack.ListSegmentMembershipChanges(
        pb.ListSegmentMembershipChangesRequest(parent="segments/not-adult-pros", page_size=100, page_token=seen),
        timeout=10).changes], recorded) == recorded
    dependent = stack.GetSegment(pb.GetSegmentRequest(name="segments/adult-pros"), timeout=10)
    assert dependent.operation and dependent.revision == 1  # recomputed, its own rule unchanged
    assert stack.GetSegment(pb.GetSegmentRequest(name="segments/adults"), timeout=10).operation == adults_operation
