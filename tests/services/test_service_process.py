"""A service as operators run it: its own process, grpcurl against it, SIGTERM for a graceful stop."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.config import CassandraSettings

pytestmark = pytest.mark.integration

GRACE_SECONDS = 3.0
REPO = Path(__file__).resolve().parents[2]


@dataclass
class ServiceProcess:
    process: subprocess.Popen[str]
    port: int
    log_lines: list[str]


def _wait_for_serving_line(process: subprocess.Popen[str], timeout: float) -> tuple[int, list[str]]:
    """Read the JSON log until the service says where it serves."""
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        record = json.loads(line)
        if record.get("message") == "serving":
            return int(record["port"]), lines
    raise AssertionError("service did not start:\n" + "".join(lines))


@pytest.fixture
def identity_process(cassandra_settings: CassandraSettings) -> Iterator[ServiceProcess]:
    env = {
        **os.environ,
        "CASSANDRA_CONTACT_POINTS": ",".join(cassandra_settings.contact_points),
        "CASSANDRA_KEYSPACE_PREFIX": cassandra_settings.keyspace_prefix,
        "ONECDP_IDENTITY_PORT": "0",
        "ONECDP_BIND_HOST": "127.0.0.1",
        "ONECDP_GRACE_PERIOD_SECONDS": str(GRACE_SECONDS),
        "ONECDP_LOG_FORMAT": "json",
    }
    process = subprocess.Popen([sys.executable, "-m", "services.identity"], env=env, cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        port, lines = _wait_for_serving_line(process, timeout=60)
        yield ServiceProcess(process, port, lines)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


def _grpcurl() -> str:
    # The setup installs grpcurl next to the venv's python; a missing binary is a failed setup, not a skip.
    found = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
    assert found, "grpcurl is not installed: run the README's setup (deploy/bootstrap.sh installs it)"
    return found


def test_grpcurl_lists_and_describes_the_service(identity_process: ServiceProcess) -> None:
    address = f"127.0.0.1:{identity_process.port}"
    listed = subprocess.run([_grpcurl(), "-plaintext", address, "list"],
                            capture_output=True, text=True, timeout=30, check=True).stdout.split()
    assert "onecdp.identity.v1.IdentityService" in listed
    assert "grpc.health.v1.Health" in listed
    described = subprocess.run(
        [_grpcurl(), "-plaintext", address, "describe", "onecdp.identity.v1.IdentityService"],
        capture_output=True, text=True, timeout=30, check=True).stdout
    assert "rpc LinkIdentifiers ( .onecdp.identity.v1.LinkIdentifiersRequest )" in described
    message = subprocess.run(
        [_grpcurl(), "-plaintext", address, "describe", "onecdp.identity.v1.LinkIdentifiersRequest"],
        capture_output=True, text=True, timeout=30, check=True).stdout
    assert "repeated .onecdp.identity.v1.Observation observations" in message
    health = subprocess.run([_grpcurl(), "-plaintext", address, "grpc.health.v1.Health/Check"],
                            capture_output=True, text=True, timeout=30, check=True).stdout
    assert json.loads(health) == {"status": "SERVING"}


def test_sigterm_turns_health_not_serving_then_exits_cleanly_within_grace(
        identity_process: ServiceProcess) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{identity_process.port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        signalled = time.monotonic()
        identity_process.process.send_signal(signal.SIGTERM)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        exit_code = identity_process.process.wait(timeout=GRACE_SECONDS + 10)
    elapsed = time.monotonic() - signalled
    assert exit_code == 0
    # The open Watch stream is an in-flight RPC: the server waits for it at most the grace period.
    assert elapsed < GRACE_SECONDS + 5
    assert identity_process.process.stdout is not None
    tail = [json.loads(line) for line in identity_process.process.stdout.read().splitlines() if line.strip()]
    assert [record["message"] for record in tail][-2:] == ["shutting down", "stopped"]
