"""The migration Job's command, exactly as the manifests give it, against the real Cassandra.

The Job starts together with Cassandra, so it must wait: here Cassandra is reached through a TCP relay
on a port where nothing listens until the Job has reported that it is waiting. The command then has to
create every service's keyspace with the replication factor from the settings. What cannot get better
by waiting (a bad setting) must fail at once instead.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy import manifests
from shared.cassandra import CassandraSession
from shared.config import SERVICE_NAMES, CassandraSettings
from shared.migrations import load_migrations, service_schema_dir

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
JOB_TIMEOUT_SECONDS = 240.0


def _job_command() -> list[str]:
    """The migration container's command in the rendered dev overlay, run with this interpreter."""
    resources = manifests.render(manifests.OVERLAYS_DIR / "dev")
    containers, problems = manifests.onecdp_containers(resources)
    assert problems == []
    (job,) = [c for c in containers if c.runs == "migrations"]
    command: list[str] = job.container["command"]
    assert command[0] == "python"
    return [sys.executable, *command[1:], *job.container.get("args", [])]


class LateRelay:
    """A TCP relay to Cassandra that starts listening only when `open()` is called."""

    def __init__(self, target: tuple[str, int]) -> None:
        self._target = target
        with socket.socket() as probe:  # a free port, closed again: connections are refused until open()
            probe.bind(("127.0.0.1", 0))
            self.port: int = probe.getsockname()[1]
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []

    def open(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def close(self) -> None:
        for sock in [*self._sockets, *([self._listener] if self._listener else [])]:
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(self._target, timeout=10)
            upstream.settimeout(None)
            self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def relay(cassandra_settings: CassandraSettings) -> Iterator[LateRelay]:
    late = LateRelay((cassandra_settings.contact_points[0], cassandra_settings.port))
    yield late
    late.close()


def _job_env(settings: CassandraSettings, **overrides: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("CASSANDRA_", "ONECDP_"))}
    env.update(CASSANDRA_CONTACT_POINTS="127.0.0.1", CASSANDRA_LOCAL_DC=settings.local_dc,
               CASSANDRA_KEYSPACE_PREFIX=settings.keyspace_prefix, CASSANDRA_REPLICATION_FACTOR="1",
               CASSANDRA_CONNECT_TIMEOUT_SECONDS="2", ONECDP_LOG_FORMAT="text", **overrides)
    return env


def test_the_job_waits_for_cassandra_then_migrates_every_service(
        relay: LateRelay, cassandra_settings: CassandraSettings, admin_session: CassandraSession) -> None:
    job = subprocess.Popen(_job_command(), cwd=REPO, env=_job_env(cassandra_settings, CASSANDRA_PORT=str(relay.port)),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert job.stdout is not None
        waited = []
        for line in job.stdout:  # Cassandra is "starting": nothing listens on the port yet
            waited.append(line)
            if "Cassandra is not ready yet" in line:
                break
        assert any("Connection refused" in line for line in waited), waited
        relay.open()
        output, _ = job.communicate(timeout=JOB_TIMEOUT_SECONDS)
    finally:
        job.kill()
    assert job.returncode == 0, output
    for service in SERVICE_NAMES:
        keyspace = cassandra_settings.keyspace(service)
        (row,) = admin_session.execute("SELECT replication FROM system_schema.keyspaces WHERE keyspace_name = ?",
                                       (keyspace,))
        assert row.replication[cassandra_settings.local_dc] == "1"
        applied = {r.version for r in admin_session.execute(f"SELECT version FROM {keyspace}.schema_migrations")}
        assert applied == {m.version for m in load_migrations(service_schema_dir(service))}
        assert f"{keyspace}: " in output


def test_a_bad_setting_fails_at_once_instead_of_waiting(cassandra_settings: CassandraSettings) -> None:
    started = time.monotonic()
    env = _job_env(cassandra_settings, CASSANDRA_CONSISTENCY="LOCAL_QUROUM")
    job = subprocess.run(_job_command(), cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert job.returncode == 2
    assert "consistency" in job.stderr
    assert time.monotonic() - started < 30  # the manifest's wait is 1500 s
