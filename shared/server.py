"""gRPC server bootstrap shared by the four services.

`create_server` returns a started server and its bound port (bind port 0 in tests), serving the
given services plus grpc.health.v1 health and server reflection, behind interceptors for
OpenTelemetry tracing and for errors/deadlines/logging. `serve_until_signalled` implements the
graceful shutdown Kubernetes expects: on SIGTERM health turns NOT_SERVING at once (load balancers
and readiness probes stop sending traffic), then in-flight RPCs get the grace period to finish.

With `ONECDP_TLS_*` set the service port requires mutual TLS (a client certificate signed by the
configured CA). Kubernetes' native gRPC probes cannot present one, so `ONECDP_HEALTH_PORT` adds a
plaintext port that serves nothing but grpc.health.v1, backed by the same health state.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import any_pb2, descriptor_pool
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status
from opentelemetry.instrumentation.grpc import server_interceptor

from shared import deadline
from shared.config import GrpcSettings, TlsFiles, read_pem
from shared.errors import DomainError, InvalidArgument, NotImplementedYet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceRegistration:
    """One gRPC service to serve: its full name (for health and reflection) and how to add it."""

    full_name: str
    add_to_server: Callable[[grpc.Server], None]


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    health: health.HealthServicer
    service_names: tuple[str, ...]
    # The plaintext health-only server and its port, when ONECDP_HEALTH_PORT is set.
    health_server: grpc.Server | None = None
    health_port: int | None = None

    def enter_graceful_shutdown(self) -> None:
        self.health.enter_graceful_shutdown()

    def stop(self, grace: float | None) -> threading.Event:
        """NOT_SERVING at once, then stop; the returned event is set once every port is closed."""
        self.enter_graceful_shutdown()
        stopped: threading.Event = self.server.stop(grace)
        health_server = self.health_server
        if health_server is None:
            return stopped
        # The health port outlives the service port, so probes read NOT_SERVING during the grace
        # period instead of a refused connection.
        all_stopped = threading.Event()

        def stop_health_after_service() -> None:
            stopped.wait()
            health_server.stop(None).wait()
            all_stopped.set()

        threading.Thread(target=stop_health_after_service, name="health-port-stop", daemon=True).start()
        return all_stopped


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    """Mutual TLS: our certificate, and every client must present one signed by the configured CA."""
    credentials: grpc.ServerCredentials = grpc.ssl_server_credentials(
        [(read_pem(tls.key), read_pem(tls.cert))],
        root_certificates=read_pem(tls.ca),
        require_client_auth=True,
    )
    return credentials


def to_status(error: DomainError, domain: str) -> grpc.Status:
    """The rich status for a domain error: ErrorInfo always, BadRequest when fields are named."""
    details = []
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=domain, metadata=error.metadata)
    details.append(_pack(info))
    if error.field_violations:
        bad_request = error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in error.field_violations
        ])
        details.append(_pack(bad_request))
    status = status_pb2.Status(code=code_pb2.Code.Value(error.code.value), message=error.message, details=details)
    result: grpc.Status = rpc_status.to_status(status)
    return result


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


class _MalformedRequest:
    """What the request deserializer yields for bytes that do not parse: grpcio would answer a raising
    deserializer with a bare INTERNAL "Exception deserializing request!", so the failure is carried to the
    wrapped behavior instead, which raises it as INVALID_ARGUMENT with ErrorInfo like any domain error."""

    __slots__ = ("deserializer", "error", "method")

    def __init__(self, error: Exception, method: str, deserializer: Callable[[bytes], Any]) -> None:
        self.error = error
        self.method = method
        self.deserializer = deserializer

    def to_error(self, position: int | None = None) -> InvalidArgument:
        message_name = _request_message_name(self.method, self.deserializer)
        why = str(self.error).split("': ", 1)[-1] or type(self.error).__name__  # drop upb's "... type 'x': "
        which = "the request bytes are" if position is None else f"the bytes of request message {position} " \
            "(counting from 0) of the stream are"
        metadata = {"message_type": message_name, "method": self.method.lstrip("/")}
        if position is not None:
            metadata["message_index"] = str(position)
        return InvalidArgument(f"{which} not a valid {message_name}: {why[:200]}", reason="MALFORMED_REQUEST",
                               metadata=metadata)


def _request_message_name(method: str, deserializer: Callable[[bytes], Any]) -> str:
    """The full name of `method`'s request message (`/pkg.Service/Method`), from the descriptor pool."""
    try:
        found = descriptor_pool.Default().FindMethodByName(method.lstrip("/").replace("/", "."))
        return str(found.input_type.full_name)
    except KeyError:
        message_class = getattr(deserializer, "__self__", None)
        descriptor = getattr(message_class, "DESCRIPTOR", None)
        return str(getattr(descriptor, "full_name", f"request message of {method.lstrip('/')}"))


def _tolerant(deserializer: Callable[[bytes], Any] | None, method: str) -> Callable[[bytes], Any] | None:
    """`deserializer`, returning a _MalformedRequest instead of raising (None: grpcio passes bytes through)."""
    if deserializer is None:
        return None
    parse = deserializer

    def deserialize(serialized: bytes) -> Any:
        try:
            return parse(serialized)
        except Exception as error:  # a DecodeError for protobuf; any failure means the bytes do not parse
            return _MalformedRequest(error, method, parse)
    return deserialize


def _checked(request: Any) -> Any:
    if isinstance(request, _MalformedRequest):
        raise request.to_error()
    return request


def _checked_stream(requests: Iterator[Any]) -> Iterator[Any]:
    """The request stream, raising INVALID_ARGUMENT where a message did not parse (in the handler's loop,
    so the interceptor turns it into the call's status)."""
    for position, request in enumerate(requests):
        if isinstance(request, _MalformedRequest):
            raise request.to_error(position)
        yield request


class ErrorAndDeadlineInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Maps domain errors to statuses (request bytes that do not parse included), exposes the caller's
    deadline, and logs each call."""

    def __init__(self, domain: str) -> None:
        self._domain = domain

    def intercept_service(self, continuation: Callable[[Any], Any], handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        request_deserializer = _tolerant(handler.request_deserializer, method)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method, _checked),
                request_deserializer=request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, method, _checked),
                request_deserializer=request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(handler.stream_unary, method, _checked_stream),
                request_deserializer=request_deserializer,
                response_serializer=handler.response_serializer)
        return grpc.stream_stream_rpc_method_handler(
            self._wrap_stream(handler.stream_stream, method, _checked_stream),
            request_deserializer=request_deserializer,
            response_serializer=handler.response_serializer)

    def _wrap_unary(self, behavior: Callable[[Any, grpc.ServicerContext], Any], method: str,
                    check: Callable[[Any], Any]) -> Callable[..., Any]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            started = time.perf_counter()
            with deadline.deadline_after(_deadline_of(context)):
                try:
                    response = behavior(check(request), context)
                    self._log(method, "OK", started)
                    return response
                except Exception as error:  # every failure is turned into a status here, once
                    self._abort(error, method, context, started)
                    raise  # unreachable: _abort always raises
        return wrapped

    def _wrap_stream(self, behavior: Callable[[Any, grpc.ServicerContext], Iterator[Any]],
                     method: str, check: Callable[[Any], Any]) -> Callable[..., Iterator[Any]]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            started = time.perf_counter()
            with deadline.deadline_after(_deadline_of(context)):
                try:
                    yield from behavior(check(request), context)
                except Exception as error:  # every failure is turned into a status here, once
                    self._abort(error, method, context, started)
            self._log(method, "OK", started)
        return wrapped

    def _abort(self, error: Exception, method: str, context: grpc.ServicerContext, started: float) -> None:
        if isinstance(error, NotImplementedError) and not isinstance(error, DomainError):
            error = NotImplementedYet(f"{method.lstrip('/')} is not implemented yet in this OneCDP release",
                                      reason="NOT_IMPLEMENTED_YET")
        if isinstance(error, DomainError):
            self._log(method, error.code.value, started, error.message)
            context.abort_with_status(to_status(error, self._domain))
        # grpc.RpcError raised by abort() itself, or by a handler that already set its status.
        if isinstance(error, grpc.RpcError) or _is_abort(error):
            raise error
        log.exception("unhandled error in %s", method)
        self._log(method, "INTERNAL", started, str(error))
        context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method.lstrip('/')}; it has been logged")

    @staticmethod
    def _log(method: str, code: str, started: float, message: str = "") -> None:
        level = logging.DEBUG if code == "OK" else logging.INFO
        log.log(level, "rpc finished", extra={"rpc_method": method, "grpc_code": code,
                                               "duration_ms": round((time.perf_counter() - started) * 1e3, 3),
                                               "detail": message})


# grpc reports "no deadline" as a time remaining of about 9.2e18 seconds.
_NO_DEADLINE_SECONDS = 1e12


def _deadline_of(context: grpc.ServicerContext) -> float | None:
    remaining: float | None = context.time_remaining()
    return None if remaining is None or remaining >= _NO_DEADLINE_SECONDS else remaining


def _is_abort(error: Exception) -> bool:
    # grpc's ServicerContext.abort raises a bare Exception subclass after setting the status.
    return type(error).__name__ == "_AbortError" or (type(error) is Exception and not error.args)


def create_server(
    registrations: Sequence[ServiceRegistration],
    settings: GrpcSettings,
    *,
    port: int,
    error_domain: str,
    bind_host: str | None = None,
) -> RunningServer:
    """Build, bind and start a server; port 0 binds a free port (returned in RunningServer.port)."""
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # Two servers on one port would silently split traffic; a clash must fail instead.
        ("grpc.so_reuseport", 0),
        ("grpc.max_connection_age_ms", int(settings.max_connection_age_seconds * 1000)),
        ("grpc.max_connection_age_grace_ms", int(settings.grace_period_seconds * 1000)),
    ]
    server = grpc.server(
        ThreadPoolExecutor(max_workers=settings.max_workers, thread_name_prefix=f"{error_domain}-rpc"),
        interceptors=[server_interceptor(), ErrorAndDeadlineInterceptor(error_domain)],  # type: ignore[no-untyped-call]
        options=options,
    )
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for registration in registrations:
        registration.add_to_server(server)
    names = tuple(registration.full_name for registration in registrations)
    reflection.enable_server_reflection(
        (*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    host = bind_host or settings.bind_host
    address = f"{host}:{port}"
    tls = settings.tls_files()
    if tls is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, server_credentials(tls))
    if bound == 0:
        raise OSError(f"could not bind {address}: is the port in use?")
    health_server, health_port = None, None
    if settings.health_port is not None:
        health_server, health_port = _health_only_server(health_servicer, f"{host}:{settings.health_port}")
    server.start()
    for name in ("", *names):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server=server, port=bound, health=health_servicer, service_names=names,
                         health_server=health_server, health_port=health_port)


def _health_only_server(health_servicer: health.HealthServicer, address: str) -> tuple[grpc.Server, int]:
    """A plaintext server with grpc.health.v1 only: no reflection, no service, nothing to leak."""
    server = grpc.server(ThreadPoolExecutor(max_workers=4, thread_name_prefix="health-port"),
                         options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"could not bind the health port {address}: is the port in use?")
    server.start()
    return server, bound


def serve_until_signalled(running: RunningServer, grace_seconds: float) -> None:
    """Block until SIGTERM/SIGINT, then shut down gracefully within `grace_seconds`."""
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("shutting down", extra={"signal": signal.Signals(signum).name, "grace_seconds": grace_seconds})
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stopping.wait()
    running.stop(grace_seconds).wait()
    log.info("stopped")
