"""EvaluatePersonSegments says which conditions sit under a NOT, so a reader can tell why a person is out of
`... AND NOT segment("x")` although segment("x") matched. Real gRPC, real profile, real Cassandra."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from onecdp.common.v1 import common_pb2
from onecdp.profile.v1 import profile_service_pb2_grpc as profile_grpc
from onecdp.segmentation.v1 import segmentation_service_pb2 as pb
from onecdp.segmentation.v1 import segmentation_service_pb2_grpc as pb_grpc

from tests.services.segmentation.conftest import identify, ingest, track

pytestmark = pytest.mark.integration


def stamp(when: datetime) -> str:
    return when.astimezone(UTC).replace(tzinfo=None).isoformat()


def test_an_explanation_marks_the_conditions_under_a_not(stack: pb_grpc.SegmentationServiceStub,
                                                         profiles: profile_grpc.ProfileServiceStub) -> None:
    for segment_id, text in [("pros", 'traits.plan = "pro"'),
                             ("buyers-not-pro", 'event("buy").count(last 30d) >= 1 AND NOT segment("pros")'),
                             ("not-not-pro", 'NOT (NOT traits.plan = "pro")')]:
        stack.CreateSegment(pb.CreateSegmentRequest(segment_id=segment_id, segment=pb.Segment(rule_text=text)),
                            timeout=10)
    now = datetime.now(UTC)
    ann = ingest(profiles, identify("ann", stamp(now - timedelta(days=2)), {"plan": "pro"}),
                 track("ann", "buy", stamp(now - timedelta(days=1))))["ann"]
    explained = stack.EvaluatePersonSegments(pb.EvaluatePersonSegmentsRequest(
        person=common_pb2.PersonSelector(person_id=ann), segments=["segments/buyers-not-pro",
                                                                   "segments/not-not-pro"]), timeout=10)
    out, double = explained.evaluations
    assert not out.matched
    assert [(c.condition_text, c.matched, c.negated) for c in out.conditions] == [
        ('event("buy").count(last 30d) >= 1', True, False),
        ('segment("pros")', True, True),  # held, and the rule needs it not to: why ann is out
    ]
    assert double.matched
    assert [(c.condition_text, c.matched, c.negated) for c in double.conditions] == [
        ('traits.plan = "pro"', True, False)]
