"""An event whose message_id identity already holds for other identifiers is refused, not stored under their person."""

from __future__ import annotations

import pytest
from onecdp.identity.v1 import identity_service_pb2 as identity_pb
from onecdp.identity.v1 import identity_service_pb2_grpc as identity_grpc
from onecdp.profile.v1 import profile_service_pb2 as pb
from onecdp.profile.v1 import profile_service_pb2_grpc as pb_grpc

from tests.services.profile.conftest import ident, ingest, profile_of, track

pytestmark = pytest.mark.integration


def _link(identity: identity_grpc.IdentityServiceStub, message_id: str, *pairs: str) -> identity_pb.LinkResult:
    observation = identity_pb.Observation(identifiers=[ident(p) for p in pairs],
                                          provenance=identity_pb.Provenance(message_id=message_id, source="crm"))
    result: identity_pb.LinkResult = identity.LinkIdentifiers(
        identity_pb.LinkIdentifiersRequest(observations=[observation]), timeout=30).results[0]
    return result


def test_an_event_reusing_a_message_id_identity_holds_for_other_identifiers_is_refused(
        profiles: pb_grpc.ProfileServiceStub, identity: identity_grpc.IdentityServiceStub) -> None:
    first = _link(identity, "msg-taken", "cookie:mt-c1", "email:mt-1@x.io")
    (result,) = ingest(profiles, track("cookie:mt-c2", "email:mt-2@x.io", message_id="msg-taken"))
    assert result.status == pb.EVENT_STATUS_REJECTED
    assert result.rejection_reason == pb.EVENT_REJECTION_REASON_BAD_MESSAGE_ID
    assert "already holds an observation of other identifiers" in result.message
    assert profile_of(profiles, "cookie:mt-c1").person_id == first.person_id
    assert profile_of(profiles, "cookie:mt-c1").computed.event_count == 0  # nothing landed on their person
    # Identity answers the replay as such, saying the identifiers differ; it links none of them.
    again = _link(identity, "msg-taken", "cookie:mt-c2", "email:mt-2@x.io")
    assert again.duplicate and again.other_identifiers


def test_an_event_whose_identifiers_identity_linked_under_its_message_id_is_stored(
        profiles: pb_grpc.ProfileServiceStub, identity: identity_grpc.IdentityServiceStub) -> None:
    """What a profile that stopped between identity's link and its own write leaves: the same identifiers under
    the same message_id (spelled differently; identity compares them normalized). Its retry is stored."""
    linked = _link(identity, "msg-same", "cookie:ms-1", "email:ms@x.io")
    (result,) = ingest(profiles, track("cookie:ms-1", "email:MS@x.io", message_id="msg-same"))
    assert result.status == pb.EVENT_STATUS_ACCEPTED and result.person_id == linked.person_id
    assert profile_of(profiles, "email:ms@x.io").computed.event_count == 1
    again = _link(identity, "msg-same", "email:ms@X.io", "cookie:ms-1")
    assert again.duplicate and not again.other_identifiers
