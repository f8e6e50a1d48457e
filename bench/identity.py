"""Identity service figures, each next to a baseline measured in the same run.

    .venv/bin/python -m bench.identity [--persons 1000] [--writers 4] [--seconds 5] [--no-counts]

(a) link throughput (observations/s through gRPC, batched) vs raw lightweight-transaction throughput
    of the same Cassandra from this (the client) process (`INSERT ... IF NOT EXISTS`,
    driver-concurrent), for new observations and for the same observations again under new message
    ids (links already made);
(b) lookup throughput and p50/p99 latency vs a bare gRPC echo (grpc.health.v1 Check on a server
    built by the same bootstrap, shared.server.create_server, with no service of its own), and p99
    of both at half of their maximum load; both measured once Cassandra has finished compacting what
    the link phases wrote (it waits at most 180 s and prints how long). Lookups are measured twice:
    of identifiers mostly looked up for the first time, then once each has been looked up (the
    service then reads the person alone, through its holder hint). Then the floor of any lookup answered
    from Cassandra: a "read echo" (bench.read_echo_server: the same bootstrap making the one read a
    hinted lookup makes, nothing else), against the echo and against the hinted lookup. Last, lookups
    that accept an answer up to `--staleness` seconds old (LookupPersonRequest.max_staleness), of the
    same identifiers, with the share answered from the service's memory (a `read_time` before the call):
    each identifier is looked up once first, and the phases that follow take less than the default 30 s,
    so this is the figure of identifiers looked up again within the staleness a caller accepts.

The identity service and the echoes run as processes of their own (`python -m services.identity`,
`python -m bench.echo_server`, `python -m bench.read_echo_server`), as deployed: the client threads that
build and send requests do not share a GIL with the server. The CQL each observation costs (requests,
lightweight transactions, rows written in batches, partitions read through IN lists) cannot be seen from
outside the service's process, so it is counted in a separate pass, after the timed ones: the same
observations linked by a service started in this process, in a keyspace of its own, with every driver
request counted. That pass's throughput is printed too (client and server sharing one process and the
counting's own cost: not the figure to quote). `--no-counts` skips it.

Uses the Cassandra answering on 127.0.0.1:9042 (or starts one like the test session does) and
keyspaces of its own, dropped at the end.
"""

from __future__ import annotations

import argparse
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import grpc
from cassandra.cluster import Session
from cassandra.query import BatchStatement
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onecdp.common.v1 import common_pb2
from onecdp.identity.v1 import identity_service_pb2 as pb
from onecdp.identity.v1 import identity_service_pb2_grpc as pb_grpc

from bench import read_echo_server
from bench.common import (
    LoadResult,
    bench_cassandra,
    closed_loop,
    console,
    figures_table,
    open_loop,
    service_processes,
    wait_for_compactions,
)
from services.identity.server import DEFINITION
from shared.cassandra import CassandraSession
from shared.config import CassandraSettings, GrpcSettings
from shared.errors import Unavailable
from shared.migrations import migrate_service
from shared.runner import start_service
from tests.services.identity.world import World, build_world

LWT_ROWS = 4000
LWT_CONCURRENCY = 64
LOOKUP_THREADS = 8


@dataclass(frozen=True)
class LatencyFigures:
    max_rate: float
    max_p50_ms: float
    max_p99_ms: float
    half_rate: float
    half_p50_ms: float
    half_p99_ms: float


@dataclass
class StatementCounts:
    """What the driver sent while counting: requests, conditional ones, rows in batches, IN-list keys."""

    requests: int = 0
    lightweight_transactions: int = 0
    batch_rows: int = 0
    in_list_keys: int = 0

    def per(self, observations: int) -> str:
        return (f"{self.requests / observations:.2f} requests, {self.lightweight_transactions / observations:.2f} "
                f"LWT, {self.batch_rows / observations:.1f} batch rows, {self.in_list_keys / observations:.1f} "
                "IN keys")


_CONDITIONAL = re.compile(r"\sIF\s", re.IGNORECASE)


@contextmanager
def counting_statements() -> Iterator[StatementCounts]:
    """Count every statement any driver session of this process sends (with a service run in process).

    Instrumentation only: each statement still goes to Cassandra unchanged. A batch's statements are
    prepared ones, named by id; their text is found in the cluster's prepared-statement registry.
    """
    counts = StatementCounts()
    lock = threading.Lock()
    original = Session.execute_async

    def text_of(statement: Any) -> str:
        prepared = getattr(statement, "prepared_statement", None)
        if prepared is not None:
            return str(prepared.query_string)
        return str(getattr(statement, "query_string", statement))

    def counted(session: Session, query: Any, parameters: Any = None, *args: Any, **kwargs: Any) -> Any:
        if isinstance(query, BatchStatement):
            entries = query._statements_and_parameters  # the driver keeps no public list
            registry = getattr(session.cluster, "_prepared_statements", {})
            first = entries[0][1] if entries else ""
            text = registry[first].query_string if entries and entries[0][0] and first in registry else str(first)
            rows, keys = len(entries), 0
        else:
            text = text_of(query)
            values = parameters if parameters is not None else getattr(query, "values", None)
            rows = 0
            keys = len(values[-1]) if " IN ?" in text and values and isinstance(values[-1], list | tuple) else 0
        with lock:
            counts.requests += 1
            counts.lightweight_transactions += bool(_CONDITIONAL.search(text))
            counts.batch_rows += rows
            counts.in_list_keys += keys
        return original(session, query, parameters, *args, **kwargs)

    Session.execute_async = counted
    try:
        yield counts
    finally:
        Session.execute_async = original


def _identifier(text: str) -> common_pb2.Identifier:
    type_name, value = text.split(":", 1)
    return common_pb2.Identifier(type=type_name, value=value)


def measure_raw_lwt(session: CassandraSession, keyspace: str) -> float:
    """Lightweight transactions per second: fresh-key `INSERT ... IF NOT EXISTS`, driver-concurrent."""
    session.execute(f"CREATE TABLE IF NOT EXISTS {keyspace}.bench_lwt (k text PRIMARY KEY, owner text)", timeout=60)
    cql = f"INSERT INTO {keyspace}.bench_lwt (k, owner) VALUES (?, ?) IF NOT EXISTS"
    session.execute_many(cql, [(f"warm-{i}", "bench") for i in range(200)], concurrency=LWT_CONCURRENCY)
    rows = [(uuid.uuid4().hex, "bench") for _ in range(LWT_ROWS)]
    started = time.perf_counter()
    results = session.execute_many(cql, rows, concurrency=LWT_CONCURRENCY)
    seconds = time.perf_counter() - started
    applied = sum(1 for result in results if result.one().applied)
    if applied != LWT_ROWS:
        raise RuntimeError(f"only {applied} of {LWT_ROWS} fresh-key lightweight transactions applied")
    return LWT_ROWS / seconds


def measure_link(stub: pb_grpc.IdentityServiceStub, observations: Sequence[tuple[str, list[str]]], *,
                 batch: int, writers: int) -> LoadResult:
    """Observations per second: `writers` concurrent callers each send their share in batches."""
    shuffled = list(observations)
    random.Random(7).shuffle(shuffled)
    batches = [shuffled[i:i + batch] for i in range(0, len(shuffled), batch)]
    latencies: list[float] = []

    def send(chunk: Sequence[tuple[str, list[str]]]) -> None:
        request = pb.LinkIdentifiersRequest(observations=[
            pb.Observation(identifiers=[_identifier(i) for i in ids],
                           provenance=pb.Provenance(message_id=message_id, source="bench"))
            for message_id, ids in chunk])
        started = time.perf_counter()
        stub.LinkIdentifiers(request, timeout=300)
        latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    with ThreadPoolExecutor(writers) as pool:
        list(pool.map(send, batches))
    return LoadResult(len(shuffled), time.perf_counter() - started, latencies)


def measure_latency(name: str, call: Callable[[int], Any], start_call: Callable[[int], Future[Any]],
                    seconds: float) -> LatencyFigures:
    """Maximum closed-loop throughput, then latency in an open loop at half of it."""
    closed_loop(lambda i: (call(i), 1)[1], threads=LOOKUP_THREADS, seconds=min(1.0, seconds))  # warm up
    loaded = closed_loop(lambda i: (call(i), 1)[1], threads=LOOKUP_THREADS, seconds=seconds)
    if loaded.errors:
        raise RuntimeError(f"{loaded.errors} {name} calls failed at maximum load")
    half = open_loop(start_call, rate=loaded.rate / 2, seconds=seconds)
    if half.errors:
        raise RuntimeError(f"{half.errors} {name} calls failed at half load")
    return LatencyFigures(loaded.rate, loaded.percentile_ms(50), loaded.percentile_ms(99),
                          half.rate, half.percentile_ms(50), half.percentile_ms(99))


def migrate(admin: CassandraSession, settings: CassandraSettings, attempts: int = 3) -> None:
    """The identity keyspace migrated; tried again when a schema change times out (a loaded machine:
    migrations are idempotent, each change `IF NOT EXISTS` and recorded once applied)."""
    for attempt in range(1, attempts + 1):
        try:
            migrate_service(admin, "identity", settings)
            return
        except Unavailable as error:
            if attempt == attempts:
                raise
            console.print(f"migration attempt {attempt} failed ({error.message[:80]}...); trying again")


def count_statements(cassandra_settings: CassandraSettings, admin: CassandraSession, world: World,
                     again: Sequence[tuple[str, list[str]]], *, batch: int, writers: int
                     ) -> tuple[tuple[StatementCounts, LoadResult], tuple[StatementCounts, LoadResult]]:
    """The CQL the link calls cost, new and again: the same load against a service in this process.

    A keyspace of its own (dropped afterwards), so that the new observations are new there too.
    """
    settings = cassandra_settings.model_copy(update={"keyspace_prefix": f"{cassandra_settings.keyspace_prefix}c"})
    grpc_settings = GrpcSettings(bind_host="127.0.0.1", log_format="text", log_level="WARNING",
                                 migrate_on_start=False)
    try:
        migrate(admin, settings)
        service = start_service(DEFINITION, grpc_settings, settings, port=0)
        with grpc.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            stub = pb_grpc.IdentityServiceStub(channel)
            with counting_statements() as new_counts:
                linked = measure_link(stub, world.observations, batch=batch, writers=writers)
            with counting_statements() as again_counts:
                relinked = measure_link(stub, again, batch=batch, writers=writers)
        service.stop(None)
    finally:
        admin.execute(f"DROP KEYSPACE IF EXISTS {settings.keyspace('identity')}", timeout=60)
    return (new_counts, linked), (again_counts, relinked)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--persons", type=int, default=1000, help="synthetic world size for the link figure")
    parser.add_argument("--batch", type=int, default=200, help="observations per LinkIdentifiers call")
    parser.add_argument("--writers", type=int, default=4, help="concurrent LinkIdentifiers callers")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each lookup/echo load phase")
    parser.add_argument("--staleness", type=float, default=30.0,
                        help="max_staleness (seconds) of the last lookup phase")
    parser.add_argument("--no-counts", action="store_true",
                        help="skip the separate in-process pass that counts CQL per observation")
    args = parser.parse_args()

    with bench_cassandra("identity") as (cassandra_settings, admin):
        # Migrated here, with the admin session's longer timeout: schema changes are slow on a loaded machine.
        migrate(admin, cassandra_settings)
        with service_processes(cassandra_settings, ["identity", "echo", "read_echo"],
                               modules={"echo": "bench.echo_server", "read_echo": "bench.read_echo_server"},
                               environment={"ONECDP_MIGRATE_ON_START": "false"}) as ports, \
                grpc.insecure_channel(f"127.0.0.1:{ports['identity']}") as channel, \
                grpc.insecure_channel(f"127.0.0.1:{ports['echo']}") as echo_channel, \
                grpc.insecure_channel(f"127.0.0.1:{ports['read_echo']}") as read_echo_channel:
            stub = pb_grpc.IdentityServiceStub(channel)
            health = health_pb2_grpc.HealthStub(echo_channel)

            console.print("raw lightweight transactions ...")
            lwt_rate = measure_raw_lwt(admin, cassandra_settings.keyspace("identity"))

            world = build_world(args.persons, seed=11)
            console.print(f"linking {len(world.observations)} observations of {args.persons} persons "
                          f"({args.writers} writers, batches of {args.batch}) ...")
            linked = measure_link(stub, world.observations, batch=args.batch, writers=args.writers)
            console.print("the same observations again under new message ids ...")
            again = [(f"again-{message_id}", identifiers) for message_id, identifiers in world.observations]
            relinked = measure_link(stub, again, batch=args.batch, writers=args.writers)
            # Again after the links: a node started just before runs its first LWTs with a cold JIT, which
            # made the baseline half as fast and the ratio twice as good. The faster of the two counts.
            console.print("raw lightweight transactions again ...")
            lwt_rates = (lwt_rate, measure_raw_lwt(admin, cassandra_settings.keyspace("identity")))
            lwt_rate = max(lwt_rates)

            owned = sorted(world.uniquely_owned())
            requests = [pb.LookupPersonRequest(person=common_pb2.PersonSelector(identifier=_identifier(i)))
                        for i in random.Random(3).sample(owned, min(len(owned), 5000))]

            def lookup(i: int) -> Any:
                return stub.LookupPerson(requests[i % len(requests)], timeout=10)

            def lookup_future(i: int) -> Future[Any]:
                future: Future[Any] = stub.LookupPerson.future(requests[i % len(requests)], timeout=10)
                return future

            check = health_pb2.HealthCheckRequest()

            def echo_call(i: int) -> Any:
                return health.Check(check, timeout=10)

            def echo_future(i: int) -> Future[Any]:
                future: Future[Any] = health.Check.future(check, timeout=10)
                return future

            waited = wait_for_compactions(admin)
            console.print(f"waited {waited:.0f} s for Cassandra to finish compacting the links' writes")
            console.print("bare gRPC echo (health Check) ...")
            echo_figures = measure_latency("echo", echo_call, echo_future, args.seconds)
            console.print("LookupPerson by identifier ...")
            lookup_figures = measure_latency("lookup", lookup, lookup_future, args.seconds)
            # The phase above looks most of its identifiers up for the first time (5,000 of them, a few
            # thousand calls). Once each has been looked up, the service has a holder hint for it and reads
            # the person alone (services.identity.recent.RecentLookups): measured apart, as a hot identifier's.
            with ThreadPoolExecutor(LOOKUP_THREADS) as pool:
                person_ids = [answer.person_id.encode()
                              for answer in pool.map(lookup, range(len(requests)))]
            console.print("LookupPerson by identifier, every one looked up before ...")
            hinted_figures = measure_latency("hinted lookup", lookup, lookup_future, args.seconds)
            # The floor of any lookup that answers from Cassandra: gRPC and the one read a hinted lookup
            # makes, nothing else (bench.read_echo_server), over the same persons.
            read_person = read_echo_channel.unary_unary(read_echo_server.METHOD)

            def read_echo(i: int) -> Any:
                return read_person(person_ids[i % len(person_ids)], timeout=10)

            def read_echo_future(i: int) -> Future[Any]:
                future: Future[Any] = read_person.future(person_ids[i % len(person_ids)], timeout=10)
                return future

            console.print("one Cassandra read behind the same bootstrap (read echo) ...")
            read_figures = measure_latency("read echo", read_echo, read_echo_future, args.seconds)
            # Callers that accept an answer read up to --staleness ago (LookupPersonRequest.max_staleness).
            staleness = Duration()
            staleness.FromTimedelta(timedelta(seconds=args.staleness))
            stale_requests = [pb.LookupPersonRequest(person=r.person, max_staleness=staleness) for r in requests]
            from_memory: list[bool] = []

            def stale_lookup(i: int) -> Any:
                started = time.time()
                person = stub.LookupPerson(stale_requests[i % len(stale_requests)], timeout=10)
                from_memory.append(person.read_time.seconds + person.read_time.nanos / 1e9 < started)
                return person

            def stale_lookup_future(i: int) -> Future[Any]:
                future: Future[Any] = stub.LookupPerson.future(stale_requests[i % len(stale_requests)], timeout=10)
                return future

            console.print(f"LookupPerson by identifier accepting answers up to {args.staleness:g} s old ...")
            with ThreadPoolExecutor(LOOKUP_THREADS) as pool:
                list(pool.map(stale_lookup, range(len(stale_requests))))
            from_memory.clear()
            stale_figures = measure_latency("stale lookup", stale_lookup, stale_lookup_future, args.seconds)
            memory_share = sum(from_memory) / max(1, len(from_memory))
        # Printed before the counting pass, which creates a keyspace (slow on a loaded machine).
        link_rate = linked.rate
        rows = [
            ("raw LWT (INSERT IF NOT EXISTS)", f"{lwt_rate:,.0f} /s",
             f"driver concurrency {LWT_CONCURRENCY}; the faster of before the links and after them "
             f"({lwt_rates[0]:,.0f}, {lwt_rates[1]:,.0f} /s)"),
            ("link, observations through gRPC", f"{link_rate:,.0f} /s",
             f"{len(world.observations)} obs, {args.writers} writers x {args.batch}/call"),
            ("link / raw LWT", f"{link_rate / lwt_rate:.2f}", "aim >= 0.5"),
            ("link call p50 / p99", f"{linked.percentile_ms(50):,.0f} / {linked.percentile_ms(99):,.0f} ms",
             f"{args.batch} observations per call"),
            ("link again, new message ids", f"{relinked.rate:,.0f} /s", "the same links"),
            ("link again / raw LWT", f"{relinked.rate / lwt_rate:.2f}", ""),
            ("echo max (closed loop)", f"{echo_figures.max_rate:,.0f} /s", f"{LOOKUP_THREADS} callers"),
            ("lookup max (closed loop)", f"{lookup_figures.max_rate:,.0f} /s", f"{LOOKUP_THREADS} callers"),
            ("lookup / echo", f"{lookup_figures.max_rate / echo_figures.max_rate:.2f}", "aim >= 0.5"),
            ("echo p50 / p99 at max", f"{echo_figures.max_p50_ms:.1f} / {echo_figures.max_p99_ms:.1f} ms", ""),
            ("lookup p50 / p99 at max", f"{lookup_figures.max_p50_ms:.1f} / {lookup_figures.max_p99_ms:.1f} ms", ""),
            ("echo p50 / p99 at half load",
             f"{echo_figures.half_p50_ms:.1f} / {echo_figures.half_p99_ms:.1f} ms",
             f"{echo_figures.half_rate:,.0f} /s"),
            ("lookup p50 / p99 at half load",
             f"{lookup_figures.half_p50_ms:.1f} / {lookup_figures.half_p99_ms:.1f} ms",
             f"{lookup_figures.half_rate:,.0f} /s; aim p99 <= 10 ms"),
            ("lookup, each identifier looked up before: max", f"{hinted_figures.max_rate:,.0f} /s",
             f"{LOOKUP_THREADS} callers; one Cassandra read a lookup (holder hints)"),
            ("lookup looked up before / echo", f"{hinted_figures.max_rate / echo_figures.max_rate:.2f}", ""),
            ("lookup looked up before, p50 / p99 at half load",
             f"{hinted_figures.half_p50_ms:.1f} / {hinted_figures.half_p99_ms:.1f} ms",
             f"{hinted_figures.half_rate:,.0f} /s"),
            ("read echo max: gRPC + the person read alone", f"{read_figures.max_rate:,.0f} /s",
             f"{LOOKUP_THREADS} callers; the floor of a lookup answered from Cassandra"),
            ("read echo / echo", f"{read_figures.max_rate / echo_figures.max_rate:.2f}",
             "the most any such lookup can reach"),
            ("lookup looked up before / read echo", f"{hinted_figures.max_rate / read_figures.max_rate:.2f}",
             "the share of the floor the service keeps"),
            ("read echo p50 / p99 at half load",
             f"{read_figures.half_p50_ms:.1f} / {read_figures.half_p99_ms:.1f} ms",
             f"{read_figures.half_rate:,.0f} /s"),
            (f"lookup accepting {args.staleness:g} s staleness: max", f"{stale_figures.max_rate:,.0f} /s",
             f"{LOOKUP_THREADS} callers; {memory_share:.0%} of the closed-loop calls answered from memory"),
            (f"lookup accepting {args.staleness:g} s staleness / echo",
             f"{stale_figures.max_rate / echo_figures.max_rate:.2f}", "aim >= 0.5 (callers that accept it)"),
            (f"lookup accepting {args.staleness:g} s staleness, p50 / p99 at half load",
             f"{stale_figures.half_p50_ms:.1f} / {stale_figures.half_p99_ms:.1f} ms",
             f"{stale_figures.half_rate:,.0f} /s"),
        ]
        console.print(figures_table("identity service (a process of its own; 2-core machine)", rows))
        if not args.no_counts:
            console.print("counting CQL per observation (the same links, service in this process) ...")
            (new_counts, counted_linked), (again_counts, counted_relinked) = count_statements(
                cassandra_settings, admin, world, again, batch=args.batch, writers=args.writers)
            console.print(figures_table("CQL per observation, counted in a separate pass (service in this process)", [
                ("link, CQL per observation", new_counts.per(len(world.observations)), ""),
                ("link again, CQL per observation", again_counts.per(len(again)), ""),
                ("link / again, in process while counted",
                 f"{counted_linked.rate:,.0f} / {counted_relinked.rate:,.0f} /s",
                 "client, service and counting share one process: not the figure to quote"),
            ]))


if __name__ == "__main__":
    main()
