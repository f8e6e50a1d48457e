"""Profile storage in Cassandra: timelines, trait writes, profile rows, and moving them between persons.

Every row is keyed so that writing it again overwrites itself (events by message id, trait writes by
(name, event time, message id)), which is what makes ingestion idempotent and moves re-runnable.
Rows are moved between persons row by row (insert at the destination, then delete exactly the rows
moved), never with partition deletes: a row written concurrently into a partition being emptied
survives, and the next pass moves it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cassandra.cluster import ResponseFuture

from services.profile.model import (
    Event,
    EventType,
    TimelineEvent,
    TraitOrigin,
    TraitValue,
    TraitWrite,
    bucket_of,
)
from shared.cassandra import CassandraSession

_TIMELINE_COLUMNS = ("person_id, bucket, event_time, message_id, event_micros, event_type, event_name, order_id, "
                     "amount, currency_code, item_count, categories, brands, payload, receive_time")
_INSERT_TIMELINE = (f"INSERT INTO timeline ({_TIMELINE_COLUMNS}) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
_INSERT_BUCKET = "INSERT INTO timeline_buckets (person_id, bucket) VALUES (?, ?)"
_INSERT_TRAIT = ("INSERT INTO trait_writes (person_id, name, event_time, message_id, value, deleted, source, party) "
                 "VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
_INSERT_DIRECT_TRAIT = ("INSERT INTO trait_writes (person_id, name, event_time, message_id, value, deleted, source, "
                        "party, origin_person_id, identifier) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
_DELETE_TRAIT = "DELETE FROM trait_writes WHERE person_id = ? AND name = ? AND event_time = ? AND message_id = ?"
_INSERT_EVENT_ID = ("INSERT INTO events_by_id (message_id, person_id, bucket, event_time, identifiers, receive_time) "
                    "VALUES (?, ?, ?, ?, ?, ?)")
_TOUCH_PROFILE = "UPDATE profiles SET update_time = ? WHERE person_id = ?"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Trait writes of BatchWriteTraits are keyed by this prefix plus their source and origin, not by an event.
DIRECT_WRITE_PREFIX = "write:"


def direct_write_id(source: str, origin: TraitOrigin) -> str:
    """The message id of a BatchWriteTraits write: the same source writing again for the same origin at
    the same event time overwrites itself; writes of different origins never share a row, even once
    merged under one person."""
    return f"{DIRECT_WRITE_PREFIX}{source}|{origin.key}"


def micros(value: datetime) -> int:
    """Microseconds since the epoch, exactly (datetime arithmetic, no float rounding)."""
    return (value - EPOCH) // timedelta(microseconds=1)


def from_micros(value: int) -> datetime:
    return EPOCH + timedelta(microseconds=value)


def utc(value: datetime) -> datetime:
    """The driver returns naive UTC datetimes; the domain works with aware ones."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


@dataclass(frozen=True)
class ProfileRow:
    person_id: str
    merged_into: str
    merged_person_ids: list[str]
    erased: bool
    update_time: datetime | None


@dataclass(frozen=True)
class DirectTraitRow:
    """A stored BatchWriteTraits write: where it is (`person_id`, the row key) and whom it follows."""

    person_id: str
    name: str
    event_time: datetime
    message_id: str
    value: str
    deleted: bool
    source: str
    party: int
    origin: TraitOrigin


@dataclass(frozen=True)
class StoredEventRef:
    """Where an accepted event lives, from the idempotency record."""

    message_id: str
    person_id: str
    identifiers: list[tuple[str, str]]


class ProfileStore:
    def __init__(self, session: CassandraSession) -> None:
        self._session = session

    # ---- ingestion --------------------------------------------------------------------------------

    def stored_events(self, message_ids: Iterable[str]) -> dict[str, StoredEventRef]:
        """The idempotency records of those message ids that were accepted before."""
        futures = {m: self._session.execute_async(
            "SELECT message_id, person_id, identifiers FROM events_by_id WHERE message_id = ?", (m,))
            for m in set(message_ids)}
        found = {}
        for message_id, future in futures.items():
            row = self._session.result(future).one()
            if row is not None:
                found[message_id] = StoredEventRef(row.message_id, row.person_id,
                                                   [tuple(i) for i in row.identifiers or ()])
        return found

    def write_events(self, items: Sequence[tuple[Event, str]], receive_time: datetime) -> None:
        """Store accepted events under their persons; the idempotency records go last."""
        futures: list[ResponseFuture] = []
        buckets: set[tuple[str, int]] = set()
        persons: set[str] = set()
        for event, person_id in items:
            assert event.event_time is not None  # validated before
            bucket = bucket_of(event.event_time)
            buckets.add((person_id, bucket))
            persons.add(person_id)
            categories, brands = event.preference_weights()
            order = event.order
            futures.append(self._session.execute_async(_INSERT_TIMELINE, (
                person_id, bucket, event.event_time, event.message_id, micros(event.event_time), event.event_type,
                event.name,
                order.order_id if order else None, event.amount,
                (order.currency_code or "USD") if order else None,
                sum(item.quantity for item in order.items) if order else None,
                categories, brands, event.payload, receive_time)))
            if event.event_type == EventType.IDENTIFY:
                for name, value in event.traits.items():
                    futures.append(self._session.execute_async(_INSERT_TRAIT, (
                        person_id, name, event.event_time, event.message_id, json.dumps(value), value is None,
                        event.source, event.party)))
        futures += [self._session.execute_async(_INSERT_BUCKET, key) for key in sorted(buckets)]
        futures += [self._session.execute_async(_TOUCH_PROFILE, (receive_time, p)) for p in sorted(persons)]
        self._wait(futures)
        self._wait([self._session.execute_async(_INSERT_EVENT_ID, (
            event.message_id, person_id, bucket_of(event.event_time), event.event_time,
            list(event.identifiers), receive_time)) for event, person_id in items if event.event_time])

    def write_traits(self, writes: Sequence[TraitWrite], receive_time: datetime) -> int:
        futures = []
        for write in writes:
            message_id = direct_write_id(write.source, write.origin)
            for name, value in write.traits.items():
                futures.append(self._session.execute_async(_INSERT_DIRECT_TRAIT, (
                    write.person_id, name, write.event_time, message_id, json.dumps(value), value is None,
                    write.source, write.party, write.origin.person_id, write.origin.identifier)))
            futures.append(self._session.execute_async(_TOUCH_PROFILE, (receive_time, write.person_id)))
        self._wait(futures)
        return sum(len(w.traits) for w in writes)

    # ---- reading ----------------------------------------------------------------------------------

    def profile_row(self, person_id: str) -> ProfileRow | None:
        return self.profile_rows([person_id]).get(person_id)

    def profile_rows(self, person_ids: Iterable[str]) -> dict[str, ProfileRow]:
        futures = {p: self._session.execute_async(
            "SELECT person_id, merged_into, merged_person_ids, erased, update_time FROM profiles WHERE person_id = ?",
            (p,)) for p in dict.fromkeys(person_ids)}
        rows = {p: self._session.result(f).one() for p, f in futures.items()}
        return {p: _profile_row(row) for p, row in rows.items() if row is not None}

    def buckets(self, person_ids: Iterable[str]) -> list[tuple[str, int]]:
        futures = [(p, self._session.execute_async("SELECT bucket FROM timeline_buckets WHERE person_id = ?", (p,)))
                   for p in dict.fromkeys(person_ids)]
        return [(p, row.bucket) for p, future in futures for row in self._session.result(future)]

    def timeline(self, person_ids: Iterable[str]) -> list[TimelineEvent]:
        """All events stored under these persons, newest first."""
        return self.timelines([list(person_ids)])[0]

    def timelines(self, groups: Sequence[Sequence[str]]) -> list[list[TimelineEvent]]:
        """For each group of person ids, all events stored under them, newest first (all reads concurrent)."""
        futures = [self._session.execute_async(f"SELECT {_TIMELINE_COLUMNS} FROM timeline "
                                               "WHERE person_id = ? AND bucket = ?", key)
                   for key in self.buckets(p for group in groups for p in group)]
        by_person: dict[str, list[TimelineEvent]] = {}
        for future in futures:
            for row in self._session.result(future):
                by_person.setdefault(row.person_id, []).append(_timeline_event(row))
        result = []
        for group in groups:
            events = [e for p in dict.fromkeys(group) for e in by_person.get(p, ())]
            events.sort(key=lambda e: (e.event_time, e.message_id), reverse=True)
            result.append(events)
        return result

    def traits(self, person_ids: Iterable[str]) -> dict[str, TraitValue]:
        """The current traits of these persons: per name, the latest write by event time (a null deletes)."""
        return self.traits_of_groups([list(person_ids)])[0]

    def traits_of_groups(self, groups: Sequence[Sequence[str]]) -> list[dict[str, TraitValue]]:
        """For each group of person ids, its current traits (all reads concurrent)."""
        futures = {p: self._session.execute_async(
            "SELECT name, event_time, message_id, value, deleted, source, party FROM trait_writes "
            "WHERE person_id = ?", (p,)) for group in groups for p in group}
        rows_of = {p: list(self._session.result(f)) for p, f in futures.items()}
        result = []
        for group in groups:
            latest: dict[str, Any] = {}
            for person_id in dict.fromkeys(group):
                for row in rows_of[person_id]:
                    known = latest.get(row.name)
                    if known is None or (row.event_time, row.message_id) > (known.event_time, known.message_id):
                        latest[row.name] = row
            result.append({name: TraitValue(name, json.loads(row.value), utc(row.event_time), row.source or "",
                                            row.party or 0) for name, row in sorted(latest.items()) if not row.deleted})
        return result

    def scan(self, start_token: int, end_token: int, page_size: int) -> Iterator[ProfileRow]:
        """Profile rows whose partition token is in (start_token, end_token]; merged and erased ones included."""
        rows = self._session.execute(
            "SELECT person_id, merged_into, merged_person_ids, erased, update_time FROM profiles "
            "WHERE token(person_id) > ? AND token(person_id) <= ?", (start_token, end_token), fetch_size=page_size)
        for row in rows:
            yield _profile_row(row)

    # ---- moving rows between persons --------------------------------------------------------------

    def move_events(self, moves: Sequence[tuple[TimelineEvent, str]]) -> None:
        """Move each event's timeline row and trait writes to the given person."""
        if not moves:
            return
        sources = {e.person_id for e, _ in moves}
        trait_rows: dict[str, list[Any]] = {}
        for source in sources:
            trait_rows[source] = list(self._session.execute(
                "SELECT name, event_time, message_id, value, deleted, source, party FROM trait_writes "
                "WHERE person_id = ?", (source,)))
        inserts: list[ResponseFuture] = []
        deletes: list[tuple[str, Sequence[Any]]] = []
        for event, target in moves:
            if target == event.person_id:
                continue
            bucket = bucket_of(event.event_time)
            inserts.append(self._session.execute_async(_INSERT_TIMELINE, (
                target, bucket, event.event_time, event.message_id, micros(event.event_time), event.event_type,
                event.event_name,
                event.order_id or None, event.amount, event.currency_code or None, event.item_count,
                event.categories, event.brands, event.payload, event.receive_time)))
            inserts.append(self._session.execute_async(_INSERT_BUCKET, (target, bucket)))
            deletes.append(("DELETE FROM timeline WHERE person_id = ? AND bucket = ? AND event_time = ? "
                            "AND message_id = ?", (event.person_id, bucket, event.event_time, event.message_id)))
            for row in trait_rows[event.person_id]:
                if row.message_id == event.message_id:
                    inserts.append(self._session.execute_async(_INSERT_TRAIT, (
                        target, row.name, row.event_time, row.message_id, row.value, row.deleted, row.source,
                        row.party)))
                    deletes.append((_DELETE_TRAIT, (event.person_id, row.name, row.event_time, row.message_id)))
            inserts.append(self._session.execute_async(
                "UPDATE events_by_id SET person_id = ? WHERE message_id = ?", (target, event.message_id)))
        self._wait(inserts)
        self._wait([self._session.execute_async(cql, params) for cql, params in deletes])

    def direct_trait_writes(self, person_ids: Iterable[str]) -> list[DirectTraitRow]:
        """The BatchWriteTraits writes stored under these persons (not those of identify events)."""
        futures = [self._session.execute_async(
            "SELECT person_id, name, event_time, message_id, value, deleted, source, party, origin_person_id, "
            "identifier FROM trait_writes WHERE person_id = ?", (p,)) for p in dict.fromkeys(person_ids)]
        return [DirectTraitRow(
            row.person_id, row.name, row.event_time, row.message_id, row.value, bool(row.deleted), row.source or "",
            row.party or 0,
            # Writes stored before origins were recorded follow the person they were stored under.
            TraitOrigin(row.origin_person_id or row.person_id, tuple(row.identifier) if row.identifier else None))
            for future in futures for row in self._session.result(future)
            if row.message_id.startswith(DIRECT_WRITE_PREFIX)]

    def move_direct_traits(self, moves: Sequence[tuple[DirectTraitRow, str]]) -> None:
        """Move each BatchWriteTraits write to the given person (insert there first, then delete here)."""
        moves = [(row, target) for row, target in moves if target != row.person_id]
        self._wait([self._session.execute_async(_INSERT_DIRECT_TRAIT, (
            target, row.name, row.event_time, row.message_id, row.value, row.deleted, row.source, row.party,
            row.origin.person_id, row.origin.identifier)) for row, target in moves])
        self._wait([self._session.execute_async(_DELETE_TRAIT, (row.person_id, row.name, row.event_time,
                                                                row.message_id)) for row, _ in moves])

    def mark_merged(self, loser: str, winner: str, now: datetime) -> None:
        self._session.execute("UPDATE profiles SET merged_into = ?, update_time = ? WHERE person_id = ?",
                              (winner, now, loser))
        self._session.execute("UPDATE profiles SET merged_person_ids = merged_person_ids + ?, update_time = ? "
                              "WHERE person_id = ?", ({loser}, now, winner))

    def mark_split(self, person_ids: Sequence[str], now: datetime) -> None:
        """The persons of a split own their rows again: none redirects, none counts another as merged."""
        futures = [self._session.execute_async(
            "UPDATE profiles SET merged_into = null, merged_person_ids = merged_person_ids - ?, update_time = ? "
            "WHERE person_id = ?", (set(person_ids) - {p}, now, p)) for p in person_ids]
        self._wait(futures)

    def erase(self, person_ids: Sequence[str], now: datetime) -> int:
        """Delete everything stored for these persons; returns how many events were deleted."""
        events = self.timeline(person_ids)
        futures = [self._session.execute_async("DELETE FROM events_by_id WHERE message_id = ?", (e.message_id,))
                   for e in events]
        for person_id, bucket in self.buckets(person_ids):
            futures.append(self._session.execute_async(
                "DELETE FROM timeline WHERE person_id = ? AND bucket = ?", (person_id, bucket)))
        for person_id in person_ids:
            futures.append(self._session.execute_async("DELETE FROM timeline_buckets WHERE person_id = ?",
                                                       (person_id,)))
            futures.append(self._session.execute_async("DELETE FROM trait_writes WHERE person_id = ?", (person_id,)))
            futures.append(self._session.execute_async(
                "UPDATE profiles SET erased = true, merged_person_ids = null, merged_into = null, update_time = ? "
                "WHERE person_id = ?", (now, person_id)))
        self._wait(futures)
        return len(events)

    # ---- the identity feed position ---------------------------------------------------------------

    def feed_position(self, feed: str) -> str:
        row = self._session.execute("SELECT cursor FROM feed_positions WHERE feed = ?", (feed,)).one()
        return str(row.cursor) if row is not None and row.cursor else ""

    def save_feed_position(self, feed: str, cursor: str, now: datetime) -> None:
        self._session.execute("INSERT INTO feed_positions (feed, cursor, update_time) VALUES (?, ?, ?)",
                              (feed, cursor, now))

    def _wait(self, futures: Sequence[ResponseFuture]) -> None:
        for future in futures:
            self._session.result(future)


def _profile_row(row: Any) -> ProfileRow:
    return ProfileRow(row.person_id, row.merged_into or "", sorted(row.merged_person_ids or ()), bool(row.erased),
                      utc(row.update_time) if row.update_time else None)


def _timeline_event(row: Any) -> TimelineEvent:
    return TimelineEvent(
        message_id=row.message_id, person_id=row.person_id, event_type=row.event_type, event_name=row.event_name,
        event_time=from_micros(row.event_micros) if row.event_micros is not None else utc(row.event_time),
        order_id=row.order_id or "", amount=row.amount,
        currency_code=row.currency_code or "", item_count=row.item_count or 0,
        categories=dict(row.categories or {}), brands=dict(row.brands or {}), payload=row.payload or b"",
        receive_time=utc(row.receive_time) if row.receive_time else None)
