"""A lookup by identifier reads one person partition when the identifier's holder hint holds, and a hint
gone stale (a merge, split or erasure by another process) is never the answer."""

from __future__ import annotations

from collections import Counter

import grpc
import pytest
from onecdp.common.v1 import common_pb2
from onecdp.identity.v1 import identity_service_pb2 as pb
from onecdp.identity.v1 import identity_service_pb2_grpc as pb_grpc

from tests.services.identity.conftest import failure, ids, link, members, observation, person_of

pytestmark = pytest.mark.integration


def answer(stub: pb_grpc.IdentityServiceStub, pair: str) -> tuple[str, set[str], list[str], str]:
    person = person_of(stub, pair)
    return person.person_id, members(person), sorted(person.merged_person_ids), person.redirected_from


def test_a_repeated_lookup_reads_the_person_alone(identity: pb_grpc.IdentityServiceStub,
                                                 reads: Counter[str]) -> None:
    link(identity, observation("account_id:hint-1", "cookie:hint-1c"))
    reads.clear()
    first = answer(identity, "cookie:hint-1c")
    assert reads == {"identifiers": 1, "person_identifiers": 1}
    reads.clear()
    assert answer(identity, "cookie:hint-1c") == first
    assert reads == {"person_identifiers": 1}, "a hinted lookup reads the hinted person only"


def test_stale_hints_are_never_answers(identity: pb_grpc.IdentityServiceStub,
                                       other_identity: pb_grpc.IdentityServiceStub) -> None:
    """`identity` looks up and keeps hints; `other_identity`, another replica, changes the persons."""
    link(other_identity, observation("cookie:s1", "cookie:s1b"), observation("cookie:s2", "cookie:s2b"))
    first, second = answer(identity, "cookie:s1"), answer(identity, "cookie:s2")
    assert first[0] != second[0]

    merging = "merge-s1-s2"
    link(other_identity, observation("cookie:s1b", "cookie:s2b", message_id=merging))
    merged = {pair: answer(identity, pair) for pair in ("cookie:s1", "cookie:s2")}
    assert merged["cookie:s1"] == merged["cookie:s2"] == answer(other_identity, "cookie:s2")
    assert merged["cookie:s1"][1] == {"cookie:s1", "cookie:s1b", "cookie:s2", "cookie:s2b"}
    assert merged["cookie:s1"][3] == "", "looked up by identifier: the holder, not a redirect"

    other_identity.UnlinkIdentifiers(pb.UnlinkIdentifiersRequest(message_id=merging, reason="test"), timeout=30)
    split = {pair: answer(identity, pair) for pair in ("cookie:s1", "cookie:s2")}
    assert split == {pair: answer(other_identity, pair) for pair in split}
    assert split["cookie:s1"][0] != split["cookie:s2"][0]
    assert split["cookie:s1"][1] == {"cookie:s1", "cookie:s1b"}

    (s1,) = ids("cookie:s1")
    other_identity.ErasePerson(pb.ErasePersonRequest(person=common_pb2.PersonSelector(identifier=s1),
                                                     reason="test"), timeout=30)
    code, reason, _ = failure(lambda: person_of(identity, "cookie:s1"))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "PERSON_NOT_FOUND")
    s2_person = split["cookie:s2"][0]
    batch = identity.BatchLookupPersons(pb.BatchLookupPersonsRequest(persons=[
        common_pb2.PersonSelector(identifier=s1), common_pb2.PersonSelector(identifier=ids("cookie:s2")[0]),
        common_pb2.PersonSelector(person_id=s2_person)]), timeout=10)
    assert [r.found for r in batch.results] == [False, True, True]
    assert batch.results[1].person == batch.results[2].person == person_of(other_identity, "cookie:s2")
