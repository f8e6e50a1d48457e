"""UnlinkIdentifiers that has nothing left to retract is NOT_FOUND, as the proto promises, not an OK that did
nothing."""

from __future__ import annotations

import grpc
import pytest
from onecdp.identity.v1 import identity_service_pb2 as pb
from onecdp.identity.v1 import identity_service_pb2_grpc as pb_grpc

from tests.services.identity.conftest import failure, ids, link, members, observation, person_of

pytestmark = pytest.mark.integration

Stub = pb_grpc.IdentityServiceStub


def test_unlink_by_message_id_after_its_links_were_retracted_by_pair_is_not_found(identity: Stub) -> None:
    link(identity, observation("cookie:un-a", "email:un-a@x.io", message_id="un-m1"))
    a, b = ids("cookie:un-a", "email:un-a@x.io")
    identity.UnlinkIdentifiers(pb.UnlinkIdentifiersRequest(link=pb.IdentifierPair(a=a, b=b)), timeout=30)
    assert failure(lambda: identity.UnlinkIdentifiers(pb.UnlinkIdentifiersRequest(message_id="un-m1"),
                                                      timeout=30))[:2] == (
        grpc.StatusCode.NOT_FOUND, "OBSERVATION_NOT_FOUND")
    # An observation some of whose links remain is still retracted.
    link(identity, observation("cookie:un-b", "email:un-b@x.io", "crm_id:un-b", message_id="un-m2"))
    a, b = ids("cookie:un-b", "email:un-b@x.io")
    identity.UnlinkIdentifiers(pb.UnlinkIdentifiersRequest(link=pb.IdentifierPair(a=a, b=b)), timeout=30)
    identity.UnlinkIdentifiers(pb.UnlinkIdentifiersRequest(message_id="un-m2"), timeout=30)
    assert members(person_of(identity, "crm_id:un-b")) == {"crm_id:un-b"}


def test_unlink_of_an_identifier_with_no_links_left_is_not_found(identity: Stub) -> None:
    link(identity, observation("cookie:un-c", "email:un-c@x.io"))
    (cookie,) = ids("cookie:un-c")
    identity.UnlinkIdentifiers(pb.UnlinkIdentifiersRequest(identifier=cookie), timeout=30)
    assert members(person_of(identity, "cookie:un-c")) == {"cookie:un-c"}
    assert failure(lambda: identity.UnlinkIdentifiers(pb.UnlinkIdentifiersRequest(identifier=cookie),
                                                      timeout=30))[:2] == (grpc.StatusCode.NOT_FOUND, "LINK_NOT_FOUND")
    (alone,) = ids("cookie:un-alone")
    link(identity, observation("cookie:un-alone"))
    assert failure(lambda: identity.UnlinkIdentifiers(pb.UnlinkIdentifiersRequest(identifier=alone),
                                                      timeout=30))[:2] == (grpc.StatusCode.NOT_FOUND, "LINK_NOT_FOUND")
    # A junk identifier is never given a person; once its links are retracted it is linked with nothing, not
    # unknown.
    link(identity, observation("cookie:unknown", "email:un-j@x.io"))
    (junk,) = ids("cookie:unknown")
    identity.UnlinkIdentifiers(pb.UnlinkIdentifiersRequest(identifier=junk), timeout=30)
    assert failure(lambda: identity.UnlinkIdentifiers(pb.UnlinkIdentifiersRequest(identifier=junk),
                                                      timeout=30))[:2] == (grpc.StatusCode.NOT_FOUND, "LINK_NOT_FOUND")
    (never,) = ids("cookie:un-never-seen")
    assert failure(lambda: identity.UnlinkIdentifiers(pb.UnlinkIdentifiersRequest(identifier=never),
                                                      timeout=30))[:2] == (
        grpc.StatusCode.NOT_FOUND, "IDENTIFIER_NOT_FOUND")
