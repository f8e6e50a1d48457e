"""The gRPC adapter of the profile service: onecdp.profile.v1 messages in, Profiles calls, messages out."""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from functools import partial
from typing import Any, Literal

import grpc
from google.protobuf import descriptor, field_mask_pb2, json_format, struct_pb2, timestamp_pb2
from onecdp.common.v1 import common_pb2
from onecdp.profile.v1 import profile_service_pb2 as pb
from onecdp.profile.v1 import profile_service_pb2_grpc as pb_grpc

from services.profile.computed import ComputedTraits
from services.profile.identity import GrpcIdentityResolver, PersonView
from services.profile.model import (
    DATA_PARTIES,
    MAX_MESSAGE_ID_LENGTH,
    MAX_PAYLOAD_BYTES,
    Event,
    EventResult,
    EventStatus,
    Order,
    OrderLine,
    StoredEventRecord,
    TraitOrigin,
    TraitValue,
    TraitWrite,
    event_time_problem,
    number_text,
)
from services.profile.profiles import FEED_COLUMNS, ProfileChange, Profiles, ProfileView
from services.profile.scan_response import profile_bytes, scan_responses
from services.profile.shards import format_shard, parse_shard, split_ring
from services.profile.store import EventSelection, ProfileStore, from_micros, micros
from shared.changefeed import ChangeFeed, parse_cursor
from shared.clients import identity_stub
from shared.config import GrpcSettings, ProfileSettings
from shared.errors import InvalidArgument, ResourceExhausted, Violations
from shared.event_times import EARLIEST_EVENT_TIME, MAX_FUTURE_SKEW, request_time_problem
from shared.leases import FollowerLease
from shared.page_tokens import decode_page_token, encode_page_token, invalid_page_token
from shared.pages import MAX_PAGE_BYTES, fitting
from shared.polling import RepeatingWorker
from shared.runner import ServiceContext, ServiceDefinition
from shared.server import ServiceRegistration
from shared.trait_names import trait_name_problem

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ProfileService"].full_name
MAX_EVENTS_PER_CALL = 1000
MAX_SELECTORS = 1000
# Identity mints far shorter ones; a longer id names nobody (and Cassandra's keys have a size limit).
MAX_PERSON_ID_LENGTH = 128
MAX_TRAIT_WRITES = 1000
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
DEFAULT_SHARDS = 16
MAX_SHARDS = 1024
WATCH_POLL_SECONDS = 0.2
FOLLOW_POLL_SECONDS = 0.5
IDENTITY_FEED_LEASE = "identity-feed"
# The share of the configured maximum message size (GrpcSettings.max_message_bytes) a response fills at most:
# sizes here are counted exactly, the margin covers what they leave out (gRPC's framing, a client whose limit is
# a little lower).
_MESSAGE_BUDGET = 15 / 16
# An events page token's time: µs since 1970, as `str(int)` writes it (no sign, no leading zero, 19 digits at most).
_MICROS = re.compile(r"[1-9][0-9]{0,18}")



# ---- messages to domain ---------------------------------------------------------------------------

def _time(message: timestamp_pb2.Timestamp) -> datetime:
    return message.ToDatetime(tzinfo=UTC)


def _optional_time(holder: Any, field_name: str) -> datetime | None:
    return _time(getattr(holder, field_name)) if holder.HasField(field_name) else None


def _request_time(stamp: timestamp_pb2.Timestamp, field_path: str, violations: Violations) -> datetime | None:
    """A Timestamp of a request as a datetime, or None after adding its violation when it is no valid Timestamp
    (seconds beyond years 1-9999 or nanos outside 0-999999999: only a binary client can send those)."""
    try:
        return _time(stamp)
    except ValueError as error:
        violations.add(field_path, f"not a valid timestamp: {error}")
        return None


def _as_of(request: pb.GetProfileRequest | pb.BatchGetProfilesRequest | pb.ScanProfilesRequest) -> datetime | None:
    """The request's as_of_time (None: absent, meaning now); INVALID_ARGUMENT outside the times a request may ask
    about (shared.event_times), where the read would see nothing or its windows would overflow."""
    if not request.HasField("as_of_time"):
        return None
    if problem := request_time_problem(request.as_of_time):
        raise InvalidArgument.for_field("as_of_time", problem)
    return _time(request.as_of_time)


def _event(message: pb.Event) -> Event:
    order = None
    if message.HasField("order"):
        order = Order(message.order.order_id, message.order.amount, message.order.currency_code, tuple(
            OrderLine(i.sku, i.name, i.category, i.brand, i.quantity, i.unit_price) for i in message.order.items))
    try:
        event_time, time_invalid = _optional_time(message, "event_time"), ""
    except ValueError as error:  # rejected as a bad timestamp, like any other time outside the bounds
        event_time, time_invalid = None, f"event_time is not a valid timestamp: {error}"
    # A NaN or infinite number makes the event invalid (validate rejects it, INVALID_FIELD), not the call.
    traits, traits_invalid = _struct_values(message, "traits")
    properties, properties_invalid = _struct_values(message, "properties")
    return Event(
        message_id=message.message_id, event_type=int(message.type),
        identifiers=tuple((i.type, i.value) for i in message.identifiers), event_name=message.event_name,
        event_time=event_time, source=message.source,
        source_kind=int(message.source_kind), party=int(message.party),
        traits=traits, properties=properties,
        order=order, traits_bytes=message.traits.ByteSize(), properties_bytes=message.properties.ByteSize(),
        payload=message.SerializeToString(), event_time_invalid=time_invalid,
        invalid_number=traits_invalid or properties_invalid)


def _struct_values(message: pb.Event, field_name: Literal["traits", "properties"]) -> tuple[dict[str, Any], str]:
    """An event's Struct field as a dict ({} when absent), or ({}, why) when it holds a NaN or infinite number,
    which JSON cannot hold (MessageToDict refuses it, and it could never be stored or read back as a trait)."""
    if not message.HasField(field_name):
        return {}, ""
    struct = getattr(message, field_name)
    try:
        return json_format.MessageToDict(struct), ""
    except ValueError:  # only a non-finite number makes a Struct no JSON; found only then, off the common path
        path, number = _non_finite_in_struct(struct, field_name) or (field_name, math.nan)
        return {}, f"{path} must be a finite number, got {number_text(number)}"


def _non_finite_in_struct(struct: struct_pb2.Struct, path: str) -> tuple[str, float] | None:
    """The field path and value of the first NaN or infinite number in `struct` (None when all are finite),
    e.g. `properties.items[2].price`."""
    for key, value in struct.fields.items():
        if found := _non_finite_in_value(value, f"{path}.{key}"):
            return found
    return None


def _non_finite_in_value(value: struct_pb2.Value, path: str) -> tuple[str, float] | None:
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        return None if math.isfinite(value.number_value) else (path, value.number_value)
    if kind == "struct_value":
        return _non_finite_in_struct(value.struct_value, path)
    if kind == "list_value":
        for index, item in enumerate(value.list_value.values):
            if found := _non_finite_in_value(item, f"{path}[{index}]"):
                return found
    return None


def _selector(selector: common_pb2.PersonSelector, field_path: str) -> tuple[str, tuple[str, str] | None]:
    which = selector.WhichOneof("selector")
    if which == "person_id" and selector.person_id:
        return selector.person_id, None
    if which == "identifier" and selector.identifier.type and selector.identifier.value:
        return "", (selector.identifier.type, selector.identifier.value)
    raise InvalidArgument.for_field(field_path, "set exactly one of person_id or identifier (type and value)",
                                    reason="PERSON_SELECTOR_EMPTY")


def _selectors(selectors: Sequence[common_pb2.PersonSelector],
               field_path: str) -> list[tuple[str, tuple[str, str] | None]]:
    """`_selector` of each, INVALID_ARGUMENT naming every empty one (`{field_path}[i]`), as identity names every
    invalid identifier."""
    violations = Violations()
    found = []
    for index, selector in enumerate(selectors):
        try:
            found.append(_selector(selector, f"{field_path}[{index}]"))
        except InvalidArgument as error:
            violations.items.extend(error.field_violations)
    violations.raise_if_any("some selectors are empty; nothing was read", reason="PERSON_SELECTOR_EMPTY")
    return found


# ---- domain to messages ---------------------------------------------------------------------------

def _value(value: Any) -> struct_pb2.Value:
    # Scalars directly: json_format's generic conversion costs several times more, on every trait read.
    if isinstance(value, str):
        return struct_pb2.Value(string_value=value)
    if isinstance(value, bool):
        return struct_pb2.Value(bool_value=value)
    if isinstance(value, float):
        return struct_pb2.Value(number_value=value)
    message = struct_pb2.Value()
    json_format.ParseDict(value, message)
    return message


def _set_time(message: timestamp_pb2.Timestamp, when: datetime) -> None:
    """`message.FromDatetime(when)` for an aware `when`, exactly, in a third of the time (reads set it per row)."""
    seconds, micro = divmod(micros(when), 1_000_000)
    message.seconds = seconds
    message.nanos = micro * 1000


def _result(result: EventResult) -> pb.EventResult:
    message = pb.EventResult(message_id=result.message_id, status=pb.EventStatus.ValueType(result.status),
                             person_id=result.person_id)
    if result.rejection is not None:
        message.rejection_reason = pb.EventRejectionReason.ValueType(result.rejection.reason)
        message.message = result.rejection.message
    else:
        message.message = result.note
    return message


def _computed(computed: ComputedTraits) -> pb.ComputedTraits:
    message = pb.ComputedTraits(
        frequency=computed.frequency, monetary=computed.monetary, average_order_value=computed.average_order_value,
        window_aggregates=[pb.WindowAggregate(event_name=w.event_name, window_days=w.window_days, count=w.count,
                                              sum=w.sum) for w in computed.windows],
        lifetime_value=computed.lifetime_value,
        lifecycle_stage=pb.LifecycleStage.ValueType(computed.lifecycle_stage), event_count=computed.event_count,
        currency_code=computed.currency_code, other_currency_amounts=computed.other_currency_amounts)
    message.as_of_time.FromDatetime(computed.as_of)
    if computed.first_seen:
        message.first_seen_time.FromDatetime(computed.first_seen)
    if computed.last_seen:
        message.last_seen_time.FromDatetime(computed.last_seen)
    if computed.recency_days is not None:
        message.recency_days = computed.recency_days
    if computed.rfm is not None:
        message.rfm.CopyFrom(pb.RfmScore(recency_score=computed.rfm.recency_score,
                                         frequency_score=computed.rfm.frequency_score,
                                         monetary_score=computed.rfm.monetary_score, segment=computed.rfm.segment))
    return message


def _profile(view: ProfileView) -> pb.Profile:
    message = pb.Profile(name=f"profiles/{view.person_id}", person_id=view.person_id,
                         identifiers=[common_pb2.Identifier(type=t, value=v) for t, v in view.identifiers],
                         merged_person_ids=view.merged_person_ids)
    _fill_traits(message, view.traits.values())
    if view.computed is not None:
        computed = view.computed
        message.computed.CopyFrom(_computed(computed))
        message.preferences.CopyFrom(pb.Preferences(top_categories=computed.top_categories,
                                                    top_brands=computed.top_brands))
        for t in computed.transactions:
            transaction = message.recent_transactions.add(order_id=t.order_id, amount=t.amount,
                                                          currency_code=t.currency_code, item_count=t.item_count,
                                                          message_id=t.message_id)
            transaction.event_time.FromDatetime(t.event_time)
            transaction.update_time.FromDatetime(t.update_time)
    if view.update_time:
        _set_time(message.update_time, view.update_time)
    return message


def _fill_traits(message: pb.Profile, traits: Iterable[TraitValue]) -> None:
    for trait in traits:
        entry = message.traits[trait.name]
        entry.value.CopyFrom(_value(trait.value))
        _set_time(entry.event_time, trait.event_time)
        entry.source = trait.source
        entry.party = common_pb2.DataParty.ValueType(trait.party)


def _profile_bytes(view: ProfileView, mask: ReadMask) -> bytes:
    """`mask.apply(_profile(view))` as wire bytes; encoded straight from the view when the mask is direct (a scan
    encodes thousands: building, masking and copying each cost it more than reading the rows)."""
    if mask.direct:
        return profile_bytes(view, mask.paths, mask.wants_traits, mask.trait_names)
    return mask.apply(_profile(view)).SerializeToString()


def _stored_event(event: StoredEventRecord) -> pb.StoredEvent:
    message = pb.StoredEvent()
    _fill_stored_event(message, event)
    return message


def _fill_stored_event(message: pb.StoredEvent, event: StoredEventRecord) -> None:
    """Fill an empty StoredEvent in place (e.g. one just added to a response: no copy of the event)."""
    message.person_id = event.person_id
    message.event.MergeFromString(event.payload)
    if event.receive_time:
        _set_time(message.receive_time, event.receive_time)


def _change(change: ProfileChange) -> pb.ProfileChange:
    message = pb.ProfileChange(cursor=change.cursor, person_id=change.person_id,
                               type=pb.ProfileChangeType.ValueType(change.change_type),
                               trait_names=change.trait_names, event_names=change.event_names,
                               merged_person_ids=change.merged_person_ids)
    message.change_time.FromDatetime(change.change_time)
    return message


# ---- read masks -----------------------------------------------------------------------------------

# Profile fields that `_profile_bytes` encodes straight from a view when a mask names only them and traits.
_DIRECT_PATHS = frozenset({"name", "person_id", "traits", "merged_person_ids", "update_time"})


class ReadMask:
    """A validated read_mask: which Profile fields to fill, and which of them need which reads."""

    def __init__(self, mask: field_mask_pb2.FieldMask, field_path: str = "read_mask") -> None:
        self.paths = list(mask.paths)
        self.trait_names: set[str] | None = None  # None: all traits
        self._other_paths: list[str] = []
        violations = Violations()
        for index, path in enumerate(self.paths):
            head, dot, rest = path.partition(".")
            problem = "" if head == "traits" else _field_path_problem(pb.Profile.DESCRIPTOR, path)
            if head == "traits" and dot and (name_problem := trait_name_problem(rest)):
                # `traits.` (no name) or a name no trait can have: not a field path a FieldMask could apply.
                violations.add(f"{field_path}.paths[{index}]", f"{path!r} names no trait: {name_problem}")
            elif problem:
                violations.add(f"{field_path}.paths[{index}]",
                               f"unknown Profile field path {path!r}: {problem}; e.g. traits, traits.<name>, "
                               "computed, computed.rfm.segment, preferences, recent_transactions, identifiers")
            elif head == "traits" and rest:
                if self.trait_names is None or "traits" not in self.paths:
                    self.trait_names = (self.trait_names or set()) | {rest}
            else:
                self._other_paths.append(path)
        violations.raise_if_any("the read mask names unknown fields", reason="INVALID_READ_MASK")
        if "traits" in self.paths:
            self.trait_names = None
        # `_profile_bytes` can encode what this mask selects without building the whole profile first.
        self.direct = bool(self.paths) and set(self._other_paths) <= _DIRECT_PATHS
        self.wants_traits = self.wants("traits")  # asked once per profile filled

    def wants(self, *heads: str) -> bool:
        return not self.paths or any(p.partition(".")[0] in heads for p in self.paths)

    @property
    def needs_events(self) -> bool:
        return self.wants("computed", "preferences", "recent_transactions")

    def apply(self, profile: pb.Profile) -> pb.Profile:
        if not self.paths:
            return profile
        masked = pb.Profile()
        if self._other_paths:
            field_mask_pb2.FieldMask(paths=self._other_paths).MergeMessage(profile, masked)
        if self.wants("traits"):
            for name, trait in profile.traits.items():
                if self.trait_names is None or name in self.trait_names:
                    masked.traits[name].CopyFrom(trait)
        return masked


def _field_path_problem(message: descriptor.Descriptor, path: str) -> str:
    """Why `path` is not a field path of `message` a FieldMask can select ("" when it is): each name a field
    of the message before it, and only the last one repeated or not a message (AIP-161)."""
    names = path.split(".")
    for depth, name in enumerate(names):
        field = message.fields_by_name.get(name)
        # The runtime's lookup stops at a NUL (`traits\x00` found `traits`): the name found must be the name asked.
        if field is None or field.name != name:
            return f"{name!r} is not a field of {message.name}"
        if depth == len(names) - 1:
            return ""
        if field.is_repeated:
            return f"{'.'.join(names[:depth + 1])} is a repeated field; a path cannot select inside its elements"
        if field.message_type is None:
            return f"{'.'.join(names[:depth + 1])} is a single value with no fields"
        message = field.message_type
    return ""


# ---- the servicer ---------------------------------------------------------------------------------

class ProfileServicer(pb_grpc.ProfileServiceServicer):
    def __init__(self, profiles: Profiles,
                 max_message_bytes: int = GrpcSettings.model_fields["max_message_bytes"].default) -> None:
        self._profiles = profiles
        # What one response may fill: scans and batch reads leave out the events of a person that would pass it.
        self._response_bytes = int(max_message_bytes * _MESSAGE_BUDGET)
        # What gRPC refuses to send: a response past it is refused here first, saying what to ask instead (not
        # at the budget: a profile a little under the limit, which gRPC sends, is answered as it always was).
        self._max_message_bytes = max_message_bytes

    def IngestEvents(self, request: pb.IngestEventsRequest, context: grpc.ServicerContext) -> pb.IngestEventsResponse:
        _check_batch(len(request.events), "events")
        return pb.IngestEventsResponse(results=[_result(r) for r in self._ingest(request.events)])

    def StreamIngestEvents(self, request_iterator: Iterable[pb.StreamIngestEventsRequest],
                           context: grpc.ServicerContext) -> pb.StreamIngestEventsResponse:
        response = pb.StreamIngestEventsResponse()
        for index, request in enumerate(request_iterator):
            if not request.events:  # nothing to store; failing here would hide that earlier messages were stored
                continue
            if len(request.events) > MAX_EVENTS_PER_CALL:
                stored = f"requests[0] to requests[{index - 1}] were stored" if index else "nothing was stored"
                raise ResourceExhausted(
                    f"requests[{index}] has {len(request.events)} events; at most {MAX_EVENTS_PER_CALL} per message "
                    f"are allowed, split it. {stored}; resending them is safe (they come back as duplicates)",
                    reason="BATCH_TOO_LARGE")
            for result in self._ingest(request.events):
                response.results.append(_result(result))
                if result.status == EventStatus.ACCEPTED:
                    response.accepted_count += 1
                elif result.status == EventStatus.DUPLICATE:
                    response.duplicate_count += 1
                else:
                    response.rejected_count += 1
        return response

    def _ingest(self, events: Iterable[pb.Event]) -> list[EventResult]:
        return self._profiles.ingest([_event(e) for e in events])

    def GetProfile(self, request: pb.GetProfileRequest, context: grpc.ServicerContext) -> pb.Profile:
        mask = ReadMask(request.read_mask)
        as_of = _as_of(request)
        person_id, identifier = _selector(request.person, "person")
        person = self._profiles.person(person_id, identifier)
        profile = self._read(person, mask, as_of)
        _check_response_size(profile.ByteSize(), self._max_message_bytes,
                             f"the profile of {profile.person_id or person.person_id}")
        return profile

    def BatchGetProfiles(self, request: pb.BatchGetProfilesRequest,
                         context: grpc.ServicerContext) -> pb.BatchGetProfilesResponse:
        if len(request.persons) > MAX_SELECTORS:
            raise ResourceExhausted(f"{len(request.persons)} persons in one call; at most {MAX_SELECTORS} are allowed",
                                    reason="BATCH_TOO_LARGE")
        if not request.persons:
            raise InvalidArgument.for_field("persons", "at least one selector is required")
        mask = ReadMask(request.read_mask)
        as_of = _as_of(request)
        selection = _event_selection(request)
        selectors = _selectors(request.persons, "persons")
        persons = self._profiles.identity.lookup(selectors)
        found = [p for p in persons if p is not None]
        views = iter(self._profiles.views(found, as_of,
                                          with_events=request.include_events, with_traits=mask.wants("traits"),
                                          with_computed=mask.needs_events, selection=selection,
                                          trait_names=mask.trait_names))
        results = []
        for person in persons:
            if person is None:
                results.append(pb.ProfileLookupResult(found=False))
                continue
            view = next(views)
            result = pb.ProfileLookupResult(found=True, profile=mask.apply(_profile(view)))
            for event in _oldest_first(view.events, selection):
                _fill_stored_event(result.events.add(), event)
            results.append(result)
        response = pb.BatchGetProfilesResponse(results=results)
        if request.include_events:
            _omit_largest_events(response, self._response_bytes)
        _check_response_size(response.ByteSize(), self._max_message_bytes,
                             f"the {len(results)} profiles asked for")
        return response

    def _read(self, person: PersonView, mask: ReadMask, as_of: datetime | None) -> pb.Profile:
        view = self._profiles.view(person, as_of, with_events=False, with_traits=mask.wants("traits"),
                                   with_computed=mask.needs_events)
        return mask.apply(_profile(view))

    def ListProfileEvents(self, request: pb.ListProfileEventsRequest,
                          context: grpc.ServicerContext) -> pb.ListProfileEventsResponse:
        start, end = _time_range(request, "start_time", "end_time")
        page_size = _page_size(request.page_size)
        person_id, identifier = _selector(request.person, "person")
        binding = _events_binding(request, start, end)
        after = _event_cursor(request.page_token, datetime.now(UTC), binding)
        person = self._profiles.person(person_id, identifier)
        events, following = self._profiles.events_page(person, start, end, names=request.event_names, after=after,
                                                       page_size=page_size)
        # 100 events of up to 64 KiB of properties each would not fit in one page.
        stored = fitting((_stored_event(e) for e in events), min(MAX_PAGE_BYTES, self._response_bytes))
        if len(stored) < len(events):
            following = (events[len(stored) - 1].event_time, events[len(stored) - 1].message_id)
        return pb.ListProfileEventsResponse(events=stored,
                                            next_page_token=_event_token(*following, binding) if following else "")

    def BatchWriteTraits(self, request: pb.BatchWriteTraitsRequest,
                         context: grpc.ServicerContext) -> pb.BatchWriteTraitsResponse:
        if len(request.writes) > MAX_TRAIT_WRITES:
            raise ResourceExhausted(f"{len(request.writes)} writes in one call; at most {MAX_TRAIT_WRITES} are "
                                    "allowed", reason="BATCH_TOO_LARGE")
        now = datetime.now(UTC)
        violations = Violations()
        violations.check(bool(request.writes), "writes", "at least one write is required")
        for index, write in enumerate(request.writes):
            has_identifier = write.HasField("identifier")
            violations.check(bool(write.person_id) or has_identifier, f"writes[{index}].person_id",
                             "set person_id, identifier, or both")
            violations.check(not has_identifier or bool(write.identifier.type and write.identifier.value),
                             f"writes[{index}].identifier", "type and value are both required")
            violations.check(bool(write.traits.fields), f"writes[{index}].traits", "at least one trait is required")
            violations.check(write.party in DATA_PARTIES, f"writes[{index}].party",
                             f"{write.party} is not a DataParty (0-{DATA_PARTIES[-1]})")
            # Capped as an identify event's traits are: a larger trait makes every read of its person too large.
            size = write.traits.ByteSize()
            violations.check(size <= MAX_PAYLOAD_BYTES, f"writes[{index}].traits",
                             f"traits are {size} bytes serialized; at most {MAX_PAYLOAD_BYTES} are allowed per write "
                             "(as in an identify event)")
            for name, value in write.traits.fields.items():
                if name_problem := trait_name_problem(name):
                    violations.add(f"writes[{index}].traits", name_problem)
                    continue
                # JSON has no NaN or Infinity: such a trait could be neither stored nor read back.
                if found := _non_finite_in_value(value, f"writes[{index}].traits.{name}"):
                    violations.add(found[0], f"must be a finite number, got {number_text(found[1])}")
            # The times events take: a write at year 9999 would be the latest forever (no write could change it).
            if write.HasField("event_time"):
                when = _request_time(write.event_time, f"writes[{index}].event_time", violations)
                problem = event_time_problem(when, now) if when is not None else ""
                violations.check(not problem, f"writes[{index}].event_time", problem)
        violations.raise_if_any("some trait writes are invalid; nothing was written")
        persons = self._profiles.identity.persons(list(dict.fromkeys(w.person_id for w in request.writes
                                                                     if w.person_id)))
        by_identifier = [i for i, w in enumerate(request.writes) if w.HasField("identifier")]
        holders = dict(zip(by_identifier, self._profiles.identity.lookup(
            [("", (request.writes[i].identifier.type, request.writes[i].identifier.value)) for i in by_identifier],
            [f"writes[{i}]" for i in by_identifier]), strict=True))
        for index, write in enumerate(request.writes):
            named = persons.get(write.person_id) if write.person_id else None
            violations.check(not write.person_id or named is not None, f"writes[{index}].person_id",
                             f"no person {write.person_id!r} (never issued, or erased)")
            if index in holders:
                holder = holders[index]
                violations.check(holder is not None, f"writes[{index}].identifier",
                                 "nobody holds this identifier; ingest an event with it first (an identifier "
                                 "erased by a privacy request stays unheld: its events are refused)")
                violations.check(holder is None or named is None or holder.person_id == named.person_id,
                                 f"writes[{index}].identifier",
                                 f"held by person {holder.person_id if holder else ''!r}, not by "
                                 f"{write.person_id!r}; drop person_id to write for whoever holds it")
        violations.raise_if_any("some trait writes name unknown persons; nothing was written",
                                reason="UNKNOWN_PERSONS")
        writes = []
        for index, write in enumerate(request.writes):
            holder = holders.get(index) or persons[write.person_id]
            identifier = (write.identifier.type, write.identifier.value) if index in holders else None
            writes.append(TraitWrite(holder.person_id, {k: json_format.MessageToDict(v)
                                                        for k, v in write.traits.fields.items()},
                                     _optional_time(write, "event_time") or now, write.source,
                                     int(write.party) or common_pb2.DATA_PARTY_FIRST,
                                     TraitOrigin(write.person_id or holder.person_id, identifier)))
        return pb.BatchWriteTraitsResponse(written_count=self._profiles.write_traits(writes))

    def ListProfileShards(self, request: pb.ListProfileShardsRequest,
                          context: grpc.ServicerContext) -> pb.ListProfileShardsResponse:
        count = request.shard_count or DEFAULT_SHARDS
        if not 1 <= count <= MAX_SHARDS:
            raise InvalidArgument.for_field("shard_count", f"must be 1-{MAX_SHARDS}")
        return pb.ListProfileShardsResponse(shards=[format_shard(r) for r in split_ring(count)])

    def ScanProfiles(self, request: pb.ScanProfilesRequest,
                     context: grpc.ServicerContext) -> Iterator[pb.ScanProfilesResponse]:
        """The responses `scan_profiles_wire` encodes, as messages (the server sends the bytes)."""
        return map(pb.ScanProfilesResponse.FromString, self.scan_profiles_wire(request, context))

    def scan_profiles_wire(self, request: pb.ScanProfilesRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        """ScanProfiles, answered with each response's wire bytes (scan_response.py; registered in
        `_add_to_server`)."""
        start, end = parse_shard(request.shard, "shard")
        person_ids = _scan_person_ids(request.person_ids)
        mask = ReadMask(request.read_mask)
        batch_size = _page_size(request.batch_size, "batch_size")
        selection = _event_selection(request)
        as_of = _as_of(request)
        for views in self._profiles.scan(start, end, as_of, batch_size, with_events=request.include_events,
                                         with_traits=mask.wants("traits"), with_computed=mask.needs_events,
                                         selection=selection, trait_names=mask.trait_names, person_ids=person_ids):
            if mask.wants("identifiers"):
                identities = self._profiles.identity.persons([v.person_id for v in views])
                for view in views:
                    if view.person_id in identities:
                        view.identifiers = identities[view.person_id].identifiers
            yield from scan_responses(((_profile_bytes(view, mask), _oldest_first(view.events, selection))
                                       for view in views), self._response_bytes)

    def ListProfileChanges(self, request: pb.ListProfileChangesRequest,
                           context: grpc.ServicerContext) -> pb.ListProfileChangesResponse:
        changes, cursor = self._profiles.changes(parse_cursor(request.page_token, "page_token"),
                                                 _page_size(request.page_size))
        return pb.ListProfileChangesResponse(changes=[_change(c) for c in changes], next_page_token=str(cursor))

    def WatchProfileChanges(self, request: pb.WatchProfileChangesRequest,
                            context: grpc.ServicerContext) -> Iterator[pb.ProfileChange]:
        cursor = parse_cursor(request.cursor, "cursor")
        while context.is_active():
            changes, cursor = self._profiles.changes(cursor, MAX_PAGE_SIZE)
            yield from (_change(c) for c in changes)
            if len(changes) < MAX_PAGE_SIZE:
                time.sleep(WATCH_POLL_SECONDS)


def _scan_person_ids(person_ids: Sequence[str]) -> list[str] | None:
    """A scan's `person_ids` (None: the whole shard); RESOURCE_EXHAUSTED above MAX_SELECTORS, as BatchGetProfiles,
    and INVALID_ARGUMENT naming every id that is empty or too long (Cassandra takes no empty key)."""
    if len(person_ids) > MAX_SELECTORS:
        raise ResourceExhausted(f"person_ids: {len(person_ids)} person ids in one scan; at most {MAX_SELECTORS} "
                                "are allowed, split them over several scans", reason="BATCH_TOO_LARGE")
    violations = Violations()
    for index, person_id in enumerate(person_ids):
        violations.check(0 < len(person_id) <= MAX_PERSON_ID_LENGTH, f"person_ids[{index}]",
                         f"a person id is 1-{MAX_PERSON_ID_LENGTH} characters, got {len(person_id)}")
    violations.raise_if_any("invalid person ids")
    return list(person_ids) if person_ids else None


def _event_selection(request: pb.ScanProfilesRequest | pb.BatchGetProfilesRequest) -> EventSelection:
    """The included events a request asks for: [events_start_time, events_end_time), of event_names if any."""
    start, end = _time_range(request, "events_start_time", "events_end_time")
    return EventSelection(start, end, frozenset(request.event_names) or None)


def _time_range(request: Any, start_field: str, end_field: str) -> tuple[datetime | None, datetime | None]:
    """A request's [start, end) time bounds (None: absent); INVALID_ARGUMENT for an empty range (the same check,
    in the same words, for every method that takes one) or a bound that is no valid Timestamp."""
    violations = Violations()
    start, end = (_request_time(getattr(request, name), name, violations) if request.HasField(name) else None
                  for name in (start_field, end_field))
    violations.raise_if_any("invalid time bounds")
    if start is not None and end is not None and start >= end:
        raise InvalidArgument.for_field(end_field, f"must be after {start_field}", reason="EMPTY_TIME_RANGE")
    return start, end


def _oldest_first(events: Sequence[StoredEventRecord], selection: EventSelection) -> list[StoredEventRecord]:
    """The events (stored newest first) `selection` selects, oldest first."""
    start, end, names = selection.start, selection.end, selection.names  # `selects`, without a call per event
    return [e for e in reversed(events) if (start is None or e.event_time >= start)
            and (end is None or e.event_time < end) and (names is None or e.event_name in names)]


def _omit_largest_events(response: pb.BatchGetProfilesResponse, max_bytes: int) -> None:
    """Leave out the events of the results with the most event bytes (setting `events_omitted`) until the
    response is at most `max_bytes` long: one heavy person's events no longer fail everyone's read (the caller
    pages them with ListProfileEvents)."""
    if response.ByteSize() <= max_bytes:
        return
    by_events = sorted(((sum(e.ByteSize() for e in r.events), i) for i, r in enumerate(response.results)
                        if r.events), reverse=True)
    for _, index in by_events:
        result = response.results[index]
        del result.events[:]
        result.events_omitted = True
        if response.ByteSize() <= max_bytes:  # counted again, exactly (rarely: only for a heavy response)
            return


def _check_response_size(size: int, max_bytes: int, what: str) -> None:
    """RESOURCE_EXHAUSTED saying what to ask instead, for a response more than one message carries (a person's
    traits: many writes of up to 64 KiB each); gRPC's own "Sent message larger than max" said nothing of it."""
    if size > max_bytes:
        raise ResourceExhausted(f"{what}: {size:,} bytes, more than one response carries ({max_bytes:,}); name "
                                "the traits you need in read_mask (`traits.<name>`), or ask for fewer persons a call",
                                reason="RESPONSE_TOO_LARGE")


def _check_batch(count: int, field_path: str) -> None:
    if count > MAX_EVENTS_PER_CALL:
        raise ResourceExhausted(f"{count} events in one batch; at most {MAX_EVENTS_PER_CALL} are allowed, split it",
                                reason="BATCH_TOO_LARGE")
    if count == 0:
        raise InvalidArgument.for_field(field_path, "at least one event is required", reason="EMPTY_BATCH")


def _page_size(requested: int, field_path: str = "page_size") -> int:
    if requested < 0:
        raise InvalidArgument.for_field(field_path, "must not be negative")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _events_binding(request: pb.ListProfileEventsRequest, start: datetime | None, end: datetime | None) -> str:
    """What an events page token is bound to: the request's person selector as sent, its time range and its
    event names (as a set: their order and repeats select nothing different). Not page_size, which AIP-158
    lets a caller change between pages."""
    person = request.person
    return json.dumps([person.WhichOneof("selector") or "", person.person_id, person.identifier.type,
                       person.identifier.value, micros(start) if start else None, micros(end) if end else None,
                       sorted(set(request.event_names))], ensure_ascii=False, separators=(",", ":"))


def _event_token(event_time: datetime, message_id: str, binding: str) -> str:
    """The page token continuing after an event (its time in µs and its message id), bound to its request."""
    return encode_page_token(binding, (str(micros(event_time)), message_id))


def _event_cursor(token: str, now: datetime, binding: str) -> tuple[datetime, str] | None:
    """Where a page continues: the (event time, message id) of the last event of the page before. A token names
    a stored event, so its time is one ingest accepts (from 1990-01-01 to at most a day after it was stored, so a
    day after `now`) and its message id is 1-128 characters: anything else, checksum and all, is refused rather
    than turned into an overflow."""
    position = decode_page_token(token, binding, fields=2)
    if position is None:
        return None
    exact, message_id = position
    if not (_MICROS.fullmatch(exact) and 0 < len(message_id) <= MAX_MESSAGE_ID_LENGTH
            and micros(EARLIEST_EVENT_TIME) <= int(exact) <= micros(now + MAX_FUTURE_SKEW)):
        raise invalid_page_token()
    return from_micros(int(exact)), message_id


def build(context: ServiceContext) -> list[ServiceRegistration]:
    settings = ProfileSettings()  # from the environment: a bad PROFILE_* value fails the start, naming it
    identity = GrpcIdentityResolver(identity_stub(context.grpc_settings, context.on_stop))
    profiles = Profiles(ProfileStore(context.session), identity,
                        ChangeFeed(context.session, FEED_COLUMNS), reporting_currency=settings.reporting_currency)
    # Every replica runs a follower of identity's changes, but only the holder of the `identity-feed` lease
    # applies them; the others try for the lease every third of its TTL, so one of them takes over when the
    # holder stops (at once: it gives the lease back) or dies (within the TTL).
    follower: RepeatingWorker

    def follow_round() -> bool:
        return profiles.follow_identity(still_leading=follower.still_leading) > 0

    follower = RepeatingWorker("profile-identity-follower", follow_round, idle_seconds=FOLLOW_POLL_SECONDS,
                               lease=FollowerLease(context.session, IDENTITY_FEED_LEASE), join_seconds=10,
                               failure_message="applying identity changes failed; retrying")
    follower.start()
    context.on_stop(follower.stop)
    servicer = ProfileServicer(profiles, context.grpc_settings.max_message_bytes)
    return [ServiceRegistration(SERVICE_NAME, partial(_add_to_server, servicer))]


def _add_to_server(servicer: ProfileServicer, server: grpc.Server) -> None:
    pb_grpc.add_ProfileServiceServicer_to_server(servicer, server)
    # ScanProfiles sends the bytes it encodes (a registered handler replaces the generated one of the same
    # method): a scan's responses built as messages cost profile more than reading their rows.
    server.add_registered_method_handlers(SERVICE_NAME, {"ScanProfiles": grpc.unary_stream_rpc_method_handler(
        servicer.scan_profiles_wire, request_deserializer=pb.ScanProfilesRequest.FromString,
        response_serializer=_wire_bytes)})


def _wire_bytes(response: bytes) -> bytes:
    return response


DEFINITION = ServiceDefinition(name="profile", build=build)
