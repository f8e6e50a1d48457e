"""A segment whose stored rule this version cannot read (stored under older, looser rules) does not take the
others down: it is listed and read as FAILED with its stored text, matches nobody, refuses what needs its rule
with FAILED_PRECONDITION naming it, and an update of its rule repairs it. Real gRPC, real Cassandra."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import field_mask_pb2
from onecdp.common.v1 import common_pb2
from onecdp.segmentation.v1 import segmentation_service_pb2 as pb
from onecdp.segmentation.v1 import segmentation_service_pb2_grpc as pb_grpc

from services.segmentation.catalog import SegmentCatalog
from services.segmentation.store import CATALOG, SegmentStore
from shared.cassandra import CassandraSession
from tests.services.segmentation.test_segments import create, failure

pytestmark = pytest.mark.integration

# Nesting deeper than today's 32 levels: what an older version accepted and stored.
TOO_DEEP = "NOT " * 40 + 'traits.plan = "pro"'


def test_an_unreadable_stored_rule_is_contained_and_repairable(segmentation: pb_grpc.SegmentationServiceStub,
                                                               segmentation_session: CassandraSession) -> None:
    create(segmentation, "old", 'traits.plan = "pro"')
    create(segmentation, "fine", 'traits.plan = "free"')
    create(segmentation, "uses-old", 'segment("old") OR traits.plan = "free"')
    # As an older version stored it (segment rows are only written with compare-and-set).
    applied = segmentation_session.execute("UPDATE segments SET rule_text = ? WHERE catalog = ? AND segment_id = ? "
                                           "IF EXISTS", (TOO_DEEP, CATALOG, "old")).one()
    assert applied[0]

    old = segmentation.GetSegment(pb.GetSegmentRequest(name="segments/old"), timeout=10)
    assert (old.state, old.rule_text, old.HasField("rule")) == (pb.SEGMENT_STATE_FAILED, TOO_DEEP, False)
    listed = segmentation.ListSegments(pb.ListSegmentsRequest(), timeout=10).segments
    assert [s.name for s in listed] == ["segments/fine", "segments/old", "segments/uses-old"]
    # (No profile service runs here, so the others' recomputes fail too: their states say nothing.)
    assert [s.HasField("rule") for s in listed] == [True, False, True]
    assert listed[1].state == pb.SEGMENT_STATE_FAILED and listed[1].rule_text == TOO_DEEP
    fine = segmentation.GetSegment(pb.GetSegmentRequest(name="segments/fine"), timeout=10)
    assert fine.rule_text == 'traits.plan = "free"' and fine.HasField("rule")

    # What needs its rule says which segment and what to do, before any work starts.
    for call, request in [
        (segmentation.RecomputeSegment, pb.RecomputeSegmentRequest(name="segments/old")),
        (segmentation.EstimateSegmentSize, pb.EstimateSegmentSizeRequest(segment="segments/old")),
        (segmentation.EvaluatePersonSegments, pb.EvaluatePersonSegmentsRequest(
            person=common_pb2.PersonSelector(person_id="p-1"), segments=["segments/old"])),
    ]:
        code, reason, _ = failure(call, request)
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "SEGMENT_RULE_UNREADABLE"), request

    # It, and the references to it, match nobody; the other rules are all there.
    rules = SegmentCatalog(SegmentStore(segmentation_session)).rules()
    assert sorted(rules) == ["fine", "uses-old"]

    # An update of its rule repairs it.
    repaired = segmentation.UpdateSegment(pb.UpdateSegmentRequest(
        segment=pb.Segment(name="segments/old", rule_text='traits.plan = "pro"'),
        update_mask=field_mask_pb2.FieldMask(paths=["rule_text"])), timeout=10)
    assert repaired.HasField("rule") and repaired.rule_text == 'traits.plan = "pro"'
    assert repaired.revision == old.revision + 1
    assert sorted(SegmentCatalog(SegmentStore(segmentation_session)).rules()) == ["fine", "old", "uses-old"]
