"""ScanProfiles restricted to some persons of a shard (`person_ids`), called as an outside user calls it (real
gRPC, real Cassandra): what it streams, what it skips, how it refuses bad ids, and that it needs no identity."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from onecdp.common.v1 import common_pb2
from onecdp.profile.v1 import profile_service_pb2 as pb
from onecdp.profile.v1 import profile_service_pb2_grpc as pb_grpc

from services.profile.shards import MAX_TOKEN, MIN_TOKEN
from shared.runner import RunningService
from tests.services.profile.conftest import ingest, order, track

pytestmark = pytest.mark.integration

Stub = pb_grpc.ProfileServiceStub
WHOLE_RING = f"{MIN_TOKEN}:{MAX_TOKEN}"


def scanned(profiles: Stub, shard: str, person_ids: list[str]) -> dict[str, list[str]]:
    """Person id -> the message ids of its included events, in the order streamed."""
    # Everything but the identifiers (which only identity knows).
    request = pb.ScanProfilesRequest(shard=shard, person_ids=person_ids, include_events=True, batch_size=2,
                                     read_mask=field_mask_pb2.FieldMask(paths=["person_id", "traits", "computed"]))
    found: dict[str, list[str]] = {}
    for response in profiles.ScanProfiles(request, timeout=30):
        for profile in response.profiles:
            assert profile.profile.person_id not in found, "each person once"
            found[profile.profile.person_id] = [e.event.message_id for e in profile.events]
    return found


def violations(error: grpc.RpcError) -> list[str]:
    status = rpc_status.from_call(error)
    assert status is not None
    request = error_details_pb2.BadRequest()
    assert any(d.Unpack(request) for d in status.details if d.Is(request.DESCRIPTOR))
    return [v.field for v in request.field_violations]


def test_a_scan_of_some_persons_streams_those_of_the_shard_and_skips_the_rest(profiles: Stub) -> None:
    persons = {}
    for name in ("ann", "bob", "cat"):
        results = ingest(profiles, track(f"crm_id:{name}", message_id=f"{name}-view"),
                         order(f"crm_id:{name}", order_id=f"{name}-o", amount=5.0, message_id=f"{name}-order"))
        persons[name] = results[0].person_id
    persons["dan"] = ingest(profiles, track("cookie:dan", message_id="dan-view"))[0].person_id
    # Dan's cookie turns out to be ann's: one of them is merged into the other.
    merged = ingest(profiles, track("crm_id:ann", "cookie:dan", message_id="ann-dan"))[0].person_id
    loser = persons["dan"] if merged == persons["ann"] else persons["ann"]
    ann, bob, cat = merged, persons["bob"], persons["cat"]

    # Asked in any order, repeated, with ids of nobody and of a merged-away person: the persons of the shard
    # with a profile of their own, once each, with their events.
    found = scanned(profiles, WHOLE_RING, [cat, ann, "p_nobody", cat, loser])
    assert set(found) == {ann, cat}
    assert sorted(found[cat]) == ["cat-order", "cat-view"]
    assert sorted(found[ann]) == ["ann-dan", "ann-order", "ann-view", "dan-view"]
    # Split in two ranges, each streams only its own persons of those asked: those a scan of it finds.
    for shard in (f"{MIN_TOKEN}:0", f"0:{MAX_TOKEN}"):
        of_shard = {p.profile.person_id for r in profiles.ScanProfiles(pb.ScanProfilesRequest(shard=shard),
                                                                       timeout=30) for p in r.profiles}
        assert set(scanned(profiles, shard, [ann, bob, cat, loser])) == of_shard
    # A range that holds none of them streams nothing.
    assert scanned(profiles, "1:2", [ann, bob, cat]) == {}
    # Without person ids: the whole shard, as before.
    everyone = [p.profile.person_id for r in profiles.ScanProfiles(pb.ScanProfilesRequest(shard=WHOLE_RING),
                                                                  timeout=30) for p in r.profiles]
    assert sorted(everyone) == sorted([ann, bob, cat])


def test_bad_person_ids_are_refused_with_the_field_named(profiles: Stub) -> None:
    with pytest.raises(grpc.RpcError) as too_many:
        list(profiles.ScanProfiles(pb.ScanProfilesRequest(shard=WHOLE_RING, person_ids=["p_x"] * 1001), timeout=10))
    assert too_many.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "person_ids" in (too_many.value.details() or "") and "1000" in (too_many.value.details() or "")
    # 1,000 is fine (none of them exists).
    assert scanned(profiles, WHOLE_RING, [f"p_{i}" for i in range(1000)]) == {}
    with pytest.raises(grpc.RpcError) as bad:
        list(profiles.ScanProfiles(pb.ScanProfilesRequest(shard=WHOLE_RING, person_ids=["", "p_ok", "p" * 129]),
                                   timeout=10))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(bad.value) == ["person_ids[0]", "person_ids[2]"]


def test_a_scan_of_some_persons_asks_identity_nothing(profiles: Stub, identity_service: RunningService) -> None:
    person = ingest(profiles, track("crm_id:solo", message_id="solo-view"))[0].person_id
    identity_service.server.stop(None).wait()  # the fixture closes the rest
    assert scanned(profiles, WHOLE_RING, [person]) == {person: ["solo-view"]}
    # A read by selector goes through identity, which is gone.
    with pytest.raises(grpc.RpcError) as unavailable:
        profiles.BatchGetProfiles(pb.BatchGetProfilesRequest(persons=[common_pb2.PersonSelector(person_id=person)]),
                                  timeout=30)
    assert unavailable.value.code() == grpc.StatusCode.UNAVAILABLE
