"""Profile storage in Cassandra: timelines, trait writes, profile rows, and moving them between persons.

Every row is keyed so that writing it again overwrites itself (events by message id, trait writes by
(name, event time, message id)), which is what makes ingestion idempotent and moves re-runnable.
Rows are moved between persons row by row (insert at the destination, then delete exactly the rows
moved), never with partition deletes: a row written concurrently into a partition being emptied
survives, and the next pass moves it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from operator import attrgetter
from typing import Any, cast

from cassandra.cluster import ResponseFuture
from cassandra.murmur3 import murmur3

from services.profile.model import (
    Event,
    EventType,
    StoredEventRecord,
    TimelineEvent,
    TraitOrigin,
    TraitValue,
    TraitWrite,
    bucket_of,
)
from services.profile.shards import MAX_TOKEN, MIN_TOKEN
from shared.cassandra import CassandraSession, PendingRows

_TIMELINE_COLUMNS = ("person_id, bucket, event_time, message_id, event_micros, event_type, event_name, order_id, "
                     "amount, currency_code, item_count, categories, brands, payload, receive_time")
# What a read that derives nothing from events needs of them (no order, preference or type columns).
_STORED_EVENT_COLUMNS = "person_id, event_time, message_id, event_micros, event_name, payload, receive_time"
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
# Reads of many persons name them in IN lists (CassandraSession.select_in): each statement costs the
# driver ~0.2-0.5 ms of this process's CPU, each key in an IN list a few microseconds.
_SELECT_PROFILES = ("SELECT person_id, merged_into, merged_person_ids, erased, update_time FROM profiles "
                    "WHERE person_id IN ?")
_SELECT_MONTHS = "SELECT person_id, bucket FROM timeline_buckets WHERE person_id IN ?"
_SELECT_MONTHS_BETWEEN = ("SELECT person_id, bucket FROM timeline_buckets "
                          "WHERE bucket >= ? AND bucket <= ? AND person_id IN ?")
# The months and trait writes of the persons of a token range, in one range read per table: reading
# partitions in token order costs Cassandra far less than naming them in IN lists (a scan's batches).
_RANGE_MONTHS = ("SELECT person_id, bucket FROM timeline_buckets WHERE token(person_id) > ? AND token(person_id) <= ? "
                 "AND bucket >= ? AND bucket <= ? ALLOW FILTERING")
_RANGE_TRAITS = ("SELECT person_id, name, event_time, message_id, value, deleted, source, party FROM trait_writes "
                 "WHERE token(person_id) > ? AND token(person_id) <= ?")
_RANGE_NAMED_TRAITS = f"{_RANGE_TRAITS} AND name IN ? ALLOW FILTERING"
# The timeline of persons with the same months, all of them at once (`person_id IN ? AND bucket IN ?`, at most
# TIMELINE_PARTITIONS partitions a statement): a statement per person cost more than the rows it read.
TIMELINE_PARTITIONS = 100
_SELECT_TRAITS = ("SELECT person_id, name, event_time, message_id, value, deleted, source, party FROM trait_writes "
                  "WHERE person_id IN ?")
_SELECT_NAMED_TRAITS = ("SELECT person_id, name, event_time, message_id, value, deleted, source, party "
                        "FROM trait_writes WHERE name IN ? AND person_id IN ?")
# Stored event times (`timeline.event_time`) keep milliseconds; a time bound in CQL is widened by one, and
# the exact time (`event_micros`) decides.
_MILLISECOND = timedelta(milliseconds=1)
_LAST_BUCKET = 999912
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NAIVE_EPOCH = datetime(1970, 1, 1)
# One constant: building timedelta(microseconds=1) on each call cost five times the arithmetic (per row read).
_MICROSECOND = timedelta(microseconds=1)
# Trait writes of BatchWriteTraits are keyed by this prefix plus their source and origin, not by an event.
DIRECT_WRITE_PREFIX = "write:"


def direct_write_id(source: str, origin: TraitOrigin) -> str:
    """The message id of a BatchWriteTraits write: the same source writing again for the same origin at
    the same event time overwrites itself; writes of different origins never share a row, even once
    merged under one person."""
    return f"{DIRECT_WRITE_PREFIX}{source}|{origin.key}"


def partition_token(person_id: str) -> int:
    """The token of a person's partitions (profiles, trait_writes, timeline_buckets: keyed by the person id alone),
    as Cassandra's Murmur3Partitioner computes `token(person_id)`: the driver's own hash, which it routes by, with
    the partitioner's one adjustment: -2^63 is the ring's minimum, never a token, so that hash becomes 2^63 - 1."""
    token = int(murmur3(person_id.encode()))
    return MAX_TOKEN if token == MIN_TOKEN else token


def micros(value: datetime) -> int:
    """Microseconds since the epoch, exactly (datetime arithmetic, no float rounding)."""
    return (value - EPOCH) // _MICROSECOND


def from_micros(value: int) -> datetime:
    return EPOCH + _MICROSECOND * value


def utc(value: datetime) -> datetime:
    """The driver returns naive UTC datetimes; the domain works with aware ones. By arithmetic from the epoch,
    the same datetime as `value.replace(tzinfo=UTC)` in a fifth of the time (reads convert several per row)."""
    return EPOCH + (value - _NAIVE_EPOCH) if value.tzinfo is None else value


@dataclass(frozen=True)
class EventSelection:
    """The events a read returns: event time (exact) in [start, end) and name in `names`; None: no bound.

    A read touches only the months that can hold them, and builds only the events selected.
    """

    start: datetime | None = None
    end: datetime | None = None
    names: frozenset[str] | None = None

    def selects(self, event: StoredEventRecord) -> bool:
        return ((self.start is None or event.event_time >= self.start)
                and (self.end is None or event.event_time < self.end)
                and (self.names is None or event.event_name in self.names))

    @property
    def bounded(self) -> bool:
        return self.start is not None or self.end is not None


ALL_EVENTS = EventSelection()


@dataclass(frozen=True)
class ProfileRow:
    person_id: str
    merged_into: str
    merged_person_ids: list[str]
    erased: bool
    update_time: datetime | None


@dataclass(frozen=True)
class PersonContents:
    """What is stored for one person (the survivor of merges), as a profile read needs it."""

    row: ProfileRow | None
    partitions: list[str]  # the person id, then those merged into it
    # Newest first; empty unless asked for. TimelineEvents unless the read asked for records only.
    events: list[StoredEventRecord]
    traits: dict[str, TraitValue]  # empty unless asked for


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
        rows = self._session.select_in("SELECT message_id, person_id, identifiers FROM events_by_id "
                                       "WHERE message_id IN ?", (), message_ids).rows()
        return {row.message_id: StoredEventRef(row.message_id, row.person_id, [tuple(i) for i in row.identifiers or ()])
                for row in rows}

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
            order = event.transaction
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
        return _profile_rows(self._session.select_in(_SELECT_PROFILES, (), person_ids))

    def buckets(self, person_ids: Iterable[str]) -> list[tuple[str, int]]:
        return [(row.person_id, row.bucket) for row in self._session.select_in(_SELECT_MONTHS, (), person_ids).rows()]

    def timeline(self, person_ids: Iterable[str]) -> list[TimelineEvent]:
        """All events stored under these persons, newest first."""
        reads = _PartitionReads(self._session, events=True, traits=False)
        partitions = list(dict.fromkeys(person_ids))
        reads.start(partitions)
        return cast(list[TimelineEvent], _newest_first(reads.finish()[0], partitions))  # a full read

    def read_persons(self, person_ids: Sequence[str], *, events: bool, traits: bool,
                     rows: Mapping[str, ProfileRow] | None = None, selection: EventSelection = ALL_EVENTS,
                     trait_names: Iterable[str] | None = None, token_range: tuple[int, int] | None = None,
                     traits_as_of: datetime | None = None, records_only: bool = False) -> list[PersonContents]:
        """What is stored for each of these persons (survivors of merges), in as few waves of reads as it takes:
        the events `selection` selects (when `events`), the traits named (all when None; when `traits`), as the
        writes at or before `traits_as_of` leave them (all writes when None). With `records_only` the events
        are StoredEventRecords (fewer columns read and decoded), else TimelineEvents.

        The profile rows (unless given), and the months and trait writes of each person's own partition
        are read together (by range when the persons are those of `token_range`, (start, end]: a scan's);
        only persons with merged partitions wait for a further wave (their rows were moved to the
        survivor, so those partitions are normally empty). Then the timelines are read, one query for the
        partitions that have the same months. Two round trips in all for the common case, where reading
        the rows, then the months, then one query per month took three plus the trait reads.
        """
        distinct = list(dict.fromkeys(person_ids))
        pending_rows = None if rows is not None else self._session.select_in(_SELECT_PROFILES, (), distinct)
        reads = _PartitionReads(self._session, events=events, traits=traits, selection=selection,
                                trait_names=trait_names, records_only=records_only)
        if token_range is None:
            reads.start(distinct)
        else:
            reads.start_range(token_range, distinct)
        if pending_rows is not None:
            rows = _profile_rows(pending_rows)
        assert rows is not None
        groups = {p: partitions_of(p, rows.get(p)) for p in distinct}
        reads.start(p for group in groups.values() for p in group)
        timelines, trait_rows = reads.finish()
        cutoff = _naive_cutoff(traits_as_of)
        return [PersonContents(rows.get(p), groups[p], _newest_first(timelines, groups[p]),
                               _latest_traits(trait_rows, groups[p], cutoff)) for p in person_ids]

    def scan(self, start_token: int, end_token: int, page_size: int) -> Iterator[tuple[int, ProfileRow]]:
        """Profile rows whose partition token is in (start_token, end_token], in token order, with their token;
        merged and erased ones included."""
        # Streamed: each page is fetched (its driver errors translated) when the caller reaches it.
        rows = self._session.iterate(
            "SELECT token(person_id), person_id, merged_into, merged_person_ids, erased, update_time "
            "FROM profiles WHERE token(person_id) > ? AND token(person_id) <= ?", (start_token, end_token),
            fetch_size=page_size, tuples=True)
        for token, person_id, merged_into, merged_person_ids, erased, update_time in rows:
            yield token, ProfileRow(person_id, merged_into or "", sorted(merged_person_ids or ()), bool(erased),
                                    utc(update_time) if update_time else None)

    # ---- moving rows between persons --------------------------------------------------------------

    def move_events(self, moves: Sequence[tuple[TimelineEvent, str]]) -> None:
        """Move each event's timeline row and trait writes to the given person."""
        if not moves:
            return
        sources = {e.person_id for e, _ in moves}
        trait_rows: dict[str, list[Any]] = {}
        for source in sources:
            trait_rows[source] = self._session.rows(_SELECT_TRAITS, ([source],))
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
            for future in futures for row in self._session.rows_of(self._session.result(future))
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
        """`loser` (a person or one merged into it before, whose rows moved to `winner`) redirects to `winner`,
        which lists it. The loser lists nobody any more: the winner lists them all. Were its list kept, a split
        that later gave the loser its own rows back would hand it the persons it had absorbed too, wherever
        identity put them (their rows counted twice, erased with it)."""
        self._session.execute("UPDATE profiles SET merged_into = ?, merged_person_ids = null, update_time = ? "
                              "WHERE person_id = ?", (winner, now, loser))
        self._session.execute("UPDATE profiles SET merged_person_ids = merged_person_ids + ?, update_time = ? "
                              "WHERE person_id = ?", ({loser}, now, winner))

    def mark_split(self, person_ids: Sequence[str], now: datetime) -> None:
        """The persons of a split own their rows again: none redirects, none counts another of them as merged,
        and each lists only persons that still redirect to it (rows written before mark_merged cleared a loser's
        list may name persons merged elsewhere since)."""
        split = set(person_ids)
        rows = self.profile_rows(person_ids)
        listed = {m for row in rows.values() for m in row.merged_person_ids} - split
        redirects = {person_id: row.merged_into for person_id, row in self.profile_rows(sorted(listed)).items()}
        # Removed, not overwritten: a merge applied at ingest meanwhile may add to a list.
        futures = [self._session.execute_async(
            "UPDATE profiles SET merged_into = null, merged_person_ids = merged_person_ids - ?, update_time = ? "
            "WHERE person_id = ?",
            ((split - {p}) | {m for m in (rows[p].merged_person_ids if p in rows else ()) if redirects.get(m) != p},
             now, p)) for p in person_ids]
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


class _PartitionReads:
    """Reads of person partitions in flight: each partition's months and trait writes are requested once,
    as soon as the partition is known (in IN lists); `finish` then reads the timelines, one query for the
    partitions that have the same months (few distinct sets when a selection bounds the time)."""

    def __init__(self, session: CassandraSession, *, events: bool, traits: bool,
                 selection: EventSelection = ALL_EVENTS, trait_names: Iterable[str] | None = None,
                 records_only: bool = False) -> None:
        self._session = session
        self._events = events
        self._records_only = records_only
        self._traits = traits
        self._selection = selection
        self._trait_names = None if trait_names is None else sorted(set(trait_names))
        self._started: set[str] = set()
        self._months: list[PendingRows] = []
        self._trait_rows: list[PendingRows] = []

    def start(self, partitions: Iterable[str]) -> None:
        new = [p for p in dict.fromkeys(partitions) if p not in self._started]
        self._started.update(new)
        if self._events and new:
            first, last = self._months_selected()
            self._months.append(self._session.select_in(_SELECT_MONTHS_BETWEEN, (first, last), new, tuples=True)
                                if self._selection.bounded
                                else self._session.select_in(_SELECT_MONTHS, (), new, tuples=True))
        if self._traits and new and self._trait_names != []:
            if self._trait_names is None:
                self._trait_rows.append(self._session.select_in(_SELECT_TRAITS, (), new))
            else:
                self._trait_rows.append(self._session.select_in(_SELECT_NAMED_TRAITS, (self._trait_names,), new))

    def start_range(self, token_range: tuple[int, int], partitions: Iterable[str]) -> None:
        """Like `start`, for `partitions` that are those wanted of the token range (start, end]: one range read
        per table. Rows of other partitions in the range are left out."""
        self._started.update(partitions)
        if self._events:
            self._months.append(self._session.start_reads(
                _RANGE_MONTHS, [(*token_range, *self._months_selected())], limited=False, tuples=True))
        if self._traits and self._trait_names != []:
            cql, params = ((_RANGE_TRAITS, token_range) if self._trait_names is None
                           else (_RANGE_NAMED_TRAITS, (*token_range, self._trait_names)))
            self._trait_rows.append(self._session.start_reads(cql, [params], limited=False))

    def _months_selected(self) -> tuple[int, int]:
        """The first and last month that can hold selected events."""
        start, end = self._selection.start, self._selection.end
        return bucket_of(start) if start else 0, bucket_of(end) if end else _LAST_BUCKET

    def finish(self) -> tuple[dict[str, list[StoredEventRecord]], dict[str, list[Any]]]:
        """Each partition's selected events (in no particular order) and its trait write rows."""
        # A partition read both by range and by name (merged into a person of the same range) counts once.
        months: dict[str, set[int]] = {}
        started = self._started
        for person_id, bucket in (row for pending in self._months for row in pending.rows()):  # tuples
            if person_id in started:
                months.setdefault(person_id, set()).add(bucket)
        same_months: dict[tuple[int, ...], list[str]] = {}
        for partition, of_partition in months.items():
            same_months.setdefault(tuple(sorted(of_partition)), []).append(partition)
        cql, bounds, names = _timeline_query(self._selection,
                                             _STORED_EVENT_COLUMNS if self._records_only else _TIMELINE_COLUMNS)
        timelines = []
        if self._selection.names != frozenset():  # no name selected: no event to read
            for buckets, partitions in same_months.items():
                per_statement = max(1, TIMELINE_PARTITIONS // len(buckets))
                timelines.append(self._session.start_reads(
                    cql, [(*bounds, list(buckets), partitions[i:i + per_statement], *names)
                          for i in range(0, len(partitions), per_statement)], tuples=self._records_only))
        # Records are read as tuples (_STORED_EVENT_COLUMNS in order): a scan reads thousands.
        event_of = _stored_event_record if self._records_only else _timeline_event
        events: dict[str, list[StoredEventRecord]] = {}
        for row in (row for pending in timelines for row in pending.rows()):
            listed = events.get(row[0])  # person_id, first in both column lists
            if listed is None:
                listed = events[row[0]] = []
            listed.append(event_of(row))
        trait_rows: dict[str, list[Any]] = {}
        for row in (row for pending in self._trait_rows for row in pending.rows()):
            if row.person_id in self._started:
                trait_rows.setdefault(row.person_id, []).append(row)  # one read twice: _latest_traits keeps one
        return events, trait_rows


def _timeline_query(selection: EventSelection, columns: str
                    ) -> tuple[str, tuple[datetime, ...], tuple[list[str], ...]]:
    """The timeline read of `columns` within `selection`'s time bounds (widened by a millisecond: see
    _MILLISECOND) and of its names: the statement, the bounds bound before the months and the person
    ids, and what is bound after them (the names, when selected).

    Names are filtered by Cassandra (`event_name IN ? ALLOW FILTERING`, within the partitions named):
    the replica still reads every row of the months, but sends and the driver builds only the events
    selected. A rule about orders, over persons with thousands of page views each, would otherwise
    decode thousands of rows in this process for a handful it keeps: building rows is most of what a
    scan costs here."""
    clauses, bounds = [], []
    if selection.start is not None:
        clauses.append("event_time >= ?")
        bounds.append(selection.start - _MILLISECOND)
    if selection.end is not None:
        clauses.append("event_time < ?")
        bounds.append(selection.end + _MILLISECOND)
    clauses += ["bucket IN ?", "person_id IN ?"]
    if selection.names is None:
        return f"SELECT {columns} FROM timeline WHERE {' AND '.join(clauses)}", tuple(bounds), ()
    clauses.append("event_name IN ?")
    return (f"SELECT {columns} FROM timeline WHERE {' AND '.join(clauses)} ALLOW FILTERING", tuple(bounds),
            (sorted(selection.names),))


def _profile_rows(pending: PendingRows) -> dict[str, ProfileRow]:
    return {row.person_id: _profile_row(row) for row in pending.rows()}


def _newest_first(events: Mapping[str, list[StoredEventRecord]],
                  partitions: Sequence[str]) -> list[StoredEventRecord]:
    if len(partitions) == 1:  # most persons: their own partition alone
        merged = list(events.get(partitions[0], ()))
    else:
        merged = [e for p in partitions for e in events.get(p, ())]
    if len(merged) > 1:
        merged.sort(key=_TIME_ORDER, reverse=True)
    return merged


_TIME_ORDER = attrgetter("event_time", "message_id")


def _naive_cutoff(as_of: datetime | None) -> datetime | None:
    """`as_of` as the driver reads timestamps (naive UTC), to compare rows with rather than convert every row."""
    return as_of.astimezone(UTC).replace(tzinfo=None) if as_of is not None else None


def _latest_traits(rows_of: Mapping[str, list[Any]], partitions: Sequence[str],
                   cutoff: datetime | None = None) -> dict[str, TraitValue]:
    """The traits as of the naive `cutoff` (see _naive_cutoff; now when None): per name, the latest write by event
    time at or before it across the partitions (a null deletes). Trait writes keep milliseconds, so that is what
    is compared."""
    if not rows_of:  # no trait read (a scan of events alone), or none stored
        return {}
    latest: dict[str, Any] = {}
    for partition in partitions:
        for row in rows_of.get(partition, ()):
            if cutoff is not None and row.event_time > cutoff:
                continue
            known = latest.get(row.name)
            if known is None or (row.event_time, row.message_id) > (known.event_time, known.message_id):
                latest[row.name] = row
    return {name: TraitValue(name, json.loads(row.value), utc(row.event_time), row.source or "", row.party or 0)
            for name, row in sorted(latest.items()) if not row.deleted}


def partitions_of(person_id: str, row: ProfileRow | None) -> list[str]:
    """The person id and those merged into it, per its profile row: whose rows make up its profile.

    The merged ids are this service's own record of the merges it applied (at ingest, or from the
    identity feed), not identity's list: after a split identity may still name a person that owns its
    rows again.
    """
    merged = row.merged_person_ids if row else []
    if not merged:  # most persons
        return [person_id]
    return [person_id, *dict.fromkeys(m for m in merged if m != person_id)]


def _profile_row(row: Any) -> ProfileRow:
    return ProfileRow(row.person_id, row.merged_into or "", sorted(row.merged_person_ids or ()), bool(row.erased),
                      utc(row.update_time) if row.update_time else None)


def _event_time(row: Any) -> datetime:
    return from_micros(row.event_micros) if row.event_micros is not None else utc(row.event_time)


def _stored_event_record(row: tuple[Any, ...]) -> StoredEventRecord:
    """A record of a timeline row read as a tuple of _STORED_EVENT_COLUMNS: `StoredEventRecord(...)`, its fields
    set as the frozen dataclass's __init__ sets them (into the instance's __dict__, in field order), without its
    object.__setattr__ call per field, which cost more than the rest of making the record (a scan makes one per
    event)."""
    person_id, event_time, message_id, exact, event_name, payload, receive_time = row
    record = _new_object(StoredEventRecord)
    record.__dict__.update(
        message_id=message_id, person_id=person_id, event_name=event_name,
        event_time=from_micros(exact) if exact is not None else utc(event_time), payload=payload or b"",
        receive_time=utc(receive_time) if receive_time else None)
    return record


_new_object = object.__new__


def _timeline_event(row: Any) -> TimelineEvent:
    return TimelineEvent(
        message_id=row.message_id, person_id=row.person_id, event_type=row.event_type, event_name=row.event_name,
        event_time=_event_time(row),
        order_id=row.order_id or "", amount=row.amount,
        currency_code=row.currency_code or "", item_count=row.item_count or 0,
        categories=dict(row.categories or {}), brands=dict(row.brands or {}), payload=row.payload or b"",
        receive_time=utc(row.receive_time) if row.receive_time else None)
