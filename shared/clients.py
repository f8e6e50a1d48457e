"""Channels to the other OneCDP services, with deadlines, retries and per-call load balancing.

Every channel gets a gRPC service config (python-api-core's rules, expressed the way gRPC itself
applies them): retries with exponential backoff and jitter on UNAVAILABLE for idempotent methods
only (reads, and writes keyed by message_id/request_id), and round_robin over every address the
target resolves to, so a `dns:///` headless Service balances per call rather than per connection.
Unary and client-streaming calls that carry no deadline get the default one (DefaultDeadline).
With `ONECDP_TLS_*` set, channels use mutual TLS: the server must present a certificate for the
target's host name signed by the configured CA, and we present ours.
"""

from __future__ import annotations

import json
from collections import namedtuple
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from onecdp.identity.v1 import identity_service_pb2, identity_service_pb2_grpc
from onecdp.prediction.v1 import prediction_service_pb2, prediction_service_pb2_grpc
from onecdp.profile.v1 import profile_service_pb2, profile_service_pb2_grpc
from onecdp.segmentation.v1 import segmentation_service_pb2, segmentation_service_pb2_grpc
from opentelemetry.instrumentation.grpc import client_interceptor
from opentelemetry.instrumentation.grpc.grpcext import intercept_channel

from shared.config import GrpcSettings, TlsFiles, read_pem

StubT = TypeVar("StubT")

# Methods that are safe to send twice: reads, and writes made idempotent by message_id/request_id.
_READ_PREFIXES = ("Get", "List", "BatchGet", "BatchLookup", "Lookup", "Explain", "Estimate", "Evaluate", "Score",
                  "BatchScore", "Scan", "Watch")
IDEMPOTENT_WRITES = frozenset({"LinkIdentifiers", "IngestEvents", "BatchWriteTraits"})


def is_idempotent(method_name: str) -> bool:
    return method_name.startswith(_READ_PREFIXES) or method_name in IDEMPOTENT_WRITES


_RETRY_POLICY = {
    "maxAttempts": 4,
    "initialBackoff": "0.1s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}


def service_config(services: Iterable[ServiceDescriptor]) -> str:
    """The gRPC service config JSON for calling `services`.

    Idempotent calls retry on UNAVAILABLE; client streams never do, because a consumed request
    stream cannot be replayed. Deadlines are not set here: a service config `timeout` caps every
    call, even one whose caller asked for longer (a bulk load), so the default deadline is applied
    by `DefaultDeadline` only to calls that carry none.
    """
    method_configs: list[dict[str, object]] = []
    for service in services:
        retried = [m.name for m in service.methods if is_idempotent(m.name) and not m.client_streaming]
        if retried:
            method_configs.append({"name": [{"service": service.full_name, "method": n} for n in retried],
                                   "retryPolicy": _RETRY_POLICY})
    return json.dumps({"loadBalancingConfig": [{"round_robin": {}}], "methodConfig": method_configs})


class _CallDetails(
        namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
        grpc.ClientCallDetails):  # type: ignore[misc]
    pass


class DefaultDeadline(grpc.UnaryUnaryClientInterceptor, grpc.StreamUnaryClientInterceptor):  # type: ignore[misc]
    """Gives unary and client-streaming calls without a deadline the default one.

    Server streams (watch feeds, exports) are left alone: they are meant to stay open.
    """

    def __init__(self, timeout_seconds: float) -> None:
        self._timeout = timeout_seconds

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        if details.timeout is not None:
            return details
        return _CallDetails(details.method, self._timeout, details.metadata, details.credentials,
                            getattr(details, "wait_for_ready", None), getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation: Any, client_call_details: grpc.ClientCallDetails,
                              request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation: Any, client_call_details: grpc.ClientCallDetails,
                               request_iterator: Any) -> Any:
        return continuation(self._details(client_call_details), request_iterator)


def channel_credentials(tls: TlsFiles) -> grpc.ChannelCredentials:
    """Mutual TLS as a client: trust only the configured CA, and present our own certificate."""
    credentials: grpc.ChannelCredentials = grpc.ssl_channel_credentials(
        root_certificates=read_pem(tls.ca), private_key=read_pem(tls.key), certificate_chain=read_pem(tls.cert))
    return credentials


def open_channel(target: str, services: Iterable[ServiceDescriptor], settings: GrpcSettings) -> grpc.Channel:
    """A channel to `target` (mutual TLS when configured) with the service config and tracing interceptor."""
    options = [
        ("grpc.service_config", service_config(services)),
        ("grpc.enable_retries", 1),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # gRPC shares connections between channels with the same arguments, backoff state included: a
        # channel opened to an address whose earlier server went away (a restarted dependency on the same
        # port) would fail "connection refused" until the old channel's reconnect backoff ends (up to
        # 120 s). Each channel keeps its own connections, so a new one connects at once.
        ("grpc.use_local_subchannel_pool", 1),
    ]
    tls = settings.tls_files()
    if tls is None:
        channel = grpc.insecure_channel(target, options=options)
    else:
        channel = grpc.secure_channel(target, channel_credentials(tls), options=options)
    # OpenTelemetry's interceptor implements its own grpcext interfaces, not grpc's: grpc.intercept_channel
    # refuses it with a TypeError, so it goes through grpcext.intercept_channel.
    channel = grpc.intercept_channel(channel, DefaultDeadline(settings.client_timeout_seconds))
    intercepted: grpc.Channel = intercept_channel(channel, client_interceptor())  # type: ignore[no-untyped-call]
    return intercepted


def _stub(service_name: str, descriptor: ServiceDescriptor, stub_class: Callable[[grpc.Channel], StubT],
          settings: GrpcSettings, close_with: Callable[[Callable[[], None]], object]) -> StubT:
    channel = open_channel(settings.target_of(service_name), [descriptor], settings)
    close_with(channel.close)
    return stub_class(channel)


def identity_stub(settings: GrpcSettings,
                  close_with: Callable[[Callable[[], None]], object]) -> identity_service_pb2_grpc.IdentityServiceStub:
    """A stub for the identity service at `ONECDP_IDENTITY_TARGET`; its channel closes through `close_with`
    (a service's ServiceContext.on_stop, a test's ExitStack.callback)."""
    return _stub("identity", identity_service_pb2.DESCRIPTOR.services_by_name["IdentityService"],
                 identity_service_pb2_grpc.IdentityServiceStub, settings, close_with)


def profile_stub(settings: GrpcSettings,
                 close_with: Callable[[Callable[[], None]], object]) -> profile_service_pb2_grpc.ProfileServiceStub:
    """A stub for the profile service at `ONECDP_PROFILE_TARGET`; its channel closes through `close_with`."""
    return _stub("profile", profile_service_pb2.DESCRIPTOR.services_by_name["ProfileService"],
                 profile_service_pb2_grpc.ProfileServiceStub, settings, close_with)


def segmentation_stub(
        settings: GrpcSettings,
        close_with: Callable[[Callable[[], None]], object]) -> segmentation_service_pb2_grpc.SegmentationServiceStub:
    """A stub for the segmentation service at `ONECDP_SEGMENTATION_TARGET`; its channel closes through
    `close_with`."""
    return _stub("segmentation", segmentation_service_pb2.DESCRIPTOR.services_by_name["SegmentationService"],
                 segmentation_service_pb2_grpc.SegmentationServiceStub, settings, close_with)


def prediction_stub(
        settings: GrpcSettings,
        close_with: Callable[[Callable[[], None]], object]) -> prediction_service_pb2_grpc.PredictionServiceStub:
    """A stub for the prediction service at `ONECDP_PREDICTION_TARGET`; its channel closes through `close_with`."""
    return _stub("prediction", prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"],
                 prediction_service_pb2_grpc.PredictionServiceStub, settings, close_with)


def every_profile_event(stub: profile_service_pb2_grpc.ProfileServiceStub,
                        request: profile_service_pb2.ListProfileEventsRequest,
                        timeout: Callable[[], float | None] = lambda: None, *,
                        missing_as_empty: bool = True) -> list[profile_service_pb2.StoredEvent]:
    """Every page of a ListProfileEvents `request` (newest first, as profile pages them): how a reader takes the
    events of a person whose profile came with `events_omitted` (too many for one message). [] when profile no
    longer knows the person (NOT_FOUND: erased since it was read, so it has no events), unless not
    `missing_as_empty` (a caller that answers about that one person says NOT_FOUND); other errors are raised as
    grpc.RpcError. `timeout` gives each page's deadline."""
    events: list[profile_service_pb2.StoredEvent] = []
    while True:
        try:
            page = stub.ListProfileEvents(request, timeout=timeout())
        except grpc.RpcError as error:
            if missing_as_empty and isinstance(error, grpc.Call) and error.code() == grpc.StatusCode.NOT_FOUND:
                return []
            raise
        events.extend(page.events)
        request.page_token = page.next_page_token
        if not request.page_token:
            return events
