"""Run the whole OneCDP stack on this machine: Cassandra, schemas, and the four services.

    python -m deploy.stack up       # start what is not running yet, then print where everything listens
    python -m deploy.stack status   # what runs where
    python -m deploy.stack down     # stop the services (SIGTERM, graceful), and Cassandra if `up` started it

Services run as detached processes (`python -m services.<name>`) with JSON logs in
`$ONECDP_STATE_DIR/services/<name>.log` (default ~/.local/state/onecdp). Ports and the Cassandra
location come from the same environment variables the services read (shared.config).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.table import Table

from deploy import cassandra as cassandra_launcher
from shared.cassandra import connect_cluster, open_session
from shared.config import SERVICE_NAMES, CassandraSettings, GrpcSettings
from shared.errors import Unavailable
from shared.migrations import migrate_service

console = Console()
REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_SECONDS = 60.0
EXAMPLE_SERVICE = "onecdp.identity.v1.IdentityService"


def _cassandra_marker() -> Path:
    """Present while the Cassandra node `up` started runs: `down` stops only a node `up` started, not one
    that was running before (a developer's node, or a test session's)."""
    return _state_dir() / "cassandra.started-by-stack"


def _state_dir() -> Path:
    root = Path(os.environ.get("ONECDP_STATE_DIR", Path.home() / ".local" / "state" / "onecdp"))
    directory = root / "services"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@dataclass(frozen=True)
class ServiceFiles:
    name: str

    @property
    def pid_file(self) -> Path:
        return _state_dir() / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return _state_dir() / f"{self.name}.log"

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        return pid


def health_status(port: int, timeout: float = 2.0) -> str:
    """The service's overall health as the grpc.health.v1 name, or UNREACHABLE."""
    with grpc.insecure_channel(f"localhost:{port}") as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return "UNREACHABLE"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def _start_service(name: str, settings: GrpcSettings) -> None:
    files = ServiceFiles(name)
    port = settings.port_of(name)
    if files.pid() is not None and health_status(port) == "SERVING":
        console.print(f"  {name}: already serving on port {port}")
        return
    if health_status(port) != "UNREACHABLE":
        raise SystemExit(f"port {port} already answers gRPC but is not our {name} service; "
                         f"set ONECDP_{name.upper()}_PORT to a free port")
    # Migrations ran once above; a service restarted later by hand still applies them itself.
    env = {**os.environ, "ONECDP_MIGRATE_ON_START": "false", "ONECDP_LOG_FORMAT": "json"}
    with files.log_file.open("a") as log, open(os.devnull) as devnull:
        process = subprocess.Popen([sys.executable, "-m", f"services.{name}"], cwd=REPO, env=env,
                                   stdin=devnull, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    files.pid_file.write_text(str(process.pid))
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = "".join(files.log_file.read_text().splitlines(keepends=True)[-20:])
            raise SystemExit(f"{name} exited with status {process.returncode}; its log ends:\n{tail}")
        if health_status(port, timeout=0.5) == "SERVING":
            return
        time.sleep(0.2)
    raise SystemExit(f"{name} did not become SERVING within {START_TIMEOUT_SECONDS:.0f} s; see {files.log_file}")


def _print_summary(settings: GrpcSettings) -> None:
    table = Table(title="OneCDP services")
    for column in ("service", "address", "pid", "health"):
        table.add_column(column)
    table.add_column("log")
    nodes = cassandra_launcher.running_nodes()
    if nodes:
        for node in nodes:
            table.add_row("cassandra", f"{node.address}:{cassandra_launcher.CQL_PORT}", str(node.pid() or "-"),
                          "started by `make up`" if _cassandra_marker().exists() else "running",
                          "system.log (below)")
    else:
        table.add_row("cassandra", f"127.0.0.1:{cassandra_launcher.CQL_PORT}", "-",
                      "answers CQL (not started here)" if cassandra_launcher.is_running() else "NOT RUNNING", "-")
    for name in SERVICE_NAMES:
        files = ServiceFiles(name)
        port = settings.port_of(name)
        table.add_row(name, f"localhost:{port}", str(files.pid() or "-"), health_status(port), files.log_file.name)
    console.print(table)
    console.print(f"Service logs: {_state_dir()}/", soft_wrap=True, highlight=False)
    for node in nodes:
        console.print(f"Cassandra log: {node.home / 'logs' / 'system.log'}", soft_wrap=True, highlight=False)
    grpcurl = REPO / ".venv" / "bin" / "grpcurl"
    port = settings.port_of("identity")
    console.print("Try it (paste as is):", style="bold")
    console.print(f"  {grpcurl} -plaintext localhost:{port} list", soft_wrap=True, highlight=False)
    console.print(f"  {grpcurl} -plaintext localhost:{port} describe {EXAMPLE_SERVICE}", soft_wrap=True,
                  highlight=False)
    console.print(f"  {grpcurl} -plaintext localhost:{port} grpc.health.v1.Health/Check", soft_wrap=True,
                  highlight=False)
    console.print("Stop with: make down (the services, and Cassandra if `make up` started it)", style="bold")


def up() -> None:
    started = time.monotonic()
    grpc_settings = GrpcSettings()
    cassandra_settings = CassandraSettings()
    local = not os.environ.get("CASSANDRA_CONTACT_POINTS")
    reused = False  # a local node someone else started
    if not local:
        console.print(f"Using the Cassandra cluster at {', '.join(cassandra_settings.contact_points)}")
    else:
        ready = cassandra_launcher.ensure_running(nodes=1)
        if ready is not None:
            _cassandra_marker().touch()
        reused = ready is None
        console.print("Cassandra: " + (f"ready in {ready:.1f} s" if ready is not None else
                                       "already running (`make down` will leave it running)"))
    try:
        _migrate(cassandra_settings)
    except Unavailable as error:
        # Seen on a shared machine: the node answering on 127.0.0.1:9042 was someone else's, stopped by its owner
        # while the schemas were applied. A traceback said nothing of that.
        where = ", ".join(cassandra_settings.contact_points)
        if local and not cassandra_launcher.is_running():
            advice = ("it was running before `make up` (someone else's node on this machine?) and has stopped: run "
                      "`make up` again, which then starts a node of its own" if reused else
                      "the node `make up` started has stopped: see its log (`.venv/bin/python -m deploy.cassandra "
                      "status`), then run `make up` again")
        elif local:
            advice = "it is still there but did not answer in time (a busy machine?): run `make up` again"
        else:
            advice = "it stopped, or answered too slowly: check the cluster, then run `make up` again"
        raise StackError(f"Cassandra at {where} did not answer while the schemas were applied ({error.message}); "
                         f"{advice}.") from error
    console.print("Starting services")
    for name in SERVICE_NAMES:
        _start_service(name, grpc_settings)
    _print_summary(grpc_settings)
    console.print(f"Up in {time.monotonic() - started:.1f} s.")


class StackError(RuntimeError):
    """`make up` could not go on; the message says why and what to do."""


def _migrate(cassandra_settings: CassandraSettings) -> None:
    cluster = connect_cluster(cassandra_settings)
    try:
        session = open_session(cluster, None, cassandra_settings.request_timeout_seconds)
        for name in SERVICE_NAMES:
            applied = migrate_service(session, name, cassandra_settings)
            console.print(f"  schema {cassandra_settings.keyspace(name)}: "
                          f"{len(applied)} migration(s) applied" if applied else
                          f"  schema {cassandra_settings.keyspace(name)}: current")
    finally:
        cluster.shutdown()


def down() -> None:
    grace = GrpcSettings().grace_period_seconds
    for name in SERVICE_NAMES:
        files = ServiceFiles(name)
        pid = files.pid()
        if pid is None:
            files.pid_file.unlink(missing_ok=True)
            continue
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace + 5
        while files.pid() is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        if files.pid() is not None:
            os.kill(pid, signal.SIGKILL)
        files.pid_file.unlink(missing_ok=True)
        console.print(f"  {name}: stopped")
    if os.environ.get("CASSANDRA_CONTACT_POINTS"):
        return
    if _cassandra_marker().exists():
        cassandra_launcher.stop()
        _cassandra_marker().unlink(missing_ok=True)
        console.print("  cassandra: stopped")
    elif cassandra_launcher.is_running():
        console.print("  cassandra: left running (it was running before `make up`); stop it with "
                      "`.venv/bin/python -m deploy.cassandra stop`")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the OneCDP stack locally.")
    parser.add_argument("command", choices=["up", "down", "status"])
    args = parser.parse_args(argv)
    if args.command == "up":
        try:
            up()
        except StackError as error:
            console.print(f"make up stopped: {error}", style="bold red", soft_wrap=True, highlight=False)
            return 1
    elif args.command == "down":
        down()
    else:
        _print_summary(GrpcSettings())
    return 0


if __name__ == "__main__":
    sys.exit(main())
