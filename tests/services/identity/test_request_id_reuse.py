"""A request_id makes retries of one request idempotent; reusing it for another request is a conflict (AIP-155)."""

from __future__ import annotations

import uuid

import grpc
import pytest
from onecdp.common.v1 import common_pb2
from onecdp.identity.v1 import identity_service_pb2 as pb
from onecdp.identity.v1 import identity_service_pb2_grpc as pb_grpc

from shared.cassandra import CassandraSession
from tests.services.identity.conftest import failure, ids, link, observation, person_of

pytestmark = pytest.mark.integration

Stub = pb_grpc.IdentityServiceStub


def _erase(person_id: str, request_id: str) -> pb.ErasePersonRequest:
    return pb.ErasePersonRequest(person=common_pb2.PersonSelector(person_id=person_id), reason="privacy request",
                                 request_id=request_id)


def test_a_request_id_reused_for_an_erasure_after_an_unlink_is_already_exists_and_erases_nothing(
        identity: Stub) -> None:
    link(identity, observation("cookie:rr-a", "email:rr-a@x.io"))
    victim = link(identity, observation("cookie:rr-v", "email:rr-v@x.io"))[0].person_id
    request_id = str(uuid.uuid4())
    a, b = ids("cookie:rr-a", "email:rr-a@x.io")
    unlink = pb.UnlinkIdentifiersRequest(link=pb.IdentifierPair(a=a, b=b), reason="wrong", request_id=request_id)
    first = identity.UnlinkIdentifiers(unlink, timeout=30)
    assert identity.UnlinkIdentifiers(unlink, timeout=30) == first  # a retry: the first result
    assert failure(lambda: identity.ErasePerson(_erase(victim, request_id), timeout=30)) == (
        grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED", [])
    with pytest.raises(grpc.RpcError) as caught:
        identity.ErasePerson(_erase(victim, request_id), timeout=30)
    assert "new request_id" in (caught.value.details() or "")
    assert person_of(identity, "cookie:rr-v").person_id == victim  # nobody was erased
    # With its own request_id the erasure happens, and its retry answers it.
    erase = _erase(victim, str(uuid.uuid4()))
    erased = identity.ErasePerson(erase, timeout=30)
    assert erased.person_id == victim and identity.ErasePerson(erase, timeout=30) == erased


def test_a_request_id_of_an_earlier_erasure_reused_for_another_person_is_already_exists(identity: Stub) -> None:
    q = link(identity, observation("cookie:rr-q", "email:rr-q@x.io"))[0].person_id
    p = link(identity, observation("cookie:rr-p", "email:rr-p@x.io"))[0].person_id
    request_id = str(uuid.uuid4())
    assert identity.ErasePerson(_erase(q, request_id), timeout=30).person_id == q
    assert failure(lambda: identity.ErasePerson(_erase(p, request_id), timeout=30))[:2] == (
        grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED")
    # The same erasure with another reason is another request too.
    changed = _erase(q, request_id)
    changed.reason = "another reason"
    assert failure(lambda: identity.ErasePerson(changed, timeout=30))[0] == grpc.StatusCode.ALREADY_EXISTS
    assert person_of(identity, "cookie:rr-p").person_id == p


def test_a_result_stored_without_a_fingerprint_still_answers_its_retry(identity: Stub,
                                                                  identity_session: CassandraSession) -> None:
    person_id = link(identity, observation("cookie:rr-old", "email:rr-old@x.io"))[0].person_id
    request_id = str(uuid.uuid4())
    stored = pb.ErasePersonResponse(person_id=person_id, erased_identifier_count=2)
    # As the code before fingerprints wrote it: the serialized response in hex, nothing else.
    identity_session.execute("INSERT INTO applied_requests (request_id, result) VALUES (?, ?)",
                             (request_id, stored.SerializeToString().hex()))
    assert identity.ErasePerson(_erase(person_id, request_id), timeout=30) == stored
