"""The ProfileSource over the profile service's gRPC API (an adapter: it imports grpc, the domain does not).

What it reads from profile (onecdp.profile.v1):
- ListProfileShards(shard_count) -> shards; then per shard ScanProfiles(shard, include_events=true,
  events_end_time=before, read_mask=person_id) streaming ScannedProfile{profile.person_id, events
  oldest first}: every person's history for training and score refresh.
- ListProfileEvents(person, end_time=before, page_size=1000, page_token) newest first: one person's
  history for scoring; GetProfile(person, read_mask=person_id) only to resolve the person id of
  someone selected by identifier who has no events. Batches read up to MAX_IN_FLIGHT persons at once.
- BatchWriteTraits: refreshed scores written back as traits `score_<model_id>` and
  `score_<model_id>_percentile`, source `onecdp-prediction`, event time = when they were computed.

Event mapping (StoredEvent.event -> ActivityEvent): ORDER -> name `order`, amount = order.amount,
category = the first item's category; TRACK/PAGE/SCREEN -> event_name, amount = properties.revenue
when numeric, category = properties.category when a string. IDENTIFY and ALIAS are state, not
behaviour, and are skipped. A later event for an order id already seen is a correction of that
transaction (e.g. a refund), not a new order: it becomes `order_update` with the change in amount,
so counts stay right and nothing from after a cutoff alters the order as it looked before it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime

import grpc
from google.protobuf import field_mask_pb2
from onecdp.common.v1 import common_pb2
from onecdp.profile.v1 import profile_service_pb2 as profile_pb
from onecdp.profile.v1 import profile_service_pb2_grpc as profile_grpc

from services.prediction.history import ORDER_EVENT, ActivityEvent, PersonHistory, PersonRef
from services.prediction.jobs import SCORES_SOURCE, score_trait_names
from services.prediction.scoring import PersonScore
from shared import deadline
from shared.errors import DeadlineExceeded, DomainError, InvalidArgument, NotFound, Unavailable

ORDER_UPDATE_EVENT = "order_update"
DEFAULT_SHARDS = 16
SCAN_BATCH_SIZE = 500
EVENTS_PAGE_SIZE = 1000
# Concurrent reads of one batch: enough to hide round trips, below profile's 32 worker threads.
MAX_IN_FLIGHT = 16
READ_TIMEOUT_SECONDS = 10.0
WRITE_TIMEOUT_SECONDS = 30.0
# Profile's BatchWriteTraits limit.
MAX_TRAIT_WRITES = 1000
_SKIPPED_TYPES = frozenset({profile_pb.EVENT_TYPE_IDENTIFY, profile_pb.EVENT_TYPE_ALIAS,
                            profile_pb.EVENT_TYPE_UNSPECIFIED})
_PERSON_ID_ONLY = field_mask_pb2.FieldMask(paths=["person_id"])


def _selector(person: PersonRef) -> common_pb2.PersonSelector:
    if person.person_id is not None:
        return common_pb2.PersonSelector(person_id=person.person_id)
    return common_pb2.PersonSelector(identifier=common_pb2.Identifier(type=person.identifier_type or "",
                                                                       value=person.identifier_value or ""))


def activity_events(stored: Iterable[profile_pb.StoredEvent], before: datetime | None = None) -> list[ActivityEvent]:
    """Profile's stored events (any order) as a time-sorted history, only those strictly before `before`.

    Profile filters by time too, but on its stored event time, which Cassandra keeps to the millisecond:
    an event at 12:00:00.000500 passes its `< 12:00:00.000500` filter. The exact time is in the event
    itself, so the boundary is applied again here; point-in-time correctness must not depend on it.
    """
    ordered = sorted(stored, key=lambda s: (s.event.event_time.seconds, s.event.event_time.nanos,
                                            s.event.message_id))
    amounts_by_order: dict[str, float] = {}
    events = []
    for item in ordered:
        event = item.event
        if event.type in _SKIPPED_TYPES:
            continue
        time = event.event_time.ToDatetime(tzinfo=UTC)
        if before is not None and time >= before:
            continue
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
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"{what}: the profile service did not answer in time; retry with a longer deadline",
                                reason="PROFILE_DEADLINE")
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
                    yield PersonHistory(scanned.profile.person_id, activity_events(scanned.events, before))
        except grpc.RpcError as error:
            raise _domain_error(error, f"scanning profile shard {shard}") from error

    def histories(self, before: datetime) -> Iterator[PersonHistory]:
        for shard in self.shards():
            yield from self.histories_of_shard(shard, before)

    def history(self, person: PersonRef, before: datetime) -> PersonHistory:
        result = self._finish_history(person, before, self._first_events_page(person, before))
        if isinstance(result, DomainError):
            raise result
        return result

    def histories_of(self, persons: Sequence[PersonRef], before: datetime) -> list[PersonHistory | DomainError]:
        """Many persons with at most MAX_IN_FLIGHT reads outstanding: a batch costs about one round trip per
        MAX_IN_FLIGHT persons instead of one per person, without flooding profile's worker threads."""
        results: list[PersonHistory | DomainError | None] = [None] * len(persons)
        in_flight: deque[tuple[int, grpc.Future]] = deque()
        for index, person in enumerate(persons):
            in_flight.append((index, self._first_events_page(person, before)))
            if len(in_flight) >= MAX_IN_FLIGHT:
                done, future = in_flight.popleft()
                results[done] = self._finish_history(persons[done], before, future)
        while in_flight:
            done, future = in_flight.popleft()
            results[done] = self._finish_history(persons[done], before, future)
        return [result for result in results if result is not None]

    def _events_request(self, person: PersonRef, before: datetime,
                        token: str = "") -> profile_pb.ListProfileEventsRequest:
        request = profile_pb.ListProfileEventsRequest(person=_selector(person), page_size=EVENTS_PAGE_SIZE,
                                                      page_token=token)
        request.end_time.FromDatetime(before)
        return request

    def _first_events_page(self, person: PersonRef, before: datetime) -> grpc.Future:
        future: grpc.Future = self._stub.ListProfileEvents.future(
            self._events_request(person, before), timeout=deadline.timeout_within(READ_TIMEOUT_SECONDS))
        return future

    def _finish_history(self, person: PersonRef, before: datetime,
                        first_page: grpc.Future) -> PersonHistory | DomainError:
        try:
            page = first_page.result()
            stored: list[profile_pb.StoredEvent] = list(page.events)
            while page.next_page_token:
                page = self._stub.ListProfileEvents(self._events_request(person, before, page.next_page_token),
                                                    timeout=deadline.timeout_within(READ_TIMEOUT_SECONDS))
                stored.extend(page.events)
            person_id = stored[0].person_id if stored else person.person_id
            if person_id is None:
                # Selected by identifier and without events before `before`: only profile knows who it is.
                profile = self._stub.GetProfile(profile_pb.GetProfileRequest(person=_selector(person),
                                                                             read_mask=_PERSON_ID_ONLY),
                                                timeout=deadline.timeout_within(READ_TIMEOUT_SECONDS))
                person_id = profile.person_id
        except grpc.RpcError as error:
            return _domain_error(error, "reading the person's events")
        except DomainError as error:  # the caller's deadline passed between pages
            return error
        return PersonHistory(person_id, activity_events(stored, before))


class GrpcScoreWriter:
    """Writes scores back to profile as traits with BatchWriteTraits (at most 1,000 writes per call)."""

    def __init__(self, stub: profile_grpc.ProfileServiceStub) -> None:
        self._stub = stub

    def write_scores(self, model_id: str, scores: Sequence[PersonScore], written_at: datetime) -> None:
        score_trait, percentile_trait = score_trait_names(model_id)
        for start in range(0, len(scores), MAX_TRAIT_WRITES):
            request = profile_pb.BatchWriteTraitsRequest()
            for score in scores[start:start + MAX_TRAIT_WRITES]:
                write = request.writes.add(person_id=score.person_id, source=SCORES_SOURCE,
                                           party=common_pb2.DATA_PARTY_FIRST)
                write.traits.update({score_trait: score.probability, percentile_trait: score.percentile})
                write.event_time.FromDatetime(written_at)
            try:
                self._stub.BatchWriteTraits(request, timeout=WRITE_TIMEOUT_SECONDS)
            except grpc.RpcError as error:
                raise _domain_error(error, "writing scores back to profile") from error
