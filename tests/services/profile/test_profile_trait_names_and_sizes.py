"""Trait names and sizes the profile service must refuse with INVALID_ARGUMENT naming the field, found by an
outside tester: a read mask naming no trait answered INTERNAL, a 5 MB trait write was stored (and then made
every read of its person fail), and only the first of several bad selectors was named."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2, struct_pb2
from onecdp.common.v1 import common_pb2
from onecdp.profile.v1 import profile_service_pb2 as pb
from onecdp.profile.v1 import profile_service_pb2_grpc as pb_grpc

from tests.services.profile.conftest import ident, identify, ingest, profile_of, selector
from tests.status_details import field_violations

pytestmark = pytest.mark.integration

Stub = pb_grpc.ProfileServiceStub


def _answer(call: Callable[..., Any], request: object) -> Any:
    result = call(request, timeout=30)
    return result if hasattr(result, "SerializeToString") else list(result)  # a stream fails when read


def _invalid(call: Callable[..., Any], request: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as bad:
        _answer(call, request)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad.value.details()
    return bad.value


def test_a_read_mask_path_naming_no_trait_is_invalid_argument_naming_the_path(profiles: Stub) -> None:
    """`traits.` and `traits\\x00` answered INTERNAL (an AttributeError applying the mask)."""
    ingest(profiles, identify("crm_id:mask", traits={"plan": "pro"}))
    shard = profiles.ListProfileShards(pb.ListProfileShardsRequest(shard_count=1), timeout=10).shards[0]
    for paths, index, words in ((["traits."], 0, "trait names are 1-128 characters"),
                                (["person_id", "traits\x00"], 1, "is not a field of Profile"),
                                (["traits.a\x00b"], 0, "must not contain control characters"),
                                (["traits." + "x" * 129], 0, "trait names are 1-128 characters"),
                                (["computed.rfm\x00"], 0, "is not a field of ComputedTraits")):
        mask = field_mask_pb2.FieldMask(paths=paths)
        for call, request in (
                (profiles.GetProfile, pb.GetProfileRequest(person=selector("crm_id:mask"), read_mask=mask)),
                (profiles.BatchGetProfiles, pb.BatchGetProfilesRequest(persons=[selector("crm_id:mask")],
                                                                       read_mask=mask)),
                (profiles.ScanProfiles, pb.ScanProfilesRequest(shard=shard, read_mask=mask))):
            violations = field_violations(_invalid(call, request))
            assert [field for field, _ in violations] == [f"read_mask.paths[{index}]"], (paths, violations)
            assert words in violations[0][1], (paths, violations)
    # A trait name with dots and any other characters is still a trait name.
    read = profile_of(profiles, "crm_id:mask", read_mask=field_mask_pb2.FieldMask(paths=["traits.plan",
                                                                                         "traits.会员.等级"]))
    assert set(read.traits) == {"plan"}


def _traits(**values: Any) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


def test_trait_writes_are_capped_as_identify_events_are_and_take_only_trait_names(profiles: Stub) -> None:
    """A 5 MB trait was stored, after which the person's profile was too large for default clients and its
    scans failed on the server; a NUL trait name was stored, which no read mask can name."""
    ingest(profiles, identify("crm_id:big", traits={"plan": "basic"}))
    who = ident("crm_id:big")
    writes = [pb.TraitWrite(identifier=who, traits=_traits(plan="pro", blob="x" * 5_000_000)),
              pb.TraitWrite(identifier=who, traits=_traits(**{"a\x00b": 1, "plan": "pro"})),
              pb.TraitWrite(identifier=who, traits=_traits(**{"x" * 129: 1}))]
    violations = field_violations(_invalid(profiles.BatchWriteTraits, pb.BatchWriteTraitsRequest(writes=writes)))
    assert [field for field, _ in violations] == ["writes[0].traits", "writes[1].traits", "writes[2].traits"]
    assert violations[0][1].startswith("traits are 5000") and "at most 65536 are allowed" in violations[0][1]
    assert violations[1][1] == ("trait name 'a\\x00b' must not contain control characters; found control character "
                                "U+0000 at position 1")
    assert violations[2][1].endswith("is 129 characters; trait names are 1-128 characters")
    assert profile_of(profiles, "crm_id:big").traits["plan"].value.string_value == "basic", "nothing was written"
    # Up to 64 KiB serialized is a write like any other; an identify event refuses the same names.
    written = profiles.BatchWriteTraits(pb.BatchWriteTraitsRequest(writes=[pb.TraitWrite(
        identifier=who, traits=_traits(blob="y" * 60_000))]), timeout=30)
    assert written.written_count == 1
    result = ingest(profiles, identify("crm_id:big", traits={"tab\tname": 1}))[0]
    assert (result.status, result.rejection_reason) == (pb.EVENT_STATUS_REJECTED,
                                                        pb.EVENT_REJECTION_REASON_INVALID_FIELD)
    assert result.message.startswith("trait name 'tab\\tname' must not contain control characters")


def test_batch_get_profiles_names_every_bad_selector(profiles: Stub) -> None:
    """Only the first empty selector was named (persons[1]); identity's BatchLookupPersons names all of them."""
    ingest(profiles, identify("crm_id:sel", traits={"plan": "pro"}))
    persons = [selector("crm_id:sel"), common_pb2.PersonSelector(), common_pb2.PersonSelector(person_id=""),
               selector("crm_id:sel"), common_pb2.PersonSelector(identifier=common_pb2.Identifier(type="crm_id"))]
    error = _invalid(profiles.BatchGetProfiles, pb.BatchGetProfilesRequest(persons=persons))
    assert [field for field, _ in field_violations(error)] == ["persons[1]", "persons[2]", "persons[4]"]
    assert "persons[4]" in (error.details() or "")
    found = profiles.BatchGetProfiles(pb.BatchGetProfilesRequest(persons=[persons[0]]), timeout=30)
    assert [r.found for r in found.results] == [True]
