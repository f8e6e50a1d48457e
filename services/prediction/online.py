"""The online path: persons' histories kept near the model, current through profile's change feed.

Reading one person through profile (BatchGetProfiles: an identity lookup, then the timeline reads)
costs 10-15 ms on this machine when it is quiet and several times that under load: far more than
the features and the booster together (well under a millisecond). Serving systems keep an online
copy of what scoring reads next to the model; `OnlineHistories` is ours. It keeps each history it
read from profile whole (every event, no time bound, so one entry answers any `as_of`: the cut at
`as_of` is made per score, by the same rule as everywhere else) and remembers which selector led to
which person. `ChangeFollower` reads profile's change feed and drops a person's entry, and the
selectors that led to it, when profile reports new events, a merge, a split or an erasure of them
(trait changes, such as written-back scores, do not touch a history). The next read of a dropped
person goes to profile again, and is kept.

Freshness: the follower reads the feed's unsettled tail too (shared.changefeed), so a change is
applied about one poll (0.2 s) after profile wrote it; the tail is read again until the settled
cursor passes it, and a change already applied is skipped (`UnsettledTail`), so an earlier-stamped
change that lands late is still applied. A score from the store therefore reflects every event
stored more than a poll before it; a person not read before, or changed since, is read from profile.
The store only answers while its follower is current (its last poll reached the end of the feed less
than `max_lag` ago); otherwise, e.g. while profile's feed cannot be read, every read goes to profile
as if there were no store.

Erasures, merges and splits start in identity: profile answers NOT_FOUND for an erased person at once
(it asks identity), but applies the erasure to its rows, and reports it in its feed, only once its own
follower of identity's feed has read it, which reads settled changes only (shared.changefeed's
SETTLE_SECONDS, 1 s) every 0.5 s: the store would keep scoring an erased person for 1-1.5 s. A second
ChangeFollower therefore reads identity's feed (unsettled tail too) and drops the persons of each
identity change about one poll (0.2 s) after identity recorded it, which it does once the person can
no longer be looked up: the next read goes to profile and gets NOT_FOUND. The store's currency still
follows profile's feed alone (`keeps_current=False` for identity's): while identity's feed cannot be
read, profile's reads, which ask identity, cannot be made either, and an erasure then reaches the store
through profile's feed, as before.

A read that was in flight when a change for its person was applied is not kept (its answer may
predate the change). Entries are evicted least recently used beyond a budget of events.

The kept histories' columns live in one table (`history_table.py`): a batch whose persons are all kept
is laid out for the feature function by one gather, with no step per person besides its selector's
dictionary lookup (in a C loop).
"""

from __future__ import annotations

import enum
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import repeat
from typing import Protocol, cast

import numpy as np

from services.prediction.history import (
    HistoryReader,
    PendingHistories,
    PersonHistory,
    PersonRef,
    ReadRuns,
    ReadsByStarting,
    RefsByPersonId,
)
from services.prediction.history_table import HistoryTable
from shared.changefeed import UnsettledTail, parse_cursor, with_unsettled
from shared.errors import DomainError
from shared.polling import RepeatingWorker

# About 350-450 bytes an event in memory (measured: ~200 for the history's columns and the store's table, which keeps
# room to grow, plus the event objects): ~200 MB at most, well inside the deployment's memory limit.
MAX_CACHED_EVENTS = 500_000
# The store answers only while the follower reached the end of the feed this recently.
MAX_FOLLOWER_LAG_SECONDS = 5.0
# Applied change batches remembered for reads in flight (far more than a read's timeout at any poll rate).
REMEMBERED_BATCHES = 1024
FEED_PAGE = 1000
POLL_SECONDS = 0.2
# The follower starts this far before its start time: harmless (nothing is kept yet), and it absorbs
# clock skew between this host and profile's.
START_MARGIN = timedelta(minutes=1)


class ChangeKind(enum.Enum):
    EVENTS = "events"
    TRAITS = "traits"
    MERGE = "merge"
    SPLIT = "split"
    ERASE = "erase"


@dataclass(frozen=True)
class HistoryChange:
    """A change of a person in profile: its id in the feed, what kind, and for merges the persons merged
    into them."""

    change_id: uuid.UUID
    person_id: str
    kind: ChangeKind
    merged_person_ids: tuple[str, ...] = ()


class ProfileChangeFeed(Protocol):
    """Profile's change feed (the profile service's ListProfileChanges in production)."""

    def cursor_at(self, time: datetime) -> str:
        """A cursor before every change stored at or after `time`."""
        ...

    def changes(self, cursor: str, limit: int) -> tuple[list[HistoryChange], str]:
        """Up to `limit` changes after `cursor`, oldest first, and the cursor to continue from (a cursor made
        with `with_unsettled` also returns the unsettled ones, again on each read until settled)."""
        ...


@dataclass
class _Store:
    """The kept histories and what leads to them; guarded by OnlineHistories' lock."""

    table: HistoryTable = field(default_factory=HistoryTable)
    slot_of: dict[str, int] = field(default_factory=dict)  # person id -> table slot
    # Where the selectors of kept persons lead; those by person id also by the id alone (RefsByPersonId).
    slot_of_selector: dict[PersonRef, int] = field(default_factory=dict)
    slot_of_person_id: dict[str, int] = field(default_factory=dict)
    selectors_of: dict[str, set[PersonRef]] = field(default_factory=dict)
    # Batches of applied changes: (generation after the batch, persons it touched).
    generation: int = 0
    recent: deque[tuple[int, frozenset[str]]] = field(default_factory=lambda: deque(maxlen=REMEMBERED_BATCHES))


class OnlineHistories(ReadsByStarting):
    """A HistoryReader for scoring: histories from memory when current, from `source` (profile) otherwise."""

    def __init__(self, source: HistoryReader, *, max_events: int = MAX_CACHED_EVENTS,
                 max_lag_seconds: float = MAX_FOLLOWER_LAG_SECONDS,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._source = source
        self._max_events = max_events
        self._max_lag = max_lag_seconds
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._store = _Store()
        self._current_at = float("-inf")  # when the last poll that reached the feed's end started

    # ---- reads (HistoryReader) ------------------------------------------------------

    def is_current(self) -> bool:
        return self._monotonic() - self._current_at <= self._max_lag

    def start_histories_of(self, persons: Sequence[PersonRef], before: datetime | None) -> PendingHistories:
        if not self.is_current():
            return self._source.start_histories_of(persons, before)
        with self._lock:
            store = self._store
            generation = store.generation
            slots = list(map(store.slot_of_selector.get, persons))
            found: list[PersonHistory | None] = [None if slot is None else store.table.history(slot)
                                                 for slot in slots]
            store.table.touch(np.asarray([slot for slot in slots if slot is not None], dtype=np.int64))
        missing = [index for index, kept in enumerate(found) if kept is None]
        reading = self._source.start_histories_of([persons[i] for i in missing], None) if missing else None
        return _OnlineRead(self, persons, before, found, missing, reading, generation)

    def whole_runs_of(self, persons: Sequence[PersonRef], *, with_names: bool) -> ReadRuns:
        """From the table when every person is kept (one gather for the batch), otherwise as `histories_of`."""
        if persons and self.is_current():
            with self._lock:
                store = self._store
                # A batch of thousands costs a C loop here, not a Python step per person (-1: not kept).
                found = (map(store.slot_of_person_id.get, persons.person_ids, repeat(-1))
                         if isinstance(persons, RefsByPersonId)
                         else map(store.slot_of_selector.get, persons, repeat(-1)))
                slots = np.fromiter(found, dtype=np.int64, count=len(persons))
                if slots.min() >= 0:
                    store.table.touch(slots)
                    runs, person_ids = store.table.runs(slots, with_names=with_names)
                    return ReadRuns(runs, person_ids, np.arange(len(persons), dtype=np.int64), {}, len(persons))
        return ReadRuns.of(self.histories_of(persons, None), with_names=with_names)

    def keep(self, person: PersonRef, history: PersonHistory, generation: int) -> None:
        """Keep a whole history read from profile, unless a change of the person was applied since the read
        started (`generation`): then the answer may predate it."""
        _ = history.columns  # computed once, outside the lock, and kept with the history
        with self._lock:
            store = self._store
            if _changed_since(store, history.person_id, generation):
                return
            previous = store.slot_of.pop(history.person_id, None)
            if previous is not None:
                store.table.remove(previous)
            slot = store.table.add(history)
            store.slot_of[history.person_id] = slot
            selectors = store.selectors_of.setdefault(history.person_id, set())
            selectors.add(person)
            for selector in selectors:  # the person's selectors that led to the old slot lead to the new one
                if selector == person or store.slot_of_selector.get(selector) == previous:
                    _lead(store, selector, slot)
            while store.table.events > self._max_events:
                evicted = store.table.least_recently_used()
                if evicted is None:
                    break
                _drop(store, store.table.person_id(evicted))

    # ---- the follower's side -----------------------------------------------------------------------

    def apply(self, changes: Sequence[HistoryChange]) -> None:
        """Drop what the changes make stale."""
        touched: set[str] = set()
        with self._lock:
            store = self._store
            for change in changes:
                if change.kind is ChangeKind.TRAITS:
                    continue
                persons = {change.person_id, *change.merged_person_ids}
                touched |= persons
                for person_id in persons:
                    # After a merge, split or erasure a selector may lead elsewhere; after new events it is
                    # simply read again with the person.
                    _drop(store, person_id)
            if touched:
                store.generation += 1
                store.recent.append((store.generation, frozenset(touched)))

    def mark_current(self, poll_started: float) -> None:
        """The follower's poll that started at `poll_started` (monotonic) reached the end of the feed."""
        self._current_at = max(self._current_at, poll_started)

    def size(self) -> tuple[int, int]:
        """Persons and events held."""
        with self._lock:
            return self._store.table.persons, self._store.table.events


def _changed_since(store: _Store, person_id: str, generation: int) -> bool:
    if store.generation == generation:
        return False
    if not store.recent or store.recent[0][0] > generation + 1:
        return True  # batches after the read started were forgotten: assume the worst
    return any(after > generation and person_id in persons for after, persons in store.recent)


def _drop(store: _Store, person_id: str) -> None:
    """Forget the person's history, when kept, and every selector that led to them."""
    slot = store.slot_of.pop(person_id, None)
    if slot is not None:
        store.table.remove(slot)
    for selector in store.selectors_of.pop(person_id, ()):
        if store.slot_of_selector.get(selector) == slot:  # not when it leads to someone else by now
            del store.slot_of_selector[selector]
            if selector.person_id is not None:
                del store.slot_of_person_id[selector.person_id]


def _lead(store: _Store, selector: PersonRef, slot: int) -> None:
    store.slot_of_selector[selector] = slot
    if selector.person_id is not None:
        store.slot_of_person_id[selector.person_id] = slot


@dataclass
class _OnlineRead:
    """Histories partly from memory (`found`), partly on their way from profile (`reading`, for `missing`)."""

    histories: OnlineHistories
    persons: Sequence[PersonRef]
    before: datetime | None
    found: list[PersonHistory | None]  # in request order; None where missing
    missing: list[int]
    reading: PendingHistories | None
    generation: int

    def result(self) -> list[PersonHistory | DomainError]:
        """In request order, each history cut at `before`."""
        whole: list[PersonHistory | DomainError | None] = list(self.found)
        if self.reading is not None:
            for index, read in zip(self.missing, self.reading.result(), strict=True):
                if isinstance(read, PersonHistory):
                    self.histories.keep(self.persons[index], read, self.generation)
                whole[index] = read
        complete = cast(list[PersonHistory | DomainError], whole)
        if self.before is None:
            return complete
        before = self.before
        return [read if isinstance(read, DomainError) else read.before(before) for read in complete]


class ChangeFollower:
    """Background thread: applies profile's changes to an OnlineHistories and keeps it current."""

    def __init__(self, histories: OnlineHistories, feed: ProfileChangeFeed, *, poll_seconds: float = POLL_SECONDS,
                 error_backoff_seconds: float = 1.0, clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 monotonic: Callable[[], float] = time.monotonic, keeps_current: bool = True,
                 name: str = "prediction-history-follower",
                 failure_message: str = "following profile changes failed; scoring reads profile until it works "
                                        "again") -> None:
        """`keeps_current`: reaching the end of this feed keeps the store current (profile's feed); False for a
        feed that only brings changes sooner (identity's, see the module docstring)."""
        self._histories = histories
        self._feed = feed
        self._clock = clock
        self._monotonic = monotonic
        self._keeps_current = keeps_current
        self._cursor: str | None = None
        self._tail = UnsettledTail()
        # Reads go to profile while following fails, so failures are logged rarely and retried soon.
        self._worker = RepeatingWorker(
            name, lambda: self.follow_once() >= FEED_PAGE, idle_seconds=poll_seconds,
            error_backoff_seconds=error_backoff_seconds, max_backoff_seconds=10.0, log_every=60,
            failure_message=failure_message)

    def start(self) -> None:
        self._worker.start()

    def stop(self) -> None:
        self._worker.stop()

    def follow_once(self) -> int:
        """Apply the next page of changes; returns how many were read."""
        started = self._monotonic()
        if self._cursor is None:
            self._cursor = with_unsettled(self._feed.cursor_at(self._clock() - START_MARGIN))
        changes, following = self._feed.changes(self._cursor, FEED_PAGE)
        unapplied = set(self._tail.unapplied(c.change_id for c in changes))
        fresh = [c for c in changes if c.change_id in unapplied]
        self._histories.apply(fresh)
        self._tail.applied(c.change_id for c in fresh)
        if following != self._cursor:
            self._cursor = following
            settled = parse_cursor(following)
            if settled is not None:
                self._tail.settled_through(settled)
        if len(changes) < FEED_PAGE and self._keeps_current:
            self._histories.mark_current(started)
        return len(changes)
