"""What this process's recent lookups found, kept for the next ones.

Two uses, one memory:

- **Holder hints** (every lookup): the person an identifier was last found held by. A hint is never
  an answer: an exact lookup reads the hinted person (members and person columns in one request) and
  takes it only if that person, read now, lists the identifier. That is what a lookup through
  `identifiers` would have answered, in one round trip instead of two. A hint made stale by a merge,
  split, unlink or erasure (by any replica) fails that check, and the lookup reads `identifiers`.
- **Answers** (lookups that accept one up to `max_staleness` old): the persons lookups read, with the
  time their reads began. Such a lookup is answered from memory when the person its identifier (or
  person id) was last found in was read within `max_staleness` and still lists it (or the merged id),
  and from Cassandra otherwise. Any replica's answer therefore holds every change committed before
  its `read_time`, which is at most `max_staleness` before the call. This process's own changes
  (links, unlinks, erasures) drop the persons they touched at once, so its later lookups never answer
  from before them; those of other replicas are seen once the answer ages past the caller's bound.

Bounded: HOLDERS_SIZE hints (the oldest go first), persons holding at most IDENTIFIERS_HELD identifiers
in all (the persons read longest ago go first), and no answer older than MAX_STALENESS_SECONDS is kept.
Kept as plain tuples of strings and times, which Python's cycle collector stops tracking: a memory of
IdKey named tuples and dataclasses (hundreds of thousands of tracked objects) made each full collection
take 60-100 ms, every few seconds, with every request of the process waiting (the p99 of lookups).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, TypeAlias

from services.identity.partition import IdKey
from services.identity.person import Person

# The oldest answer a caller may accept: beyond it a replica would answer with what another replica's
# merge or erasure (a privacy request) undid long ago.
MAX_STALENESS_SECONDS = 60.0
# Identifiers and person ids whose last holder is remembered: about 250 bytes each.
HOLDERS_SIZE = 100_000
# Identifiers held by the persons remembered, all together (a person is kept once, however many of its
# identifiers were looked up): about 150 bytes each, so some 30 MB at most.
IDENTIFIERS_HELD = 200_000

Selected: TypeAlias = IdKey | str  # an identifier (normalized), or a person id as asked for


# A person remembered: (person_id, identifiers as (type, value) tuples, merged person ids, create_time,
# update_time, read_time, read_at: monotonic, when the reads it comes from began, the identifiers as a set:
# one tracked object a person, for membership without a scan).
_Remembered: TypeAlias = tuple[str, tuple[tuple[str, str], ...], tuple[str, ...], datetime | None, datetime | None,
                               datetime | None, float, frozenset[tuple[str, str]]]
_READ_AT: Final = 6
_MEMBERS: Final = 7


def _size(remembered: _Remembered) -> int:
    """What a person counts against IDENTIFIERS_HELD: its identifiers and merged ids (at least one)."""
    return max(1, len(remembered[1]) + len(remembered[2]))


def _answer(remembered: _Remembered, redirected_from: str = "") -> Person:
    person_id, identifiers, merged, create_time, update_time, read_time, _, _ = remembered
    return Person(person_id, [IdKey(*i) for i in identifiers], list(merged), redirected_from, create_time,
                  update_time, read_time)


@dataclass(frozen=True)
class Reading:
    """When a lookup's reads began (wall clock and monotonic), and the change count then (see RecentLookups)."""

    read_time: datetime
    read_at: float
    changes_seen: int


class RecentLookups:
    def __init__(self, *, holders_size: int = HOLDERS_SIZE, identifiers_held: int = IDENTIFIERS_HELD,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._holders_size = holders_size
        self._identifiers_held = identifiers_held
        self._clock = clock
        self._holders: dict[tuple[str, str] | str, str] = {}  # identifiers as plain (type, value) tuples
        # Oldest read first (re-read persons move to the end), so the oldest are at hand to drop.
        self._persons: dict[str, _Remembered] = {}
        self._held = 0
        # Counts the changes this process made: an answer read before one of them is not remembered after
        # it (the change may have dropped that person while the lookup was reading it).
        self._changes = 0
        self._lock = threading.Lock()

    def begin(self) -> Reading:
        """To be taken before a lookup's first read: what it reads holds every change committed before this."""
        with self._lock:
            changes = self._changes
        return Reading(datetime.now(UTC), self._clock(), changes)

    def hints(self, keys: Iterable[IdKey]) -> dict[IdKey, str]:
        """The person each identifier was last found held by, where one was."""
        with self._lock:
            return {key: person_id for key in keys if (person_id := self._holders.get(key))}

    def answers(self, selected: Iterable[Selected], max_staleness: float) -> dict[Selected, Person]:
        """The answers read at most `max_staleness` seconds ago, of those `selected` has.

        An identifier's answer is the person it was last found in, if that person's last read lists it;
        a person id's, the person it was last found as or redirected to, if that read names it."""
        oldest = self._clock() - max_staleness
        found: dict[Selected, _Remembered] = {}
        redirected: set[str] = set()
        with self._lock:
            for key in selected:
                person_id = self._holders.get(key)
                remembered = self._persons.get(person_id) if person_id else None
                if remembered is None or remembered[_READ_AT] < oldest:
                    continue
                if isinstance(key, str):
                    if key == person_id:
                        found[key] = remembered
                    elif key in remembered[2]:
                        found[key] = remembered
                        redirected.add(key)
                elif key in remembered[_MEMBERS]:  # an IdKey equals its (type, value) tuple
                    found[key] = remembered
        return {key: _answer(remembered, key if key in redirected else "")
                for key, remembered in found.items()}

    def remember(self, reading: Reading, answers: Mapping[Selected, Person]) -> None:
        """Keep what a lookup that began at `reading` found: each selector's holder, and the persons."""
        if not answers:
            return
        with self._lock:
            for key, person in answers.items():
                kept_key = key if isinstance(key, str) else (key.type, key.value)
                self._holders.pop(kept_key, None)  # re-inserted last: the oldest hints go first
                self._holders[kept_key] = person.person_id
            while len(self._holders) > self._holders_size:
                del self._holders[next(iter(self._holders))]
            if reading.changes_seen != self._changes:
                return
            for person in {p.person_id: p for p in answers.values()}.values():
                current = self._persons.get(person.person_id)
                if current is not None and current[_READ_AT] > reading.read_at:
                    continue
                self._drop(person.person_id)
                identifiers = tuple((i.type, i.value) for i in person.identifiers)
                remembered = (person.person_id, identifiers, tuple(person.merged_person_ids), person.create_time,
                              person.update_time, person.read_time, reading.read_at, frozenset(identifiers))
                self._persons[person.person_id] = remembered
                self._held += _size(remembered)
            oldest = self._clock() - MAX_STALENESS_SECONDS
            while self._persons:
                first = next(iter(self._persons.values()))
                if self._held <= self._identifiers_held and first[_READ_AT] >= oldest:
                    break
                self._drop(first[0])

    def forget_hints(self, keys: Iterable[IdKey]) -> None:
        with self._lock:
            for key in keys:
                self._holders.pop(key, None)

    def forget(self, person_ids: Iterable[str], keys: Iterable[IdKey] = ()) -> None:
        """After this process changed (or may have changed) these persons and identifiers: no answer that
        names them is given again. An identifier's answer is the person it was last found in, which may
        be an id merged away since (by another replica): that person is dropped too. A lookup that began
        reading before this is not remembered after it."""
        with self._lock:
            self._changes += 1
            for key in keys:
                holder = self._holders.get(key)
                if holder:
                    self._drop(holder)
            for person_id in person_ids:
                self._drop(person_id)

    def _drop(self, person_id: str) -> None:
        remembered = self._persons.pop(person_id, None)
        if remembered is not None:
            self._held -= _size(remembered)
