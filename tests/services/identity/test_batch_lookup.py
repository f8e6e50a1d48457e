"""BatchLookupPersons: results in request order, misses as found=false, bad selectors named."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from onecdp.common.v1 import common_pb2
from onecdp.identity.v1 import identity_service_pb2 as pb
from onecdp.identity.v1 import identity_service_pb2_grpc as pb_grpc

from tests.services.identity.conftest import failure, ids, link, observation

pytestmark = pytest.mark.integration


def _by_identifier(pair: str) -> common_pb2.PersonSelector:
    (identifier,) = ids(pair)
    return common_pb2.PersonSelector(identifier=identifier)


def test_batch_lookup_answers_every_selector_in_order(identity: pb_grpc.IdentityServiceStub) -> None:
    persons = [link(identity, observation(f"crm_id:b{i}", f"cookie:c-b{i}"))[0].person_id for i in range(40)]
    selectors = []
    for i, person_id in enumerate(persons):
        selectors.append(_by_identifier(f"cookie:c-b{i}") if i % 2 else common_pb2.PersonSelector(person_id=person_id))
        selectors.append(_by_identifier(f"crm_id:missing-{i}"))
    results = identity.BatchLookupPersons(pb.BatchLookupPersonsRequest(persons=selectors), timeout=30).results
    assert [r.found for r in results] == [True, False] * 40
    assert [r.person.person_id for r in results[::2]] == persons


def test_batch_lookup_names_every_invalid_selector(identity: pb_grpc.IdentityServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as bad:
        identity.BatchLookupPersons(pb.BatchLookupPersonsRequest(persons=[
            _by_identifier("email:bad"), _by_identifier("cookie:fine"), _by_identifier("phone:nope")]), timeout=10)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(bad.value)
    assert status is not None
    violations = error_details_pb2.BadRequest()
    assert any(d.Unpack(violations) for d in status.details if d.Is(violations.DESCRIPTOR))
    assert [v.field for v in violations.field_violations] == ["persons[0].identifier.value",
                                                              "persons[2].identifier.value"]


def test_an_empty_batch_is_refused(identity: pb_grpc.IdentityServiceStub) -> None:
    assert failure(lambda: identity.BatchLookupPersons(pb.BatchLookupPersonsRequest(), timeout=10)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "PERSONS_REQUIRED", ["persons"])


def test_a_missing_identifier_is_named_as_required(identity: pb_grpc.IdentityServiceStub) -> None:
    (cookie,) = ids("cookie:c-present")
    required = (grpc.StatusCode.INVALID_ARGUMENT, "IDENTIFIER_REQUIRED")
    assert failure(lambda: identity.ExplainLink(pb.ExplainLinkRequest(b=cookie), timeout=10)) == (*required, ["a"])
    assert failure(lambda: identity.UnlinkIdentifiers(pb.UnlinkIdentifiersRequest(
        link=pb.IdentifierPair(a=cookie), reason="test"), timeout=10)) == (*required, ["link.b"])
    assert failure(lambda: identity.DeleteErasureTombstone(pb.DeleteErasureTombstoneRequest(), timeout=10)) == (
        *required, ["identifier"])


def test_a_batch_naming_each_id_of_a_merge_chain_follows_it_to_the_survivor(
        identity: pb_grpc.IdentityServiceStub) -> None:
    # C merges into B, then B into A (the oldest survives): C redirects to B, which redirects to A. With all
    # three in one batch the first read has every row, and the redirects must still be followed through them.
    a, b, c = (link(identity, observation(f"cookie:chain-{name}"))[0].person_id for name in "abc")
    link(identity, observation("cookie:chain-b", "cookie:chain-c"))
    link(identity, observation("cookie:chain-a", "cookie:chain-b"))
    chain = {"cookie:chain-a", "cookie:chain-b", "cookie:chain-c"}
    for batch in ([c, b, a], [b, c], [a, c, b], [c]):
        results = identity.BatchLookupPersons(pb.BatchLookupPersonsRequest(
            persons=[common_pb2.PersonSelector(person_id=p) for p in batch]), timeout=10).results
        assert [(r.found, r.person.person_id, r.person.redirected_from) for r in results] == [
            (True, a, "" if p == a else p) for p in batch], batch
        assert all({f"{i.type}:{i.value}" for i in r.person.identifiers} == chain for r in results), batch
