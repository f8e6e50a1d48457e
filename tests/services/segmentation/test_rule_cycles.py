"""Rule changes are checked one after another, so two concurrent ones cannot close a cycle of segment
references together (real Cassandra); and a cycle that got in anyway (saved before that, or written by hand)
makes the segments in it match nobody: real time goes on, a person's evaluation answers, and a recompute of
such a segment fails with FAILED_PRECONDITION naming the cycle (the real stack: identity + profile +
segmentation, real gRPC and Cassandra)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from google.rpc import code_pb2
from onecdp.common.v1 import common_pb2
from onecdp.profile.v1 import profile_service_pb2_grpc as profile_grpc
from onecdp.segmentation.v1 import segmentation_service_pb2 as pb
from onecdp.segmentation.v1 import segmentation_service_pb2_grpc as pb_grpc

from services.segmentation.catalog import RuleInput, SegmentCatalog, SegmentState
from services.segmentation.store import SegmentStore
from services.segmentation.text import format_rule, parse
from shared.cassandra import CassandraSession
from shared.errors import InvalidArgument
from tests.services.segmentation.conftest import eventually, identify, ingest
from tests.services.segmentation.test_batch import finished, members_of, wait_ready

pytestmark = pytest.mark.integration


def test_a_cycle_matches_nobody_and_real_time_goes_on(stack: pb_grpc.SegmentationServiceStub,
                                                      profiles: profile_grpc.ProfileServiceStub,
                                                      segmentation_session: CassandraSession) -> None:
    long_ago = (datetime.now(UTC) - timedelta(days=3)).replace(tzinfo=None).isoformat()
    ann = ingest(profiles, identify("ann", long_ago, {"plan": "pro", "age": 30}))["ann"]
    for segment_id, text in [("a", 'traits.plan = "pro"'), ("b", 'segment("a") AND traits.age >= 18'),
                             ("pros", 'traits.plan = "pro"')]:
        stack.CreateSegment(pb.CreateSegmentRequest(segment_id=segment_id, segment=pb.Segment(rule_text=text)),
                            timeout=10)
        assert wait_ready(stack, f"segments/{segment_id}").state == pb.SEGMENT_STATE_READY
    assert eventually(lambda: members_of(stack, "segments/b"), [ann]) == [ann]

    # What the update of a to `segment("b")` saves when it was checked before b referred to a.
    store = SegmentStore(segmentation_session)
    current = store.get("a")
    assert current is not None
    rule = parse('segment("b")')
    assert store.replace(replace(current, rule_text=format_rule(rule), referenced=frozenset({"b"}),
                                 revision=current.revision + 1, state=SegmentState.COMPUTING), current.etag)

    # Real time goes on: bob turns up and enters pros at once.
    bob = ingest(profiles, identify("bob", long_ago, {"plan": "pro", "age": 40}))["bob"]
    assert eventually(lambda: members_of(stack, "segments/pros"), sorted([ann, bob])) == sorted([ann, bob])
    # A person's evaluation answers: the segments in the cycle match nobody.
    explained = stack.EvaluatePersonSegments(pb.EvaluatePersonSegmentsRequest(
        person=common_pb2.PersonSelector(person_id=bob)), timeout=10)
    assert {e.segment: e.matched for e in explained.evaluations} == {
        "segments/a": False, "segments/b": False, "segments/pros": True}
    # A recompute says why.
    operation = finished(stack, stack.RecomputeSegment(pb.RecomputeSegmentRequest(name="segments/a"), timeout=10))
    assert operation.done and operation.error.code == code_pb2.FAILED_PRECONDITION, operation
    assert "segments/a -> segments/b -> segments/a" in operation.error.message
    assert wait_ready(stack, "segments/a", timeout=5).state == pb.SEGMENT_STATE_FAILED


def test_rule_changes_are_checked_one_after_another(segmentation_session: CassandraSession) -> None:
    """The update of a to `segment("b")` is checked while b's change to `segment("a")` is saved (asking
    whether a score's model exists is the moment): a's check is run again against b's new rule, and refused."""
    store = SegmentStore(segmentation_session)
    concurrent = SegmentCatalog(store)
    pending = [lambda: concurrent.update("b", ["rule_text"], display_name="", description="", etag="",
                                         rule_input=RuleInput(parse('segment("a")'), "segment.rule_text", True))]

    def model_exists(name: str) -> bool:
        while pending:
            pending.pop()()  # b's change, saved in between
        return True

    catalog = SegmentCatalog(store, model_exists=model_exists)
    catalog.create("a", "", "", RuleInput(parse('traits.plan = "pro"'), "segment.rule_text", True))
    catalog.create("b", "", "", RuleInput(parse("traits.age >= 18"), "segment.rule_text", True))
    with pytest.raises(InvalidArgument) as refused:
        catalog.update("a", ["rule_text"], display_name="", description="", etag="", rule_input=RuleInput(
            parse('segment("b") AND score("models/churn") >= 0.5'), "segment.rule_text", True))
    assert [v.field for v in refused.value.field_violations] == ["segment.rule_text"]
    assert "cycle of segment references: segments/a -> segments/b -> segments/a" in str(
        refused.value.field_violations[0].description)
    assert not pending
    assert (catalog.get("a").rule_text, catalog.get("b").rule_text) == ('traits.plan = "pro"', 'segment("a")')
