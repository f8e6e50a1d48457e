"""Errors are API: domain errors reach a real client as precise statuses with ErrorInfo/BadRequest."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from cassandra import OperationTimedOut
from cassandra.cluster import NoHostAvailable
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from onecdp.common.v1 import common_pb2
from onecdp.identity.v1 import identity_service_pb2 as pb
from onecdp.identity.v1 import identity_service_pb2_grpc as pb_grpc

from shared import deadline
from shared.cassandra import translate_driver_error
from shared.config import GrpcSettings
from shared.errors import DeadlineExceeded, FieldViolation, InvalidArgument, NotFound, Unavailable, Violations
from shared.server import RunningServer, ServiceRegistration, create_server

pytestmark = pytest.mark.unit


class _FailingIdentity(pb_grpc.IdentityServiceServicer):
    """Raises the failures under test; ListIdentifierTypes stays inherited (UNIMPLEMENTED)."""

    def LookupPerson(self, request: pb.LookupPersonRequest, context: grpc.ServicerContext) -> pb.Person:
        raise NotFound("no person holds email ada@example.com", reason="PERSON_NOT_FOUND",
                       metadata={"identifier_type": "email"})

    def LinkIdentifiers(self, request: pb.LinkIdentifiersRequest,
                        context: grpc.ServicerContext) -> pb.LinkIdentifiersResponse:
        violations = Violations()
        for i, observation in enumerate(request.observations):
            violations.check(bool(observation.provenance.message_id),
                             f"observations[{i}].provenance.message_id", "required")
        violations.raise_if_any()
        return pb.LinkIdentifiersResponse()

    def ExplainLink(self, request: pb.ExplainLinkRequest, context: grpc.ServicerContext) -> pb.ExplainLinkResponse:
        raise RuntimeError("a bug")

    def GetGuardPolicy(self, request: pb.GetGuardPolicyRequest, context: grpc.ServicerContext) -> pb.GuardPolicy:
        return pb.GuardPolicy(name=f"remaining={deadline.remaining() is not None}")

    def WatchIdentityChanges(self, request: pb.WatchIdentityChangesRequest,
                             context: grpc.ServicerContext) -> Iterator[pb.IdentityChange]:
        yield pb.IdentityChange(cursor="1")
        raise Unavailable("change feed storage is down; reconnect with cursor 1", reason="FEED_UNAVAILABLE")


@pytest.fixture
def server(grpc_settings: GrpcSettings) -> Iterator[RunningServer]:
    servicer = _FailingIdentity()  # type: ignore[abstract]
    running = create_server(
        [ServiceRegistration("onecdp.identity.v1.IdentityService",
                             lambda s: pb_grpc.add_IdentityServiceServicer_to_server(servicer, s))],
        grpc_settings, port=0, error_domain="onecdp.identity")
    yield running
    running.stop(None)


@pytest.fixture
def stub(server: RunningServer) -> Iterator[pb_grpc.IdentityServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.IdentityServiceStub(channel)


def _details(error: grpc.RpcError) -> tuple[error_details_pb2.ErrorInfo, error_details_pb2.BadRequest | None]:
    status = rpc_status.from_call(error)
    assert status is not None
    info, bad_request = error_details_pb2.ErrorInfo(), None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
    return info, bad_request


def test_not_found_carries_error_info(stub: pb_grpc.IdentityServiceStub) -> None:
    selector = common_pb2.PersonSelector(identifier=common_pb2.Identifier(type="email", value="ada@example.com"))
    with pytest.raises(grpc.RpcError) as caught:
        stub.LookupPerson(pb.LookupPersonRequest(person=selector), timeout=5)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == "no person holds email ada@example.com"
    info, bad_request = _details(caught.value)
    assert (info.reason, info.domain, dict(info.metadata)) == (
        "PERSON_NOT_FOUND", "onecdp.identity", {"identifier_type": "email"})
    assert bad_request is None


def test_invalid_argument_names_every_bad_field(stub: pb_grpc.IdentityServiceStub) -> None:
    request = pb.LinkIdentifiersRequest(observations=[
        pb.Observation(provenance=pb.Provenance(message_id="m1")), pb.Observation(), pb.Observation()])
    with pytest.raises(grpc.RpcError) as caught:
        stub.LinkIdentifiers(request, timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    _, bad_request = _details(caught.value)
    assert bad_request is not None
    assert [v.field for v in bad_request.field_violations] == [
        "observations[1].provenance.message_id", "observations[2].provenance.message_id"]


def test_unimplemented_method_names_itself(stub: pb_grpc.IdentityServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.ListIdentifierTypes(pb.ListIdentifierTypesRequest(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert caught.value.details() == (
        "onecdp.identity.v1.IdentityService/ListIdentifierTypes is not implemented yet in this OneCDP release")


def test_a_bug_is_internal_without_leaking_the_exception(stub: pb_grpc.IdentityServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.ExplainLink(pb.ExplainLinkRequest(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "a bug" not in caught.value.details()


def test_the_callers_deadline_is_visible_to_domain_code(stub: pb_grpc.IdentityServiceStub) -> None:
    assert stub.GetGuardPolicy(pb.GetGuardPolicyRequest(), timeout=5).name == "remaining=True"
    assert stub.GetGuardPolicy(pb.GetGuardPolicyRequest()).name == "remaining=False"


def test_a_stream_that_fails_midway_ends_with_the_domain_status(stub: pb_grpc.IdentityServiceStub) -> None:
    stream = stub.WatchIdentityChanges(pb.WatchIdentityChangesRequest(), timeout=5)
    assert next(stream).cursor == "1"
    with pytest.raises(grpc.RpcError) as caught:
        next(stream)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert _details(caught.value)[0].reason == "FEED_UNAVAILABLE"


def test_driver_failures_become_retryable_unavailable() -> None:
    translated = translate_driver_error(NoHostAvailable("no hosts", {}))
    assert isinstance(translated, Unavailable)
    assert "retry" in translated.message
    with deadline.deadline_after(0.0):
        assert isinstance(translate_driver_error(OperationTimedOut()), DeadlineExceeded)
    other = ValueError("not a driver error")
    assert translate_driver_error(other) is other


def test_violations_summarise_at_most_five_fields() -> None:
    violations = Violations()
    for i in range(7):
        violations.add(f"events[{i}].message_id", "required")
    with pytest.raises(InvalidArgument) as caught:
        violations.raise_if_any("bad batch")
    assert caught.value.message.endswith("(and 2 more)")
    assert caught.value.field_violations[6] == FieldViolation("events[6].message_id", "required")
