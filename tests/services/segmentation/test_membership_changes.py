"""ListSegmentMembershipChanges from a start time, over real gRPC and Cassandra: any start a Timestamp can hold
gives what a user expects (everything since 0001-01-01 is everything), to the microsecond, and a start no
change can follow is INVALID_ARGUMENT on `start_time`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf import timestamp_pb2
from onecdp.segmentation.v1 import segmentation_service_pb2 as pb
from onecdp.segmentation.v1 import segmentation_service_pb2_grpc as pb_grpc

from services.segmentation.catalog import RuleInput, SegmentCatalog
from services.segmentation.store import SegmentStore
from services.segmentation.text import parse
from shared.cassandra import CassandraSession
from shared.runner import RunningService
from tests.services.segmentation.test_segments import failure

pytestmark = pytest.mark.integration


def changes_since(stub: pb_grpc.SegmentationServiceStub, start: timestamp_pb2.Timestamp | None = None,
                  token: str = "") -> pb.ListSegmentMembershipChangesResponse:
    request = pb.ListSegmentMembershipChangesRequest(parent="segments/pinged", page_size=100, page_token=token)
    if start is not None:
        request.start_time.CopyFrom(start)
    response: pb.ListSegmentMembershipChangesResponse = stub.ListSegmentMembershipChanges(request, timeout=10)
    return response


def timestamp(when: datetime) -> timestamp_pb2.Timestamp:
    message = timestamp_pb2.Timestamp()
    message.FromDatetime(when)
    return message


def test_changes_since_a_start_time(segmentation_alone: RunningService,
                                   segmentation_session: CassandraSession) -> None:
    store = SegmentStore(segmentation_session)
    SegmentCatalog(store).create("pinged", "", "", RuleInput(parse('event("ping").count(last 1d) >= 1'),
                                                             "segment.rule_text", True))
    store.apply_changes("pinged", ["ann"], [], "realtime", datetime.now(UTC))
    with grpc.insecure_channel(f"127.0.0.1:{segmentation_alone.port}") as channel:
        stub = pb_grpc.SegmentationServiceStub(channel)
        [ann] = changes_since(stub).changes
        assert ann.person_id == "ann"

        # The earliest start a Timestamp can hold: everything, and a token that sees what comes next.
        earliest = changes_since(stub, timestamp_pb2.Timestamp(seconds=-62_135_596_800))
        assert [c.person_id for c in earliest.changes] == ["ann"]
        since_1000 = changes_since(stub, timestamp(datetime(1000, 1, 1, tzinfo=UTC)))
        assert [c.person_id for c in since_1000.changes] == ["ann"]
        store.apply_changes("pinged", ["bob"], [], "realtime", datetime.now(UTC))
        assert [c.person_id for c in changes_since(stub, token=earliest.next_page_token).changes] == ["bob"]

        # A change at the start time is included; one a microsecond before it is not.
        at = ann.change_time.ToDatetime(tzinfo=UTC)
        assert [c.person_id for c in changes_since(stub, timestamp(at)).changes] == ["ann", "bob"]
        assert [c.person_id for c in changes_since(stub, timestamp(at + timedelta(microseconds=1))).changes] == [
            "bob"]

        for start in (timestamp_pb2.Timestamp(seconds=253_402_300_800),  # after 9999-12-31
                      timestamp_pb2.Timestamp(seconds=0, nanos=-1),
                      timestamp(datetime(6000, 1, 1, tzinfo=UTC))):  # past the last time a change id can name
            code, _, fields = failure(stub.ListSegmentMembershipChanges, pb.ListSegmentMembershipChangesRequest(
                parent="segments/pinged", start_time=start))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and set(fields) == {"start_time"}, start
