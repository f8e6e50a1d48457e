"""Run a real Apache Cassandra 5.0 from Maven Central artifacts on this machine's JDK.

No tarball and no Docker: Maven resolves ``org.apache.cassandra:cassandra-all`` and its runtime
dependencies into a cache outside the repository, and this module writes each node's config and starts
``CassandraDaemon`` directly with the JDK 17 flags Cassandra's own ``conf/jvm17-server.options`` lists.

Commands (``python -m deploy.cassandra <command>``)::

    fetch                     resolve the jars (idempotent; ~40 s the first time)
    start [--nodes 3] [--fast] start 1 node on 127.0.0.1:9042, or 3 on 127.0.0.1/.2/.3; wait for CQL
    stop                      stop every node this project started (SIGTERM, then SIGKILL)
    status                    which nodes run, where, with which pid
    logs [--node N] [-n 50]   tail a node's system.log
    wipe                      stop and delete all node data (logs are kept in cassandra-last-logs/)

``--fast`` is for tests only: it skips fsync and system-table flushes (``cassandra.skip_sync``,
``cassandra.unsafesystem``) and skips commit-log mutations it cannot replay after a crash
(``cassandra.commitlog.ignorereplayerrors``); data survives a clean stop but not a power cut.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

CASSANDRA_VERSION = "5.0.9"
CLUSTER_NAME = "onecdp"
CQL_PORT = 9042
STORAGE_PORT = 7000
READY_LOG_LINE = "Starting listening for CQL clients"
DEFAULT_START_TIMEOUT_SECONDS = 240.0
STOP_TIMEOUT_SECONDS = 60.0

# From Cassandra 5.0's conf/jvm17-server.options: without these, startup dies with
# "Cassandra is unable to access required classes".
JDK17_MODULE_FLAGS = (
    "--add-exports=java.base/jdk.internal.misc=ALL-UNNAMED",
    "--add-exports=java.base/jdk.internal.ref=ALL-UNNAMED",
    "--add-exports=java.base/sun.nio.ch=ALL-UNNAMED",
    "--add-exports=java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED",
    "--add-exports=java.rmi/sun.rmi.registry=ALL-UNNAMED",
    "--add-exports=java.rmi/sun.rmi.server=ALL-UNNAMED",
    "--add-exports=java.sql/java.sql=ALL-UNNAMED",
    "--add-exports=java.base/java.lang.ref=ALL-UNNAMED",
    "--add-exports=jdk.unsupported/sun.misc=ALL-UNNAMED",
    "--add-opens=java.base/java.lang.module=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.loader=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.ref=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.reflect=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.math=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.module=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.util.jar=ALL-UNNAMED",
    "--add-opens=jdk.management/com.sun.management.internal=ALL-UNNAMED",
    "--add-opens=java.base/sun.nio.ch=ALL-UNNAMED",
    "--add-opens=java.base/java.io=ALL-UNNAMED",
    "--add-opens=java.base/java.nio=ALL-UNNAMED",
    "--add-opens=java.base/java.util.concurrent=ALL-UNNAMED",
    "--add-opens=java.base/java.util=ALL-UNNAMED",
    "--add-opens=java.base/java.util.concurrent.atomic=ALL-UNNAMED",
    "--add-opens=java.base/java.lang=ALL-UNNAMED",
    "--add-opens=java.base/java.math=ALL-UNNAMED",
    "--add-opens=java.base/java.lang.reflect=ALL-UNNAMED",
    "--add-opens=java.base/java.net=ALL-UNNAMED",
)

POM_TEMPLATE = """<?xml version="1.0" encoding="UTF-8"?>
<!-- Written by deploy/cassandra.py: only used to let Maven resolve Cassandra's runtime jars. -->
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dev.onecdp</groupId>
  <artifactId>cassandra-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.cassandra</groupId>
      <artifactId>cassandra-all</artifactId>
      <version>{version}</version>
    </dependency>
  </dependencies>
</project>
"""

LOGBACK_XML = """<configuration scan="false">
  <!-- Written by deploy/cassandra.py. INFO to system.log; warnings also to stdout.log. -->
  <appender name="FILE" class="ch.qos.logback.core.FileAppender">
    <file>${cassandra.logdir}/system.log</file>
    <encoder><pattern>%-5level [%thread] %date{ISO8601} %F:%L - %msg%n</pattern></encoder>
  </appender>
  <appender name="STDOUT" class="ch.qos.logback.core.ConsoleAppender">
    <filter class="ch.qos.logback.classic.filter.ThresholdFilter"><level>WARN</level></filter>
    <encoder><pattern>%-5level %date{ISO8601} %msg%n</pattern></encoder>
  </appender>
  <root level="INFO">
    <appender-ref ref="FILE"/>
    <appender-ref ref="STDOUT"/>
  </root>
  <logger name="org.apache.cassandra" level="INFO"/>
</configuration>
"""


class CassandraError(RuntimeError):
    """The launcher could not do what was asked; the message says what to do about it."""


def cache_dir() -> Path:
    base = Path(os.environ.get("ONECDP_CACHE_DIR", Path.home() / ".cache" / "onecdp"))
    return base / f"cassandra-{CASSANDRA_VERSION}"


def state_dir() -> Path:
    base = Path(os.environ.get("ONECDP_STATE_DIR", Path.home() / ".local" / "state" / "onecdp"))
    return base / "cassandra"


def lib_dir() -> Path:
    return cache_dir() / "lib"


@dataclass(frozen=True)
class Node:
    """One Cassandra node of a cluster of ``cluster_size`` on loopback address 127.0.0.<index>."""

    index: int
    cluster_size: int

    @property
    def address(self) -> str:
        return f"127.0.0.{self.index}"

    @property
    def home(self) -> Path:
        # Clusters of different sizes keep separate data: a 1-node data dir cannot join a 3-node ring.
        return state_dir() / f"{self.cluster_size}-node" / f"node{self.index}"

    @property
    def pid_file(self) -> Path:
        return self.home / "cassandra.pid"

    @property
    def log_file(self) -> Path:
        return self.home / "logs" / "system.log"

    @property
    def stdout_file(self) -> Path:
        return self.home / "logs" / "stdout.log"

    @property
    def initial_token(self) -> int:
        # Balanced Murmur3 tokens: one per node, evenly spaced over [-2^63, 2^63).
        return -(2**63) + (self.index - 1) * (2**64 // self.cluster_size)

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if process_alive(pid) else None

    def answers_cql(self) -> bool:
        return _port_open(self.address, CQL_PORT)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited child not yet reaped) is not a running node.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def other_daemons() -> dict[int, str]:
    """Cassandra daemons on this machine that are not nodes of this state directory, by pid: the data
    directory each names (`-Dcassandra.storagedir`), or "" when it names none.

    Another checkout's node, the test session's own node (it lives in a state directory of its own) or
    a developer's node: they take the same ports, and one of two nodes started side by side dies at
    bind ("127.0.0.1:7000 is in use") after minutes of loading its data.
    """
    ours = {node.pid() for node in _all_known_nodes()}
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in ours:
            continue
        try:
            arguments = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if b"org.apache.cassandra.service.CassandraDaemon" not in arguments or not process_alive(int(entry.name)):
            continue
        storage = [a.decode(errors="replace").split("=", 1)[1] for a in arguments
                   if a.startswith(b"-Dcassandra.storagedir=")]
        found[int(entry.name)] = storage[0] if storage else ""
    return found


def _wait_for_other_daemons(deadline: float) -> None:
    """Until CQL answers on 127.0.0.1:9042 or every other Cassandra daemon has exited (or the deadline)."""
    while time.monotonic() < deadline and not is_running() and other_daemons():
        time.sleep(0.5)


def _port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def nodes_of(cluster_size: int) -> list[Node]:
    return [Node(index, cluster_size) for index in range(1, cluster_size + 1)]


def _all_known_nodes() -> list[Node]:
    return [node for size in (1, 3) for node in nodes_of(size)]


# --------------------------------------------------------------------------------------------------
# fetch


def fetch(*, quiet: bool = False) -> Path:
    """Resolve cassandra-all and its runtime jars into the cache; a no-op when already complete."""
    marker = cache_dir() / "COMPLETE"
    if marker.exists():
        return lib_dir()
    if shutil.which("mvn") is None:
        raise CassandraError("Maven (mvn) is required to fetch Cassandra from Maven Central")
    cache_dir().mkdir(parents=True, exist_ok=True)
    pom = cache_dir() / "pom.xml"
    pom.write_text(POM_TEMPLATE.format(version=CASSANDRA_VERSION))
    staging = cache_dir() / "lib.partial"
    shutil.rmtree(staging, ignore_errors=True)
    if not quiet:
        print(f"fetching cassandra-all {CASSANDRA_VERSION} and its runtime dependencies from Maven Central",
              flush=True)
    command = ["mvn", "-B", "-q", "-f", str(pom), "dependency:copy-dependencies",
               "-DincludeScope=runtime", f"-DoutputDirectory={staging}"]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise CassandraError(f"mvn failed ({result.returncode}):\n{result.stdout[-4000:]}{result.stderr[-4000:]}")
    jars = list(staging.glob("*.jar"))
    if not any(jar.name.startswith(f"cassandra-all-{CASSANDRA_VERSION}") for jar in jars):
        raise CassandraError(f"mvn finished but cassandra-all-{CASSANDRA_VERSION}.jar is not in {staging}")
    shutil.rmtree(lib_dir(), ignore_errors=True)
    staging.rename(lib_dir())
    marker.write_text(f"{len(jars)} jars\n")
    return lib_dir()


def _jamm_jar() -> Path:
    candidates = sorted(lib_dir().glob("jamm-*.jar"))
    if not candidates:
        raise CassandraError(f"no jamm jar in {lib_dir()}; run `python -m deploy.cassandra fetch`")
    return candidates[-1]


# --------------------------------------------------------------------------------------------------
# config


def node_config(node: Node) -> dict[str, object]:
    """The cassandra.yaml of one node (written as JSON, which is valid YAML)."""
    home = node.home
    seeds = ",".join(f"{seed.address}:{STORAGE_PORT}" for seed in nodes_of(node.cluster_size)[:1])
    return {
        "cluster_name": CLUSTER_NAME,
        "num_tokens": 1,
        "initial_token": str(node.initial_token),
        "partitioner": "org.apache.cassandra.dht.Murmur3Partitioner",
        "endpoint_snitch": "SimpleSnitch",
        "seed_provider": [{"class_name": "org.apache.cassandra.locator.SimpleSeedProvider",
                           "parameters": [{"seeds": seeds}]}],
        "listen_address": node.address,
        "rpc_address": node.address,
        "storage_port": STORAGE_PORT,
        "native_transport_port": CQL_PORT,
        "start_native_transport": True,
        "auto_bootstrap": False,
        "storage_compatibility_mode": "NONE",
        # Paxos v2 needs about half the round trips of v1 for lightweight transactions.
        "paxos_variant": "v2",
        # The Corretto provider is a `provided` dependency that Maven never delivers.
        "crypto_provider": [{"class_name": "org.apache.cassandra.security.JREProvider"}],
        "data_file_directories": [str(home / "data")],
        "commitlog_directory": str(home / "commitlog"),
        "saved_caches_directory": str(home / "saved_caches"),
        "hints_directory": str(home / "hints"),
        "cdc_raw_directory": str(home / "cdc_raw"),
        "commitlog_sync": "periodic",
        "commitlog_sync_period": "10000ms",
        "commitlog_disk_access_mode": "legacy",
        "disk_access_mode": "standard",
        "auto_snapshot": False,
        "memtable_heap_space": "128MiB",
        "memtable_offheap_space": "128MiB",
        # Shared batches are up to 12 KiB (shared.cassandra.BATCH_BYTES): warn only past that.
        "batch_size_warn_threshold": "16KiB",
        "concurrent_reads": 16,
        "concurrent_writes": 16,
        "concurrent_counter_writes": 4,
        "concurrent_compactors": 1,
        "authenticator": "AllowAllAuthenticator",
        "authorizer": "AllowAllAuthorizer",
        "read_request_timeout": "10000ms",
        "write_request_timeout": "5000ms",
        "cas_contention_timeout": "2000ms",
        "range_request_timeout": "20000ms",
        "request_timeout": "20000ms",
    }


def _java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").exists():
        return str(Path(java_home) / "bin" / "java")
    java = shutil.which("java")
    if java is None:
        raise CassandraError("Java 17 is required to run Cassandra (no `java` on PATH and no JAVA_HOME)")
    return java


def heap_size(cluster_size: int) -> str:
    """The JVM heap of one node: ONECDP_CASSANDRA_HEAP if set (e.g. "4G"), else Cassandra's own rule for a
    node alone on its machine (cassandra-env.sh: the larger of half the RAM up to 1 GiB and a quarter of
    it up to 8 GiB), and 768M for each node of a cluster sharing this machine. A fixed 1G was too little
    for a node serving several identity services at once (many large IN-list reads and batches)."""
    configured = os.environ.get("ONECDP_CASSANDRA_HEAP")
    if configured:
        return configured
    if cluster_size > 1:
        return "768M"
    ram_mib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
    return f"{max(min(ram_mib // 2, 1024), min(ram_mib // 4, 8192))}M"


def java_command(node: Node, *, fast: bool) -> list[str]:
    home = node.home
    heap = heap_size(node.cluster_size)
    flags = [
        _java(),
        f"-Xms{heap}", f"-Xmx{heap}", "-Xss512k",
        "-XX:+UseG1GC", "-XX:+ExitOnOutOfMemoryError", "-XX:+PerfDisableSharedMem",
        *JDK17_MODULE_FLAGS,
        f"-javaagent:{_jamm_jar()}",
        "-Djdk.attach.allowAttachSelf=true",
        "-Djava.net.preferIPv4Stack=true",
        "-Dchronicle.analytics.disable=true",
        "-Dio.netty.tryReflectionSetAccessible=true",
        f"-Dcassandra.config={(home / 'conf' / 'cassandra.yaml').as_uri()}",
        f"-Dlogback.configurationFile={(home / 'conf' / 'logback.xml').as_uri()}",
        f"-Dcassandra.logdir={home / 'logs'}",
        f"-Dcassandra.storagedir={home}",
        f"-Djna.tmpdir={home / 'tmp'}",
        f"-Djava.io.tmpdir={home / 'tmp'}",
        "-Dcassandra-foreground=yes",
        "-Dcassandra.skip_wait_for_gossip_to_settle=0",
        f"-Dcassandra.available_processors={2 if node.cluster_size == 1 else 1}",
    ]
    if node.cluster_size > 1:
        flags.append("-Dcassandra.ring_delay_ms=1000")
    if fast:
        # After an unclean stop (a killed machine) a fast node's commit log can hold mutations of tables whose
        # schema change never reached disk (unsafesystem): replaying them fails ("Unknown column ... during
        # deserialization") and the node would never start again. A fast node promises nothing after a crash,
        # so it skips what it cannot replay.
        flags += ["-Dcassandra.unsafesystem=true", "-Dcassandra.skip_sync=true",
                  "-Dcassandra.commitlog.ignorereplayerrors=true"]
    return [*flags, "-cp", f"{home / 'conf'}:{lib_dir()}/*", "org.apache.cassandra.service.CassandraDaemon"]


def _write_node_files(node: Node) -> None:
    for sub in ("conf", "logs", "data", "commitlog", "saved_caches", "hints", "cdc_raw", "tmp"):
        (node.home / sub).mkdir(parents=True, exist_ok=True)
    (node.home / "conf" / "cassandra.yaml").write_text(json.dumps(node_config(node), indent=2) + "\n")
    (node.home / "conf" / "logback.xml").write_text(LOGBACK_XML)


# --------------------------------------------------------------------------------------------------
# start / stop


def running_nodes() -> list[Node]:
    return [node for node in _all_known_nodes() if node.pid() is not None]


def is_running() -> bool:
    """True when some Cassandra answers CQL on 127.0.0.1:9042 (ours or anyone's)."""
    return _port_open("127.0.0.1", CQL_PORT)


def start(nodes: int = 1, *, fast: bool = False, timeout: float = DEFAULT_START_TIMEOUT_SECONDS,
          quiet: bool = False) -> float:
    """Start a cluster of ``nodes`` and wait until every node answers CQL; returns the seconds it took."""
    if nodes not in (1, 3):
        raise CassandraError(f"a cluster has 1 or 3 nodes here, not {nodes}")
    fetch(quiet=quiet)
    cluster = nodes_of(nodes)
    foreign = [node for node in running_nodes() if node.cluster_size != nodes]
    if foreign:
        raise CassandraError(f"a {foreign[0].cluster_size}-node cluster is running; "
                             "stop it first (python -m deploy.cassandra stop)")
    started_at = time.monotonic()
    deadline = started_at + timeout
    # The seed first: the other nodes' gossip shadow round fails unless the seed already answers.
    # They then start together (auto_bootstrap is off and their tokens are fixed, so they may).
    seed, *others = cluster
    _launch(seed, fast=fast)
    _wait_ready(seed, deadline)
    for node in others:
        _launch(node, fast=fast)
    for node in others:
        _wait_ready(node, deadline)
    elapsed = time.monotonic() - started_at
    if not quiet:
        where = ", ".join(f"{node.address}:{CQL_PORT}" for node in cluster)
        print(f"Cassandra {CASSANDRA_VERSION} ({nodes} node{'s' if nodes > 1 else ''}) ready in "
              f"{elapsed:.1f} s at {where}", flush=True)
    return elapsed


def _launch(node: Node, *, fast: bool) -> None:
    if node.pid() is not None:
        return
    if node.answers_cql():
        raise CassandraError(f"something else listens on {node.address}:{CQL_PORT}; stop it first")
    others = other_daemons()
    if others:
        which = "; ".join(f"pid {pid}, data in {data or 'unknown'}" for pid, data in sorted(others.items()))
        raise CassandraError(f"another Cassandra runs on this machine ({which}) without answering on "
                             "127.0.0.1:9042 yet (starting, hung, or on other ports) and would take the same ports; "
                             "wait until it answers there (then it is reused) or stop it")
    _write_node_files(node)
    offset = node.log_file.stat().st_size if node.log_file.exists() else 0
    (node.home / "log-offset").write_text(f"{offset}\n")
    with node.stdout_file.open("ab") as out:
        process = subprocess.Popen(
            java_command(node, fast=fast), stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, cwd=node.home)
    node.pid_file.write_text(f"{process.pid}\n")


def _wait_ready(node: Node, deadline: float) -> None:
    while time.monotonic() < deadline:
        if node.pid() is None:
            raise CassandraError(f"Cassandra node {node.index} exited during startup; last lines of "
                                 f"{node.stdout_file}:\n{_tail(node.stdout_file, 30)}\n{_tail(node.log_file, 30)}")
        if node.answers_cql() and _logged_ready(node):
            return
        time.sleep(0.25)
    raise CassandraError(f"Cassandra node {node.index} did not answer CQL on {node.address}:{CQL_PORT} in time; "
                         f"see {node.log_file}")


def _logged_ready(node: Node) -> bool:
    try:
        offset = int((node.home / "log-offset").read_text().strip())
        with node.log_file.open("rb") as log:
            log.seek(offset)
            return READY_LOG_LINE.encode() in log.read()
    except (OSError, ValueError):
        return False


def ensure_running(nodes: int = 1, *, fast: bool = False,
                   timeout: float = DEFAULT_START_TIMEOUT_SECONDS) -> float | None:
    """Reuse a node answering on 127.0.0.1:9042, else start a cluster; the ready time when started.

    A Cassandra of another state directory still starting (see `other_daemons`) is waited for and then
    reused, instead of starting a second node that one of the two would not survive.
    """
    deadline = time.monotonic() + timeout
    _wait_for_other_daemons(deadline)
    if is_running():
        return None
    return start(nodes, fast=fast, quiet=True, timeout=max(1.0, deadline - time.monotonic()))


def stop_node(node: Node, *, timeout: float = STOP_TIMEOUT_SECONDS, kill: bool = False) -> None:
    """Stop one node: SIGTERM (Cassandra drains and flushes), SIGKILL if it lingers or when ``kill``."""
    pid = node.pid()
    if pid is None:
        return
    os.kill(pid, signal.SIGKILL if kill else signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process_alive(pid):
        time.sleep(0.2)
    if process_alive(pid):
        os.kill(pid, signal.SIGKILL)
        while process_alive(pid):
            time.sleep(0.1)
    node.pid_file.unlink(missing_ok=True)


def stop() -> list[Node]:
    """Stop every node this project started; returns the nodes that were running."""
    stopped = running_nodes()
    for node in stopped:
        pid = node.pid()
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
    for node in stopped:
        stop_node(node)
    return stopped


def last_logs_dir() -> Path:
    return state_dir().parent / "cassandra-last-logs"


def wipe() -> None:
    """Stop every node and delete its data. The nodes' logs move to `last_logs_dir()` first (replacing
    the ones kept by the wipe before): a node that died before the wipe can still say why."""
    stop()
    logs = sorted(state_dir().glob("*-node/node*/logs"))
    if logs:
        shutil.rmtree(last_logs_dir(), ignore_errors=True)
        for node_logs in logs:
            kept = last_logs_dir() / node_logs.parent.parent.name / node_logs.parent.name
            kept.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(node_logs, kept)
    shutil.rmtree(state_dir(), ignore_errors=True)


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} does not exist)"


# --------------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.cassandra", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("fetch", help="resolve the Cassandra jars from Maven Central")
    start_parser = commands.add_parser("start", help="start a cluster and wait until CQL answers")
    start_parser.add_argument("--nodes", type=int, choices=(1, 3), default=1)
    start_parser.add_argument("--fast", action="store_true", help="tests only: no fsync")
    start_parser.add_argument("--timeout", type=float, default=DEFAULT_START_TIMEOUT_SECONDS)
    commands.add_parser("stop", help="stop all nodes")
    commands.add_parser("status", help="show running nodes")
    logs_parser = commands.add_parser("logs", help="tail a node's system.log")
    logs_parser.add_argument("--node", type=int, default=1)
    logs_parser.add_argument("-n", "--lines", type=int, default=50)
    commands.add_parser("wipe", help="stop all nodes and delete their data (their logs are kept)")
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            print(f"Cassandra jars in {fetch()}")
        elif args.command == "start":
            if is_running() and not running_nodes():
                print(f"a Cassandra not started by this project already answers on 127.0.0.1:{CQL_PORT}; using it")
            else:
                start(args.nodes, fast=args.fast, timeout=args.timeout)
        elif args.command == "stop":
            stopped = stop()
            print(f"stopped {len(stopped)} node(s)" if stopped else "no node was running")
        elif args.command == "status":
            nodes = running_nodes()
            if not nodes:
                print("no Cassandra node started by this project is running")
            for node in nodes:
                state = "answers CQL" if node.answers_cql() else "starting"
                print(f"node{node.index} of {node.cluster_size}: pid {node.pid()} {node.address}:{CQL_PORT} "
                      f"{state}; logs {node.log_file}")
        elif args.command == "logs":
            size = max((node.cluster_size for node in running_nodes()), default=1)
            print(_tail(Node(args.node, size).log_file, args.lines))
        elif args.command == "wipe":
            wipe()
            print(f"deleted {state_dir()}")
    except CassandraError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
