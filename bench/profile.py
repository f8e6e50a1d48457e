"""Profile ingest and read throughput vs the same rows written / read straight with the raw driver.

    .venv/bin/python -m bench.profile [--events 20000] [--persons 2000] [--customers 500] [--seconds 10]

Runs identity and profile as real processes (as deployed), against their own keyspaces:
1. creates the persons (identify events, not timed);
2. ingests `--events` track/order events for them through StreamIngestEvents, 4 client streams of
   500-event batches, with 1 and then 2 profile server processes;
3. writes the same rows (timeline row, bucket row, idempotency record per event) with the raw
   driver's execute_concurrent from this process: the baseline, measured in the same run.
4. the same identifiers looked up in identity alone (BatchLookupPersons, the same batches and streams):
   what ingest asks identity, so the profile-only part of ingest shows. The timed events name
   identifiers linked in step 1, so ingest looks them up and links nothing.
Then reads: the first `--customers` CDNOW customers (their real orders, 1997-1998, spread over ~2.3
months each on average, and an identify event with traits) are loaded (not timed), and for
`--seconds` each, in a closed loop:
5. GetProfile by identifier (traits and computed traits), 8 callers;
6. BatchGetProfiles of 100 customers with their events, 2 callers;
7. the baseline: the rows those reads need (each timeline month and the trait writes of a person),
   read with the raw driver from this process, one person per call (8 callers) and 100 per call
   (execute_concurrent, 2 callers); and identity's BatchLookupPersons of the same selectors alone.
Prints events/s and persons/s for each and the ratios. Figures, not a test.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime, timedelta

import grpc
from onecdp.common.v1 import common_pb2
from onecdp.identity.v1 import identity_service_pb2 as identity_pb
from onecdp.identity.v1 import identity_service_pb2_grpc as identity_grpc
from onecdp.profile.v1 import profile_service_pb2 as pb
from onecdp.profile.v1 import profile_service_pb2_grpc as pb_grpc

from bench.common import (
    LoadResult,
    bench_cassandra,
    closed_loop,
    console,
    figures_table,
    free_port,
    service_env,
    start_service_process,
)
from deploy.cdnow import read_cdnow
from services.profile.model import bucket_of
from shared.cassandra import CassandraSession, connect_cluster, open_session
from shared.migrations import migrate_service

BATCH = 500
STREAMS = 4
READ_BATCH = 100
SINGLE_READERS = 8
BATCH_READERS = 2
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


def identity_lookups(port: int, events: Sequence[pb.Event]) -> float:
    """Seconds for identity alone to look up the events' identifiers, in the batches and streams ingest uses
    (each batch's distinct identifiers once, as ingest asks them)."""
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = identity_grpc.IdentityServiceStub(channel)
    parts = [events[i::STREAMS] for i in range(STREAMS)]

    def stream(index: int) -> None:
        part = parts[index]
        for start in range(0, len(part), BATCH):
            distinct = dict.fromkeys((i.type, i.value) for e in part[start:start + BATCH] for i in e.identifiers)
            stub.BatchLookupPersons(identity_pb.BatchLookupPersonsRequest(persons=[
                common_pb2.PersonSelector(identifier=common_pb2.Identifier(type=t, value=v)) for t, v in distinct]),
                timeout=600)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=STREAMS) as pool:
        list(pool.map(stream, range(STREAMS)))
    seconds = time.perf_counter() - started
    channel.close()
    return seconds


# ---- reads ------------------------------------------------------------------------------------------

def cdnow_events(customers: int) -> tuple[list[pb.Event], dict[str, set[int]]]:
    """The first `customers` CDNOW customers as events (an identify with traits, then each order) under
    crm_id `cdnow-<id>`, and the timeline months of each customer's events."""
    events: list[pb.Event] = []
    months: dict[str, set[int]] = {}
    for index, purchase in enumerate(read_cdnow()):
        crm_id = f"cdnow-{purchase.customer_id}"
        when = datetime(purchase.date.year, purchase.date.month, purchase.date.day, 12, tzinfo=UTC)
        identifier = common_pb2.Identifier(type="crm_id", value=crm_id)
        if crm_id not in months:
            if len(months) == customers:
                break
            months[crm_id] = set()
            identify = pb.Event(message_id=f"bench-cdnow-identify-{crm_id}", type=pb.EVENT_TYPE_IDENTIFY,
                                identifiers=[identifier])
            identify.event_time.FromDatetime(when - timedelta(hours=1))
            identify.traits.update({"plan": "cd-club", "country": "US", "newsletter": True})
            events.append(identify)
        order = pb.Event(message_id=f"bench-cdnow-{index}", type=pb.EVENT_TYPE_ORDER, identifiers=[identifier],
                         order=pb.Order(order_id=f"cdnow-{index}", amount=purchase.dollars, items=[
                             pb.OrderItem(sku="cd", category="music", quantity=purchase.cds,
                                          unit_price=purchase.dollars / purchase.cds)]))
        order.event_time.FromDatetime(when)
        events.append(order)
        months[crm_id].add(bucket_of(when))
    return events, months


def selector_of(crm_id: str) -> common_pb2.PersonSelector:
    return common_pb2.PersonSelector(identifier=common_pb2.Identifier(type="crm_id", value=crm_id))


def read_profiles(port: int, crm_ids: Sequence[str], seconds: float) -> tuple[LoadResult, LoadResult]:
    """GetProfile one customer per call, then BatchGetProfiles of READ_BATCH with events; persons per second."""
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.ProfileServiceStub(channel)
    as_of = pb.GetProfileRequest().as_of_time
    as_of.FromDatetime(datetime(1998, 7, 1, tzinfo=UTC))

    def get_one(index: int) -> int:
        profile = stub.GetProfile(pb.GetProfileRequest(person=selector_of(crm_ids[index % len(crm_ids)]),
                                                       as_of_time=as_of), timeout=30)
        assert profile.computed.frequency >= 1
        return 1

    def get_batch(index: int) -> int:
        start = index * READ_BATCH % len(crm_ids)
        chosen = [crm_ids[(start + i) % len(crm_ids)] for i in range(READ_BATCH)]
        response = stub.BatchGetProfiles(pb.BatchGetProfilesRequest(
            persons=[selector_of(c) for c in chosen], as_of_time=as_of, include_events=True), timeout=60)
        assert all(r.found and r.events for r in response.results)
        return len(response.results)

    single = closed_loop(get_one, threads=SINGLE_READERS, seconds=seconds)
    batch = closed_loop(get_batch, threads=BATCH_READERS, seconds=seconds)
    channel.close()
    return single, batch


def identity_reads(port: int, crm_ids: Sequence[str], seconds: float) -> LoadResult:
    """BatchLookupPersons of READ_BATCH customers per call: the identity part of BatchGetProfiles."""
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = identity_grpc.IdentityServiceStub(channel)

    def lookup(index: int) -> int:
        start = index * READ_BATCH % len(crm_ids)
        persons = [selector_of(crm_ids[(start + i) % len(crm_ids)]) for i in range(READ_BATCH)]
        stub.BatchLookupPersons(identity_pb.BatchLookupPersonsRequest(persons=persons), timeout=60)
        return READ_BATCH

    result = closed_loop(lookup, threads=BATCH_READERS, seconds=seconds)
    channel.close()
    return result


_RAW_TIMELINE = ("SELECT person_id, bucket, event_time, message_id, event_micros, event_type, event_name, order_id, "
                 "amount, currency_code, item_count, categories, brands, payload, receive_time FROM timeline "
                 "WHERE person_id = ? AND bucket = ?")
_RAW_TRAITS = ("SELECT name, event_time, message_id, value, deleted, source, party FROM trait_writes "
               "WHERE person_id = ?")


def raw_reads(session: CassandraSession, persons: Mapping[str, set[int]], seconds: float,
              ) -> tuple[LoadResult, LoadResult]:
    """The rows a profile read needs (each timeline month, the trait writes), straight from Cassandra, knowing
    where they are: one person per call, then READ_BATCH persons per call."""
    person_ids = list(persons)

    def read(chosen: Sequence[str]) -> int:
        futures = [session.execute_async(_RAW_TIMELINE, (p, month)) for p in chosen for month in sorted(persons[p])]
        futures += [session.execute_async(_RAW_TRAITS, (p,)) for p in chosen]
        for future in futures:
            session.result(future)
        return len(chosen)

    single = closed_loop(lambda i: read([person_ids[i % len(person_ids)]]), threads=SINGLE_READERS, seconds=seconds)
    batch = closed_loop(lambda i: read([person_ids[(i * READ_BATCH + k) % len(person_ids)]
                                        for k in range(READ_BATCH)]), threads=BATCH_READERS, seconds=seconds)
    return single, batch


def lookup_persons(port: int, crm_ids: Sequence[str]) -> dict[str, str]:
    """The person id of each customer, from identity."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = identity_grpc.IdentityServiceStub(channel)
        found: dict[str, str] = {}
        for start in range(0, len(crm_ids), 1000):
            chunk = crm_ids[start:start + 1000]
            response = stub.BatchLookupPersons(identity_pb.BatchLookupPersonsRequest(
                persons=[selector_of(c) for c in chunk]), timeout=60)
            found.update((c, r.person.person_id) for c, r in zip(chunk, response.results, strict=True))
    return found


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
    parser.add_argument("--customers", type=int, default=500, help="CDNOW customers loaded for the read figures")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each read measurement")
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
        lookups = identity_lookups(identity_port, activity_events(args.events, args.persons, "one"))
        stack.enter_context(service_process("profile", profile_ports[1], env))
        two = ingest(profile_ports, activity_events(args.events, args.persons, "two"))
        cluster = connect_cluster(settings)
        stack.callback(cluster.shutdown)
        session = open_session(cluster, settings.keyspace("profile"), 60)
        raw = raw_writes(session, activity_events(args.events, args.persons, "raw"))
        console.print(f"loading {args.customers:,} CDNOW customers (not timed)")
        events, months = cdnow_events(args.customers)
        ingest(profile_ports[:1], events)
        crm_ids = list(months)
        found = lookup_persons(identity_port, crm_ids)
        read_one, read_batch = read_profiles(profile_ports[0], crm_ids, args.seconds)
        identity_batch = identity_reads(identity_port, crm_ids, args.seconds)
        raw_one, raw_batch = raw_reads(session, {found[c]: months[c] for c in crm_ids}, args.seconds)
    n = args.events
    profile_only = one - lookups
    rows = [
        ("raw driver writes (same rows)", f"{n / raw:,.0f} events/s", "baseline, same run"),
        ("StreamIngestEvents, 1 profile process", f"{n / one:,.0f} events/s", f"ratio {raw / one:.2f} (aim >= 0.5)"),
        ("StreamIngestEvents, 2 profile processes", f"{n / two:,.0f} events/s",
         f"ratio {raw / two:.2f}; x{one / two:.2f} vs 1 process"),
        ("identity BatchLookupPersons of the same identifiers", f"{n / lookups:,.0f} events/s",
         f"{lookups / one:.0%} of the 1-process ingest time"),
        ("ingest less those lookups (profile's own part)",
         f"{n / profile_only:,.0f} events/s" if profile_only > 0 else "n/a",
         f"ratio {raw / profile_only:.2f}" if profile_only > 0 else "lookups took longer than ingest"),
    ]
    console.print(figures_table(f"profile ingest, {n:,} events over {args.persons:,} persons, "
                                f"{STREAMS} streams of {BATCH}-event batches", rows))
    reads = [
        ("raw driver, 1 person per call", f"{raw_one.rate:,.0f} persons/s", f"baseline, {SINGLE_READERS} callers"),
        ("GetProfile by identifier", f"{read_one.rate:,.0f} persons/s",
         f"ratio {read_one.rate / raw_one.rate:.2f}; p50 {read_one.percentile_ms(50):.1f} ms"),
        (f"raw driver, {READ_BATCH} persons per call", f"{raw_batch.rate:,.0f} persons/s",
         f"baseline, {BATCH_READERS} callers"),
        (f"BatchGetProfiles of {READ_BATCH} with events", f"{read_batch.rate:,.0f} persons/s",
         f"ratio {read_batch.rate / raw_batch.rate:.2f}; p50 {read_batch.percentile_ms(50):.0f} ms per call"),
        (f"identity BatchLookupPersons of {READ_BATCH}", f"{identity_batch.rate:,.0f} persons/s",
         "the identity part of BatchGetProfiles, alone"),
    ]
    errors = read_one.errors + read_batch.errors + raw_one.errors + raw_batch.errors + identity_batch.errors
    console.print(figures_table(f"profile reads, {len(crm_ids):,} CDNOW customers "
                                f"({sum(map(len, months.values())) / len(months):.1f} months of events each), "
                                f"{args.seconds:.0f} s each" + (f", {errors} errors" if errors else ""), reads))
    console.print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
