"""Segmentation service figures, each next to what it is compared with in the same run.

    .venv/bin/python -m bench.segmentation [--persons 1500] [--latency-seconds 15] [--rate 4] [--rounds 3]

(a) real-time latency: from IngestEvents returning (a new person's `ping` event) to that person's
    enter being visible in ListSegmentMembershipChanges of a segment `event("ping").count(last 1d) >= 1`,
    p50/p99 (aim p99 <= 1 s), events sent open loop at `--rate` per second while a poller reads the
    changes every 20 ms with `include_unsettled` (as a display that wants changes at once does; a poller
    of deltas without it sees each change a settle second later);
(b) batch recompute throughput: RecomputeSegment in profiles/s (the operation's own elapsed time) of two
    rules: one that needs traits and events (BATCH_RULE: its trait decides two persons in three, whose
    events the recompute then never reads), and one on events alone (EVENTS_RULE: nothing decides without
    events, so every person's events are read, in one phase). Each is compared with raw parallel
    token-range scans with the driver from this process, same parallelism: of the rows a profile is built
    from (profiles + timeline + trait_writes tables, persons/s: the issue's baseline), of the rows and
    columns a one-phase recompute of BATCH_RULE reads (its trait, its events from its window's start), and
    of the profiles table alone (rows/s); and with profile's ScanProfiles alone, with the one-phase request
    of BATCH_RULE (its trait and the events of everyone) and with the request a recompute of EVENTS_RULE
    makes, to show where the time goes. Each is measured in `--rounds` rounds (all figures in turn) and
    reported as the median; so is the CPU time each process (Cassandra, profile, segmentation, this one)
    spends per 1,000 profiles in the events-only recompute and in the raw scan (from /proc).

Identity, profile and segmentation run as separate processes on free ports, against keyspaces of the
benchmark's own that are dropped at the end. Data: synthetic persons, one identify event and three
orders each, ingested through profile's StreamIngestEvents. Figures, not a test.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from statistics import median

import grpc
from google.longrunning import operations_pb2
from onecdp.common.v1 import common_pb2
from onecdp.profile.v1 import profile_service_pb2 as profile_pb
from onecdp.profile.v1 import profile_service_pb2_grpc as profile_grpc
from onecdp.segmentation.v1 import segmentation_service_pb2 as pb
from onecdp.segmentation.v1 import segmentation_service_pb2_grpc as pb_grpc

from bench.common import (
    LoadResult,
    bench_cassandra,
    cassandra_pid,
    console,
    cpu_seconds,
    figures_table,
    open_loop,
    service_processes,
)
from services.profile.shards import split_ring
from services.segmentation.profile_source import scan_request
from services.segmentation.realtime import EventReads, ProfileReads, events_read, profile_reads
from services.segmentation.text import parse
from shared.cassandra import CassandraSession, connect_cluster, open_session
from shared.config import SERVICE_NAMES, CassandraSettings

REPO = Path(__file__).resolve().parent.parent
SERVICES = ("identity", "profile", "segmentation")
PARALLELISM = 8
BATCH_RULE = 'traits.plan = "pro" AND event("order").count(last 30d) >= 2'
# A rule no trait can decide: a recompute reads every person's events (the case two phases cannot prune).
EVENTS_RULE = 'event("order").count(last 30d) >= 2'
PING_RULE = 'event("ping").count(last 1d) >= 1'


def _event(message_id: str, person: str, when: datetime, **fields: object) -> profile_pb.Event:
    event = profile_pb.Event(message_id=message_id, identifiers=[common_pb2.Identifier(type="crm_id", value=person)],
                             source="bench", **fields)  # type: ignore[arg-type]
    event.event_time.FromDatetime(when)
    return event


def synthetic_events(persons: int, now: datetime) -> list[list[profile_pb.Event]]:
    """Per person: an identify (plan pro for every third) and three orders in the last 60 days."""
    batches = []
    for index in range(persons):
        person = f"bench-{index:06d}"
        identify = _event(f"{person}-identify", person, now - timedelta(days=90), type=profile_pb.EVENT_TYPE_IDENTIFY)
        identify.traits.update({"plan": "pro" if index % 3 == 0 else "free"})
        orders = [_event(f"{person}-order-{k}", person, now - timedelta(days=5 + 17 * k + index % 7),
                         type=profile_pb.EVENT_TYPE_ORDER,
                         order=profile_pb.Order(order_id=f"{person}-{k}", amount=10.0 + k, currency_code="USD"))
                  for k in range(3)]
        batches.append([identify, *orders])
    return batches


def ingest(stub: profile_grpc.ProfileServiceStub, events: Sequence[profile_pb.Event], streams: int = 4) -> None:
    chunk = -(-len(events) // streams)

    def stream(part: Sequence[profile_pb.Event]) -> None:
        requests = (profile_pb.StreamIngestEventsRequest(events=part[i:i + 500]) for i in range(0, len(part), 500))
        response = stub.StreamIngestEvents(requests, timeout=3600)
        if response.rejected_count:
            raise RuntimeError(f"{response.rejected_count} events rejected")

    with ThreadPoolExecutor(max_workers=streams) as pool:
        for future in [pool.submit(stream, events[i:i + chunk]) for i in range(0, len(events), chunk)]:
            future.result()


def wait_operation(stub: pb_grpc.SegmentationServiceStub, operation: operations_pb2.Operation
                   ) -> pb.RecomputeSegmentResponse:
    while not operation.done:
        time.sleep(0.2)
        operation = stub.GetOperation(operations_pb2.GetOperationRequest(name=operation.name), timeout=10)
    response = pb.RecomputeSegmentResponse()
    if not operation.response.Unpack(response):
        raise RuntimeError(f"recompute failed: {operation.error.message}")
    return response


@dataclass(frozen=True)
class RawRead:
    """A token-range read of one table: `SELECT columns FROM table WHERE token(key) > ? AND token(key) <= ?`,
    plus `where` (with `params`) if any."""

    table: str
    key: str
    columns: str = "*"
    where: str = ""
    params: tuple[object, ...] = ()


# Everything a profile is built from: the baseline.
WHOLE_PROFILES = [RawRead("profiles", "person_id"), RawRead("timeline", "person_id, bucket"),
                  RawRead("trait_writes", "person_id")]


def rule_reads(since: datetime) -> list[RawRead]:
    """The rows and columns a recompute of BATCH_RULE reads (its trait, its events from `since` on)."""
    return [RawRead("profiles", "person_id", "person_id, merged_into, merged_person_ids, erased, update_time"),
            RawRead("trait_writes", "person_id",
                    "person_id, name, event_time, message_id, value, deleted, source, party",
                    "AND name IN ('plan') ALLOW FILTERING"),
            RawRead("timeline", "person_id, bucket", "person_id, bucket, event_time, message_id, event_micros, "
                    "event_type, event_name, order_id, amount, currency_code, item_count, categories, brands, payload, "
                    "receive_time", "AND bucket >= ? AND event_time >= ? ALLOW FILTERING",
                    (since.year * 100 + since.month, since))]


def raw_scan(session: CassandraSession, reads: Sequence[RawRead], parallelism: int) -> tuple[int, float]:
    """Run every read over `parallelism * 2` token ranges with `parallelism` threads; returns (distinct persons,
    seconds)."""
    ranges = split_ring(parallelism * 2)

    def scan(read: RawRead, start: int, end: int) -> set[str]:
        rows = session.execute(f"SELECT {read.columns} FROM {read.table} WHERE token({read.key}) > ? "
                               f"AND token({read.key}) <= ? {read.where}", (start, end, *read.params), fetch_size=1000)
        return {row.person_id for row in rows}

    started = time.perf_counter()
    persons: set[str] = set()
    with ThreadPoolExecutor(max_workers=parallelism) as pool:
        futures = [pool.submit(scan, read, start, end) for read in reads for start, end in ranges]
        for future in futures:
            persons |= future.result()
    return len(persons), time.perf_counter() - started


def batch_rule_reads(now: datetime, rule: str = BATCH_RULE) -> tuple[EventReads, ProfileReads]:
    """What a one-phase recompute of `rule` at `now` asks profile for: its events, its profile fields."""
    rules = {"segment": parse(rule)}
    return events_read(rules.values(), rules, now), profile_reads(rules.values(), rules, now)


def recompute_reads(rule: str = BATCH_RULE) -> str:
    """What a one-phase recompute of `rule` asks ScanProfiles for, in words: its read mask, and its events."""
    events, fields = batch_rule_reads(datetime.now(UTC), rule)
    request = scan_request("", datetime.now(UTC), events, fields)
    names = ", ".join(f"`{n}`" for n in request.event_names) or "no"
    return f"read mask {', '.join(request.read_mask.paths)}; {names} events from the rule's window start"


def profile_scan(stub: profile_grpc.ProfileServiceStub, parallelism: int, rule: str = BATCH_RULE
                 ) -> tuple[int, float]:
    """What a one-phase recompute of `rule` reads, alone: profile's ScanProfiles over the same number of shards,
    with the same request (the rule's traits, its events from its earliest window on)."""
    shards = stub.ListProfileShards(profile_pb.ListProfileShardsRequest(shard_count=parallelism * 2),
                                    timeout=10).shards
    now = datetime.now(UTC)
    events, fields = batch_rule_reads(now, rule)

    def scan(shard: str) -> int:
        request = scan_request(shard, now, events, fields)
        return sum(len(response.profiles) for response in stub.ScanProfiles(request, timeout=600))

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=parallelism) as pool:
        total = sum(pool.map(scan, shards))
    return total, time.perf_counter() - started


def realtime_latency(profiles: profile_grpc.ProfileServiceStub, stub: pb_grpc.SegmentationServiceStub,
                     rate: float, seconds: float, run: str) -> tuple[LoadResult, int]:
    """Open loop: a new person pings every 1/rate s; latency from the ingest returning to the enter visible.
    Persons and messages are named after `run`, so that each run's pings are new persons. Also returns how
    many pings returned but never became visible (within 30 s)."""
    returned: dict[str, float] = {}
    visible: dict[str, float] = {}
    stop = threading.Event()
    lock = threading.Lock()

    def poll() -> None:
        token = stub.ListSegmentMembershipChanges(pb.ListSegmentMembershipChangesRequest(
            parent="segments/pinged", page_size=1, include_unsettled=True), timeout=10).next_page_token
        while not stop.is_set():
            page = stub.ListSegmentMembershipChanges(pb.ListSegmentMembershipChangesRequest(
                parent="segments/pinged", page_token=token, page_size=1000, include_unsettled=True), timeout=10)
            seen = time.perf_counter()
            with lock:
                for change in page.changes:
                    visible.setdefault(change.person_id, seen)
            token = page.next_page_token
            time.sleep(0.02)

    poller = threading.Thread(target=poll, name="bench-poller")
    poller.start()
    pool = ThreadPoolExecutor(max_workers=8)

    def send(index: int) -> Future[object]:
        def call() -> object:
            event = _event(f"ping-{run}-{index}", f"pinger-{run}-{index:05d}", datetime.now(UTC),
                           type=profile_pb.EVENT_TYPE_TRACK, event_name="ping")
            result = profiles.IngestEvents(profile_pb.IngestEventsRequest(events=[event]), timeout=10).results[0]
            with lock:
                returned[result.person_id] = time.perf_counter()
            return result
        return pool.submit(call)

    sent = open_loop(send, rate=rate, seconds=seconds)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with lock:
            if set(returned) <= set(visible):
                break
        time.sleep(0.1)
    stop.set()
    poller.join()
    pool.shutdown()
    with lock:
        latencies = [visible[p] - t for p, t in returned.items() if p in visible]
        missing = len(set(returned) - set(visible))
    return LoadResult(len(latencies), sent.seconds, latencies, errors=sent.errors + missing), missing


def measure_rounds(figures: Mapping[str, Callable[[], tuple[int, float]]], rounds: int,
                   processes: Mapping[str, int]) -> tuple[dict[str, list[float]], dict[str, dict[str, list[float]]]]:
    """Each figure's rate (count / seconds) in each of `rounds` rounds (a round measures every figure once), and
    the CPU seconds each of `processes` (name -> pid) spent per 1,000 counted in each round."""
    rates: dict[str, list[float]] = {name: [] for name in figures}
    cpu: dict[str, dict[str, list[float]]] = {name: {p: [] for p in processes} for name in figures}
    for _ in range(rounds):
        for name, measure in figures.items():
            before = {p: cpu_seconds(pid) for p, pid in processes.items()}
            count, seconds = measure()
            rates[name].append(count / seconds)
            for p, pid in processes.items():
                cpu[name][p].append((cpu_seconds(pid) - before[p]) / count * 1000)
    return rates, cpu


def cpu_figure(per_process: Mapping[str, list[float]]) -> str:
    """Median CPU milliseconds per profile of each process (seconds per 1,000), those that spent any."""
    return ", ".join(f"{name} {median(values):.3f} ms" for name, values in per_process.items()
                     if median(values) >= 0.0005)


def drop_keyspaces(admin: CassandraSession, settings: CassandraSettings) -> None:
    for name in SERVICE_NAMES:
        admin.execute(f"DROP KEYSPACE IF EXISTS {settings.keyspace(name)}", timeout=60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--persons", type=int, default=1500, help="synthetic persons for the batch figure")
    parser.add_argument("--latency-seconds", type=float, default=15.0, help="how long to send pings")
    parser.add_argument("--rate", type=float, default=4.0, help="pings per second (each a new person)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the batch figures (medians are reported)")
    args = parser.parse_args(argv)

    pids: dict[str, int] = {}
    with bench_cassandra("segmentation") as (settings, admin), \
            service_processes(settings, SERVICES, pids=pids) as ports:
        try:
            with grpc.insecure_channel(f"127.0.0.1:{ports['profile']}") as profile_channel, \
                    grpc.insecure_channel(f"127.0.0.1:{ports['segmentation']}") as channel:
                profiles = profile_grpc.ProfileServiceStub(profile_channel)
                stub = pb_grpc.SegmentationServiceStub(channel)
                now = datetime.now(UTC)
                events = [e for person in synthetic_events(args.persons, now) for e in person]
                started = time.perf_counter()
                ingest(profiles, events)
                console.print(f"ingested {len(events):,} events of {args.persons:,} persons through profile in "
                              f"{time.perf_counter() - started:.1f} s")
                # Real time first catches up with the ingest (a segment on something nobody did yet).
                stub.CreateSegment(pb.CreateSegmentRequest(segment_id="pinged", segment=pb.Segment(
                    rule_text=PING_RULE)), timeout=10)
                stub.CreateSegment(pb.CreateSegmentRequest(segment_id="pro-buyers", segment=pb.Segment(
                    rule_text=BATCH_RULE)), timeout=10)
                stub.CreateSegment(pb.CreateSegmentRequest(segment_id="buyers", segment=pb.Segment(
                    rule_text=EVENTS_RULE)), timeout=10)
                caught_up, _ = realtime_latency(profiles, stub, 1.0, 1.0, "warm-up")  # waits for real time to catch up
                console.print(f"real time caught up with the ingest: first ping visible after "
                              f"{caught_up.percentile_ms(100) / 1e3:.1f} s")
                latency, unseen = realtime_latency(profiles, stub, args.rate, args.latency_seconds, "measured")

                def recompute(segment_id: str = "pro-buyers") -> tuple[int, float]:
                    done = wait_operation(stub, stub.RecomputeSegment(pb.RecomputeSegmentRequest(
                        name=f"segments/{segment_id}", parallelism=PARALLELISM), timeout=10))
                    return done.profiles_scanned, done.elapsed_seconds

                recompute()  # warm up
                recompute("buyers")
                cluster = connect_cluster(settings)
                try:
                    session = open_session(cluster, settings.keyspace("profile"), 60)
                    since = batch_rule_reads(datetime.now(UTC))[0].since
                    assert since is not None
                    # Rounds of every figure in turn, so that a change of the machine's load reaches them all.
                    cassandra = cassandra_pid()
                    processes = {**({"Cassandra": cassandra} if cassandra is not None else {}),
                                 "profile": pids["profile"], "segmentation": pids["segmentation"],
                                 "this process (the raw scans' driver)": os.getpid()}
                    rates, cpu = measure_rounds({
                        "recompute": recompute,
                        "recompute_events": lambda: recompute("buyers"),
                        "scan": lambda: profile_scan(profiles, PARALLELISM),
                        "scan_events": lambda: profile_scan(profiles, PARALLELISM, EVENTS_RULE),
                        "raw": lambda: raw_scan(session, WHOLE_PROFILES, PARALLELISM),
                        "read": lambda: raw_scan(session, rule_reads(since), PARALLELISM),
                        "table": lambda: raw_scan(session, WHOLE_PROFILES[:1], PARALLELISM),
                    }, args.rounds, processes)
                finally:
                    cluster.shutdown()
        finally:
            drop_keyspaces(admin, settings)

    batch_rate, events_rate, scan_rate, scan_events_rate, raw_rate, read_rate, table_rate = (
        median(rates[name]) for name in ("recompute", "recompute_events", "scan", "scan_events", "raw", "read",
                                         "table"))
    console.print(figures_table(f"segmentation service ({args.persons + latency.operations:,} profiles, "
                                f"parallelism {PARALLELISM}; rates are medians of {args.rounds} rounds)", [
        ("real time: IngestEvents returned -> enter visible, p50 / p99",
         f"{latency.percentile_ms(50):,.0f} / {latency.percentile_ms(99):,.0f} ms",
         f"{latency.operations} new persons at {args.rate:g}/s, {latency.errors - unseen} ingest calls failed, "
         f"{unseen} never seen; aim p99 <= 1 s"),
        (f"batch RecomputeSegment of `{BATCH_RULE}` (two phases: every trait, then the events of the persons "
         "it leaves undecided; evaluate; diff)", f"{batch_rate:,.0f} profiles/s",
         "rounds: " + ", ".join(f"{rate:,.0f}" for rate in rates["recompute"])),
        (f"batch RecomputeSegment of `{EVENTS_RULE}` (no trait decides anyone: one phase, every person's "
         "events)", f"{events_rate:,.0f} profiles/s",
         f"ratio recompute / raw {events_rate / raw_rate:.2f}; rounds: "
         + ", ".join(f"{rate:,.0f}" for rate in rates["recompute_events"])),
        (f"profile's ScanProfiles alone, one phase of the first rule ({recompute_reads()})",
         f"{scan_rate:,.0f} profiles/s", f"ratio recompute / ScanProfiles {batch_rate / scan_rate:.2f}"),
        (f"profile's ScanProfiles alone, as a recompute of the events-only rule calls it "
         f"({recompute_reads(EVENTS_RULE)})", f"{scan_events_rate:,.0f} profiles/s",
         f"ratio recompute / ScanProfiles {events_rate / scan_events_rate:.2f}"),
        ("raw token-range scan: profiles + timeline + trait_writes", f"{raw_rate:,.0f} persons/s",
         f"ratio recompute / raw {batch_rate / raw_rate:.2f} (aim >= 0.5), events-only rule "
         f"{events_rate / raw_rate:.2f}; rounds: " + ", ".join(f"{rate:,.0f}" for rate in rates["raw"])),
        ("raw token-range scan: what a one-phase recompute of the first rule reads (profiles; trait_writes of "
         "`plan`; timeline from the window's start)", f"{read_rate:,.0f} persons/s",
         f"ratio recompute / raw {batch_rate / read_rate:.2f}"),
        ("raw token-range scan: profiles table alone", f"{table_rate:,.0f} rows/s",
         f"ratio recompute / raw {batch_rate / table_rate:.3f}"),
        ("CPU time per profile, by process: RecomputeSegment of the events-only rule",
         cpu_figure(cpu["recompute_events"]), "where a recompute's time goes (/proc; medians of the rounds)"
         + ("" if "Cassandra" in cpu["raw"] else "; Cassandra not measured: not one Cassandra on this machine")),
        ("CPU time per person, by process: the raw scan of profiles + timeline + trait_writes",
         cpu_figure(cpu["raw"]), "the same, of the baseline"),
    ]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
