"""The token ranges ScanProfiles takes, called as an outside user calls them (real gRPC)."""

from __future__ import annotations

import grpc
import pytest
from cassandra.murmur3 import murmur3
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from onecdp.profile.v1 import profile_service_pb2 as pb
from onecdp.profile.v1 import profile_service_pb2_grpc as pb_grpc

from services.profile import store
from services.profile.shards import MAX_TOKEN, MIN_TOKEN
from tests.services.profile.conftest import ingest, track

pytestmark = pytest.mark.integration

Stub = pb_grpc.ProfileServiceStub


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


@pytest.mark.unit
def test_a_person_token_is_cassandras_including_the_one_hash_the_partitioner_moves(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver's Murmur3 of a person id is its token, except -2^63 (the ring's minimum, never a token), which
    Cassandra's Murmur3Partitioner makes 2^63 - 1: a `person_ids` scan placing such a person would skip it."""
    assert store.partition_token("p_abc") == murmur3(b"p_abc")
    monkeypatch.setattr(store, "murmur3", lambda data: MIN_TOKEN)
    assert store.partition_token("p_rare") == MAX_TOKEN
