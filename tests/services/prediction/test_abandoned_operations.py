"""Operations whose process is killed: a prediction service in a process of its own starts trainings, is
SIGKILLed, and another instance over the same keyspace answers GetOperation / GetModelVersion with the
end of them (ABORTED, the version FAILED) once the dead process's leases have expired."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from google.longrunning import operations_pb2
from google.protobuf import timestamp_pb2
from google.rpc import code_pb2
from onecdp.prediction.v1 import prediction_service_pb2 as pb
from onecdp.prediction.v1 import prediction_service_pb2_grpc as pb_grpc
from onecdp.profile.v1 import profile_service_pb2

from shared.config import CassandraSettings
from shared.runner import RunningService

pytestmark = pytest.mark.integration

# Short leases for the killed process (renewed every 2 s); the other instance needs no setting: it only
# reads whether a lease is still there.
LEASE_SECONDS = 6
# Generous: Cassandra is shared and the machine loaded, and the end is read only after the lease expired.
END_WITHIN_SECONDS = 90.0

# The service in a process of its own, with the lease time set before it builds its registry; prints
# its port and runs until it is killed.
SERVICE_PROCESS = """
import sys, threading
import services.prediction.registry as registry
from services.prediction.server import DEFINITION
from shared.config import CassandraSettings, GrpcSettings
from shared.runner import start_service

registry.LEASE_SECONDS = int(sys.argv[1])
grpc_settings = GrpcSettings(bind_host="127.0.0.1", profile_target=sys.argv[2], client_timeout_seconds=600,
                             migrate_on_start=False, log_format="text")
service = start_service(DEFINITION, grpc_settings, CassandraSettings(), port=0)
print(service.port, flush=True)
threading.Event().wait()
"""


def _silent_profile_handlers(released: threading.Event) -> grpc.GenericRpcHandler:
    """Every method of the profile service, never answering until `released`: the trainings stay in their
    first stage until their process dies."""

    def wait(request: Any, context: grpc.ServicerContext) -> Any:
        released.wait()
        context.abort(grpc.StatusCode.UNAVAILABLE, "the test ended")

    def wait_streaming(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        wait(request, context)
        yield from ()

    handlers = {}
    for method in profile_service_pb2.DESCRIPTOR.services_by_name["ProfileService"].methods:
        if method.client_streaming:
            continue  # profile's feeds and scans are server streams; nothing here sends a stream
        handlers[method.name] = (grpc.unary_stream_rpc_method_handler(wait_streaming) if method.server_streaming
                                 else grpc.unary_unary_rpc_method_handler(wait))
    return grpc.method_handlers_generic_handler("onecdp.profile.v1.ProfileService", handlers)


@pytest.fixture
def silent_profile() -> Iterator[str]:
    released = threading.Event()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((_silent_profile_handlers(released),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        released.set()
        server.stop(0)


def _environment(cassandra: CassandraSettings) -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("CASSANDRA_", "ONECDP_"))}
    environment.update({
        "CASSANDRA_CONTACT_POINTS": ",".join(cassandra.contact_points), "CASSANDRA_PORT": str(cassandra.port),
        "CASSANDRA_LOCAL_DC": cassandra.local_dc, "CASSANDRA_KEYSPACE_PREFIX": cassandra.keyspace_prefix,
        "CASSANDRA_REPLICATION_FACTOR": str(cassandra.replication_factor)})
    if cassandra.username:
        environment["CASSANDRA_USERNAME"] = cassandra.username
    if cassandra.password:
        environment["CASSANDRA_PASSWORD"] = cassandra.password.get_secret_value()
    return environment


@pytest.fixture
def doomed_service(prediction_service: RunningService, cassandra_settings: CassandraSettings,
                   silent_profile: str) -> Iterator[tuple[subprocess.Popen[str], pb_grpc.PredictionServiceStub]]:
    """A second prediction instance over the same keyspace (migrated by `prediction_service`), in a process
    the test kills."""
    process = subprocess.Popen([sys.executable, "-c", SERVICE_PROCESS, str(LEASE_SECONDS), silent_profile],
                               env=_environment(cassandra_settings), stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        port = process.stdout.readline().strip()
        assert port.isdigit(), f"the service process did not start (exit code {process.poll()})"
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield process, pb_grpc.PredictionServiceStub(channel)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def _timestamp(text: str) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromJsonString(text)
    return stamp


def _train(stub: pb_grpc.PredictionServiceStub) -> operations_pb2.Operation:
    operation: operations_pb2.Operation = stub.TrainModel(pb.TrainModelRequest(
        name="models/buyers", training_cutoffs=[_timestamp("2024-01-01T00:00:00Z")],
        validation_cutoff=_timestamp("2024-04-01T00:00:00Z")), timeout=30)
    return operation


def _version_of(operation: operations_pb2.Operation) -> str:
    metadata = pb.TrainModelMetadata()
    assert operation.metadata.Unpack(metadata)
    return metadata.model_version


def _poll(call: Any, request: Any, ended: Any) -> Any:
    deadline = time.monotonic() + END_WITHIN_SECONDS
    while True:
        answer = call(request, timeout=30)
        if ended(answer) or time.monotonic() > deadline:
            return answer
        time.sleep(0.5)


def test_trainings_of_a_killed_process_end_aborted_and_their_versions_failed(
        prediction: pb_grpc.PredictionServiceStub,
        doomed_service: tuple[subprocess.Popen[str], pb_grpc.PredictionServiceStub]) -> None:
    process, doomed = doomed_service
    doomed.CreateModel(pb.CreateModelRequest(model_id="buyers", model=pb.Model(spec=pb.ModelSpec(
        kind=pb.PREDICTION_KIND_CONVERSION, horizon_days=30))), timeout=30)
    running = _train(doomed)  # waits on profile
    queued = _train(doomed)  # behind it on the worker
    assert (_version_of(running), _version_of(queued)) == ("models/buyers/versions/1", "models/buyers/versions/2")

    # While its process lives, its leases are renewed: the other instance sees both still running,
    # well past the lease time.
    time.sleep(2 * LEASE_SECONDS + 1)
    for operation in (running, queued):
        seen = prediction.GetOperation(operations_pb2.GetOperationRequest(name=operation.name), timeout=30)
        assert not seen.done
    version = prediction.GetModelVersion(pb.GetModelVersionRequest(name=_version_of(queued)), timeout=30)
    assert version.state == pb.MODEL_VERSION_STATE_TRAINING

    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)

    # The queued training's version, read without its operation, is failed once its lease expired ...
    version = _poll(prediction.GetModelVersion, pb.GetModelVersionRequest(name=_version_of(queued)),
                    lambda answer: answer.state != pb.MODEL_VERSION_STATE_TRAINING)
    assert version.state == pb.MODEL_VERSION_STATE_FAILED
    assert "process running this operation stopped" in version.failure_message
    # ... and a caller polling the running one gets its end too.
    ended = _poll(prediction.GetOperation, operations_pb2.GetOperationRequest(name=running.name),
                  lambda answer: answer.done)
    assert ended.done and ended.error.code == code_pb2.ABORTED
    assert ended.error.message.endswith("start it again with TrainModel")
    failed = prediction.GetModelVersion(pb.GetModelVersionRequest(name=_version_of(running)), timeout=30)
    assert failed.state == pb.MODEL_VERSION_STATE_FAILED and failed.failure_message == ended.error.message
    # The queued one's operation was ended with its version.
    queued_end = prediction.GetOperation(operations_pb2.GetOperationRequest(name=queued.name), timeout=30)
    assert queued_end.done and queued_end.error.code == code_pb2.ABORTED
    listed = prediction.ListModelVersions(pb.ListModelVersionsRequest(parent="models/buyers"), timeout=30)
    assert [v.state for v in listed.model_versions] == [pb.MODEL_VERSION_STATE_FAILED] * 2
