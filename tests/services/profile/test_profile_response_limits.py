"""Responses a default gRPC client can read (BatchGetProfiles and ScanProfiles with large events), and the
token ranges ScanProfiles takes, called as an outside user calls them: real gRPC, a channel with the
default 4 MiB receive limit."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from onecdp.profile.v1 import profile_service_pb2 as pb
from onecdp.profile.v1 import profile_service_pb2_grpc as pb_grpc

from services.profile.shards import MAX_TOKEN, MIN_TOKEN
from tests.services.profile.conftest import ingest, selector, track

pytestmark = pytest.mark.integration

Stub = pb_grpc.ProfileServiceStub
DEFAULT_CLIENT_MAX_RECEIVE = 4 * 1024 * 1024
START = datetime(2026, 1, 1, tzinfo=UTC)
BLOB = "b" * 60_000  # within the 64 KiB limit per event


def _ingest_large(profiles: Stub, pair: str, count: int) -> list[str]:
    """`count` events of about 60 KB for `pair`, a minute apart; their message ids, oldest first."""
    ids = [f"{pair}-{i}" for i in range(count)]
    for first in range(0, count, 20):
        results = ingest(profiles, *[track(pair, name="big", when=START + timedelta(minutes=i), message_id=ids[i],
                                           properties={"blob": BLOB}) for i in range(first, min(first + 20, count))])
        assert {r.status for r in results} == {pb.EVENT_STATUS_ACCEPTED}
    return ids


def _rest(profiles: Stub, pair: str, returned: list[pb.StoredEvent]) -> list[str]:
    """What ListProfileEvents gives after the last returned event, as events_truncated says to read it."""
    request = pb.ListProfileEventsRequest(person=selector(pair), event_names=["big"])
    request.start_time.CopyFrom(returned[-1].event.event_time)
    seen: list[str] = []
    while True:
        page = profiles.ListProfileEvents(request, timeout=30)
        seen += [e.event.message_id for e in page.events]
        if not page.next_page_token:
            break
        request.page_token = page.next_page_token
    already = {e.event.message_id for e in returned}
    return [m for m in reversed(seen) if m not in already]


def test_batch_get_and_scan_with_large_events_fit_a_default_client(profiles: Stub) -> None:
    # About 3.3 MB of events for the heavy person alone, 4.5 MB in all: more than a default client takes.
    heavy = _ingest_large(profiles, "crm_id:heavy", 55)
    light = {pair: _ingest_large(profiles, pair, 10) for pair in ("crm_id:light-1", "crm_id:light-2")}

    request = pb.BatchGetProfilesRequest(persons=[selector(p) for p in ("crm_id:light-1", "crm_id:heavy",
                                                                         "crm_id:light-2")],
                                         include_events=True, event_names=["big"])
    response = profiles.BatchGetProfiles(request, timeout=60)
    assert response.ByteSize() < DEFAULT_CLIENT_MAX_RECEIVE
    first, middle, last = response.results
    # The light persons need less than the equal share: they get all their events; the heavy one the rest.
    for result, pair in ((first, "crm_id:light-1"), (last, "crm_id:light-2")):
        assert not result.events_truncated
        assert [e.event.message_id for e in result.events] == light[pair]
    assert middle.events_truncated
    returned = [e.event.message_id for e in middle.events]
    assert 10 < len(returned) < len(heavy)
    assert returned == heavy[:len(returned)]  # the oldest, in order
    assert returned + _rest(profiles, "crm_id:heavy", list(middle.events)) == heavy
    # Small results are untouched by the budget.
    (small,) = profiles.BatchGetProfiles(pb.BatchGetProfilesRequest(persons=[selector("crm_id:light-1")],
                                                                    include_events=True), timeout=30).results
    assert not small.events_truncated and len(small.events) == 10

    shard = profiles.ListProfileShards(pb.ListProfileShardsRequest(shard_count=1), timeout=10).shards[0]
    messages = list(profiles.ScanProfiles(pb.ScanProfilesRequest(shard=shard, include_events=True,
                                                                 event_names=["big"], batch_size=100), timeout=60))
    assert all(m.ByteSize() < DEFAULT_CLIENT_MAX_RECEIVE for m in messages)
    assert len(messages) >= 2  # cut by size: batch_size alone would give one message of 3 profiles
    scanned = {s.profile.identifiers[0].value: s for m in messages for s in m.profiles}
    assert sorted(scanned) == ["heavy", "light-1", "light-2"]
    for pair, ids in light.items():
        assert not scanned[pair.split(":")[1]].events_truncated
        assert [e.event.message_id for e in scanned[pair.split(":")[1]].events] == ids
    heavy_scanned = scanned["heavy"]
    assert heavy_scanned.events_truncated
    returned = [e.event.message_id for e in heavy_scanned.events]
    assert returned == heavy[:len(returned)] and len(returned) < len(heavy)
    assert returned + _rest(profiles, "crm_id:heavy", list(heavy_scanned.events)) == heavy


def _shard_violation(profiles: Stub, shard: str) -> list[str]:
    with pytest.raises(grpc.RpcError) as bad:
        list(profiles.ScanProfiles(pb.ScanProfilesRequest(shard=shard), timeout=10))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(bad.value)
    assert status is not None
    violations = error_details_pb2.BadRequest()
    assert any(d.Unpack(violations) for d in status.details if d.Is(violations.DESCRIPTOR))
    return [v.field for v in violations.field_violations]


def test_scan_takes_any_token_range_and_names_shard_for_others(profiles: Stub) -> None:
    persons = {ingest(profiles, track(f"crm_id:range-{i}", name="open"))[0].person_id for i in range(12)}
    shards = profiles.ListProfileShards(pb.ListProfileShardsRequest(shard_count=1), timeout=10).shards
    assert shards == [f"{MIN_TOKEN}:{MAX_TOKEN}"]
    # The listed shard split in two ranges of our own: together they scan every profile once.
    seen: list[str] = []
    for shard in (f"{MIN_TOKEN}:0", f"0:{MAX_TOKEN}"):
        seen += [s.profile.person_id for m in profiles.ScanProfiles(pb.ScanProfilesRequest(shard=shard), timeout=30)
                 for s in m.profiles]
    assert sorted(seen) == sorted(persons)
    # A valid range that holds no profile streams nothing.
    assert [s for m in profiles.ScanProfiles(pb.ScanProfilesRequest(shard="1:2"), timeout=30) for s in m.profiles] == []
    for bad in ("5:1", "3:3", "1", "a:b", "", f"{MIN_TOKEN - 1}:0", f"0:{MAX_TOKEN + 1}"):
        assert _shard_violation(profiles, bad) == ["shard"], bad
