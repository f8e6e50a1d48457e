"""Profiles as evaluation facts, read from the profile service over its gRPC contract (part of the adapter).

Shards and ScanProfiles for batch work (of a whole shard, or of some persons of it by id), BatchGetProfiles
for the persons real time re-evaluates (one call, events included), GetProfile + ListProfileEvents for one
person. A scanned or batch-read person whose events profile left out (`events_omitted`: more than one message
carries) has them paged with ListProfileEvents, with the names and time range the read asked for, so a heavy
person is evaluated on every event like everyone else. The profile service computes computed
traits as of the time asked, so facts and windows share one `as_of`. Batch and real-time reads ask only
for events from the earliest window on, and keep only the event names the rules read.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, ClassVar, overload

import grpc
from google.protobuf import field_mask_pb2, json_format, struct_pb2, timestamp_pb2
from onecdp.common.v1 import common_pb2
from onecdp.profile.v1 import profile_service_pb2 as profile_pb
from onecdp.profile.v1 import profile_service_pb2_grpc as profile_grpc

from services.segmentation.evaluation import EventFact, ProfileFacts
from services.segmentation.realtime import EVERY_FIELD, EventReads, ProfileReads
from shared.clients import every_profile_event
from shared.errors import DeadlineExceeded, DomainError, InvalidArgument, NotFound, Unavailable
from shared.trait_names import trait_name_problem

_DEFAULT_EVENT_NAMES = {profile_pb.EVENT_TYPE_ORDER: "order", profile_pb.EVENT_TYPE_IDENTIFY: "identify",
                        profile_pb.EVENT_TYPE_ALIAS: "alias"}
_LIFECYCLE = {profile_pb.LIFECYCLE_STAGE_NEW: "new", profile_pb.LIFECYCLE_STAGE_ACTIVE: "active",
              profile_pb.LIFECYCLE_STAGE_SILENT: "silent", profile_pb.LIFECYCLE_STAGE_CHURNED: "churned"}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_NO_PROPERTIES: Mapping[str, Any] = MappingProxyType({})
SCAN_BATCH = 500
EVENTS_PAGE = 1000
BATCH_GET_LIMIT = 1000  # profile's BatchGetProfiles limit
SCAN_PERSONS_LIMIT = 1000  # profile's limit of ScanProfilesRequest.person_ids
# What reading some persons' events needs of their profiles: which person each is.
EVENTS_ONLY = ProfileReads(frozenset(), computed=False)
# What an evaluation reads of a profile (no recent transactions, no identifiers).
FACTS_MASK = field_mask_pb2.FieldMask(paths=["person_id", "traits", "computed", "preferences"])
# onecdp.profile.v1.ProfileChangeType values.
CHANGE_MERGE, CHANGE_SPLIT, CHANGE_ERASE = 3, 4, 5


@dataclass(frozen=True)
class FeedChange:
    """One entry of profile's change feed, as the segmentation follower needs it."""

    change_id: uuid.UUID
    person_id: str
    change_type: int
    trait_names: tuple[str, ...]
    event_names: tuple[str, ...]
    merged_person_ids: tuple[str, ...]


def _properties(event: profile_pb.Event) -> dict[str, Any]:
    properties: dict[str, Any] = json_format.MessageToDict(event.properties) if event.HasField("properties") else {}
    if event.HasField("order"):
        # An order's own fields are properties too, so rules can sum `amount` of `order` events.
        order = event.order
        properties.update(amount=order.amount, order_id=order.order_id, currency_code=order.currency_code or "USD")
    return properties


def _plain(value: struct_pb2.Value) -> Any:
    """A trait's value as JSON would give it; strings and booleans directly (json_format costs several times more)."""
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    return json_format.MessageToDict(value)


def computed_of(profile: profile_pb.Profile) -> dict[str, Any]:
    if not profile.HasField("computed"):
        return {}
    computed = profile.computed
    values: dict[str, Any] = {
        "frequency": float(computed.frequency), "monetary": computed.monetary,
        "average_order_value": computed.average_order_value, "lifetime_value": computed.lifetime_value,
        "event_count": float(computed.event_count),
        "top_categories": list(profile.preferences.top_categories), "top_brands": list(profile.preferences.top_brands),
    }
    if computed.HasField("recency_days"):
        values["recency_days"] = computed.recency_days
    if computed.HasField("rfm"):
        values.update({"rfm.recency_score": float(computed.rfm.recency_score),
                       "rfm.frequency_score": float(computed.rfm.frequency_score),
                       "rfm.monetary_score": float(computed.rfm.monetary_score), "rfm.segment": computed.rfm.segment})
    if computed.lifecycle_stage in _LIFECYCLE:
        values["lifecycle_stage"] = _LIFECYCLE[computed.lifecycle_stage]
    for name in ("first_seen_time", "last_seen_time"):
        if computed.HasField(name):
            values[name] = getattr(computed, name).ToDatetime(tzinfo=UTC)
    return values


def event_name_of(event: profile_pb.Event) -> str:
    return event.event_name or _DEFAULT_EVENT_NAMES.get(event.type, "")


def time_of(timestamp: timestamp_pb2.Timestamp) -> datetime:
    """`timestamp.ToDatetime(tzinfo=UTC)` in a third of the time (a scan converts every event's). A valid
    Timestamp's nanos are 0-999,999,999, so flooring them to microseconds is ToDatetime's rounding."""
    return _EPOCH + _MICROSECOND * (timestamp.seconds * 1_000_000 + timestamp.nanos // 1000)


def facts_of(profile: profile_pb.Profile, events: Sequence[profile_pb.StoredEvent],
             wanted: EventReads | None = None) -> ProfileFacts:
    """A profile's facts with its events: only those `wanted` reads, when given, converted when first looked at
    (see EventsOnDemand), and with their properties only when it reads properties (converting those is what
    costs)."""
    stored_traits = profile.traits  # by key: a map's items() costs several times more
    traits = {name: _plain(stored_traits[name].value) for name in stored_traits}
    facts = EventsOnDemand(events, wanted) if wanted is not None else event_facts(events, None)
    return ProfileFacts(profile.person_id, traits, computed_of(profile), facts)


def event_facts(events: Iterable[profile_pb.StoredEvent], wanted: EventReads | None) -> list[EventFact]:
    """The events `wanted` reads (all when None) as EventFacts, with properties if it reads them."""
    with_properties = wanted is None or wanted.properties
    # `wanted.wants(name, when)`, its name tested before the time is converted.
    names, since = (None, None) if wanted is None else (wanted.names, wanted.since)
    facts = []
    for stored in events:
        event = stored.event
        name = event.event_name or _DEFAULT_EVENT_NAMES.get(event.type, "")
        if names is not None and (name not in names or since is None):
            continue
        when = time_of(event.event_time)
        if since is None or when >= since:
            facts.append(EventFact(name, when, _properties(event) if with_properties else _NO_PROPERTIES))
    return facts


class EventsOnDemand(Sequence[EventFact]):
    """A profile's events, converted from its StoredEvents when first looked at. A compiled rule looks at traits
    first (see evaluation.compile_rule), so a person a trait condition decides never has its events converted:
    a recompute of `traits.plan = "pro" AND event("order")...` converts the events of the pros only."""

    def __init__(self, events: Sequence[profile_pb.StoredEvent], wanted: EventReads) -> None:
        self._stored: Sequence[profile_pb.StoredEvent] = events
        self._wanted = wanted
        self._events: list[EventFact] | None = None

    def _converted(self) -> list[EventFact]:
        if self._events is None:
            self._events = event_facts(self._stored, self._wanted)
            self._stored = ()  # the messages can go
        return self._events

    @overload
    def __getitem__(self, index: int) -> EventFact: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[EventFact]: ...

    def __getitem__(self, index: int | slice) -> EventFact | Sequence[EventFact]:
        return self._converted()[index]

    def __len__(self) -> int:
        return len(self._converted())

    def __iter__(self) -> Iterator[EventFact]:
        return iter(self._converted())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and self._converted() == list(other)

    __hash__: ClassVar[None]  # type: ignore[assignment]  # unhashable, like the list it stands for

    def __repr__(self) -> str:
        return repr(self._converted())


def read_mask(fields: ProfileReads) -> field_mask_pb2.FieldMask:
    """The Profile fields an evaluation reading `fields` needs (never identifiers, which would cost profile an
    identity call per batch, nor recent transactions)."""
    if fields == EVERY_FIELD:
        return FACTS_MASK
    # A name profile refuses (a control character: a rule stored before segmentation refused those too) names no
    # trait anyone has: left out, so that the condition reads it as absent, as it always did.
    traits = ["traits"] if fields.trait_names is None else [f"traits.{name}" for name in sorted(fields.trait_names)
                                                            if not trait_name_problem(name)]
    return field_mask_pb2.FieldMask(paths=["person_id", *traits, *(["computed", "preferences"] if fields.computed
                                                                   else [])])


def scan_request(shard: str, as_of: datetime, events: EventReads, fields: ProfileReads,
                 person_ids: Sequence[str] = ()) -> profile_pb.ScanProfilesRequest:
    """ScanProfiles of what evaluating rules that read `events` and `fields` needs: those fields, and the events
    of those names from the earliest window on (profile then reads only the months holding them); of the
    persons `person_ids` of the shard only, when given."""
    request = profile_pb.ScanProfilesRequest(shard=shard, include_events=events.since is not None,
                                             batch_size=SCAN_BATCH, read_mask=read_mask(fields),
                                             event_names=sorted(events.names), person_ids=person_ids)
    request.as_of_time.FromDatetime(as_of)
    if events.since is not None:
        request.events_start_time.FromDatetime(events.since)
    return request


def profile_error(error: grpc.RpcError) -> DomainError:
    """The domain error of a failed profile call: its code and message carried over (never INTERNAL here)."""
    code: grpc.StatusCode = error.code()
    details = f"the profile service answered {code.name}: {error.details()}"
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(details, reason="PERSON_NOT_FOUND")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(details, reason="PROFILE_REJECTED_REQUEST")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(details, reason="PROFILE_DEADLINE")
    return Unavailable(details, reason="PROFILE_UNAVAILABLE")


class GrpcProfileSource:
    """Reads profiles through the profile service's API; failures become domain errors."""

    def __init__(self, stub: profile_grpc.ProfileServiceStub) -> None:
        self._stub = stub

    def shards(self, count: int) -> list[str]:
        try:
            return self._shards(count)
        except grpc.RpcError as error:
            raise profile_error(error) from error

    def scan(self, shard: str, as_of: datetime, events: EventReads,
             fields: ProfileReads = EVERY_FIELD) -> Iterator[list[ProfileFacts]]:
        try:
            yield from self._scan(shard, as_of, events, fields)
        except grpc.RpcError as error:
            raise profile_error(error) from error

    def scan_events(self, shard: str, person_ids: Sequence[str], as_of: datetime,
                    events: EventReads) -> Iterator[list[ProfileFacts]]:
        """The events `events` reads of those of these persons of the shard that still have a profile of their
        own, as facts with no traits: ScanProfiles restricted to them (read by id, no identity lookup), in
        calls of SCAN_PERSONS_LIMIT persons."""
        try:
            for start in range(0, len(person_ids), SCAN_PERSONS_LIMIT):
                yield from self._scan(shard, as_of, events, EVENTS_ONLY, person_ids[start:start + SCAN_PERSONS_LIMIT])
        except grpc.RpcError as error:
            raise profile_error(error) from error

    def person(self, selector: common_pb2.PersonSelector, as_of: datetime, events: EventReads,
               fields: ProfileReads) -> ProfileFacts:
        """One person's facts as of `as_of`, with the events `events` reads and the fields `fields` names (those
        of the rules evaluated)."""
        try:
            return self._person(selector, as_of, events, fields)
        except grpc.RpcError as error:
            raise profile_error(error) from error

    def changes(self, cursor: str, limit: int) -> tuple[list[FeedChange], str]:
        """The next profile changes after `cursor` ("" for the feed's start), and where to go on (a cursor
        with shared.changefeed's UNSETTLED_SUFFIX also returns the changes not settled yet)."""
        try:
            page = self._stub.ListProfileChanges(profile_pb.ListProfileChangesRequest(page_size=limit,
                                                                                     page_token=cursor))
        except grpc.RpcError as error:
            raise profile_error(error) from error
        return [FeedChange(uuid.UUID(c.cursor), c.person_id, c.type, tuple(c.trait_names), tuple(c.event_names),
                           tuple(c.merged_person_ids)) for c in page.changes], page.next_page_token

    def persons(self, person_ids: Sequence[str], as_of: datetime, events: EventReads,
                fields: ProfileReads) -> dict[str, ProfileFacts | None]:
        """Facts of each person as of `as_of`, with the events `events` reads and the fields `fields` names; None for
        a person that has no profile of its own any more (merged into another, erased, never stored)."""
        try:
            return self._persons(person_ids, as_of, events, fields)
        except grpc.RpcError as error:
            raise profile_error(error) from error

    def _persons(self, person_ids: Sequence[str], as_of: datetime, events: EventReads,
                 fields: ProfileReads) -> dict[str, ProfileFacts | None]:
        found: dict[str, ProfileFacts | None] = {}
        chunks = [person_ids[start:start + BATCH_GET_LIMIT] for start in range(0, len(person_ids), BATCH_GET_LIMIT)]
        while chunks:
            chunk = chunks.pop()
            request = profile_pb.BatchGetProfilesRequest(
                persons=[common_pb2.PersonSelector(person_id=p) for p in chunk], read_mask=read_mask(fields),
                include_events=events.since is not None, event_names=sorted(events.names))
            request.as_of_time.FromDatetime(as_of)
            if events.since is not None:
                request.events_start_time.FromDatetime(events.since)
            try:
                response = self._stub.BatchGetProfiles(request)
            except grpc.RpcError as error:
                # More than one response carries (the traits the rules name, up to 64 KiB each, of many persons):
                # read in halves, as profile's answer says. A single person's is raised.
                if isinstance(error, grpc.Call) and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED \
                        and len(chunk) > 1:
                    chunks += [chunk[:len(chunk) // 2], chunk[len(chunk) // 2:]]
                    continue
                raise
            for person_id, result in zip(chunk, response.results, strict=True):
                # Identity answers a merged person's id with the survivor's profile: not this person's any more.
                mine = result.found and result.profile.person_id == person_id
                stored = self._events_of(person_id, request) if mine and result.events_omitted else result.events
                found[person_id] = facts_of(result.profile, stored, events) if mine else None
        return found

    def _events_of(self, person_id: str, request: profile_pb.ScanProfilesRequest | profile_pb.BatchGetProfilesRequest,
                   ) -> list[profile_pb.StoredEvent]:
        """The events a scan or batch read `request` left out of `person_id`'s profile (`events_omitted`), oldest
        first as it would have sent them: ListProfileEvents pages of the same names and time range; none for a
        person profile no longer knows (erased since it was read): it has no events."""
        page_request = profile_pb.ListProfileEventsRequest(person=common_pb2.PersonSelector(person_id=person_id),
                                                           event_names=request.event_names, page_size=EVENTS_PAGE)
        if request.HasField("events_start_time"):
            page_request.start_time.CopyFrom(request.events_start_time)
        if request.HasField("events_end_time"):
            page_request.end_time.CopyFrom(request.events_end_time)
        events = every_profile_event(self._stub, page_request)
        events.reverse()  # pages are newest first
        return events

    def _shards(self, count: int) -> list[str]:
        response = self._stub.ListProfileShards(profile_pb.ListProfileShardsRequest(shard_count=count))
        return list(response.shards)

    def _scan(self, shard: str, as_of: datetime, events: EventReads, fields: ProfileReads,
              person_ids: Sequence[str] = ()) -> Iterator[list[ProfileFacts]]:
        request = scan_request(shard, as_of, events, fields, person_ids)
        for response in self._stub.ScanProfiles(request):
            yield [facts_of(p.profile, self._events_of(p.profile.person_id, request) if p.events_omitted
                            else p.events, events) for p in response.profiles]

    def _person(self, selector: common_pb2.PersonSelector, as_of: datetime, wanted: EventReads,
                fields: ProfileReads) -> ProfileFacts:
        request = profile_pb.GetProfileRequest(person=selector, read_mask=read_mask(fields))
        request.as_of_time.FromDatetime(as_of)
        profile = self._stub.GetProfile(request)
        # Only the events the rules read (their names, from their earliest window on), as a scan reads them: paging
        # every event of a person with a million page views took longer than any caller waits, for rules about
        # orders. An event no rule names, or older than every window, changes no evaluation.
        events: list[profile_pb.StoredEvent] = []
        if wanted.since is not None:
            page_request = profile_pb.ListProfileEventsRequest(
                person=common_pb2.PersonSelector(person_id=profile.person_id), event_names=sorted(wanted.names),
                page_size=EVENTS_PAGE)
            page_request.start_time.FromDatetime(wanted.since)
            # Erased since GetProfile: NOT_FOUND, as a call a moment later would answer (not an evaluation of nobody).
            events = every_profile_event(self._stub, page_request, missing_as_empty=False)
        return facts_of(profile, events, wanted)
