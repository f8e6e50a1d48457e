"""Profile rejects an event naming an erased identifier, and writes nothing: identity links none of its
identifiers either."""

from __future__ import annotations

import pytest
from onecdp.common.v1 import common_pb2
from onecdp.identity.v1 import identity_service_pb2 as identity_pb
from onecdp.identity.v1 import identity_service_pb2_grpc as identity_grpc
from onecdp.profile.v1 import profile_service_pb2 as pb
from onecdp.profile.v1 import profile_service_pb2_grpc as pb_grpc

from tests.services.profile.conftest import ident, identify, ingest

pytestmark = pytest.mark.integration


def test_an_event_rejected_for_an_erased_identifier_links_none_of_its_identifiers(
        profiles: pb_grpc.ProfileServiceStub, identity: identity_grpc.IdentityServiceStub) -> None:
    person_id = ingest(profiles, identify("cookie:pe-a", "email:pe-a@example.com"))[0].person_id
    identity.ErasePerson(identity_pb.ErasePersonRequest(person=common_pb2.PersonSelector(person_id=person_id),
                                                        reason="privacy request"), timeout=30)
    result = ingest(profiles, identify("cookie:pe-a", "cookie:pe-f1", "email:pe-f2@example.com"))[0]
    assert result.status == pb.EVENT_STATUS_REJECTED
    assert result.rejection_reason == pb.EVENT_REJECTION_REASON_ERASED_IDENTIFIER
    explained = identity.ExplainLink(identity_pb.ExplainLinkRequest(
        a=ident("cookie:pe-f1"), b=ident("email:pe-f2@example.com")), timeout=10)
    assert not explained.same_person and not explained.path
