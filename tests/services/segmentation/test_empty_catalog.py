"""Once its last segment is deleted, the catalog partition keeps only its version (a static column) and
reads as one row of nulls: every read of the catalog still answers as for no segments. Real gRPC, real
Cassandra."""

from __future__ import annotations

import grpc
import pytest
from onecdp.segmentation.v1 import segmentation_service_pb2 as pb
from onecdp.segmentation.v1 import segmentation_service_pb2_grpc as pb_grpc

from services.segmentation.catalog import SegmentCatalog
from services.segmentation.store import SegmentStore
from shared.cassandra import CassandraSession
from tests.services.segmentation.test_segments import create, failure

pytestmark = pytest.mark.integration


def test_a_catalog_whose_segments_were_all_deleted_reads_as_empty(segmentation: pb_grpc.SegmentationServiceStub,
                                                                  segmentation_session: CassandraSession) -> None:
    only = create(segmentation, "only", 'traits.plan = "pro"')
    segmentation.DeleteSegment(pb.DeleteSegmentRequest(name=only.name, etag=only.etag), timeout=10)

    assert SegmentCatalog(SegmentStore(segmentation_session)).rules() == {}
    assert list(segmentation.ListSegments(pb.ListSegmentsRequest(), timeout=10).segments) == []
    code, reason, _ = failure(segmentation.EstimateSegmentSize, pb.EstimateSegmentSizeRequest(segment=only.name))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "SEGMENT_NOT_FOUND")
    # And a new segment may refer to no deleted one.
    code, reason, _ = failure(segmentation.CreateSegment, pb.CreateSegmentRequest(
        segment_id="again", segment=pb.Segment(rule_text='segment("only")')))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, reason
