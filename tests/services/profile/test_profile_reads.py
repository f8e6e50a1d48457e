"""Reads as an outside user makes them: page tokens, large pages, nested read masks, point-in-time traits,
stream ingest edge cases. Each test covers several requests, since every test pays for its own keyspaces."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf import field_mask_pb2, timestamp_pb2
from onecdp.profile.v1 import profile_service_pb2 as pb
from onecdp.profile.v1 import profile_service_pb2_grpc as pb_grpc

from tests.services.profile.conftest import at, identify, ingest, order, profile_of, selector, track
from tests.status_details import field_violations

pytestmark = pytest.mark.integration

Stub = pb_grpc.ProfileServiceStub
# What a gRPC client accepts by default: a page must fit it.
DEFAULT_CLIENT_MAX_RECEIVE = 4 * 1024 * 1024


def _timestamp(when: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(when)
    return stamp


def test_pages_fit_a_default_client_and_forged_tokens_are_invalid_arguments(profiles: Stub) -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    blob = "a" * 60_000  # each event within the 64 KiB limit; 100 of them are about 6 MB
    for first in (0, 50):
        results = ingest(profiles, *[track("crm_id:big", name="x", when=start + timedelta(minutes=i),
                                           message_id=f"big-{i}", properties={"blob": blob})
                                     for i in range(first, first + 50)])
        assert {r.status for r in results} == {pb.EVENT_STATUS_ACCEPTED}
    person = selector("crm_id:big")
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = profiles.ListProfileEvents(pb.ListProfileEventsRequest(person=person, page_token=token), timeout=30)
        pages += 1
        assert 0 < page.ByteSize() < DEFAULT_CLIENT_MAX_RECEIVE
        assert len(page.events) < 100
        seen += [e.event.message_id for e in page.events]
        token = page.next_page_token
        if not token:
            break
        assert pages < 10
    assert seen == [f"big-{i}" for i in reversed(range(100))]
    # Small events still fill a page up to page_size.
    assert len(profiles.ListProfileEvents(pb.ListProfileEventsRequest(person=person, page_size=3),
                                          timeout=30).events) == 3

    real = profiles.ListProfileEvents(pb.ListProfileEventsRequest(person=person, page_size=1),
                                      timeout=30).next_page_token
    # Forged tokens (shared.page_tokens: opaque and checked; positions a valid checksum could carry are refused
    # in test_profile_request_bounds).
    for forged in ("99999999999999999999999|x", "-5|x", "garbage", "abc|def", "\u00b2|x", f" {real}", real[:-2],
                   real + "A", real.upper() if real.upper() != real else real.lower()):
        with pytest.raises(grpc.RpcError) as bad:
            profiles.ListProfileEvents(pb.ListProfileEventsRequest(person=person, page_token=forged), timeout=10)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT, forged
        assert [field for field, _ in field_violations(bad.value)] == ["page_token"], forged


def test_read_masks_take_any_profile_path_and_as_of_time_cuts_traits_off(profiles: Stub) -> None:
    ingest(profiles, identify("crm_id:pit", when="2026-08-01", traits={"plan": "silver", "city": "Oslo"}),
           order("crm_id:pit", order_id="o-1", amount=300.0, when="2026-08-02"),
           identify("crm_id:pit", when="2026-11-20", traits={"plan": "gold", "vip": True}),
           identify("crm_id:pit", when="2026-10-01", traits={"city": None}))
    nested = profile_of(profiles, "crm_id:pit", read_mask=field_mask_pb2.FieldMask(
        paths=["computed.rfm.segment", "computed.rfm.monetary_score", "preferences.top_brands"]))
    assert nested.computed.rfm.segment and nested.computed.rfm.monetary_score == 4
    assert not nested.computed.rfm.recency_score and not nested.computed.frequency and not nested.traits
    for unknown in ("computed.rfm.nope", "computed.frequency.value", "recent_transactions.amount", "computed..rfm",
                    "identifiers.type", "nope"):
        with pytest.raises(grpc.RpcError) as bad:
            profile_of(profiles, "crm_id:pit", read_mask=field_mask_pb2.FieldMask(paths=["traits", unknown]))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT, unknown
        ((field, description),) = field_violations(bad.value)
        assert field == "read_mask.paths[1]" and repr(unknown) in description

    mask = field_mask_pb2.FieldMask(paths=["traits", "computed.event_count"])
    before = profile_of(profiles, "crm_id:pit", read_mask=mask, as_of_time=_timestamp(at("2026-09-01")))
    assert before.computed.event_count == 2
    assert {n: t.value.string_value for n, t in before.traits.items()} == {"plan": "silver", "city": "Oslo"}
    assert before.traits["plan"].event_time.ToDatetime(tzinfo=UTC) == at("2026-08-01")
    # At a write's own time the write counts; the deletion of `city` counts from its time on.
    at_deletion = profile_of(profiles, "crm_id:pit", read_mask=mask, as_of_time=_timestamp(at("2026-10-01")))
    assert set(at_deletion.traits) == {"plan"}
    now = profile_of(profiles, "crm_id:pit", read_mask=mask)
    assert (now.traits["plan"].value.string_value, set(now.traits)) == ("gold", {"plan", "vip"})
    # BatchGetProfiles takes the same point in time.
    (result,) = profiles.BatchGetProfiles(pb.BatchGetProfilesRequest(
        persons=[selector("crm_id:pit")], read_mask=mask, as_of_time=_timestamp(at("2026-09-01"))),
        timeout=30).results
    assert result.profile.traits == before.traits


def test_stream_ingest_skips_empty_messages_and_results_note_unused_traits(profiles: Stub) -> None:
    def messages() -> list[pb.StreamIngestEventsRequest]:
        return [pb.StreamIngestEventsRequest(events=[track("crm_id:st", message_id="st-1"),
                                                     track("crm_id:st", message_id="st-2")]),
                pb.StreamIngestEventsRequest(),
                pb.StreamIngestEventsRequest(events=[track("crm_id:st", message_id="st-3",
                                                           traits={"sneaky": 1, "other": 2})]),
                pb.StreamIngestEventsRequest()]
    response = profiles.StreamIngestEvents(iter(messages()), timeout=30)
    assert [r.message_id for r in response.results] == ["st-1", "st-2", "st-3"]
    assert (response.accepted_count, response.duplicate_count, response.rejected_count) == (3, 0, 0)
    assert [r.message for r in response.results[:2]] == ["", ""]
    note = response.results[2].message
    assert "identify events only" in note and "2 trait(s)" in note
    assert "sneaky" not in profile_of(profiles, "crm_id:st").traits
    # Traits on an identify event are used: no note.
    (used,) = ingest(profiles, identify("crm_id:st", traits={"plan": "pro"}))
    assert used.status == pb.EVENT_STATUS_ACCEPTED and not used.message

    # A message above the limit fails the call, naming it and what was stored before it.
    def oversized() -> list[pb.StreamIngestEventsRequest]:
        return [pb.StreamIngestEventsRequest(events=[track("crm_id:st", message_id="st-4")]),
                pb.StreamIngestEventsRequest(events=[track("crm_id:st")] * 1001)]
    with pytest.raises(grpc.RpcError) as too_many:
        profiles.StreamIngestEvents(iter(oversized()), timeout=30)
    assert too_many.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = too_many.value.details() or ""
    assert "requests[1]" in details and "requests[0] were stored" in details
    listed = profiles.ListProfileEvents(pb.ListProfileEventsRequest(person=selector("crm_id:st")), timeout=30)
    assert "st-4" in {e.event.message_id for e in listed.events}

    # ScanProfiles clamps batch_size to its maximum as page sizes are, and refuses a negative one.
    shard = profiles.ListProfileShards(pb.ListProfileShardsRequest(shard_count=1), timeout=10).shards[0]
    scanned = [p for r in profiles.ScanProfiles(pb.ScanProfilesRequest(shard=shard, batch_size=100_000), timeout=30)
               for p in r.profiles]
    assert len(scanned) == 1
    with pytest.raises(grpc.RpcError) as negative:
        list(profiles.ScanProfiles(pb.ScanProfilesRequest(shard=shard, batch_size=-1), timeout=30))
    assert negative.value.code() == grpc.StatusCode.INVALID_ARGUMENT
