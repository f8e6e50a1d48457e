"""Profile ingest throughput: the streaming RPC vs the same rows written straight to Cassandra.

    .venv/bin/python -m bench.profile [--events 20000] [--persons 2000]

Runs identity and profile as real processes (as deployed), against their own keyspaces:
1. creates the persons (identify events, not timed);
2. ingests `--events` track/order events for them through StreamIngestEvents, 4 client streams of
   500-event batches, with 1 and then 2 profile server processes;
3. writes the same rows (timeline row, bucket row, idempotency record per event) with the raw
   driver's execute_concurrent from this process: the baseline, measured in the same run.
Prints events/s for each and the ratios. Figures, not a test.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime, timedelta

import grpc
from onecdp.common.v1 import common_pb2
from onecdp.profile.v1 import profile_service_pb2 as pb
from onecdp.profile.v1 import profile_service_pb2_grpc as pb_grpc

from bench.common import bench_cassandra, console, figures_table, free_port, service_env, start_service_process
from services.profile.model import bucket_of
from shared.cassandra import CassandraSession, connect_cluster, open_session
from shared.migrations import migrate_service

BATCH = 500
STREAMS = 4
START = datetime(2026, 1, 1, tzinfo=UTC)


@contextmanager
def service_process(name: str, port: int, env: Mapping[str, str]) -> Iterator[None]:
    process = start_service_process(name, port, {**env, "ONECDP_MIGRATE_ON_START": "false"})
    try:
        yield
    finally:
        process.terminate()
        process.wait(timeout=30)


def identify_events(persons: int) -> list[pb.Event]:
    events = []
    for person in range(persons):
        event = pb.Event(message_id=f"bench-identify-{person}", type=pb.EVENT_TYPE_IDENTIFY,
                         identifiers=[common_pb2.Identifier(type="crm_id", value=f"bench-{person}"),
                                      common_pb2.Identifier(type="email", value=f"bench{person}@example.com")])
        event.event_time.FromDatetime(START)
        event.traits.update({"plan": "free"})
        events.append(event)
    return events


def activity_events(count: int, persons: int, run: str) -> list[pb.Event]:
    events = []
    for index in range(count):
        person = index % persons
        event = pb.Event(message_id=f"bench-{run}-{index}", identifiers=[
            common_pb2.Identifier(type="crm_id", value=f"bench-{person}")])
        if index % 5 == 0:
            event.type = pb.EVENT_TYPE_ORDER
            event.order.CopyFrom(pb.Order(order_id=f"o-{run}-{index}", amount=10.0 + index % 90, items=[
                pb.OrderItem(sku="sku", category="books", quantity=1, unit_price=10.0)]))
        else:
            event.type = pb.EVENT_TYPE_TRACK
            event.event_name = "view_item"
            event.properties.update({"category": "books"})
        event.event_time.FromDatetime(START + timedelta(minutes=index))
        events.append(event)
    return events


def ingest(ports: Sequence[int], events: Sequence[pb.Event]) -> float:
    """Seconds to ingest `events` over STREAMS streams spread across the servers; all must be accepted."""
    channels = [grpc.insecure_channel(f"127.0.0.1:{port}") for port in ports]
    stubs = [pb_grpc.ProfileServiceStub(channel) for channel in channels]
    parts = [events[i::STREAMS] for i in range(STREAMS)]

    def stream(index: int) -> pb.StreamIngestEventsResponse:
        part = parts[index]
        requests = (pb.StreamIngestEventsRequest(events=part[i:i + BATCH]) for i in range(0, len(part), BATCH))
        response: pb.StreamIngestEventsResponse = stubs[index % len(stubs)].StreamIngestEvents(requests, timeout=3600)
        return response

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=STREAMS) as pool:
        responses = list(pool.map(stream, range(STREAMS)))
    seconds = time.perf_counter() - started
    for channel in channels:
        channel.close()
    rejected = sum(r.rejected_count for r in responses)
    accepted = sum(r.accepted_count for r in responses)
    if rejected or accepted != len(events):
        raise SystemExit(f"ingest went wrong: {accepted} accepted, {rejected} rejected of {len(events)}")
    return seconds


def raw_writes(session: CassandraSession, events: Sequence[pb.Event]) -> float:
    """Seconds to write the rows the service writes per event (timeline, bucket, idempotency record)."""
    now = datetime.now(UTC)
    timeline: list[tuple[object, ...]] = []
    buckets: set[tuple[str, int]] = set()
    ids: list[tuple[object, ...]] = []
    for event in events:
        when = event.event_time.ToDatetime(tzinfo=UTC)
        person = f"raw-{event.identifiers[0].value}"
        order = event.order if event.HasField("order") else None
        timeline.append((person, bucket_of(when), when, event.message_id, int(event.type),
                         event.event_name or "order", order.order_id if order else None,
                         order.amount if order else None, "USD" if order else None, 1 if order else None,
                         {"books": 1}, {}, event.SerializeToString(), now))
        buckets.add((person, bucket_of(when)))
        ids.append((event.message_id, person, bucket_of(when), when, [(i.type, i.value) for i in event.identifiers],
                    now))
    started = time.perf_counter()
    session.execute_many("INSERT INTO timeline (person_id, bucket, event_time, message_id, event_type, event_name, "
                         "order_id, amount, currency_code, item_count, categories, brands, payload, receive_time) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", timeline, concurrency=128)
    session.execute_many("INSERT INTO timeline_buckets (person_id, bucket) VALUES (?, ?)", sorted(buckets),
                         concurrency=128)
    session.execute_many("INSERT INTO events_by_id (message_id, person_id, bucket, event_time, identifiers, "
                         "receive_time) VALUES (?, ?, ?, ?, ?, ?)", ids, concurrency=128)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--persons", type=int, default=2_000)
    args = parser.parse_args(argv)
    with bench_cassandra("profile") as (settings, admin), ExitStack() as stack:
        stack.callback(admin.execute, f"DROP KEYSPACE IF EXISTS {settings.keyspace('identity')}", timeout=60)
        for service in ("identity", "profile"):
            migrate_service(admin, service, settings)
        identity_port, profile_ports = free_port(), [free_port(), free_port()]
        env = service_env(settings, {"identity": identity_port, "profile": profile_ports[0]})
        stack.enter_context(service_process("identity", identity_port, env))
        stack.enter_context(service_process("profile", profile_ports[0], env))
        console.print(f"creating {args.persons:,} persons (not timed)")
        ingest(profile_ports[:1], identify_events(args.persons))
        one = ingest(profile_ports[:1], activity_events(args.events, args.persons, "one"))
        stack.enter_context(service_process("profile", profile_ports[1], env))
        two = ingest(profile_ports, activity_events(args.events, args.persons, "two"))
        cluster = connect_cluster(settings)
        stack.callback(cluster.shutdown)
        raw = raw_writes(open_session(cluster, settings.keyspace("profile"), 60),
                         activity_events(args.events, args.persons, "raw"))
    n = args.events
    rows = [
        ("raw driver writes (same rows)", f"{n / raw:,.0f} events/s", "baseline, same run"),
        ("StreamIngestEvents, 1 profile process", f"{n / one:,.0f} events/s", f"ratio {raw / one:.2f} (aim >= 0.5)"),
        ("StreamIngestEvents, 2 profile processes", f"{n / two:,.0f} events/s",
         f"ratio {raw / two:.2f}; x{one / two:.2f} vs 1 process"),
    ]
    console.print(figures_table(f"profile ingest, {n:,} events over {args.persons:,} persons, "
                                f"{STREAMS} streams of {BATCH}-event batches", rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
