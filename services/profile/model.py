"""The profile service's domain types and the validation of incoming events.

Plain data, no grpc: the gRPC adapter (server.py) turns onecdp.profile.v1 messages into these and
back. An event keeps its serialized form (`payload`) so it can be returned exactly as ingested.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from enum import IntEnum
from typing import Any

from shared.errors import control_character_problem
from shared.event_times import EARLIEST_EVENT_TIME, MAX_FUTURE_SKEW
from shared.trait_names import trait_name_problem

MAX_MESSAGE_ID_LENGTH = 128
MAX_NAME_LENGTH = 128
# Trait names: 1-128 characters of any kind, however a trait is written (identify event, BatchWriteTraits).
MAX_IDENTIFIERS = 32
MAX_PAYLOAD_BYTES = 64 * 1024
MAX_ORDER_ITEMS = 500
# The largest order amount (and numeric `revenue` property) taken, either sign. Computed traits add amounts up
# (monetary, lifetime value, window sums), so each must be small enough that a sum of any number of them stays
# finite: 1.7e308 twice is Infinity. 1e15 is far above any real order in any currency unit, is below 2**53 (so
# whole amounts up to it are exact doubles), and overflowing a sum of such amounts would take ~1e293 events.
MAX_AMOUNT = 1e15
# The largest quantity of an order item. An order's item count and its category and brand weights are stored
# as 32-bit ints (timeline.item_count, categories, brands): 500 items of at most 1,000,000 each stay below 2**31.
MAX_ITEM_QUANTITY = 1_000_000
_CURRENCY = re.compile(r"[A-Z]{3}")  # fullmatch: `$` also matches before a final newline


class EventType(IntEnum):
    # Values match onecdp.profile.v1.EventType.
    IDENTIFY = 1
    TRACK = 2
    PAGE = 3
    SCREEN = 4
    ALIAS = 5
    ORDER = 6


class EventStatus(IntEnum):
    # Values match onecdp.profile.v1.EventStatus.
    ACCEPTED = 1
    DUPLICATE = 2
    REJECTED = 3


class RejectionReason(IntEnum):
    # Values match onecdp.profile.v1.EventRejectionReason.
    BAD_MESSAGE_ID = 1
    UNKNOWN_TYPE = 2
    BAD_TIMESTAMP = 3
    MISSING_IDENTIFIER = 4
    INVALID_IDENTIFIER = 5
    OVERSIZED_PAYLOAD = 6
    MISSING_FIELD = 7
    ERASED_IDENTIFIER = 8
    INVALID_FIELD = 9


# The values of onecdp.common.v1.SourceKind and onecdp.common.v1.DataParty: an event or a trait write with another
# is refused (proto3 lets a client send any number in an enum field).
SOURCE_KINDS = range(7)
DATA_PARTIES = range(4)


class ChangeType(IntEnum):
    # Values match onecdp.profile.v1.ProfileChangeType.
    TRAITS = 1
    EVENTS = 2
    MERGE = 3
    SPLIT = 4
    ERASE = 5


@dataclass(frozen=True)
class OrderLine:
    sku: str
    name: str
    category: str
    brand: str
    quantity: int
    unit_price: float


@dataclass(frozen=True)
class Order:
    order_id: str
    amount: float
    currency_code: str
    items: tuple[OrderLine, ...] = ()


@dataclass(frozen=True)
class Event:
    """An incoming event, as the adapter decoded it."""

    message_id: str
    event_type: int
    identifiers: tuple[tuple[str, str], ...]
    event_name: str
    event_time: datetime | None
    source: str
    source_kind: int
    party: int
    traits: dict[str, Any]
    properties: dict[str, Any]
    order: Order | None
    # Serialized sizes of traits and properties (the limit is on what the client sent).
    traits_bytes: int
    properties_bytes: int
    # The event as ingested (the serialized onecdp.profile.v1.Event), returned by reads as is.
    payload: bytes
    # Why the event_time sent is no time at all (a Timestamp beyond years 1-9999 or with nanos outside
    # 0-999999999, which only a binary client can send); `event_time` is None then.
    event_time_invalid: str = ""
    # Why a number the event carries cannot be taken (NaN or ±Infinity in traits or properties: JSON has no such
    # numbers, so they can be neither stored as traits nor read back), e.g. `properties.price must be a finite
    # number, got NaN`; "" when every number is finite. `traits` or `properties` is empty then.
    invalid_number: str = ""

    @property
    def name(self) -> str:
        """The name the timeline and window aggregates use: `order` for orders without a name."""
        if self.event_type == EventType.ORDER and not self.event_name:
            return "order"
        if self.event_type == EventType.IDENTIFY and not self.event_name:
            return "identify"
        if self.event_type == EventType.ALIAS and not self.event_name:
            return "alias"
        return self.event_name

    @property
    def transaction(self) -> Order | None:
        """The order this event records: an order event's `order`. On any other event the order is kept in the
        payload but read by nothing (only its numbers are validated: finite, as everywhere); see `unused_parts`."""
        return self.order if self.event_type == EventType.ORDER else None

    @property
    def amount(self) -> float | None:
        """Order amount, or a numeric `revenue` property: what window sums and monetary add up."""
        if self.transaction is not None:
            return self.transaction.amount
        revenue = self.properties.get("revenue")
        return float(revenue) if isinstance(revenue, int | float) and math.isfinite(revenue) else None

    def preference_weights(self) -> tuple[dict[str, int], dict[str, int]]:
        """Category and brand weights this event contributes to preferences (items weigh by quantity)."""
        categories: dict[str, int] = {}
        brands: dict[str, int] = {}
        if self.transaction is not None:
            for item in self.transaction.items:
                if item.category:
                    categories[item.category] = categories.get(item.category, 0) + item.quantity
                if item.brand:
                    brands[item.brand] = brands.get(item.brand, 0) + item.quantity
        for key, weights in (("category", categories), ("brand", brands)):
            value = self.properties.get(key)
            if isinstance(value, str) and value:
                weights[value] = weights.get(value, 0) + 1
        return categories, brands


@dataclass(frozen=True)
class Rejection:
    reason: RejectionReason
    message: str


@dataclass(frozen=True)
class EventResult:
    message_id: str
    status: EventStatus
    person_id: str = ""
    rejection: Rejection | None = None
    note: str = ""  # on an accepted event: what of it was stored but has no effect (see `unused_parts`)


@dataclass(frozen=True)
class StoredEventRecord:
    """An event on a person's timeline as a read returns it: enough to select it (name, exact time), order it
    and return it as ingested (`payload`). Reads that derive nothing from events (a scan without computed
    traits) read no more than this."""

    message_id: str
    person_id: str  # the partition it is stored under (a merged person's, until moved)
    event_name: str
    event_time: datetime
    payload: bytes
    receive_time: datetime | None


@dataclass(frozen=True)
class TimelineEvent(StoredEventRecord):
    """An event as stored on a person's timeline, with what computed traits derive from."""

    event_type: int
    order_id: str
    amount: float | None
    currency_code: str
    item_count: int
    categories: dict[str, int]
    brands: dict[str, int]


@dataclass(frozen=True)
class TraitValue:
    """The current value of a trait: its latest write by event time."""

    name: str
    value: Any
    event_time: datetime
    source: str
    party: int


@dataclass(frozen=True)
class TraitWrite:
    """One write of traits for a person (BatchWriteTraits); a None value deletes the trait.

    `person_id` is the person the traits are stored under now. `origin` is what the write belongs to
    when identity later splits that person: the identifier it was written for, or else the person id
    the caller named (see `TraitOrigin`).
    """

    person_id: str
    traits: dict[str, Any]
    event_time: datetime
    source: str
    party: int
    origin: TraitOrigin


@dataclass(frozen=True)
class TraitOrigin:
    """Whom a BatchWriteTraits write follows: an identifier (whoever holds it) or else a person id."""

    person_id: str
    identifier: tuple[str, str] | None = None

    @property
    def selector(self) -> tuple[str, tuple[str, str] | None]:
        """How identity is asked whom this origin belongs to now: by the identifier if any, else by person id."""
        return ("", self.identifier) if self.identifier else (self.person_id, None)

    @property
    def key(self) -> str:
        """Distinguishes writes of different origins in the same row key, so moving them never collides."""
        return f"{self.identifier[0]}:{self.identifier[1]}" if self.identifier else self.person_id


@dataclass
class ProfileRecord:
    """Everything stored for one person (the survivor of merges)."""

    person_id: str
    traits: dict[str, TraitValue] = field(default_factory=dict)
    events: list[TimelineEvent] = field(default_factory=list)
    merged_person_ids: list[str] = field(default_factory=list)
    update_time: datetime | None = None


def validate(event: Event, now: datetime) -> Rejection | None:
    """Why the event cannot be stored, or None. Identifier values are checked by the identity service."""
    if not 0 < len(event.message_id) <= MAX_MESSAGE_ID_LENGTH:
        return Rejection(RejectionReason.BAD_MESSAGE_ID,
                         f"message_id must be 1-{MAX_MESSAGE_ID_LENGTH} characters, got {len(event.message_id)}")
    if problem := control_character_problem(event.message_id):
        return Rejection(RejectionReason.BAD_MESSAGE_ID, f"message_id {problem}")
    if event.event_type not in EventType.__members__.values():
        return Rejection(RejectionReason.UNKNOWN_TYPE,
                         f"type {event.event_type} is not one of IDENTIFY, TRACK, PAGE, SCREEN, ALIAS, ORDER")
    if event.event_time_invalid:
        return Rejection(RejectionReason.BAD_TIMESTAMP, event.event_time_invalid)
    if event.event_time is None:
        return Rejection(RejectionReason.BAD_TIMESTAMP, "event_time is required")
    if problem := event_time_problem(event.event_time, now):
        return Rejection(RejectionReason.BAD_TIMESTAMP, problem)
    if not event.identifiers:
        return Rejection(RejectionReason.MISSING_IDENTIFIER, "at least one identifier is required")
    if len(event.identifiers) > MAX_IDENTIFIERS:
        return Rejection(RejectionReason.INVALID_IDENTIFIER,
                         f"{len(event.identifiers)} identifiers; at most {MAX_IDENTIFIERS} are allowed")
    for index, (type_name, value) in enumerate(event.identifiers):
        if not type_name or not value:
            return Rejection(RejectionReason.INVALID_IDENTIFIER, f"identifiers[{index}] needs a type and a value")
    for name, size in (("traits", event.traits_bytes), ("properties", event.properties_bytes)):
        if size > MAX_PAYLOAD_BYTES:
            return Rejection(RejectionReason.OVERSIZED_PAYLOAD,
                             f"{name} are {size} bytes serialized; at most {MAX_PAYLOAD_BYTES} are allowed")
    return _check_fields(event)


def event_time_problem(when: datetime, now: datetime) -> str:
    """Why `when` is not an event time OneCDP stores ("" when it is), worded for the caller: events and
    trait writes take the same times, so a trait can never be written where no later write reaches it."""
    if when > now + MAX_FUTURE_SKEW:
        return f"event_time {when.isoformat()} is more than 1 day in the future"
    if when < EARLIEST_EVENT_TIME:
        return f"event_time {when.isoformat()} is before 1990-01-01"
    return ""


def unused_parts(event: Event) -> str:
    """What an acceptable event carries that nothing reads, said back to the caller ("" when nothing).

    Traits are applied from identify events only, an order is read from order events only; on other events
    they are kept in the stored payload but set nothing, which a caller otherwise never learns.
    """
    notes = []
    if event.traits and event.event_type != EventType.IDENTIFY:
        notes.append(f"traits are applied from identify events only; the {len(event.traits)} trait(s) of this "
                     "event set nothing (send them in an identify event, or as properties)")
    if event.order is not None and event.transaction is None:
        notes.append(f"order is read from order events only; the order {event.order.order_id!r} of this event "
                     "counts as no transaction, amount or preference (send it in an order event, or its amount as "
                     "the revenue property)")
    return "; ".join(notes)


def _check_fields(event: Event) -> Rejection | None:
    if event.event_type in (EventType.TRACK, EventType.PAGE, EventType.SCREEN) and not event.event_name:
        return Rejection(RejectionReason.MISSING_FIELD, f"{EventType(event.event_type).name.lower()} events need "
                                                        "an event_name")
    if event.event_type == EventType.ALIAS and len(set(event.identifiers)) < 2:
        return Rejection(RejectionReason.MISSING_FIELD, "alias events need at least 2 distinct identifiers")
    for name, text in (("event_name", event.event_name), ("source", event.source)):
        if len(text) > MAX_NAME_LENGTH:
            return Rejection(RejectionReason.INVALID_FIELD,
                             f"{name} is {len(text)} characters; at most {MAX_NAME_LENGTH} are allowed")
        if problem := control_character_problem(text):
            return Rejection(RejectionReason.INVALID_FIELD, f"{name} {problem}")
    if event.source_kind not in SOURCE_KINDS:
        return Rejection(RejectionReason.INVALID_FIELD, f"source_kind {event.source_kind} is not a SourceKind "
                                                        f"(0-{SOURCE_KINDS[-1]})")
    if event.party not in DATA_PARTIES:
        return Rejection(RejectionReason.INVALID_FIELD, f"party {event.party} is not a DataParty "
                                                        f"(0-{DATA_PARTIES[-1]})")
    if event.event_type == EventType.IDENTIFY:
        for trait_name in event.traits:
            if problem := trait_name_problem(trait_name):
                return Rejection(RejectionReason.INVALID_FIELD, problem)
    if rejection := _check_numbers(event):
        return rejection
    if event.event_type != EventType.ORDER:
        return None
    order = event.order
    if order is None or not order.order_id:
        return Rejection(RejectionReason.MISSING_FIELD, "order events need an order with an order_id")
    if len(order.order_id) > MAX_NAME_LENGTH:
        return Rejection(RejectionReason.INVALID_FIELD, f"order.order_id is longer than {MAX_NAME_LENGTH} characters")
    if len(order.items) > MAX_ORDER_ITEMS:
        return Rejection(RejectionReason.OVERSIZED_PAYLOAD,
                         f"{len(order.items)} order items; at most {MAX_ORDER_ITEMS} are allowed")
    if not abs(order.amount) <= MAX_AMOUNT:
        return Rejection(RejectionReason.INVALID_FIELD, f"order.amount {order.amount!r} is out of range; amounts are "
                                                        f"at most {MAX_AMOUNT:.0e} either way")
    if order.currency_code and not _CURRENCY.fullmatch(order.currency_code):
        return Rejection(RejectionReason.INVALID_FIELD,
                         f"order.currency_code {order.currency_code!r} is not an ISO 4217 code like USD")
    for index, item in enumerate(order.items):
        if not 1 <= item.quantity <= MAX_ITEM_QUANTITY:
            return Rejection(RejectionReason.INVALID_FIELD, f"order.items[{index}].quantity {item.quantity} is out "
                                                            f"of range; quantities are 1-{MAX_ITEM_QUANTITY:,}")
    return None


def _check_numbers(event: Event) -> Rejection | None:
    """Every number an event carries is finite, whatever its type; the amounts computed traits add up are also
    at most MAX_AMOUNT either way (an order event's order.amount, another event's numeric `revenue` property)."""
    if event.invalid_number:
        return Rejection(RejectionReason.INVALID_FIELD, event.invalid_number)
    if event.order is not None:
        if not math.isfinite(event.order.amount):
            return Rejection(RejectionReason.INVALID_FIELD,
                             f"order.amount must be a finite number, got {number_text(event.order.amount)}")
        for index, item in enumerate(event.order.items):
            if not math.isfinite(item.unit_price):
                return Rejection(RejectionReason.INVALID_FIELD, f"order.items[{index}].unit_price must be a finite "
                                                                f"number, got {number_text(item.unit_price)}")
    revenue = event.properties.get("revenue")
    if event.transaction is None and isinstance(revenue, int | float) and not abs(revenue) <= MAX_AMOUNT:
        return Rejection(RejectionReason.INVALID_FIELD, f"properties.revenue {revenue!r} is out of range; amounts "
                                                        f"are at most {MAX_AMOUNT:.0e} either way")
    return None


def number_text(value: float) -> str:
    """A number as a caller wrote it in JSON: NaN, Infinity and -Infinity by their proto JSON names."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return repr(value)


def bucket_of(when: datetime) -> int:
    """The timeline partition (month) of an event time, as yyyymm."""
    return when.year * 100 + when.month
