"""The ProfileSource over the profile service's gRPC API (an adapter: it imports grpc, the domain does not).

What it reads from profile (onecdp.profile.v1):
- ListProfileShards(shard_count) -> shards; then per shard ScanProfiles(shard, include_events=true,
  events_end_time=before, read_mask=person_id) streaming ScannedProfile{profile.person_id, events
  oldest first}: every person's history for training and score refresh.
- ListProfileEvents(person, end_time=before, page_size=1000, page_token) newest first: one person's
  history for scoring; GetProfile(person, read_mask=person_id) only to resolve the person id of
  someone selected by identifier who has no events.

Event mapping (StoredEvent.event -> ActivityEvent): ORDER -> name `order`, amount = order.amount,
category = the first item's category; TRACK/PAGE/SCREEN -> event_name, amount = properties.revenue
when numeric, category = properties.category when a string. IDENTIFY and ALIAS are state, not
behaviour, and are skipped. A later event for an order id already seen is a correction of that
transaction (e.g. a refund), not a new order: it becomes `order_update` with the change in amount,
so counts stay right and nothing from after a cutoff alters the order as it looked before it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import UTC, datetime

import grpc
from google.protobuf import field_mask_pb2
from onecdp.common.v1 import common_pb2
from onecdp.profile.v1 import profile_service_pb2 as profile_pb
from onecdp.profile.v1 import profile_service_pb2_grpc as profile_grpc

from services.prediction.history import ORDER_EVENT, ActivityEvent, PersonHistory, PersonRef
from shared import deadline
from shared.errors import DomainError, InvalidArgument, NotFound, Unavailable

ORDER_UPDATE_EVENT = "order_update"
DEFAULT_SHARDS = 16
SCAN_BATCH_SIZE = 500
EVENTS_PAGE_SIZE = 1000
_SKIPPED_TYPES = frozenset({profile_pb.EVENT_TYPE_IDENTIFY, profile_pb.EVENT_TYPE_ALIAS,
                            profile_pb.EVENT_TYPE_UNSPECIFIED})
_PERSON_ID_ONLY = field_mask_pb2.FieldMask(paths=["person_id"])


def _selector(person: PersonRef) -> common_pb2.PersonSelector:
    if person.person_id is not None:
        return common_pb2.PersonSelector(person_id=person.person_id)
    return common_pb2.PersonSelector(identifier=common_pb2.Identifier(type=person.identifier_type or "",
                                                                       value=person.identifier_value or ""))




def activity_events(stored: Iterable[profile_pb.StoredEvent]) -> list[ActivityEvent]:
    """Profile's stored events (any order) as a time-sorted history."""
    ordered = sorted(stored, key=lambda s: (s.event.event_time.seconds, s.event.event_time.nanos,
                                            s.event.message_id))
    amounts_by_order: dict[str, float] = {}
    events = []
    for item in ordered:
        event = item.event
        if event.type in _SKIPPED_TYPES:
            continue
        time = event.event_time.ToDatetime(tzinfo=UTC)
        if event.type == profile_pb.EVENT_TYPE_ORDER:
            order = event.order
            category = next((i.category for i in order.items if i.category), None)
            if order.order_id in amounts_by_order:
                change = order.amount - amounts_by_order[order.order_id]
                amounts_by_order[order.order_id] = order.amount
                events.append(ActivityEvent(ORDER_UPDATE_EVENT, time, change, category))
                continue
            amounts_by_order[order.order_id] = order.amount
            events.append(ActivityEvent(ORDER_EVENT, time, order.amount, category))
            continue
        properties = event.properties.fields
        revenue = properties.get("revenue")
        category_value = properties.get("category")
        events.append(ActivityEvent(
            event.event_name, time,
            revenue.number_value if revenue is not None and revenue.WhichOneof("kind") == "number_value" else None,
            category_value.string_value
            if category_value is not None and category_value.WhichOneof("kind") == "string_value" else None))
    return events


def _domain_error(error: grpc.RpcError, what: str) -> DomainError:
    code = error.code() if isinstance(error, grpc.Call) else None
    details = error.details() if isinstance(error, grpc.Call) else str(error)
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(f"{what}: {details}", reason="PERSON_NOT_FOUND")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument.for_field("person", f"{what}: {details}", reason="BAD_PERSON_SELECTOR")
    return Unavailable(f"{what}: the profile service answered {code.name if code else 'an error'} ({details}); "
                       "retry with backoff", reason="PROFILE_UNAVAILABLE")


class GrpcProfileSource:
    """Histories from the profile service."""

    def __init__(self, stub: profile_grpc.ProfileServiceStub, shard_count: int = DEFAULT_SHARDS) -> None:
        self._stub = stub
        self._shard_count = shard_count

    def shards(self) -> list[str]:
        try:
            response = self._stub.ListProfileShards(profile_pb.ListProfileShardsRequest(shard_count=self._shard_count))
        except grpc.RpcError as error:
            raise _domain_error(error, "listing profile shards") from error
        return list(response.shards)

    def histories_of_shard(self, shard: str, before: datetime) -> Iterator[PersonHistory]:
        request = profile_pb.ScanProfilesRequest(shard=shard, read_mask=_PERSON_ID_ONLY, include_events=True,
                                                 batch_size=SCAN_BATCH_SIZE)
        request.events_end_time.FromDatetime(before)
        try:
            for batch in self._stub.ScanProfiles(request):
                for scanned in batch.profiles:
                    yield PersonHistory(scanned.profile.person_id, activity_events(scanned.events))
        except grpc.RpcError as error:
            raise _domain_error(error, f"scanning profile shard {shard}") from error

    def histories(self, before: datetime) -> Iterator[PersonHistory]:
        for shard in self.shards():
            yield from self.histories_of_shard(shard, before)

    def history(self, person: PersonRef, before: datetime) -> PersonHistory:
        selector = _selector(person)
        stored: list[profile_pb.StoredEvent] = []
        token = ""
        try:
            while True:
                request = profile_pb.ListProfileEventsRequest(person=selector, page_size=EVENTS_PAGE_SIZE,
                                                              page_token=token)
                request.end_time.FromDatetime(before)
                page = self._stub.ListProfileEvents(request, timeout=deadline.timeout_within(10.0))
                stored.extend(page.events)
                token = page.next_page_token
                if not token:
                    break
            person_id = stored[0].person_id if stored else person.person_id
            if person_id is None:
                profile = self._stub.GetProfile(profile_pb.GetProfileRequest(person=selector,
                                                                             read_mask=_PERSON_ID_ONLY),
                                                timeout=deadline.timeout_within(10.0))
                person_id = profile.person_id
        except grpc.RpcError as error:
            raise _domain_error(error, "reading the person's events") from error
        return PersonHistory(person_id, activity_events(stored))
