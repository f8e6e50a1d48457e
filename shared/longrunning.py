"""google.longrunning.Operations for a service whose methods return operations (AIP-151).

Generic clients (grpcurl, google-api-core's operations client) poll operations through the standard
service, not through each service's own `GetOperation`. `operations_registration` serves it beside a
service, over that service's own GetOperation handler, so both answer the same (statuses included: the
handler's domain errors go through the same interceptor). The operations a process serves are its own
service's: each service reads them from its own keyspace, so a name another service gave is NOT_FOUND.

WaitOperation polls the handler until the operation is done or the wait ends, and answers the latest
state either way (AIP-151: best effort, even an early answer may be not done). The wait is the request's
`timeout`, DEFAULT_WAIT_SECONDS when it is unset, at most MAX_WAIT_SECONDS, and always ends a little
before the caller's deadline so the caller gets the state rather than DEADLINE_EXCEEDED. A waiting call
holds one of the server's worker threads, so at most MAX_WAITING calls wait at a time per service; the
next ones answer the current state at once.

ListOperations, CancelOperation and DeleteOperation answer UNIMPLEMENTED, naming the method and what to
use instead (each service says what): operations are stored by id only (nothing to list them by),
nothing stops a running one, and they are kept (or expire) by the service's own rules.

`operation_error` is the one conversion of a failed operation's record to its `Operation.error`: a
google.rpc.Status with an ErrorInfo (reason, domain, metadata), like the status of a synchronous error.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

import grpc
from google.longrunning import operations_proto_pb2 as lro_pb
from google.longrunning.operations_pb2_grpc import OperationsServicer, add_OperationsServicer_to_server
from google.protobuf import empty_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from shared import deadline
from shared.errors import InvalidArgument, NotImplementedYet
from shared.server import ServiceRegistration

OPERATIONS_SERVICE_NAME = lro_pb.DESCRIPTOR.services_by_name["Operations"].full_name
# How long WaitOperation waits when the request gives no timeout, and at most (a waiting call holds a thread).
DEFAULT_WAIT_SECONDS = 10.0
MAX_WAIT_SECONDS = 60.0
# How many WaitOperation calls may wait at a time (the server has ~32 worker threads for everything).
MAX_WAITING = 8
# Polling the service's handler: first after this, then each time 1.5 times longer, at most MAX_POLL_SECONDS.
FIRST_POLL_SECONDS = 0.05
MAX_POLL_SECONDS = 1.0
# The wait ends this share of the caller's remaining time early (at most MAX_DEADLINE_MARGIN_SECONDS), so
# the last read and the answer fit in the deadline.
DEADLINE_MARGIN_SHARE = 0.2
MAX_DEADLINE_MARGIN_SECONDS = 0.5

# An operation's name. Services give uuid4 hex ids; the bound keeps any name a caller sends inside what
# Cassandra accepts as a key (refused by name, not INTERNAL from the driver).
_OPERATION_NAME = re.compile(r"operations/([A-Za-z0-9_-]{1,64})")

GetOperationHandler = Callable[[lro_pb.GetOperationRequest, grpc.ServicerContext], lro_pb.Operation]


@dataclass(frozen=True)
class Instead:
    """What a caller does instead of each unsupported method, in the service's own terms."""

    list_operations: str
    cancel_operation: str
    delete_operation: str


class LongRunningOperations(OperationsServicer):
    """google.longrunning.Operations over one service's GetOperation handler."""

    def __init__(self, service: str, get_operation: GetOperationHandler, instead: Instead, *,
                 max_waiting: int = MAX_WAITING) -> None:
        self._service = service
        self._get_operation = get_operation
        self._instead = instead
        self._waiting = threading.BoundedSemaphore(max_waiting)

    def GetOperation(self, request: lro_pb.GetOperationRequest, context: grpc.ServicerContext) -> lro_pb.Operation:
        return self._get_operation(request, context)

    def WaitOperation(self, request: lro_pb.WaitOperationRequest, context: grpc.ServicerContext) -> lro_pb.Operation:
        wait_seconds = _wait_seconds(request)
        end = time.monotonic() + wait_seconds  # from now: the first read's time counts against the deadline too
        get = lro_pb.GetOperationRequest(name=request.name)
        operation = self._get_operation(get, context)  # a bad name or an unknown operation fails here, at once
        if operation.done or wait_seconds <= 0 or not self._waiting.acquire(blocking=False):
            return operation
        try:
            pause = FIRST_POLL_SECONDS
            while not operation.done and context.is_active():
                left = end - time.monotonic()
                if left <= 0:
                    break
                time.sleep(min(pause, left))
                pause = min(pause * 1.5, MAX_POLL_SECONDS)
                operation = self._get_operation(get, context)
            return operation
        finally:
            self._waiting.release()

    def ListOperations(self, request: lro_pb.ListOperationsRequest,
                       context: grpc.ServicerContext) -> lro_pb.ListOperationsResponse:
        raise self._unsupported("ListOperations", self._instead.list_operations)

    def CancelOperation(self, request: lro_pb.CancelOperationRequest,
                        context: grpc.ServicerContext) -> empty_pb2.Empty:
        raise self._unsupported("CancelOperation", self._instead.cancel_operation)

    def DeleteOperation(self, request: lro_pb.DeleteOperationRequest,
                        context: grpc.ServicerContext) -> empty_pb2.Empty:
        raise self._unsupported("DeleteOperation", self._instead.delete_operation)

    def _unsupported(self, method: str, instead: str) -> NotImplementedYet:
        return NotImplementedYet(
            f"{OPERATIONS_SERVICE_NAME}/{method} is not supported by {self._service}: {instead}",
            reason="OPERATION_METHOD_NOT_SUPPORTED",
            metadata={"method": f"{OPERATIONS_SERVICE_NAME}/{method}", "service": self._service})


def _wait_seconds(request: lro_pb.WaitOperationRequest) -> float:
    """How long to wait: the request's timeout (DEFAULT_WAIT_SECONDS when unset, at most MAX_WAIT_SECONDS),
    ended early enough that the answer beats the caller's deadline."""
    requested = DEFAULT_WAIT_SECONDS
    if request.HasField("timeout"):
        timeout = request.timeout
        if timeout.seconds < 0 or not 0 <= timeout.nanos <= 999_999_999:
            raise InvalidArgument.for_field(
                "timeout", f"must be a non-negative duration (0 answers at once), got {timeout.seconds} s "
                           f"{timeout.nanos} ns")
        requested = min(timeout.seconds + timeout.nanos / 1e9, MAX_WAIT_SECONDS)
    left = deadline.remaining()
    if left is None:
        return requested
    return min(requested, left - min(left * DEADLINE_MARGIN_SHARE, MAX_DEADLINE_MARGIN_SECONDS))


def operation_id_of(name: str, field_path: str = "name") -> str:
    """The id of an `operations/{id}` name, for every service's GetOperation; INVALID_ARGUMENT naming
    `field_path` otherwise (reason INVALID_OPERATION_NAME, the same from every service)."""
    match = _OPERATION_NAME.fullmatch(name)  # fullmatch: `$` would also accept a name ending in a newline
    if match is None:
        raise InvalidArgument.for_field(
            field_path, f"{name[:200]!r} is not an operation name: expected operations/{{id}}, an id of 1-64 "
                        "letters, digits, _ or - (use Operation.name exactly as the call that started it returned it)",
            reason="INVALID_OPERATION_NAME")
    return match.group(1)


def operation_error(code: str, message: str, *, domain: str, reason: str | None = None,
                    metadata: Mapping[str, str] | None = None) -> status_pb2.Status:
    """The `Operation.error` of an operation that ended with the google.rpc code named `code`: its message and
    an ErrorInfo in the service's error `domain`, as a synchronous error would carry (shared.server.to_status).
    `reason` and `metadata` are what the operation recorded when it ended; an operation recorded without a
    reason (before reasons were stored) gets the code's name, the reason of a DomainError that gives none."""
    status = status_pb2.Status(code=code_pb2.Code.Value(code), message=message)
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason=reason or code, domain=domain,
                                                          metadata=dict(metadata or {})))
    return status


def operations_registration(service: str, get_operation: GetOperationHandler,
                            instead: Instead) -> ServiceRegistration:
    """google.longrunning.Operations for `service` (its full name), over its own GetOperation handler: served
    beside it, reflected and reported by health like it."""
    return ServiceRegistration(OPERATIONS_SERVICE_NAME, partial(
        add_OperationsServicer_to_server, LongRunningOperations(service, get_operation, instead)))
