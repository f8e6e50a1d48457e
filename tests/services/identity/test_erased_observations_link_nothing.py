"""An observation naming an erased identifier came from the erased person: it links nothing, and it is not
recorded as applied, so that a replay once the tombstone is lifted links it."""

from __future__ import annotations

import pytest
from onecdp.common.v1 import common_pb2
from onecdp.identity.v1 import identity_service_pb2 as pb
from onecdp.identity.v1 import identity_service_pb2_grpc as pb_grpc

from tests.services.identity.conftest import ids, link, members, observation, person_of

pytestmark = pytest.mark.integration

Stub = pb_grpc.IdentityServiceStub


def _erase_holder(identity: Stub, pair: str) -> None:
    (identifier,) = ids(pair)
    identity.ErasePerson(pb.ErasePersonRequest(person=common_pb2.PersonSelector(identifier=identifier),
                                               reason="privacy request"), timeout=30)


def _linked(identity: Stub, a: str, b: str) -> bool:
    (first,), (second,) = ids(a), ids(b)
    return bool(identity.ExplainLink(pb.ExplainLinkRequest(a=first, b=second), timeout=10).same_person)


def test_an_observation_naming_an_erased_identifier_links_none_of_its_other_identifiers(identity: Stub) -> None:
    link(identity, observation("cookie:eo-a", "email:eo-a@x.io"))
    _erase_holder(identity, "cookie:eo-a")
    result = link(identity, observation("cookie:eo-a", "cookie:eo-f1", "email:eo-f2@x.io"))[0]
    assert [(d.identifier.value, d.guard) for d in result.guard_decisions] == [("eo-a", pb.GUARD_KIND_ERASED)]
    assert not _linked(identity, "cookie:eo-f1", "email:eo-f2@x.io")
    assert members(person_of(identity, "cookie:eo-f1")) == {"cookie:eo-f1"}
    # An observation of the same call that names no erased identifier is linked as usual.
    other = link(identity, observation("cookie:eo-a", "cookie:eo-g1"), observation("cookie:eo-g1", "crm_id:eo-g2"))
    assert [d.guard for d in other[0].guard_decisions] == [pb.GUARD_KIND_ERASED]
    assert members(person_of(identity, "cookie:eo-g1")) == {"cookie:eo-g1", "crm_id:eo-g2"}


def test_an_observation_dropped_for_an_erasure_links_when_replayed_after_the_tombstone_is_lifted(
        identity: Stub) -> None:
    link(identity, observation("cookie:eo-b", "email:eo-b@x.io"))
    _erase_holder(identity, "email:eo-b@x.io")
    late = observation("cookie:eo-b", "cookie:eo-h1", "email:eo-h2@x.io", message_id="eo-late")
    first = link(identity, late)[0]
    assert not first.duplicate and [d.guard for d in first.guard_decisions] == [pb.GUARD_KIND_ERASED]
    # Replayed while still tombstoned: dropped again, not a duplicate of something applied.
    again = link(identity, late)[0]
    assert not again.duplicate and [d.guard for d in again.guard_decisions] == [pb.GUARD_KIND_ERASED]
    assert not _linked(identity, "cookie:eo-h1", "email:eo-h2@x.io")
    (cookie,) = ids("cookie:eo-b")
    identity.DeleteErasureTombstone(pb.DeleteErasureTombstoneRequest(identifier=cookie), timeout=10)
    replayed = link(identity, late)[0]
    assert not replayed.duplicate and not replayed.guard_decisions
    assert {f"{i.type}:{i.value}" for i in replayed.normalized_identifiers} == {
        "cookie:eo-b", "cookie:eo-h1", "email:eo-h2@x.io"}
    assert members(person_of(identity, "cookie:eo-h1")) == {"cookie:eo-b", "cookie:eo-h1", "email:eo-h2@x.io"}
    assert link(identity, late)[0].duplicate  # applied now: a replay is a duplicate
