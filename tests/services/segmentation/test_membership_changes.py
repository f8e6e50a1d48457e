"""ListSegmentMembershipChanges over real gRPC and Cassandra.

From a start time: any start a Timestamp can hold gives what a user expects (everything since 0001-01-01 is
everything), to the microsecond, and a start no change can follow is INVALID_ARGUMENT on `start_time`.
A poller resuming from each next_page_token never misses a change, even one written after a later-stamped
one (pages stop a settle time short of now); `include_unsettled` shows the newest changes at once without
moving the cursor past them."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from cassandra.util import uuid_from_time
from google.protobuf import timestamp_pb2
from onecdp.segmentation.v1 import segmentation_service_pb2 as pb
from onecdp.segmentation.v1 import segmentation_service_pb2_grpc as pb_grpc

from services.segmentation.catalog import RuleInput, SegmentCatalog
from services.segmentation.store import SegmentStore
from services.segmentation.text import parse
from shared.cassandra import CassandraSession
from shared.changefeed import SETTLE_SECONDS
from shared.runner import RunningService
from tests.services.segmentation.conftest import eventually
from tests.services.segmentation.test_segments import failure

pytestmark = pytest.mark.integration


def changes_since(stub: pb_grpc.SegmentationServiceStub, start: timestamp_pb2.Timestamp | None = None,
                  token: str = "", *, unsettled: bool = False) -> pb.ListSegmentMembershipChangesResponse:
    request = pb.ListSegmentMembershipChangesRequest(parent="segments/pinged", page_size=100, page_token=token,
                                                     include_unsettled=unsettled)
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
    time.sleep(SETTLE_SECONDS)  # settled: in every page from here on
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
        time.sleep(SETTLE_SECONDS)
        assert [c.person_id for c in changes_since(stub, token=earliest.next_page_token).changes] == ["bob"]

        # A change at the start time is included; one a microsecond before it is not.
        at = ann.change_time.ToDatetime(tzinfo=UTC)
        assert [c.person_id for c in changes_since(stub, timestamp(at)).changes] == ["ann", "bob"]
        assert [c.person_id for c in changes_since(stub, timestamp(at + timedelta(microseconds=1))).changes] == [
            "bob"]

        # A start in the future: nothing yet, and a token that goes on from there (its position is later than
        # now: a feed cursor that far ahead would be refused, a position this list handed out is not).
        tomorrow = changes_since(stub, timestamp(datetime.now(UTC) + timedelta(days=1)))
        assert list(tomorrow.changes) == []
        assert list(changes_since(stub, token=tomorrow.next_page_token).changes) == []

        for start in (timestamp_pb2.Timestamp(seconds=253_402_300_800),  # after 9999-12-31
                      timestamp_pb2.Timestamp(seconds=0, nanos=-1),
                      timestamp(datetime(6000, 1, 1, tzinfo=UTC))):  # past the last time a change id can name
            code, _, fields = failure(stub.ListSegmentMembershipChanges, pb.ListSegmentMembershipChangesRequest(
                parent="segments/pinged", start_time=start))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and set(fields) == {"start_time"}, start


def _write_change(session: CassandraSession, person_id: str, stamped: float) -> None:
    """A change log row stamped at `stamped` (epoch seconds), written now: as a slow write lands."""
    session.execute("INSERT INTO membership_changes (segment_id, change_id, person_id, entered, cause) "
                    "VALUES (?, ?, ?, ?, ?)", ("pinged", uuid_from_time(stamped), person_id, True, "realtime"))


def test_a_poller_never_misses_a_change_that_lands_after_a_later_stamped_one(
        segmentation_alone: RunningService, segmentation_session: CassandraSession) -> None:
    SegmentCatalog(SegmentStore(segmentation_session)).create(
        "pinged", "", "", RuleInput(parse('event("ping").count(last 1d) >= 1'), "segment.rule_text", True))
    with grpc.insecure_channel(f"127.0.0.1:{segmentation_alone.port}") as channel:
        stub = pb_grpc.SegmentationServiceStub(channel)
        _write_change(segmentation_session, "later", time.time() - 0.2)
        polled_at = time.time()
        first = changes_since(stub)
        # An earlier-stamped change lands after that poll (a concurrent write that was slower).
        _write_change(segmentation_session, "earlier", polled_at - 0.5)
        seen = [c.person_id for c in first.changes]

        def rest() -> list[str]:
            return [c.person_id for c in changes_since(stub, token=first.next_page_token).changes]

        # Resuming from the first page's token returns every change it did not (in stamp order, once each).
        expected = [p for p in ("earlier", "later") if p not in seen]
        assert eventually(rest, expected) == expected
        assert sorted(seen + rest()) == ["earlier", "later"]


def test_unsettled_changes_are_shown_but_not_passed(segmentation_alone: RunningService,
                                                    segmentation_session: CassandraSession) -> None:
    SegmentCatalog(SegmentStore(segmentation_session)).create(
        "pinged", "", "", RuleInput(parse('event("ping").count(last 1d) >= 1'), "segment.rule_text", True))
    with grpc.insecure_channel(f"127.0.0.1:{segmentation_alone.port}") as channel:
        stub = pb_grpc.SegmentationServiceStub(channel)
        _write_change(segmentation_session, "settled", time.time() - 10)
        # Stamped 3 s ahead: unsettled for the next 4 s, whatever the load.
        _write_change(segmentation_session, "unsettled", time.time() + 3)
        assert [c.person_id for c in changes_since(stub).changes] == ["settled"]
        shown = changes_since(stub, unsettled=True)
        assert [c.person_id for c in shown.changes] == ["settled", "unsettled"]
        # Its token stops before the unsettled change: the next pages return it again, until it has
        # settled and a settled page returns it too.
        assert [c.person_id for c in changes_since(stub, token=shown.next_page_token, unsettled=True).changes] == [
            "unsettled"]
        assert eventually(lambda: [c.person_id for c in changes_since(stub, token=shown.next_page_token).changes],
                          ["unsettled"], timeout=15) == ["unsettled"]
