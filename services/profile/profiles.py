"""The profile service's domain: ingest events, read profiles, follow identity merges, splits and erasures.

A profile is derived on read from what is stored under a person: the timeline, the trait writes,
and the rows of persons merged into it. Identity decides who is who; this module keeps the stored
rows where identity says they belong:
- ingest resolves each event's identifiers through identity (batched), applies the merges identity
  reports at once (so a read right after sees the merged profile), and stores the event under the
  person it now belongs to;
- `follow_identity` applies the identity change feed: merges move the losers' rows to the winner,
  splits re-resolve every event of the split person and move those that now belong elsewhere,
  erasures delete everything. Each step is idempotent, so replaying the feed is harmless.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import cast

from services.profile.computed import ComputedTraits, LifecyclePolicy, compute
from services.profile.identity import IdentityResolver, Observation, PersonView, Resolution
from services.profile.model import (
    ChangeType,
    Event,
    EventResult,
    EventStatus,
    EventType,
    Rejection,
    RejectionReason,
    StoredEventRecord,
    TimelineEvent,
    TraitValue,
    TraitWrite,
    unused_parts,
    validate,
)
from services.profile.store import (
    ALL_EVENTS,
    EventSelection,
    ProfileRow,
    ProfileStore,
    partition_token,
    partitions_of,
)
from shared.changefeed import ChangeFeed
from shared.config import DEFAULT_REPORTING_CURRENCY
from shared.event_times import EARLIEST_EVENT_TIME, MAX_FUTURE_SKEW

log = logging.getLogger(__name__)

FEED_COLUMNS = ("person_id", "change_type", "trait_names", "event_names", "merged_person_ids")
IDENTITY_FEED = "identity"
DEFAULT_POLICY = LifecyclePolicy()
_ONE_MICROSECOND = timedelta(microseconds=1)
# The first window a page of events is looked for in, below its upper bound (a month: a timeline's partition).
_FIRST_PAGE_WINDOW = timedelta(days=31)
# onecdp.identity.v1.IdentityChangeType values.
IDENTITY_MERGE, IDENTITY_SPLIT, IDENTITY_ERASE = 1, 2, 3


@dataclass(frozen=True)
class ProfileChange:
    cursor: str
    person_id: str
    change_time: datetime
    change_type: ChangeType
    trait_names: list[str]
    event_names: list[str]
    merged_person_ids: list[str]


@dataclass
class ProfileView:
    """A person's profile as read: what the gRPC Profile message shows."""

    person_id: str
    identifiers: list[tuple[str, str]]
    traits: dict[str, TraitValue]
    computed: ComputedTraits | None
    events: list[StoredEventRecord]
    merged_person_ids: list[str]
    update_time: datetime | None


@dataclass
class _PersonChanges:
    trait_names: set[str] = field(default_factory=set)
    event_names: set[str] = field(default_factory=set)


class Profiles:
    def __init__(self, store: ProfileStore, identity: IdentityResolver, feed: ChangeFeed,
                 policy: LifecyclePolicy = DEFAULT_POLICY,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC), *,
                 reporting_currency: str = DEFAULT_REPORTING_CURRENCY) -> None:
        self.store = store
        self.identity = identity
        self.feed = feed
        self.policy = policy
        # The currency computed money traits add up (PROFILE_REPORTING_CURRENCY); others are reported apart.
        self.reporting_currency = reporting_currency
        self._clock = clock

    # ---- ingestion --------------------------------------------------------------------------------

    def ingest(self, events: Sequence[Event]) -> list[EventResult]:
        """Store a batch of events; one result per event, in order. Rejected events write nothing."""
        now = self._clock()
        results: list[EventResult | None] = [None] * len(events)
        first_of: dict[str, int] = {}
        for index, event in enumerate(events):
            rejection = validate(event, now)
            if rejection is not None:
                results[index] = _rejected(event, rejection)
            elif event.message_id in first_of:
                results[index] = EventResult(event.message_id, EventStatus.DUPLICATE)
            else:
                first_of[event.message_id] = index
        stored = self.store.stored_events(first_of)
        for message_id, ref in stored.items():
            results[first_of[message_id]] = EventResult(message_id, EventStatus.DUPLICATE, ref.person_id)
        pending = [i for m, i in first_of.items() if m not in stored]
        resolutions = self.identity.resolve([_observation(events[i]) for i in pending])
        accepted: list[tuple[Event, str]] = []
        merges: dict[str, set[str]] = {}
        for index, resolution in zip(pending, resolutions, strict=True):
            event = events[index]
            rejection = _identity_rejection(resolution)
            if rejection is not None:
                results[index] = _rejected(event, rejection)
                continue
            accepted.append((event, resolution.person_id))
            if resolution.merged_person_ids:
                merges.setdefault(resolution.person_id, set()).update(resolution.merged_person_ids)
            results[index] = EventResult(event.message_id, EventStatus.ACCEPTED, resolution.person_id,
                                         note=unused_parts(event))
        for winner, losers in sorted(merges.items()):
            self.apply_merge(winner, sorted(losers))
        if accepted:
            self.store.write_events(accepted, now)
            self._record_ingest(accepted)
        # A repeat within the batch shares the fate of the event it repeats: its person, or its rejection.
        first = {m: results[i] for m, i in first_of.items()}
        final = []
        for event, result in zip(events, results, strict=True):
            original = first.get(event.message_id)
            if result is not None and (result.status != EventStatus.DUPLICATE or result.person_id):
                final.append(result)
            elif original is not None and original.status == EventStatus.REJECTED:
                final.append(original)
            else:
                final.append(EventResult(event.message_id, EventStatus.DUPLICATE,
                                         original.person_id if original is not None else ""))
        return final

    def _record_ingest(self, accepted: Sequence[tuple[Event, str]]) -> None:
        changes: dict[str, _PersonChanges] = {}
        for event, person_id in accepted:
            change = changes.setdefault(person_id, _PersonChanges())
            change.event_names.add(event.name)
            if event.event_type == EventType.IDENTIFY:
                change.trait_names.update(event.traits)
        self.feed.record_many([(person_id, int(ChangeType.EVENTS), sorted(change.trait_names),
                                sorted(change.event_names), []) for person_id, change in sorted(changes.items())])

    def write_traits(self, writes: Sequence[TraitWrite]) -> int:
        now = self._clock()
        written = self.store.write_traits(writes, now)
        self.feed.record_many([(w.person_id, int(ChangeType.TRAITS), sorted(w.traits), [], []) for w in writes])
        return written

    # ---- reading ----------------------------------------------------------------------------------

    def person(self, person_id: str = "", identifier: tuple[str, str] | None = None) -> PersonView:
        """The person (the survivor of merges) by id or identifier; NotFound when nobody matches."""
        return self.identity.person(person_id, identifier)

    def partitions(self, person_id: str) -> list[str]:
        """Every person id whose rows make up this person's profile, itself first (see `partitions_of`)."""
        return partitions_of(person_id, self.store.profile_row(person_id))

    def view(self, person: PersonView, as_of: datetime | None, *, with_events: bool = True,
             with_traits: bool = True, with_computed: bool = True) -> ProfileView:
        return self.views([person], as_of, with_events=with_events, with_traits=with_traits,
                          with_computed=with_computed)[0]

    def views(self, persons: Sequence[PersonView], as_of: datetime | None, *, with_events: bool = True,
              with_traits: bool = True, with_computed: bool = True,
              rows: dict[str, ProfileRow] | None = None, selection: EventSelection = ALL_EVENTS,
              trait_names: Iterable[str] | None = None, token_range: tuple[int, int] | None = None,
              records_only: bool = False, owned_only: bool = False) -> list[ProfileView]:
        """The profiles of many persons, read together (see `ProfileStore.read_persons`).

        `with_events` reads the timelines (needed for computed traits too), `with_computed` derives
        the computed traits, `with_traits` reads the trait writes (those in `trait_names`, all when None);
        skip what the caller does not ask for. The events of a view are those `selection` selects, unless
        computed traits are asked for: they derive from every event, so then all are read and returned.
        `as_of` (None: now) cuts off the computed traits' events and the trait writes after it.
        `records_only` (without computed traits) reads the events as StoredEventRecords: fewer columns.
        `owned_only` leaves out the persons without a profile of their own (no profile row, merged, erased).
        """
        records_only = records_only and not with_computed
        contents = self.store.read_persons([p.person_id for p in persons], events=with_events or with_computed,
                                           traits=with_traits, rows=rows,
                                           selection=ALL_EVENTS if with_computed else selection,
                                           trait_names=trait_names, token_range=token_range, traits_as_of=as_of,
                                           records_only=records_only)
        when = as_of or self._clock()
        return [ProfileView(
            person_id=person.person_id, identifiers=person.identifiers, traits=stored.traits,
            # Computed traits are never read as records only: the events are TimelineEvents then.
            computed=compute(cast(list[TimelineEvent], stored.events), when, self.policy,
                             self.reporting_currency) if with_computed else None,
            events=stored.events if with_events else [], merged_person_ids=stored.partitions[1:],
            update_time=stored.row.update_time if stored.row else None)
            for person, stored in zip(persons, contents, strict=True)
            if not owned_only or (stored.row is not None and not (stored.row.merged_into or stored.row.erased))]

    def events_page(self, person: PersonView, start: datetime | None, end: datetime | None, *,
                    names: Sequence[str], after: tuple[datetime, str] | None, page_size: int,
                    ) -> tuple[list[StoredEventRecord], tuple[datetime, str] | None]:
        """A page of the person's events, newest first, and where the next page starts (None at the end).

        Read in a window below the page's upper bound (the cursor, or `end`) that widens fourfold until it holds
        more than a page or reaches `start`: a page costs the months it needs, not the whole timeline (paging a
        person of 100,000 events read them all for every page). The window's events are newer than any below
        it, so its newest `page_size` are the page.
        """
        upper = end
        if after is not None:
            past_cursor = after[0] + _ONE_MICROSECOND  # the cursor's own instant may hold older message ids
            upper = past_cursor if upper is None else min(upper, past_cursor)
        floor = max(start, EARLIEST_EVENT_TIME) if start is not None else EARLIEST_EVENT_TIME
        top = upper if upper is not None else self._clock() + MAX_FUTURE_SKEW
        span = _FIRST_PAGE_WINDOW
        wanted = frozenset(names)
        while True:
            lower = max(floor, top - span) if top - floor > span else floor
            selection = EventSelection(lower if lower > floor or start is not None else None, upper, wanted or None)
            stored = self.store.read_persons([person.person_id], events=True, traits=False, selection=selection)[0]
            selected = [e for e in stored.events if selection.selects(e)
                        and (after is None or (e.event_time, e.message_id) < after)]
            if len(selected) > page_size or lower == floor:
                break
            span *= 4
        page = selected[:page_size]
        following = (page[-1].event_time, page[-1].message_id) if len(selected) > page_size else None
        return page, following

    def scan(self, start_token: int, end_token: int, as_of: datetime | None, batch_size: int, *,
             with_events: bool = True, with_traits: bool = True, with_computed: bool = True,
             selection: EventSelection = ALL_EVENTS, trait_names: Iterable[str] | None = None,
             person_ids: Sequence[str] | None = None) -> Iterator[list[ProfileView]]:
        """The profiles of the token range (start_token, end_token], in batches (read as `views` reads them);
        persons merged into others and erased ones are skipped. With `person_ids`, only those of these persons
        that are in the range, each once, in token order: ids outside it, and ids without a profile of their
        own (never stored, merged, erased) are skipped.

        A batch is the persons of a token range of its own, so their months and trait writes are read by
        range; it ends where the token changes, so that persons sharing a token share a batch. Persons named
        by id are read by id (IN lists): no identity call, since an id stands for itself (the rows this
        service keeps say whether it has a profile of its own), and their tokens are computed here, so that
        their profile rows are read together with their months and trait writes.
        """
        def scanned(rows: Sequence[ProfileRow], token_range: tuple[int, int]) -> list[ProfileView]:
            return self.views([PersonView(r.person_id, [], []) for r in rows], as_of, with_events=with_events,
                              with_traits=with_traits, with_computed=with_computed,
                              rows={r.person_id: r for r in rows}, selection=selection, trait_names=trait_names,
                              token_range=token_range, records_only=True)

        if person_ids is not None:
            tokens = {p: partition_token(p) for p in person_ids}
            named = sorted((p for p, token in tokens.items() if start_token < token <= end_token),
                           key=lambda p: (tokens[p], p))
            for start in range(0, len(named), batch_size):
                views = self.views([PersonView(p, [], []) for p in named[start:start + batch_size]], as_of,
                                   with_events=with_events, with_traits=with_traits, with_computed=with_computed,
                                   selection=selection, trait_names=trait_names, records_only=True, owned_only=True)
                if views:
                    yield views
            return
        batch: list[ProfileRow] = []
        first = last = start_token
        for token, row in self.store.scan(start_token, end_token, batch_size):
            if len(batch) >= batch_size and token != last:
                yield scanned(batch, (first, last))
                batch, first = [], last
            if not (row.merged_into or row.erased):
                batch.append(row)
                last = token
        if batch:
            yield scanned(batch, (first, end_token))

    # ---- following identity -----------------------------------------------------------------------

    def apply_merge(self, winner: str, losers: Sequence[str]) -> None:
        """Move the losers' rows (and those of persons merged into them before) to the winner."""
        now = self._clock()
        moved: list[str] = []
        for loser in losers:
            if loser == winner:
                continue
            partitions = self.partitions(loser)
            self.store.move_events([(e, winner) for e in self.store.timeline(partitions)])
            self.store.move_direct_traits([(w, winner) for w in self.store.direct_trait_writes(partitions)])
            for partition in partitions:
                self.store.mark_merged(partition, winner, now)
                moved.append(partition)
        if moved:
            self._record(winner, ChangeType.MERGE, merged_person_ids=moved)

    def apply_split(self, source: str, results: Sequence[str]) -> None:
        """Re-resolve every event and trait write stored under `source`; move those identity now gives to
        someone else.

        An event goes to the person of its identifiers (as at ingest). A BatchWriteTraits write goes to
        whoever holds the identifier it was written for, or, written by person id alone, to the person
        that id resolves to now (itself when the split kept or restored it); it stays where it is when
        identity knows neither any more.
        """
        partitions = self.partitions(source)
        events = self.store.timeline(partitions)
        refs = self.store.stored_events(e.message_id for e in events)
        observations = [Observation(e.message_id, tuple(refs[e.message_id].identifiers)) for e in events
                        if e.message_id in refs]
        targets = {o.message_id: r.person_id
                   for o, r in zip(observations, self.identity.resolve(observations), strict=True)}
        self.store.move_events([(e, targets.get(e.message_id) or source) for e in events])
        writes = self.store.direct_trait_writes(partitions)
        selectors = list(dict.fromkeys(w.origin.selector for w in writes))
        holders = {s: p.person_id for s, p in zip(selectors, self.identity.lookup(selectors), strict=True) if p}
        self.store.move_direct_traits([(w, holders.get(w.origin.selector, w.person_id)) for w in writes])
        persons = list(dict.fromkeys([source, *results]))
        self.store.mark_split(persons, self._clock())
        for person_id in persons:
            self._record(person_id, ChangeType.SPLIT)

    def apply_erase(self, person_id: str) -> int:
        partitions = self.partitions(person_id)
        erased = self.store.erase(partitions, self._clock())
        self._record(person_id, ChangeType.ERASE)
        return erased

    def follow_identity(self, limit: int = 500, still_leading: Callable[[], bool] = lambda: True) -> int:
        """Apply the next page of identity changes; returns how many were applied.

        `still_leading` is asked before each change: once it says no (another replica took the
        follower lease), the rest of the page is left to that replica. The position is saved after
        each change, so a replica taking over re-applies at most the change in progress (each is
        idempotent).
        """
        cursor = self.store.feed_position(IDENTITY_FEED)
        changes, next_cursor = self.identity.changes(cursor, limit)
        for applied, change in enumerate(changes):
            if not still_leading():
                return applied
            if change.change_type == IDENTITY_MERGE and change.result_person_ids:
                winner = change.result_person_ids[0]
                self.apply_merge(winner, [p for p in change.source_person_ids if p != winner])
            elif change.change_type == IDENTITY_SPLIT and change.source_person_ids:
                self.apply_split(change.source_person_ids[0], change.result_person_ids)
            elif change.change_type == IDENTITY_ERASE:
                for person_id in change.source_person_ids:
                    self.apply_erase(person_id)
            self.store.save_feed_position(IDENTITY_FEED, change.cursor, self._clock())
        if next_cursor and next_cursor != cursor:
            self.store.save_feed_position(IDENTITY_FEED, next_cursor, self._clock())
        return len(changes)

    # ---- the profile change feed ------------------------------------------------------------------

    def _record(self, person_id: str, change_type: ChangeType, *, trait_names: set[str] | None = None,
                event_names: set[str] | None = None, merged_person_ids: Sequence[str] = ()) -> None:
        self.feed.record((person_id, int(change_type), sorted(trait_names or ()), sorted(event_names or ()),
                          list(merged_person_ids)))

    def changes(self, after: uuid.UUID | None, limit: int) -> tuple[list[ProfileChange], uuid.UUID]:
        entries, cursor = self.feed.read(after, limit)
        return [ProfileChange(str(e.change_id), e.row.person_id, e.change_time, ChangeType(e.row.change_type),
                              list(e.row.trait_names or ()), list(e.row.event_names or ()),
                              list(e.row.merged_person_ids or ())) for e in entries], cursor


def _observation(event: Event) -> Observation:
    return Observation(event.message_id, event.identifiers, event.source, event.source_kind, event.event_time)


def _rejected(event: Event, rejection: Rejection) -> EventResult:
    return EventResult(event.message_id, EventStatus.REJECTED, rejection=rejection)


def _identity_rejection(resolution: Resolution) -> Rejection | None:
    if resolution.invalid:
        return Rejection(RejectionReason.INVALID_IDENTIFIER, resolution.invalid)
    # Privacy first: an event naming an erased identifier is not stored, even when another of its
    # identifiers would give it a person, since it would bring the erased person's behaviour back.
    if resolution.erased:
        return Rejection(RejectionReason.ERASED_IDENTIFIER,
                         "an identifier of the event was erased by a privacy request; it is not stored again")
    if resolution.message_id_taken:
        return Rejection(RejectionReason.BAD_MESSAGE_ID,
                         "the identity service already holds an observation of other identifiers under this "
                         "message_id (a LinkIdentifiers call used it); give every event a message_id of its own")
    if resolution.person_id:
        return None
    return Rejection(RejectionReason.MISSING_IDENTIFIER,
                     "no usable identifier: every identifier is a blocked junk value or was erased")

