"""google.longrunning.Operations over a service's GetOperation handler, through a real server and channel
(the services' own operations against Cassandra: tests/services/*/test_longrunning_operations.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from google.longrunning import operations_proto_pb2 as lro_pb
from google.longrunning.operations_pb2_grpc import OperationsStub
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from grpc_status import rpc_status

from shared.config import GrpcSettings
from shared.errors import InvalidArgument, NotFound
from shared.longrunning import OPERATIONS_SERVICE_NAME, Instead, operations_registration
from shared.server import RunningServer, create_server

pytestmark = pytest.mark.unit

INSTEAD = Instead(list_operations="keep the name RunThing returned", cancel_operation="things run to their end",
                  delete_operation="things expire after a day")


class Operations:
    """A service's operations: `ready/<n>` done, `slow` done once `finish` is set, `busy` never done."""

    def __init__(self) -> None:
        self.finish = threading.Event()
        self.reads = 0

    def get(self, request: lro_pb.GetOperationRequest, context: grpc.ServicerContext) -> lro_pb.Operation:
        self.reads += 1
        name = request.name
        if not name.startswith("things/"):
            raise InvalidArgument.for_field("name", f"{name!r} is not a name like things/<id>")
        if name == "things/slow":
            return lro_pb.Operation(name=name, done=self.finish.is_set())
        if name == "things/busy":
            return lro_pb.Operation(name=name, done=False)
        if name.startswith("things/ready"):
            return lro_pb.Operation(name=name, done=True)
        raise NotFound(f"{name} does not exist", reason="OPERATION_NOT_FOUND")


@pytest.fixture
def operations() -> Operations:
    return Operations()


@pytest.fixture
def server(grpc_settings: GrpcSettings, operations: Operations) -> Iterator[RunningServer]:
    running = create_server([operations_registration("test.v1.ThingService", operations.get, INSTEAD)],
                            grpc_settings, port=0, error_domain="onecdp.test")
    try:
        yield running
    finally:
        running.stop(None).wait()


@pytest.fixture
def channel(server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as opened:
        yield opened


@pytest.fixture
def stub(channel: grpc.Channel) -> OperationsStub:
    return OperationsStub(channel)  # type: ignore[no-untyped-call]


def failure(call: grpc.UnaryUnaryMultiCallable, request: object,
            timeout: float = 10) -> tuple[grpc.StatusCode, str, str, list[str]]:
    """(code, message, ErrorInfo reason, violated fields) of a failing call."""
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=timeout)
    error = caught.value
    status = rpc_status.from_call(error)
    reason, fields = "", []
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields = [v.field for v in bad.field_violations]
    return error.code(), error.details(), reason, fields


def seconds(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(value * 1e9))
    return duration


def test_get_operation_answers_what_the_handler_answers(stub: OperationsStub) -> None:
    assert stub.GetOperation(lro_pb.GetOperationRequest(name="things/ready1"), timeout=10) == lro_pb.Operation(
        name="things/ready1", done=True)
    code, message, reason, _ = failure(stub.GetOperation, lro_pb.GetOperationRequest(name="things/gone"))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "OPERATION_NOT_FOUND") and "things/gone" in message
    code, _, _, fields = failure(stub.GetOperation, lro_pb.GetOperationRequest(name="nonsense"))
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["name"])


def test_wait_answers_a_done_operation_at_once(stub: OperationsStub, operations: Operations) -> None:
    started = time.monotonic()
    answer = stub.WaitOperation(lro_pb.WaitOperationRequest(name="things/ready2", timeout=seconds(30)), timeout=40)
    assert answer.done and time.monotonic() - started < 1 and operations.reads == 1


def test_wait_answers_the_latest_state_when_its_timeout_ends(stub: OperationsStub, operations: Operations) -> None:
    started = time.monotonic()
    answer = stub.WaitOperation(lro_pb.WaitOperationRequest(name="things/busy", timeout=seconds(0.6)), timeout=10)
    waited = time.monotonic() - started
    assert answer == lro_pb.Operation(name="things/busy", done=False)
    assert 0.6 <= waited < 1.6 and operations.reads > 2  # polled, not slept through


def test_wait_answers_once_the_operation_is_done(stub: OperationsStub, operations: Operations) -> None:
    threading.Timer(0.5, operations.finish.set).start()
    started = time.monotonic()
    answer = stub.WaitOperation(lro_pb.WaitOperationRequest(name="things/slow", timeout=seconds(20)), timeout=30)
    assert answer.done and 0.5 <= time.monotonic() - started < 2.5


def test_wait_ends_before_the_callers_deadline(stub: OperationsStub) -> None:
    """No timeout (default 10 s) under a 1.5 s deadline: the latest state, not DEADLINE_EXCEEDED."""
    started = time.monotonic()
    answer = stub.WaitOperation(lro_pb.WaitOperationRequest(name="things/busy"), timeout=1.5)
    assert not answer.done and 1.0 <= time.monotonic() - started < 1.5


def test_wait_of_zero_answers_at_once(stub: OperationsStub, operations: Operations) -> None:
    answer = stub.WaitOperation(lro_pb.WaitOperationRequest(name="things/busy", timeout=seconds(0)), timeout=10)
    assert not answer.done and operations.reads == 1


def test_wait_checks_its_timeout_and_its_name(stub: OperationsStub) -> None:
    code, message, _, fields = failure(stub.WaitOperation, lro_pb.WaitOperationRequest(
        name="things/busy", timeout=duration_pb2.Duration(seconds=-1)))
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["timeout"]) and "non-negative" in message
    code, message, _, _ = failure(stub.WaitOperation, lro_pb.WaitOperationRequest(
        name="things/gone", timeout=seconds(5)))
    assert code == grpc.StatusCode.NOT_FOUND and "things/gone" in message
    code, _, _, fields = failure(stub.WaitOperation, lro_pb.WaitOperationRequest(name="nonsense"))
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["name"])


def test_waiting_calls_beyond_the_limit_answer_at_once(stub: OperationsStub) -> None:
    """Waiting calls hold server threads: the ninth at a time gets the current state without waiting."""
    request = lro_pb.WaitOperationRequest(name="things/busy", timeout=seconds(3))
    with futures.ThreadPoolExecutor(8) as pool:
        waiting = [pool.submit(stub.WaitOperation, request, timeout=10) for _ in range(8)]
        time.sleep(0.5)  # all eight are waiting now
        started = time.monotonic()
        assert not stub.WaitOperation(request, timeout=10).done
        assert time.monotonic() - started < 1
        assert not any(call.result().done for call in waiting)


@pytest.mark.parametrize(("method", "request_message", "instead"), [
    ("ListOperations", lro_pb.ListOperationsRequest(name="things"), INSTEAD.list_operations),
    ("CancelOperation", lro_pb.CancelOperationRequest(name="things/busy"), INSTEAD.cancel_operation),
    ("DeleteOperation", lro_pb.DeleteOperationRequest(name="things/ready3"), INSTEAD.delete_operation),
])
def test_unsupported_methods_are_unimplemented_and_say_what_to_do_instead(
        stub: OperationsStub, method: str, request_message: object, instead: str) -> None:
    code, message, reason, _ = failure(getattr(stub, method), request_message)
    assert (code, reason) == (grpc.StatusCode.UNIMPLEMENTED, "OPERATION_METHOD_NOT_SUPPORTED")
    assert f"google.longrunning.Operations/{method}" in message and "test.v1.ThingService" in message
    assert instead in message


def test_the_operations_service_is_reflected_and_healthy(channel: grpc.Channel) -> None:
    assert OPERATIONS_SERVICE_NAME in set(ProtoReflectionDescriptorDatabase(channel).get_services())
    response = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=OPERATIONS_SERVICE_NAME), timeout=5)
    assert response.status == health_pb2.HealthCheckResponse.SERVING
