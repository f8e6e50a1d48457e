"""Demo data: the CDNOW customers as OneCDP events, ingested through the profile service's gRPC API.

Every CDNOW customer becomes a person seen on two channels: a web identify event (crm id, email,
cookie) at the first purchase, and an app identify event (account id, device id, and the same email)
a day later, so identity links five identifiers into one person. Every purchase becomes an `order`
event carrying only the crm id, as a CRM import would. Message ids are derived from the data, so
loading twice stores everything once (the second run reports duplicates).

    python -m deploy.demo load [--customers N] [--streams 8] [--target localhost:50052]
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

import grpc
from onecdp.common.v1 import common_pb2
from onecdp.profile.v1 import profile_service_pb2 as pb
from onecdp.profile.v1 import profile_service_pb2_grpc as pb_grpc
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from deploy.cdnow import CdnowPurchase, read_cdnow
from shared.config import GrpcSettings

SOURCE = "cdnow-import"
BATCH_SIZE = 500
# Batches per StreamIngestEvents call (10,000 events): short enough to finish well within a connection's
# maximum age, long enough that per-call costs vanish.
BATCHES_PER_CALL = 20
MAX_ATTEMPTS = 5
console = Console()


def crm_id(customer_id: str) -> str:
    return f"cdnow-{customer_id}"


def _noon(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, 12, tzinfo=UTC)


def _device_id(customer_id: str) -> str:
    digest = hashlib.sha256(f"cdnow-device-{customer_id}".encode()).hexdigest()
    return f"{digest[:8]}-{digest[8:12]}-4{digest[13:16]}-8{digest[17:20]}-{digest[20:32]}"


def _identifiers(*pairs: tuple[str, str]) -> list[common_pb2.Identifier]:
    return [common_pb2.Identifier(type=t, value=v) for t, v in pairs]


def identify_events(customer_id: str, first_purchase: date) -> list[pb.Event]:
    """The two channel sign-ins that give a customer five linked identifiers."""
    email = ("email", f"customer{customer_id}@cdnow.example")
    web = pb.Event(message_id=f"cdnow-identify-web-{customer_id}", type=pb.EVENT_TYPE_IDENTIFY,
                   identifiers=_identifiers(("crm_id", crm_id(customer_id)), email,
                                            ("cookie", f"ck-{customer_id}")),
                   source="cdnow-web", source_kind=common_pb2.SOURCE_KIND_WEB, party=common_pb2.DATA_PARTY_FIRST)
    web.event_time.FromDatetime(_noon(first_purchase) - timedelta(hours=1))
    web.traits.update({"customer_id": customer_id, "signup_channel": "web",
                       "first_purchase_date": first_purchase.isoformat()})
    app = pb.Event(message_id=f"cdnow-identify-app-{customer_id}", type=pb.EVENT_TYPE_IDENTIFY,
                   identifiers=_identifiers(("account_id", f"acct-{customer_id}"), email,
                                            ("device_id", _device_id(customer_id))),
                   source="cdnow-app", source_kind=common_pb2.SOURCE_KIND_APP, party=common_pb2.DATA_PARTY_FIRST)
    app.event_time.FromDatetime(_noon(first_purchase) + timedelta(days=1))
    app.traits.update({"app_user": True})
    return [web, app]


def order_event(purchase: CdnowPurchase, line: int) -> pb.Event:
    """One CDNOW purchase line as an order (CDNOW has no order ids: customer and line number make one)."""
    order_id = f"cdnow-{purchase.customer_id}-{line}"
    event = pb.Event(message_id=f"cdnow-order-{purchase.customer_id}-{line}", type=pb.EVENT_TYPE_ORDER,
                     identifiers=_identifiers(("crm_id", crm_id(purchase.customer_id))),
                     source=SOURCE, source_kind=common_pb2.SOURCE_KIND_CRM_IMPORT,
                     party=common_pb2.DATA_PARTY_FIRST,
                     order=pb.Order(order_id=order_id, amount=purchase.dollars, currency_code="USD",
                                    items=[pb.OrderItem(sku="cd", name="CD", category="music",
                                                        quantity=max(purchase.cds, 1),
                                                        unit_price=purchase.dollars / max(purchase.cds, 1))]))
    event.event_time.FromDatetime(_noon(purchase.date))
    return event


def demo_events(purchases: Sequence[CdnowPurchase]) -> tuple[list[pb.Event], list[pb.Event]]:
    """(identify events, order events) for the purchases; identify events are ingested first."""
    identifies: list[pb.Event] = []
    orders: list[pb.Event] = []
    for customer_id, group in itertools.groupby(purchases, key=lambda p: p.customer_id):
        lines = list(group)
        identifies += identify_events(customer_id, min(p.date for p in lines))
        orders += [order_event(p, line) for line, p in enumerate(lines)]
    return identifies, orders


def customers_of(purchases: Sequence[CdnowPurchase], limit: int | None) -> list[CdnowPurchase]:
    """The purchases of the first `limit` customers (all when None)."""
    if limit is None:
        return list(purchases)
    keep = set(sorted({p.customer_id for p in purchases})[:limit])
    return [p for p in purchases if p.customer_id in keep]


@dataclass
class LoadSummary:
    events: int = 0
    accepted: int = 0
    duplicate: int = 0
    rejected: int = 0
    seconds: float = 0.0
    retried: int = 0
    rejections: list[pb.EventResult] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, response: pb.StreamIngestEventsResponse) -> None:
        with self.lock:
            self.events += len(response.results)
            self.accepted += response.accepted_count
            self.duplicate += response.duplicate_count
            self.rejected += response.rejected_count
            self.rejections += [r for r in response.results if r.status == pb.EVENT_STATUS_REJECTED][:10]


def _batches(events: Sequence[pb.Event], size: int) -> Iterator[list[pb.Event]]:
    for start in range(0, len(events), size):
        yield list(events[start:start + size])


def _requests(events: Sequence[pb.Event], batch_size: int, sent: list[int],
              advance: Callable[[int], None]) -> Iterator[pb.StreamIngestEventsRequest]:
    """The stream's messages; counts (and reports) what was handed to gRPC, to undo on a retry."""
    for batch in _batches(events, batch_size):
        yield pb.StreamIngestEventsRequest(events=batch)
        sent[0] += len(batch)
        advance(len(batch))


def load(stub: pb_grpc.ProfileServiceStub, purchases: Sequence[CdnowPurchase], *, streams: int = 8,
         batch_size: int = BATCH_SIZE, progress: Progress | None = None) -> LoadSummary:
    """Ingest the demo events over `streams` concurrent StreamIngestEvents calls."""
    identifies, orders = demo_events(purchases)
    summary = LoadSummary()
    task = progress.add_task("events", total=len(identifies) + len(orders)) if progress else None
    started = time.perf_counter()

    def advance(events: int) -> None:
        if progress is not None and task is not None:
            progress.advance(task, events)

    def stream(events: list[pb.Event]) -> None:
        # Bounded calls, so none outlives the servers' maximum connection age; a call cut short (a
        # server restarting, a connection recycled) is sent again: ingestion is idempotent, so what
        # it had stored comes back as duplicates.
        for start in range(0, len(events), batch_size * BATCHES_PER_CALL):
            chunk = events[start:start + batch_size * BATCHES_PER_CALL]
            for attempt in itertools.count(1):
                sent = [0]
                try:
                    response = stub.StreamIngestEvents(_requests(chunk, batch_size, sent, advance), timeout=600)
                    break
                except grpc.RpcError as error:
                    advance(-sent[0])
                    if error.code() != grpc.StatusCode.UNAVAILABLE or attempt == MAX_ATTEMPTS:
                        raise
                    summary.retried += 1
                    time.sleep(min(2.0 ** attempt, 30.0))
            summary.add(response)

    # Identify events first (they link the identifiers), then the orders; each phase split across streams.
    for phase in (identifies, orders):
        chunk = -(-len(phase) // streams) if phase else 0
        parts = [phase[i:i + chunk] for i in range(0, len(phase), chunk)] if chunk else []
        with ThreadPoolExecutor(max_workers=max(len(parts), 1)) as pool:
            for future in [pool.submit(stream, part) for part in parts]:
                future.result()
    summary.seconds = time.perf_counter() - started
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Load the CDNOW demo data through the profile service.")
    commands = parser.add_subparsers(dest="command", required=True)
    load_parser = commands.add_parser("load", help="ingest CDNOW customers as events")
    load_parser.add_argument("--customers", type=int, default=None, help="only the first N customers (default: all)")
    load_parser.add_argument("--streams", type=int, default=8, help="concurrent ingest streams")
    load_parser.add_argument("--target", default=None, help="profile service address (default ONECDP_PROFILE_TARGET)")
    args = parser.parse_args(argv)
    settings = GrpcSettings()
    target = args.target or settings.target_of("profile")
    purchases = customers_of(read_cdnow(), args.customers)
    customers = len({p.customer_id for p in purchases})
    console.print(f"Loading {len(purchases):,} CDNOW purchases of {customers:,} customers into {target}")
    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", settings.max_message_bytes),
                                                ("grpc.max_receive_message_length", settings.max_message_bytes)]) \
            as channel:
        stub = pb_grpc.ProfileServiceStub(channel)
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), console=console) as progress:
            summary = load(stub, purchases, streams=args.streams, progress=progress)
    rate = summary.events / summary.seconds if summary.seconds else 0.0
    console.print(f"[bold]Done:[/bold] {summary.events:,} events in {summary.seconds:.1f} s ({rate:,.0f} events/s): "
                  f"{summary.accepted:,} accepted, {summary.duplicate:,} duplicates, {summary.rejected:,} rejected; "
                  f"{customers:,} customer profiles"
                  + (f"; {summary.retried} calls cut short were sent again" if summary.retried else ""))
    for rejected in summary.rejections[:5]:
        console.print(f"  rejected {rejected.message_id}: {rejected.message}")
    first = min(p.customer_id for p in purchases)
    console.print("Fetch a customer's profile (paste as is):", style="bold")
    console.print(f"  .venv/bin/grpcurl -plaintext -d '{{\"person\":{{\"identifier\":{{\"type\":\"crm_id\","
                  f"\"value\":\"{crm_id(first)}\"}}}},\"as_of_time\":\"1998-07-01T00:00:00Z\"}}' {target} "
                  "onecdp.profile.v1.ProfileService/GetProfile", soft_wrap=True, highlight=False)
    return 1 if summary.rejected else 0


if __name__ == "__main__":
    sys.exit(main())
