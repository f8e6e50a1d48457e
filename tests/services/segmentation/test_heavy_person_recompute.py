"""One heavy person (events of 63 KiB properties each, all within the documented limits) failed a whole segment
recompute: profile answered RESOURCE_EXHAUSTED "Sent message larger than max" on ScanProfiles. Profile now sends
such a person with `events_omitted`, and segmentation pages their events with ListProfileEvents, so the heavy
person is counted like anyone else, in a recompute (ScanProfiles) and in real time (BatchGetProfiles).

The stack runs with a 1 MiB maximum message size (ONECDP_MAX_MESSAGE_BYTES), so 20 events make a heavy person."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import grpc
import pytest
from google.protobuf import struct_pb2
from onecdp.common.v1 import common_pb2
from onecdp.profile.v1 import profile_service_pb2 as profile_pb
from onecdp.profile.v1 import profile_service_pb2_grpc as profile_grpc
from onecdp.segmentation.v1 import segmentation_service_pb2 as pb
from onecdp.segmentation.v1 import segmentation_service_pb2_grpc as pb_grpc

from services.segmentation.profile_source import GrpcProfileSource
from services.segmentation.realtime import NO_EVENTS, ProfileReads
from shared.config import GrpcSettings
from shared.runner import RunningService
from tests.services.segmentation.conftest import eventually, identify, ingest, track

pytestmark = pytest.mark.integration
BLOB = "x" * (63 * 1024)
WINDOW = "from 2024-01-01T00:00:00Z to 2024-12-01T00:00:00Z"


@pytest.fixture
def grpc_settings() -> GrpcSettings:
    return GrpcSettings(bind_host="127.0.0.1", grace_period_seconds=2.0, log_format="text",
                        max_message_bytes=1024 * 1024)


def _ingest_views(profiles: profile_grpc.ProfileServiceStub, person: str, count: int, blob: bool,
                  first: int = 0) -> str:
    person_id = ""
    for start in range(first, first + count, 8):  # a request stays under the 1 MiB limit too
        person_id = ingest(profiles, *(track(person, "v", f"2024-03-{1 + k % 28:02d}T10:00:00",
                                             {"blob": BLOB, "k": k} if blob else {"k": k})
                                       for k in range(start, min(first + count, start + 8))))[person]
    return person_id


def _ready(stack: pb_grpc.SegmentationServiceStub, name: str) -> pb.Segment:
    end = time.monotonic() + 90
    while True:
        segment: pb.Segment = stack.GetSegment(pb.GetSegmentRequest(name=name), timeout=10)
        if segment.state in (pb.SEGMENT_STATE_READY, pb.SEGMENT_STATE_FAILED) or time.monotonic() > end:
            return segment
        time.sleep(0.3)


def _members(stack: pb_grpc.SegmentationServiceStub, name: str) -> set[str]:
    members, token = set(), ""
    while True:
        page = stack.ListSegmentMembers(pb.ListSegmentMembersRequest(parent=name, page_size=1000, page_token=token),
                                        timeout=10)
        members |= {m.person_id for m in page.members}
        token = page.next_page_token
        if not token:
            return members


def test_a_heavy_person_is_counted_in_a_recompute_and_in_real_time(stack: pb_grpc.SegmentationServiceStub,
                                                                    profiles: profile_grpc.ProfileServiceStub) -> None:
    heavy = _ingest_views(profiles, "heavy", 20, blob=True)  # 1.3 MB of events: more than a message carries
    twenty = _ingest_views(profiles, "twenty", 20, blob=False)
    nineteen = _ingest_views(profiles, "nineteen", 19, blob=False)
    rules = {"viewers": f'event("v").count({WINDOW}) >= 1', "twenty-views": f'event("v").count({WINDOW}) >= 20',
             "many-views": f'event("v").count({WINDOW}) >= 21'}
    for segment_id, text in rules.items():
        stack.CreateSegment(pb.CreateSegmentRequest(segment_id=segment_id, segment=pb.Segment(rule_text=text)),
                            timeout=10)
    for segment_id, expected in (("viewers", {heavy, twenty, nineteen}), ("twenty-views", {heavy, twenty}),
                                 ("many-views", set())):
        segment = _ready(stack, f"segments/{segment_id}")
        assert segment.state == pb.SEGMENT_STATE_READY, segment
        assert _members(stack, segment.name) == expected, segment_id
    # One more heavy event: real time re-reads the person (BatchGetProfiles with events) and counts all 21.
    _ingest_views(profiles, "heavy", 1, blob=True, first=20)
    assert eventually(lambda: _members(stack, "segments/many-views"), {heavy}, timeout=60) == {heavy}


def test_a_person_with_megabytes_of_other_traits_stalls_nobody(stack: pb_grpc.SegmentationServiceStub,
                                                               profiles: profile_grpc.ProfileServiceStub) -> None:
    """Real time read every trait of the persons it re-evaluated: one person with 1.2 MB of traits its rules never
    name (20 writes of 60 KiB, each within profile's limits) made each batch read holding them pass the message
    limit, and real time stalled for everyone behind them. It reads the traits its rules read."""
    stack.CreateSegment(pb.CreateSegmentRequest(segment_id="pros", segment=pb.Segment(rule_text='traits.plan = "pro"')),
                        timeout=10)
    hoarder = ingest(profiles, identify("hoarder", "2024-03-01T10:00:00", {"plan": "free"}))["hoarder"]
    blob = "y" * (60 * 1024)
    for k in range(20):  # one write a call: a request stays under the 1 MiB limit
        traits = struct_pb2.Struct()
        traits.update({f"note_{k}": blob})
        profiles.BatchWriteTraits(profile_pb.BatchWriteTraitsRequest(writes=[profile_pb.TraitWrite(
            person_id=hoarder, traits=traits, source="notes")]), timeout=10)
    # The hoarder and someone else turn pro together: both are re-evaluated in one round, and both enter.
    others = ingest(profiles, identify("hoarder", "2024-03-02T10:00:00", {"plan": "pro"}),
                    identify("plain", "2024-03-02T10:00:00", {"plan": "pro"}))
    assert eventually(lambda: _members(stack, "segments/pros"), {hoarder, others["plain"]}, timeout=60) == \
        {hoarder, others["plain"]}
    # A size estimate read every trait (and the computed traits) of its sample too: the hoarder failed it.
    estimate = stack.EstimateSegmentSize(pb.EstimateSegmentSizeRequest(segment="segments/pros"), timeout=60)
    assert (estimate.sample_size, estimate.sample_matches) == (2, 2)
    # And explaining the hoarder's memberships read their whole profile.
    explained = stack.EvaluatePersonSegments(pb.EvaluatePersonSegmentsRequest(
        person=common_pb2.PersonSelector(person_id=hoarder)), timeout=30)
    assert [(e.segment, e.matched) for e in explained.evaluations] == [("segments/pros", True)]


def test_persons_whose_named_traits_fill_more_than_a_response_are_read_in_halves(
        profiles: profile_grpc.ProfileServiceStub, profile_service: RunningService) -> None:
    """The traits a rule names can themselves pass the limit over a batch (60 KiB each, 20 persons: 1.2 MB), which
    profile answers RESOURCE_EXHAUSTED; real time's reader reads such a batch in halves instead of failing it."""
    note = "z" * (60 * 1024)
    person_ids = []
    for start in range(0, 20, 8):  # a request stays under the 1 MiB limit
        ingested = ingest(profiles, *(identify(f"noted-{k}", "2024-03-01T10:00:00", {"note": note, "k": k})
                                      for k in range(start, min(20, start + 8))))
        person_ids += [ingested[f"noted-{k}"] for k in range(start, min(20, start + 8))]
    with grpc.insecure_channel(f"127.0.0.1:{profile_service.port}") as channel:
        source = GrpcProfileSource(profile_grpc.ProfileServiceStub(channel))
        facts = source.persons(person_ids, datetime.now(UTC), NO_EVENTS, ProfileReads(frozenset({"note"}), False))
    assert sorted(facts) == sorted(person_ids)
    assert all(f is not None and f.traits == {"note": note} for f in facts.values())
