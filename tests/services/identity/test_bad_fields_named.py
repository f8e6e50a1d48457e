"""Bad input is INVALID_ARGUMENT naming every bad field, never INTERNAL (a Cassandra error) or half of them."""

from __future__ import annotations

import grpc
import pytest
from onecdp.common.v1 import common_pb2
from onecdp.identity.v1 import identity_service_pb2 as pb
from onecdp.identity.v1 import identity_service_pb2_grpc as pb_grpc

from tests.services.identity.conftest import failure, ids, link, observation

pytestmark = pytest.mark.integration

Stub = pb_grpc.IdentityServiceStub


def test_unlink_by_an_empty_or_bad_message_id_is_invalid_argument_naming_message_id(identity: Stub) -> None:
    for message_id in ("", "line\nbreak", "x" * 129):
        code, reason, fields = failure(lambda m=message_id: identity.UnlinkIdentifiers(  # type: ignore[misc]
            pb.UnlinkIdentifiersRequest(message_id=m), timeout=10))
        assert (code, reason, fields) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_MESSAGE_ID", ["message_id"])


def test_explain_and_unlink_name_every_bad_identifier(identity: Stub) -> None:
    (bad_a,), (bad_b,) = ids("email:not-an-email"), ids("phone:not a phone")
    assert failure(lambda: identity.ExplainLink(pb.ExplainLinkRequest(a=bad_a, b=bad_b), timeout=10)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_IDENTIFIER", ["a.value", "b.value"])
    assert failure(lambda: identity.ExplainLink(pb.ExplainLinkRequest(b=bad_b), timeout=10))[2] == ["a", "b.value"]
    assert failure(lambda: identity.UnlinkIdentifiers(pb.UnlinkIdentifiersRequest(
        link=pb.IdentifierPair(a=bad_a, b=common_pb2.Identifier(type="no_such_type", value="x"))), timeout=10))[2] == [
        "link.a.value", "link.b.type"]


def test_a_message_id_with_a_control_character_is_refused_like_an_identifier_value(identity: Stub) -> None:
    bad = observation("cookie:cc-1", "email:cc-1@x.io", message_id="m\n1")
    assert failure(lambda: link(identity, observation("cookie:cc-0", message_id="fine"), bad)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_OBSERVATION", ["observations[1].provenance.message_id"])
    with pytest.raises(grpc.RpcError) as caught:
        link(identity, bad)
    assert "control character U+000A" in (caught.value.details() or "")
