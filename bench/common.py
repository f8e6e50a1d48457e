"""Helpers every benchmark uses: closed- and open-loop load, percentiles, a Cassandra to run against, output.

Figures on a shared 2-core machine are noisy, so benchmarks report each figure next to a baseline
measured in the same run (a ratio), and say what load they were measured at.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from rich.console import Console
from rich.table import Table

from deploy import cassandra as launcher
from deploy.stack import health_status
from shared.cassandra import CassandraSession, connect_cluster, open_session
from shared.config import CassandraSettings

console = Console()


@dataclass(frozen=True)
class LoadResult:
    """What a load run achieved: completed operations over wall time, and each operation's latency."""

    operations: int
    seconds: float
    latencies: Sequence[float]  # seconds, one per completed call
    errors: int = 0

    @property
    def rate(self) -> float:
        return self.operations / self.seconds if self.seconds > 0 else 0.0

    def percentile_ms(self, percent: float) -> float:
        return percentile(self.latencies, percent) * 1e3


def percentile(samples: Sequence[float], percent: float) -> float:
    """The nearest-rank percentile (0 for no samples): the value below which `percent` % of samples lie."""
    if not samples:
        return 0.0
    ordered = sorted(samples)
    rank = max(1, math.ceil(percent / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def closed_loop(call: Callable[[int], int], *, threads: int, seconds: float) -> LoadResult:
    """`threads` callers issue `call(i)` back to back for `seconds`; `call` returns operations it did.

    Closed loop: each caller waits for its answer before the next call, so this finds the maximum
    throughput at that concurrency (latencies here include queueing and are not the figure to quote).
    """
    stop = time.monotonic() + seconds
    lock = threading.Lock()
    latencies: list[float] = []
    counts = [0, 0]  # operations, errors
    sequence = iter(range(1 << 62))

    def worker() -> None:
        mine: list[float] = []
        operations = errors = 0
        while time.monotonic() < stop:
            with lock:
                index = next(sequence)
            started = time.perf_counter()
            try:
                operations += call(index)
            except Exception:  # counted, reported; a benchmark keeps going
                errors += 1
                continue
            mine.append(time.perf_counter() - started)
        with lock:
            latencies.extend(mine)
            counts[0] += operations
            counts[1] += errors

    started = time.monotonic()
    workers = [threading.Thread(target=worker, name=f"bench-{i}") for i in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    return LoadResult(counts[0], time.monotonic() - started, latencies, counts[1])


def open_loop(start_call: Callable[[int], Future[object]], *, rate: float, seconds: float) -> LoadResult:
    """Start `start_call(i)` at a fixed `rate` per second for `seconds`, without waiting for answers.

    Open loop: latency is measured from the moment a call was *due*, so a slow answer cannot hide
    the calls that should have been sent meanwhile (no coordinated omission).
    """
    interval = 1.0 / rate
    total = max(1, int(rate * seconds))
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    done = threading.Semaphore(0)
    origin = time.perf_counter()

    def finished(due: float, future: Future[object]) -> None:
        elapsed = time.perf_counter() - due
        with lock:
            if future.exception() is None:
                latencies.append(elapsed)
            else:
                errors[0] += 1
        done.release()

    for index in range(total):
        due = origin + index * interval
        pause = due - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        future = start_call(index)
        future.add_done_callback(partial(finished, due))
    for _ in range(total):
        done.acquire()
    return LoadResult(len(latencies), time.perf_counter() - origin, latencies, errors[0])


@contextmanager
def bench_cassandra(service: str) -> Iterator[tuple[CassandraSettings, CassandraSession]]:
    """Settings with a keyspace prefix of the benchmark's own (dropped afterwards) and an admin session.

    Reuses the node answering on 127.0.0.1:9042, or starts one the way the test session does.
    """
    started = launcher.ensure_running(nodes=1, fast=True)
    if started is not None:
        console.print(f"started Cassandra for the benchmark in {started:.1f} s")
    settings = CassandraSettings().model_copy(update={"keyspace_prefix": f"bench{uuid.uuid4().hex[:10]}"})
    cluster = connect_cluster(settings)
    admin = open_session(cluster, None, 30)
    try:
        yield settings, admin
    finally:
        admin.execute(f"DROP KEYSPACE IF EXISTS {settings.keyspace(service)}", timeout=60)
        cluster.shutdown()


def wait_for_compactions(admin: CassandraSession, *, limit_seconds: float = 180.0) -> float:
    """Wait until Cassandra runs no compaction (system_views.sstable_tasks is empty), at most `limit_seconds`;
    the seconds waited. A phase that reads right after one that wrote much would otherwise share the cores
    with compacting what was written, a cost of the writes, not of the reads."""
    started = time.monotonic()
    while (time.monotonic() - started < limit_seconds
           and admin.execute("SELECT kind FROM system_views.sstable_tasks").one() is not None):
        time.sleep(1.0)
    return time.monotonic() - started


def figures_table(title: str, rows: Sequence[tuple[str, str, str]]) -> Table:
    """A three-column table: what, measured, and the baseline or aim it is compared with."""
    table = Table(title=title, title_justify="left")
    table.add_column("figure")
    table.add_column("measured", justify="right")
    table.add_column("compared with", style="dim")
    for row in rows:
        table.add_row(*row)
    return table


# ---- services as processes, as deployed --------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def service_env(settings: CassandraSettings, ports: Mapping[str, int]) -> dict[str, str]:
    """The environment of a service process: the benchmark's keyspaces, and where every service listens."""
    env = {**os.environ, "CASSANDRA_KEYSPACE_PREFIX": settings.keyspace_prefix, "ONECDP_BIND_HOST": "127.0.0.1",
           "ONECDP_LOG_LEVEL": "WARNING", "ONECDP_GRACE_PERIOD_SECONDS": "1"}
    for name, port in ports.items():
        env[f"ONECDP_{name.upper()}_PORT"] = str(port)
        env[f"ONECDP_{name.upper()}_TARGET"] = f"127.0.0.1:{port}"
    return env


def start_service_process(name: str, port: int, env: Mapping[str, str], *,
                          module: str | None = None) -> subprocess.Popen[bytes]:
    """`python -m services.<name>` (or `module`) on `port`, once it answers SERVING."""
    process = subprocess.Popen([sys.executable, "-m", module or f"services.{name}"], cwd=REPO,
                               env={**env, f"ONECDP_{name.upper()}_PORT": str(port)}, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while health_status(port, timeout=0.5) != "SERVING":
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"{name} did not start (exit status {process.poll()})")
        time.sleep(0.2)
    return process


@contextmanager
def service_processes(settings: CassandraSettings, services: Sequence[str], *,
                      modules: Mapping[str, str] | None = None,
                      environment: Mapping[str, str] | None = None,
                      pids: dict[str, int] | None = None) -> Iterator[dict[str, int]]:
    """The services as processes on free ports, started in order and stopped in reverse; their ports.

    `modules` runs a name as another module than `services.<name>` (e.g. a baseline server);
    `environment` adds to (or overrides) every process's environment; `pids`, when given, is filled with each
    service's process id (for `cpu_seconds`).
    """
    ports = {name: free_port() for name in services}
    env = {**service_env(settings, ports), **(environment or {})}
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for name in services:
            processes.append(start_service_process(name, ports[name], env, module=(modules or {}).get(name)))
            if pids is not None:
                pids[name] = processes[-1].pid
        yield ports
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            process.wait(timeout=30)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cassandra_pid() -> int | None:
    """The process id of the Cassandra running on this machine; None when there is none, or more than one (which
    of them serves the benchmark is not known then, and another's work would be counted as its)."""
    daemons = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"org.apache.cassandra.service.CassandraDaemon" in (entry / "cmdline").read_bytes():
                    daemons.append(int(entry.name))
            except OSError:  # gone meanwhile
                continue
    return daemons[0] if len(daemons) == 1 else None
