"""A person whose events are more than one message carries (all within the documented limits: 64 KiB of
properties per event) failed every scan of their shard and every batch read including them, RESOURCE_EXHAUSTED
"Sent message larger than max". Responses are now packed under the configured maximum message size, and such a
person comes with `events_omitted` instead of their events, which ListProfileEvents pages.

The services here run with a 1 MiB maximum (ONECDP_MAX_MESSAGE_BYTES), so a few events make a heavy person."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2, struct_pb2, timestamp_pb2
from onecdp.common.v1 import common_pb2
from onecdp.profile.v1 import profile_service_pb2 as pb
from onecdp.profile.v1 import profile_service_pb2_grpc as pb_grpc

from services.profile.model import StoredEventRecord
from services.profile.scan_response import scan_response_bytes, scan_responses
from shared.config import GrpcSettings
from shared.errors import ResourceExhausted
from tests.services.profile.conftest import ingest, track

pytestmark = pytest.mark.integration

Stub = pb_grpc.ProfileServiceStub
MAX_MESSAGE_BYTES = 1024 * 1024
BLOB = "x" * (63 * 1024)  # an event's properties stay under the 64 KiB they may take
WHEN = datetime(2024, 3, 1, tzinfo=UTC)


@pytest.fixture
def grpc_settings() -> GrpcSettings:
    return GrpcSettings(bind_host="127.0.0.1", grace_period_seconds=2.0, log_format="text",
                        max_message_bytes=MAX_MESSAGE_BYTES)


def _ingest_blobs(profiles: Stub, person: str, count: int, name: str = "v") -> None:
    for start in range(0, count, 8):  # a request stays under the server's limit too
        results = ingest(profiles, *(track(f"crm_id:{person}", name=name, when=f"2024-03-{1 + (start + k) % 28:02d}",
                                           properties={"blob": BLOB, "k": start + k})
                                     for k in range(start, min(count, start + 8))))
        assert {r.status for r in results} == {pb.EVENT_STATUS_ACCEPTED}


def _all_events(profiles: Stub, person_id: str, **request: Any) -> list[pb.StoredEvent]:
    events: list[pb.StoredEvent] = []
    token = ""
    while True:
        page = profiles.ListProfileEvents(pb.ListProfileEventsRequest(
            person=common_pb2.PersonSelector(person_id=person_id), page_size=1000, page_token=token, **request),
            timeout=30)
        assert page.ByteSize() <= MAX_MESSAGE_BYTES
        events += page.events
        token = page.next_page_token
        if not token:
            return events


def test_a_heavy_person_comes_without_events_and_the_others_in_responses_under_the_limit(profiles: Stub) -> None:
    _ingest_blobs(profiles, "heavy", 20)  # 1.3 MB of events
    for person in ("mid1", "mid2", "mid3"):
        _ingest_blobs(profiles, person, 6)  # 390 KB each: two fit a response, three do not
    ingest(profiles, track("crm_id:light", name="v", when="2024-03-02"), track("crm_id:light", name="w",
                                                                             when="2024-03-03"))
    shard = profiles.ListProfileShards(pb.ListProfileShardsRequest(shard_count=1), timeout=10).shards[0]
    request = pb.ScanProfilesRequest(shard=shard, include_events=True, batch_size=1000)
    responses = list(profiles.ScanProfiles(request, timeout=60))
    assert all(r.ByteSize() <= MAX_MESSAGE_BYTES for r in responses) and len(responses) >= 2
    scanned = [p for r in responses for p in r.profiles]
    assert len(scanned) == 5
    omitted = [p.profile.person_id for p in scanned if p.events_omitted]
    assert len(omitted) == 1 and not next(p for p in scanned if p.events_omitted).events
    heavy = omitted[0]
    assert sorted(len(p.events) for p in scanned if not p.events_omitted) == [2, 6, 6, 6]
    # What the scan left out, ListProfileEvents pages: all of it, with the same names and time range.
    assert len(_all_events(profiles, heavy)) == 20
    ranged = _all_events(profiles, heavy, event_names=["v"], start_time=_stamp("2024-03-05T00:00:00Z"))
    assert len(ranged) == 16

    # A batch read leaves out the events of the heaviest results until the rest fit.
    persons = [common_pb2.PersonSelector(identifier=common_pb2.Identifier(type="crm_id", value=p))
               for p in ("light", "heavy", "mid1", "mid2")]
    response = profiles.BatchGetProfiles(pb.BatchGetProfilesRequest(persons=persons, include_events=True),
                                         timeout=60)
    assert response.ByteSize() <= MAX_MESSAGE_BYTES
    assert [(r.found, r.events_omitted, len(r.events)) for r in response.results] == [
        (True, False, 2), (True, True, 0), (True, False, 6), (True, False, 6)]
    assert response.results[1].profile.person_id == heavy
    # Without events nothing is left out.
    plain = profiles.BatchGetProfiles(pb.BatchGetProfilesRequest(persons=persons), timeout=60)
    assert not any(r.events_omitted for r in plain.results)


def _stamp(text: str) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromJsonString(text)
    return stamp


def test_packed_responses_are_the_scan_split_under_the_limit() -> None:
    """scan_responses splits what scan_response_bytes would send as one response, in order, each at most the
    limit; only a profile too large alone with its events loses them (and says so)."""
    def event(message_id: str, size: int) -> StoredEventRecord:
        payload = pb.Event(message_id=message_id, event_name="v", properties=_struct(blob="x" * size))
        return StoredEventRecord(message_id, "p", "v", WHEN, payload.SerializeToString(), WHEN)

    scanned = [(pb.Profile(person_id=f"p{i}").SerializeToString(), [event(f"m{i}-{k}", 300) for k in range(count)])
               for i, count in enumerate((1, 3, 12, 2, 0, 3))]
    limit = 4 * 350
    responses = list(scan_responses(scanned, limit))
    assert all(len(r) <= limit for r in responses) and len(responses) >= 3
    profiles = [p for r in responses for p in pb.ScanProfilesResponse.FromString(r).profiles]
    whole = pb.ScanProfilesResponse.FromString(scan_response_bytes(scanned)).profiles
    assert [p.events_omitted for p in profiles] == [False, False, True, False, False, False]
    assert [p for p in profiles if not p.events_omitted] == [p for i, p in enumerate(whole) if i != 2]
    assert profiles[2] == pb.ScannedProfile(profile=whole[2].profile, events_omitted=True)
    assert list(scan_responses([], limit)) == [b""]
    # A profile too large even without its events ends the scan, after what came before it was sent.
    huge = pb.Profile(person_id="p-huge", merged_person_ids=["m" * 100] * 20).SerializeToString()
    sent: list[bytes] = []
    with pytest.raises(ResourceExhausted) as too_large:
        sent.extend(scan_responses([scanned[0], (huge, [])], limit))
    assert [p.profile.person_id for r in sent for p in pb.ScanProfilesResponse.FromString(r).profiles] == ["p0"]
    assert too_large.value.message.startswith("the profile of p-huge: ")


def _struct(**values: Any) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


def test_a_profile_whose_traits_pass_the_limit_is_refused_saying_what_to_ask_for(profiles: Stub) -> None:
    """Traits are written up to 64 KiB each, so a person's traits alone can pass the limit; gRPC's own "Sent message
    larger than max" said nothing of what to ask instead. Named traits (read_mask) are read as ever."""
    person_id = ingest(profiles, track("crm_id:hoarder", name="v", when="2024-03-01"))[0].person_id
    blob = "y" * (60 * 1024)
    for k in range(20):
        traits = struct_pb2.Struct()
        traits.update({f"note_{k}": blob})
        profiles.BatchWriteTraits(pb.BatchWriteTraitsRequest(writes=[pb.TraitWrite(
            person_id=person_id, traits=traits, source="notes")]), timeout=10)
    selector = common_pb2.PersonSelector(person_id=person_id)
    for call, request in ((profiles.GetProfile, pb.GetProfileRequest(person=selector)),
                          (profiles.BatchGetProfiles, pb.BatchGetProfilesRequest(persons=[selector]))):
        with pytest.raises(grpc.RpcError) as refused:
            call(request, timeout=30)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "more than one response carries" in refused.value.details()
        assert "name the traits you need in read_mask" in refused.value.details()
    named = profiles.GetProfile(pb.GetProfileRequest(person=selector, read_mask=field_mask_pb2.FieldMask(
        paths=["person_id", "traits.note_3"])), timeout=30)
    assert list(named.traits) == ["note_3"]
    # A scan of every trait: ends saying whose profile and what to do (it was gRPC's "Sent message larger than max").
    (shard,) = profiles.ListProfileShards(pb.ListProfileShardsRequest(shard_count=1), timeout=10).shards
    with pytest.raises(grpc.RpcError) as scan_refused:
        list(profiles.ScanProfiles(pb.ScanProfilesRequest(shard=shard), timeout=30))
    assert scan_refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"the profile of {person_id}" in scan_refused.value.details()
    scanned = list(profiles.ScanProfiles(pb.ScanProfilesRequest(shard=shard, read_mask=field_mask_pb2.FieldMask(
        paths=["person_id", "traits.note_3"])), timeout=30))
    assert [p.profile.person_id for r in scanned for p in r.profiles] == [person_id]
    # Under the limit itself (above the share a scan's responses fill): answered, as gRPC sends it.
    under = ingest(profiles, track("crm_id:keeper", name="v", when="2024-03-01"))[0].person_id
    for k in range(16):
        traits = struct_pb2.Struct()
        traits.update({f"note_{k}": "k" * (62 * 1024)})
        profiles.BatchWriteTraits(pb.BatchWriteTraitsRequest(writes=[pb.TraitWrite(
            person_id=under, traits=traits, source="notes")]), timeout=10)
    kept = profiles.GetProfile(pb.GetProfileRequest(person=common_pb2.PersonSelector(person_id=under)), timeout=30)
    assert MAX_MESSAGE_BYTES * 15 // 16 < kept.ByteSize() <= MAX_MESSAGE_BYTES and len(kept.traits) == 16
