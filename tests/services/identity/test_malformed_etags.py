"""An etag the service never issues is a malformed field (INVALID_ARGUMENT naming it), not a stale one
(ABORTED, which tells the caller to read again and retry: with a malformed etag that loop never ends)."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import field_mask_pb2
from onecdp.identity.v1 import identity_service_pb2 as pb
from onecdp.identity.v1 import identity_service_pb2_grpc as pb_grpc

from tests.services.identity.conftest import failure

pytestmark = pytest.mark.integration

Stub = pb_grpc.IdentityServiceStub
MALFORMED = ['"garbage"', "garbage", 'W/"0123456789abcdef01234567"', '"0123456789ABCDEF01234567"', " "]


def _update_type(stub: Stub, etag: str) -> object:
    return stub.UpdateIdentifierType(pb.UpdateIdentifierTypeRequest(
        identifier_type=pb.IdentifierType(name="identifierTypes/cookie", display_name="Cookie", etag=etag),
        update_mask=field_mask_pb2.FieldMask(paths=["display_name"])), timeout=30)


def _update_policy(stub: Stub, etag: str) -> object:
    policy = stub.GetGuardPolicy(pb.GetGuardPolicyRequest(), timeout=10)
    policy.etag = etag
    return stub.UpdateGuardPolicy(pb.UpdateGuardPolicyRequest(
        guard_policy=policy, update_mask=field_mask_pb2.FieldMask(paths=["blocked_values"])), timeout=30)


@pytest.mark.parametrize("etag", MALFORMED)
def test_a_malformed_etag_is_invalid_argument_naming_the_field(identity: Stub, etag: str) -> None:
    assert failure(lambda: _update_type(identity, etag)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ETAG", ["identifier_type.etag"])
    assert failure(lambda: _update_policy(identity, etag)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ETAG", ["guard_policy.etag"])


def test_a_well_formed_stale_etag_is_still_aborted_and_a_bare_current_one_applies(identity: Stub) -> None:
    stale = '"0123456789abcdef01234567"'
    assert failure(lambda: _update_type(identity, stale))[:2] == (grpc.StatusCode.ABORTED, "ETAG_MISMATCH")
    assert failure(lambda: _update_policy(identity, stale))[:2] == (grpc.StatusCode.ABORTED, "ETAG_MISMATCH")
    current = identity.GetIdentifierType(pb.GetIdentifierTypeRequest(name="identifierTypes/cookie"), timeout=10)
    updated = _update_type(identity, current.etag.strip('"'))  # bare, as a client that strips quotes sends it
    assert isinstance(updated, pb.IdentifierType) and updated.display_name == "Cookie"
