"""Client channels: a default deadline where the caller set none, retries only where a repeat is harmless."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from onecdp.identity.v1 import identity_service_pb2
from onecdp.profile.v1 import profile_service_pb2

from shared.clients import every_profile_event, is_idempotent, open_channel, service_config
from shared.config import GrpcSettings

pytestmark = pytest.mark.unit

IDENTITY = identity_service_pb2.DESCRIPTOR.services_by_name["IdentityService"]
PROFILE = profile_service_pb2.DESCRIPTOR.services_by_name["ProfileService"]
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]


def _configs_by_method(config: dict[str, object]) -> dict[str, dict[str, object]]:
    by_method = {}
    for method_config in config["methodConfig"]:  # type: ignore[attr-defined]
        for name in method_config["name"]:
            by_method[name["method"]] = method_config
    return by_method


def test_reads_and_keyed_writes_retry_on_unavailable_others_do_not() -> None:
    config = json.loads(service_config([IDENTITY, PROFILE]))
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    by_method = _configs_by_method(config)
    for method in ("LookupPerson", "LinkIdentifiers", "IngestEvents", "GetProfile", "ListProfileChanges"):
        assert by_method[method]["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]  # type: ignore[index]
        assert "timeout" not in by_method[method], "a service config timeout would cap longer caller deadlines"
    for method in ("UnlinkIdentifiers", "ErasePerson", "CreateIdentifierType"):
        assert method not in by_method


def test_client_streams_never_retry() -> None:
    by_method = _configs_by_method(json.loads(service_config([IDENTITY, PROFILE])))
    assert "StreamIngestEvents" not in by_method


def test_calls_without_a_deadline_get_the_default_and_callers_may_ask_for_longer() -> None:
    def slow_check(request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext) -> Any:
        time.sleep(0.6)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("grpc.health.v1.Health", {
        "Check": grpc.unary_unary_rpc_method_handler(
            slow_check, request_deserializer=health_pb2.HealthCheckRequest.FromString,
            response_serializer=health_pb2.HealthCheckResponse.SerializeToString)})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        settings = GrpcSettings(client_timeout_seconds=0.2)
        channel = open_channel(f"127.0.0.1:{port}", [HEALTH], settings)
        stub = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.RpcError) as cut:
            stub.Check(health_pb2.HealthCheckRequest())
        assert cut.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        channel.close()
    finally:
        server.stop(None)


def test_idempotence_rule() -> None:
    assert is_idempotent("GetProfile") and is_idempotent("BatchScorePersons") and is_idempotent("IngestEvents")
    assert not is_idempotent("ErasePerson") and not is_idempotent("TrainModel")


def _health_server(port: int) -> tuple[grpc.Server, int]:
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server, bound


def test_a_new_channel_does_not_inherit_the_reconnect_backoff_of_a_channel_whose_server_went_away() -> None:
    """In tests and in any process that restarts a dependency, a server can come back on the port an
    earlier one used. A channel opened then must connect at once, not fail with the earlier channel's
    "connection refused" for as long as that channel's reconnect backoff lasts (up to 120 s)."""
    settings = GrpcSettings()
    first_server, port = _health_server(0)
    old_channel = open_channel(f"127.0.0.1:{port}", [HEALTH], settings)
    assert health_pb2_grpc.HealthStub(old_channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    first_server.stop(None).wait()
    with pytest.raises(grpc.RpcError) as refused:
        health_pb2_grpc.HealthStub(old_channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    second_server, _ = _health_server(port)
    try:
        with open_channel(f"127.0.0.1:{port}", [HEALTH], settings) as new_channel:
            answer = health_pb2_grpc.HealthStub(new_channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        old_channel.close()
        second_server.stop(None)


class _NotFound(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.NOT_FOUND

    def details(self) -> str:
        return "no person 'p_gone' (never issued, or erased)"


class _PagesThenGone:
    """A ListProfileEvents that answers one page, then NOT_FOUND (the person erased meanwhile)."""

    def ListProfileEvents(self, request: Any, timeout: float | None = None) -> Any:
        if request.page_token:
            raise _NotFound()
        return profile_service_pb2.ListProfileEventsResponse(next_page_token="2")


def test_every_profile_event_answers_a_vanished_person_as_asked() -> None:
    request = profile_service_pb2.ListProfileEventsRequest()
    assert every_profile_event(_PagesThenGone(), request) == []  # type: ignore[arg-type]  # a reader: no events
    with pytest.raises(grpc.RpcError) as gone:  # one person's caller: NOT_FOUND, as a moment later
        every_profile_event(_PagesThenGone(), profile_service_pb2.ListProfileEventsRequest(),  # type: ignore[arg-type]
                            missing_as_empty=False)
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
