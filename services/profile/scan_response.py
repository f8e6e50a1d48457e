"""ScanProfiles responses as the wire carries them, encoded from the views directly (part of the gRPC adapter).

A scan sends thousands of profiles with their events. Built as messages, each event's stored payload (the
Event as ingested, already wire bytes) was parsed into the response only for gRPC to serialize it again,
and every field of every profile and event was set by a Python step into the protobuf runtime: more of
profile's time than reading the rows. Here a ScannedProfile is laid out as bytes: the payload goes in as it
is stored, and the few other fields (person id, traits, receive time) are encoded by hand. The result is
the same message (the tests parse both and compare); the layout follows the proto's field numbers, read
from the descriptors.

Profiles whose read mask names more than `profile_bytes`' direct fields (computed traits, preferences,
identifiers, ...) are built as messages by the adapter and serialized.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2
from google.protobuf.message import Message
from onecdp.profile.v1 import profile_service_pb2 as pb

from services.profile.model import StoredEventRecord, TraitValue
from services.profile.profiles import ProfileView
from services.profile.store import EPOCH
from shared.errors import ResourceExhausted

# Wire types: 0 a varint, 1 a 64-bit field, 2 a length-delimited one.
VARINT, FIXED_64, LENGTH_DELIMITED = 0, 1, 2


def field_tag(message: type[Message], field: str, wire_type: int) -> bytes:
    """The wire tag of `message.field`, from the descriptor (so the layout follows the proto); one byte."""
    tag = message.DESCRIPTOR.fields_by_name[field].number << 3 | wire_type
    if tag >= 128:
        raise ValueError(f"{message.__name__}.{field}'s tag takes more than one byte on the wire")
    return bytes([tag])


_PROFILES = field_tag(pb.ScanProfilesResponse, "profiles", LENGTH_DELIMITED)
_SCANNED_PROFILE = field_tag(pb.ScannedProfile, "profile", LENGTH_DELIMITED)
_SCANNED_EVENTS = field_tag(pb.ScannedProfile, "events", LENGTH_DELIMITED)
_EVENTS_OMITTED = field_tag(pb.ScannedProfile, "events_omitted", VARINT)
_NAME = field_tag(pb.Profile, "name", LENGTH_DELIMITED)
_PERSON_ID = field_tag(pb.Profile, "person_id", LENGTH_DELIMITED)
_TRAITS = field_tag(pb.Profile, "traits", LENGTH_DELIMITED)
_MERGED_PERSON_IDS = field_tag(pb.Profile, "merged_person_ids", LENGTH_DELIMITED)
_UPDATE_TIME = field_tag(pb.Profile, "update_time", LENGTH_DELIMITED)
_ENTRY_KEY = field_tag(pb.Profile.TraitsEntry, "key", LENGTH_DELIMITED)
_ENTRY_VALUE = field_tag(pb.Profile.TraitsEntry, "value", LENGTH_DELIMITED)
_TRAIT_VALUE = field_tag(pb.Trait, "value", LENGTH_DELIMITED)
_TRAIT_EVENT_TIME = field_tag(pb.Trait, "event_time", LENGTH_DELIMITED)
_TRAIT_SOURCE = field_tag(pb.Trait, "source", LENGTH_DELIMITED)
_TRAIT_PARTY = field_tag(pb.Trait, "party", VARINT)
_STRING_VALUE = field_tag(struct_pb2.Value, "string_value", LENGTH_DELIMITED)
_NUMBER_VALUE = field_tag(struct_pb2.Value, "number_value", FIXED_64)
_BOOL_VALUE = field_tag(struct_pb2.Value, "bool_value", VARINT)
_SECONDS = field_tag(timestamp_pb2.Timestamp, "seconds", VARINT)
_NANOS = field_tag(timestamp_pb2.Timestamp, "nanos", VARINT)
_EVENT = field_tag(pb.StoredEvent, "event", LENGTH_DELIMITED)
_EVENT_PERSON_ID = field_tag(pb.StoredEvent, "person_id", LENGTH_DELIMITED)
_RECEIVE_TIME = field_tag(pb.StoredEvent, "receive_time", LENGTH_DELIMITED)
_ONE_BYTE_VARINTS = [bytes([value]) for value in range(128)]
_UINT64 = (1 << 64) - 1
_DOUBLE = struct.Struct("<d")


def varint(value: int) -> bytes:
    """`value` as a protobuf varint; a negative one as its 64-bit two's complement (int32/int64 fields)."""
    if 0 <= value < 128:
        return _ONE_BYTE_VARINTS[value]
    if 0 < value < 16384:  # most lengths: an event's payload, a response's item
        return bytes((value & 0x7F | 0x80, value >> 7))
    value &= _UINT64
    encoded = bytearray()
    while value >= 128:
        encoded.append(value & 0x7F | 0x80)
        value >>= 7
    encoded.append(value)
    return bytes(encoded)


def _length_delimited(tag: bytes, payload: bytes) -> bytes:
    return tag + varint(len(payload)) + payload


def timestamp_bytes(when: datetime) -> bytes:
    """A Timestamp's fields for an aware `when`, exactly as `_set_time` sets them (zero fields left out, as the
    runtime serializes them)."""
    # divmod(micros(when), 1_000_000) as the timedelta holds it (days, seconds 0-86,399, microseconds 0-999,999):
    # the same floored seconds and microseconds, in a third of the time (a scan encodes a time per event).
    delta = when - EPOCH
    seconds, micro = delta.days * 86_400 + delta.seconds, delta.microseconds
    return (_SECONDS + varint(seconds) if seconds else b"") + (_NANOS + varint(micro * 1000) if micro else b"")


def value_bytes(value: Any) -> bytes:
    """A trait value (as JSON gives it) as a google.protobuf.Value's fields: scalars by hand, the rest by the
    runtime (the same conversion as the adapter's `_value`)."""
    if isinstance(value, str):
        return _length_delimited(_STRING_VALUE, value.encode())
    if isinstance(value, bool):
        return _BOOL_VALUE + _ONE_BYTE_VARINTS[int(value)]
    if isinstance(value, int | float):
        return _NUMBER_VALUE + _DOUBLE.pack(float(value))
    message = struct_pb2.Value()
    json_format.ParseDict(value, message)
    return message.SerializeToString()


def trait_bytes(trait: TraitValue) -> bytes:
    """One `traits` map entry of a Profile: the name, and the Trait as `_fill_traits` fills it."""
    value = _length_delimited(_TRAIT_VALUE, value_bytes(trait.value))
    value += _length_delimited(_TRAIT_EVENT_TIME, timestamp_bytes(trait.event_time))
    if trait.source:
        value += _length_delimited(_TRAIT_SOURCE, trait.source.encode())
    if trait.party:
        value += _TRAIT_PARTY + varint(trait.party)
    return _length_delimited(_ENTRY_KEY, trait.name.encode()) + _length_delimited(_ENTRY_VALUE, value)


def profile_bytes(view: ProfileView, paths: Sequence[str], traits: bool, trait_names: set[str] | None) -> bytes:
    """The Profile of `view` with the fields a direct read mask names (`paths`: of name, person_id,
    traits, merged_person_ids, update_time; `traits`: whether it selects traits, those in `trait_names`, all when None),
    as the adapter's `mask.apply(_profile(view))` selects it."""
    encoded = b""
    if "name" in paths:
        encoded += _length_delimited(_NAME, f"profiles/{view.person_id}".encode())
    if "person_id" in paths and view.person_id:
        encoded += _length_delimited(_PERSON_ID, view.person_id.encode())
    if traits:
        encoded += b"".join(_length_delimited(_TRAITS, trait_bytes(t)) for t in view.traits.values()
                            if trait_names is None or t.name in trait_names)
    if "merged_person_ids" in paths:
        encoded += b"".join(_length_delimited(_MERGED_PERSON_IDS, m.encode()) for m in view.merged_person_ids)
    if "update_time" in paths and view.update_time:
        encoded += _length_delimited(_UPDATE_TIME, timestamp_bytes(view.update_time))
    return encoded


def stored_event_bytes(event: StoredEventRecord) -> bytes:
    """A StoredEvent as the adapter's `_fill_stored_event` fills it: the stored payload is the Event's wire bytes
    already."""
    return _EventFields()(event)


class _EventFields:
    """`stored_event_bytes`, remembering the person id and receive time fields it encoded: the events of a scan's
    batch share few of them (a person's own id; the receive time of an ingest call, shared by its events), and
    encoding a time cost more than the rest of an event. Lives as long as one batch's responses."""

    def __init__(self) -> None:
        self._person_ids: dict[str, bytes] = {}
        self._receive_times: dict[datetime, bytes] = {}

    def __call__(self, event: StoredEventRecord) -> bytes:
        payload = event.payload
        encoded = _EVENT + varint(len(payload)) + payload
        person_id = event.person_id
        if person_id:
            field = self._person_ids.get(person_id)
            if field is None:
                field = self._person_ids[person_id] = _length_delimited(_EVENT_PERSON_ID, person_id.encode())
            encoded += field
        receive_time = event.receive_time
        if receive_time:
            field = self._receive_times.get(receive_time)
            if field is None:
                field = self._receive_times[receive_time] = _length_delimited(_RECEIVE_TIME,
                                                                              timestamp_bytes(receive_time))
            encoded += field
        return encoded


def scan_response_bytes(scanned: Iterable[tuple[bytes, Iterable[StoredEventRecord]]]) -> bytes:
    """A ScanProfilesResponse of (Profile wire bytes, its events in order) pairs."""
    fields = _EventFields()
    return b"".join(_length_delimited(_PROFILES, _scanned_profile(profile, events, fields))
                    for profile, events in scanned)


def _scanned_profile(profile: bytes, events: Iterable[StoredEventRecord], fields: _EventFields) -> bytes:
    item = _length_delimited(_SCANNED_PROFILE, profile)
    return item + b"".join(_length_delimited(_SCANNED_EVENTS, fields(e)) for e in events)


def scan_responses(scanned: Iterable[tuple[bytes, Iterable[StoredEventRecord]]], max_bytes: int) -> Iterator[bytes]:
    """ScanProfilesResponses of (Profile wire bytes, its events in order) pairs, in order, each at most
    `max_bytes` long: a response ends before the profile that would pass it. A profile that passes it alone
    with its events goes without them and with `events_omitted` (the caller pages them with
    ListProfileEvents); one that passes it even so (its traits) ends the scan RESOURCE_EXHAUSTED, saying to name
    the traits needed. At least one response, empty for no pairs."""
    response: list[bytes] = []
    size = 0
    fields = _EventFields()
    for profile, events in scanned:
        item = _length_delimited(_PROFILES, _scanned_profile(profile, events, fields))
        if len(item) > max_bytes:
            item = _length_delimited(_PROFILES, _length_delimited(_SCANNED_PROFILE, profile)
                                     + _EVENTS_OMITTED + _ONE_BYTE_VARINTS[1])
            if len(item) > max_bytes:
                if response:  # what came before it is sent first
                    yield b"".join(response)
                person_id = pb.Profile.FromString(profile).person_id
                raise ResourceExhausted(
                    f"the profile of {person_id or 'a person of this shard'}: {len(item):,} bytes without its events, "
                    f"more than one response carries ({max_bytes:,}); name the traits you need in read_mask "
                    "(`traits.<name>`)", reason="RESPONSE_TOO_LARGE")
        if response and size + len(item) > max_bytes:
            yield b"".join(response)
            response, size = [], 0
        response.append(item)
        size += len(item)
    yield b"".join(response)
