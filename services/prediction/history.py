"""A person's history as the prediction domain sees it, and the seam through which it arrives.

The domain never sees profile's messages: the adapter (`profile_source.py`) turns profile's stored
events and orders into `ActivityEvent`s, and tests use `InMemoryProfileSource`. Everything that
trains or scores takes a `ProfileSource`, so the same code runs on a laptop list and on a cluster scan.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property
from itertools import repeat
from operator import attrgetter
from typing import NamedTuple, Protocol, cast, overload

import numpy as np
import numpy.typing as npt

from shared.errors import DomainError, InvalidArgument, NotFound

# Transactions arrive as events of this name whose amount is the order amount.
ORDER_EVENT = "order"
_ONLY_SHARD = "all"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


@dataclass(frozen=True, slots=True)
class ActivityEvent:
    """One thing a person did: its name, when (timezone-aware), and for orders the amount."""

    name: str
    time: datetime
    amount: float | None = None
    category: str | None = None


class PersonRef(NamedTuple):
    """A person by id or by any identifier: exactly one of the two is set (the gRPC adapter checks selectors).

    A tuple on purpose: batches build one per requested person, and the online store keys its index by
    them, so construction, hashing and comparison run in C (a dataclass costs a Python call for each).
    """

    person_id: str | None = None
    identifier_type: str | None = None
    identifier_value: str | None = None


def person_not_found(person: PersonRef) -> NotFound:
    """NOT_FOUND for a selector no person answers to, naming it as identity and profile do."""
    if person.person_id is not None:
        return NotFound(f"no person {person.person_id!r} (never issued, or erased)", reason="PERSON_NOT_FOUND")
    return NotFound(f"no person holds {person.identifier_type} {person.identifier_value!r}",
                    reason="PERSON_NOT_FOUND", metadata={"identifier_type": person.identifier_type or ""})


def refs_by_person_id(person_ids: Iterable[str]) -> list[PersonRef]:
    """`PersonRef(person_id=...)` of each id, made in C: `tuple.__new__` builds the named tuple without calling
    its Python `__new__` (which costs as much as the rest of a person's lookup in the online store)."""
    make = cast(Callable[[type[PersonRef], tuple[str, None, None]], PersonRef], tuple.__new__)
    return list(map(make, repeat(PersonRef), zip(person_ids, repeat(None), repeat(None))))


class RefsByPersonId(Sequence[PersonRef]):
    """Selectors that are all person ids (a batch's usual form), kept as the ids: `PersonRef`s are only made when
    asked for, and the online store looks the ids up as they are (no tuple per person to build and hash)."""

    __slots__ = ("person_ids",)

    def __init__(self, person_ids: list[str]) -> None:
        self.person_ids = person_ids

    def __len__(self) -> int:
        return len(self.person_ids)

    @overload
    def __getitem__(self, index: int) -> PersonRef: ...

    @overload
    def __getitem__(self, index: slice) -> list[PersonRef]: ...

    def __getitem__(self, index: int | slice) -> PersonRef | list[PersonRef]:
        if isinstance(index, slice):
            return refs_by_person_id(self.person_ids[index])
        return PersonRef(person_id=self.person_ids[index])

    def __iter__(self) -> Iterator[PersonRef]:
        return iter(refs_by_person_id(self.person_ids))


# The rows of EventColumns.table (laid out as these in the online store's table too).
TABLE_ROWS = 4
_MICROS, _IS_ORDER, _AMOUNT_BITS, _CATEGORY = range(TABLE_ROWS)
# For batches: a history's table, and its size (rows times events), both by C calls.
_table_of = attrgetter("table")
_size_of = attrgetter("size")


@dataclass(frozen=True)
class EventColumns:
    """A person's time-sorted history as arrays: what the feature function reads, one entry per event.

    Times are integer microseconds since the Unix epoch, so "strictly before the cutoff" and the
    window bounds are exact comparisons. Categories are codes local to the person (-1: none), numbered
    0, 1, ... in order of first appearance, so that any prefix of the history holds codes 0 to its
    largest: only how many distinct ones there are matters, and that is the largest code plus one.
    Names are the events' names (for specs that name the events they count).

    The columns are the rows of one int64 table (an amount's row holds its float64 bits), so that a
    batch lays many persons' histories end to end with one concatenation instead of one per column
    (a few hundred ns per array: as much as the features of the person).
    """

    table: npt.NDArray[np.int64]  # (4, events): micros, is_order (0/1), amount bits, category
    names: npt.NDArray[np.object_] | None  # None in runs built without them (EventRuns.of)

    @property
    def micros(self) -> npt.NDArray[np.int64]:
        micros: npt.NDArray[np.int64] = self.table[_MICROS]
        return micros

    @property
    def is_order(self) -> npt.NDArray[np.bool_]:
        is_order: npt.NDArray[np.bool_] = self.table[_IS_ORDER] != 0
        return is_order

    @property
    def amounts(self) -> npt.NDArray[np.float64]:
        """Order amounts, 0 when none."""
        amounts: npt.NDArray[np.float64] = self.table[_AMOUNT_BITS].view(np.float64)
        return amounts

    @property
    def categories(self) -> npt.NDArray[np.int64]:
        categories: npt.NDArray[np.int64] = self.table[_CATEGORY]
        return categories

    def __len__(self) -> int:
        return int(self.table.shape[1])

    def prefix(self, count: int) -> EventColumns:
        """The first `count` events (views, no copies)."""
        return EventColumns(self.table[:, :count], self.names[:count] if self.names is not None else None)

    def where(self, keep: npt.NDArray[np.bool_]) -> EventColumns:
        """The events where `keep` is true, in order."""
        return EventColumns(self.table[:, keep], self.names[keep] if self.names is not None else None)


def micros_of(time: datetime) -> int:
    return (time - _EPOCH) // _MICROSECOND


def columns_of(events: Sequence[ActivityEvent]) -> EventColumns:
    """The arrays of a time-sorted history (one pass over the events)."""
    codes: dict[str, int] = {}
    count = len(events)
    table = np.empty((TABLE_ROWS, count), dtype=np.int64)
    table[_MICROS] = np.fromiter((micros_of(e.time) for e in events), dtype=np.int64, count=count)
    table[_IS_ORDER] = np.fromiter((e.name == ORDER_EVENT for e in events), dtype=np.bool_, count=count)
    table[_AMOUNT_BITS] = np.fromiter(((e.amount or 0.0) if e.name == ORDER_EVENT else 0.0 for e in events),
                                      dtype=np.float64, count=count).view(np.int64)
    table[_CATEGORY] = np.fromiter((codes.setdefault(e.category, len(codes)) if e.category else -1 for e in events),
                                   dtype=np.int64, count=count)
    return EventColumns(table, np.fromiter((e.name for e in events), dtype=np.object_, count=count))


@dataclass(frozen=True)
class EventRuns:
    """Many persons' histories laid end to end: run i (`sizes[i]` events, time-sorted) is person i's.

    What batch computations read: every count, sum or test over "each person's events" is one
    vectorised operation over `columns` and a segment reduction by run, whatever the batch size,
    instead of a Python step per person.
    """

    columns: EventColumns
    sizes: npt.NDArray[np.int64]

    @classmethod
    def of(cls, histories: Sequence[EventColumns], *, with_names: bool = False) -> EventRuns:
        """The runs of `histories`, in order; the events' names only `with_names` (a spec that names events)."""
        if len(histories) == 1:  # one person (single scores): the arrays themselves, no copies
            return cls(histories[0], np.asarray([len(histories[0])], dtype=np.int64))
        tables = list(map(_table_of, histories))
        sizes = np.fromiter(map(_size_of, tables), dtype=np.int64, count=len(tables)) // TABLE_ROWS
        if not histories:
            return cls(columns_of([]), sizes)
        names = None
        if with_names:
            parts = [h.names for h in histories if h.names is not None]
            if len(parts) != len(histories):
                raise ValueError("with_names needs every history's names")
            names = np.concatenate(parts)
        return cls(EventColumns(np.concatenate(tables, axis=1), names), sizes)

    def __len__(self) -> int:
        """Runs (persons)."""
        return len(self.sizes)

    def count(self, events: npt.NDArray[np.bool_]) -> npt.NDArray[np.int64]:
        """How many events of each run are true in `events` (one flag per event): exact, 0 for an empty run."""
        running = np.zeros(len(events) + 1, dtype=np.int64)
        np.cumsum(events, out=running[1:])
        ends = np.cumsum(self.sizes)
        counts: npt.NDArray[np.int64] = running[ends] - running[ends - self.sizes]
        return counts

    def where(self, events: npt.NDArray[np.bool_]) -> EventRuns:
        """The same runs holding only the events that are true in `events` (order kept)."""
        if events.all():
            return self
        return EventRuns(self.columns.where(events), self.count(events))

    def before(self, cutoff: datetime) -> EventRuns:
        """Each person's events strictly before `cutoff` (a prefix of each run)."""
        return self.where(self.columns.micros < micros_of(cutoff))

    def select(self, persons: npt.NDArray[np.bool_]) -> EventRuns:
        """Only the runs where `persons` (one flag per run) is true."""
        if persons.all():
            return self
        return EventRuns(self.columns.where(np.repeat(persons, self.sizes)), self.sizes[persons])


@dataclass(frozen=True)
class ReadRuns:
    """Persons requested for scoring, as read: the histories that were read laid end to end (run i is request
    position `positions[i]`, person `person_ids[i]`), and an error for each request position that was not."""

    runs: EventRuns
    person_ids: list[str]
    positions: npt.NDArray[np.int64]
    errors: dict[int, DomainError]
    requested: int

    @classmethod
    def of(cls, histories: Sequence[PersonHistory | DomainError], *, with_names: bool) -> ReadRuns:
        """The runs of read histories (whole or cut), in request order; errors where a person was not read."""
        # Per-person steps by map (C loops): on a warm batch they are most of what is left besides the arrays.
        is_read = list(map(isinstance, histories, repeat(PersonHistory)))
        if all(is_read):
            read = cast(list[PersonHistory], list(histories))
            positions = np.arange(len(histories), dtype=np.int64)
            errors: dict[int, DomainError] = {}
        else:
            errors = {index: history for index, history in enumerate(histories) if isinstance(history, DomainError)}
            read = [history for history in histories if isinstance(history, PersonHistory)]
            positions = np.flatnonzero(is_read).astype(np.int64)
        runs = EventRuns.of(list(map(_columns_of, read)), with_names=with_names)
        return cls(runs, list(map(_person_id_of, read)), positions, errors, len(histories))


_columns_of = attrgetter("columns")
_person_id_of = attrgetter("person_id")


@dataclass(frozen=True)
class PersonHistory:
    """A person's time-sorted events."""

    person_id: str
    events: Sequence[ActivityEvent]

    @cached_property
    def columns(self) -> EventColumns:
        """The events as the arrays the feature function reads, computed once per history (the online store
        keeps them with the history it holds)."""
        return columns_of(self.events)

    def before(self, cutoff: datetime) -> PersonHistory:
        """The history strictly before `cutoff`; its columns are views of these, when these were computed."""
        columns: EventColumns | None = self.__dict__.get("columns")  # where cached_property keeps its value
        count = (int(columns.micros.searchsorted(micros_of(cutoff))) if columns is not None
                 else bisect_left(self.events, cutoff, key=lambda e: e.time))
        if count == len(self.events):
            return self  # the common case of scoring as of now: nothing to cut
        cut = PersonHistory(self.person_id, self.events[:count])
        if columns is not None:
            cut.__dict__["columns"] = columns.prefix(count)
        return cut


class PendingHistories(Protocol):
    """Histories requested and on their way: `result()` waits for them."""

    def result(self) -> list[PersonHistory | DomainError]:
        """In request order; a person that cannot be read is its error (e.g. NotFound)."""
        ...


@dataclass(frozen=True)
class ReadHistories:
    """Histories that are already here (a PendingHistories that does not wait)."""

    histories: list[PersonHistory | DomainError]

    def result(self) -> list[PersonHistory | DomainError]:
        return self.histories


class HistoryReader(Protocol):
    """Reads of chosen persons' histories (what scoring needs): a ProfileSource, or the online store over one."""

    def histories_of(self, persons: Sequence[PersonRef],
                     before: datetime | None) -> list[PersonHistory | DomainError]:
        """Many persons at once, in request order; a person that cannot be read is its error (e.g. NotFound).

        `before` None reads every event (the online store keeps whole histories and cuts them per score).
        """
        ...

    def start_histories_of(self, persons: Sequence[PersonRef], before: datetime | None) -> PendingHistories:
        """`histories_of` without waiting, so the caller can do other work while the reads travel."""
        ...

    def history(self, person: PersonRef, before: datetime | None) -> PersonHistory:
        """One person's events strictly before `before` (all when None), oldest first; NotFound for an unknown
        person."""
        ...

    def whole_runs_of(self, persons: Sequence[PersonRef], *, with_names: bool) -> ReadRuns:
        """Many persons' whole histories (every event) laid end to end, for a batch score: `histories_of(persons,
        None)` as runs, which the online store lays out from its table without a step per person."""
        ...


class ReadsByStarting:
    """`history` and `histories_of` of a HistoryReader, in terms of its `start_histories_of`."""

    def start_histories_of(self, persons: Sequence[PersonRef], before: datetime | None) -> PendingHistories:
        raise NotImplementedError

    def histories_of(self, persons: Sequence[PersonRef],
                     before: datetime | None) -> list[PersonHistory | DomainError]:
        return self.start_histories_of(persons, before).result()

    def history(self, person: PersonRef, before: datetime | None) -> PersonHistory:
        (result,) = self.histories_of([person], before)
        if isinstance(result, DomainError):
            raise result
        return result

    def whole_runs_of(self, persons: Sequence[PersonRef], *, with_names: bool) -> ReadRuns:
        return ReadRuns.of(self.histories_of(persons, None), with_names=with_names)


class ProfileSource(HistoryReader, Protocol):
    """Where persons' histories come from (the profile service in production)."""

    def histories(self, before: datetime) -> Iterator[PersonHistory]:
        """Every person with their events strictly before `before`, oldest first, each person once."""
        ...

    def shards(self) -> list[str]:
        """Opaque shards that together hold every person once (for scans with progress, or in parallel)."""
        ...

    def histories_of_shard(self, shard: str, before: datetime) -> Iterator[PersonHistory]:
        """The persons of one shard, as `histories` gives them."""
        ...


class InMemoryProfileSource(ReadsByStarting):
    """A ProfileSource over a dict, for tests, benchmarks and the CDNOW yardstick."""

    def __init__(self, events_by_person: Mapping[str, Iterable[ActivityEvent]],
                 identifiers: Mapping[tuple[str, str], str] | None = None) -> None:
        self._events = {person: sorted(events, key=lambda e: e.time) for person, events in events_by_person.items()}
        self._identifiers = dict(identifiers or {})

    def histories(self, before: datetime) -> Iterator[PersonHistory]:
        for person_id in sorted(self._events):
            yield PersonHistory(person_id, [e for e in self._events[person_id] if e.time < before])

    def shards(self) -> list[str]:
        return [_ONLY_SHARD]

    def histories_of_shard(self, shard: str, before: datetime) -> Iterator[PersonHistory]:
        if shard != _ONLY_SHARD:
            raise InvalidArgument.for_field("shard", f"unknown shard {shard!r}", reason="INVALID_SHARD")
        yield from self.histories(before)

    def histories_of(self, persons: Sequence[PersonRef],
                     before: datetime | None) -> list[PersonHistory | DomainError]:
        results: list[PersonHistory | DomainError] = []
        for person in persons:
            try:
                results.append(self.history(person, before))
            except DomainError as error:
                results.append(error)
        return results

    def start_histories_of(self, persons: Sequence[PersonRef], before: datetime | None) -> PendingHistories:
        return ReadHistories(self.histories_of(persons, before))

    def history(self, person: PersonRef, before: datetime | None) -> PersonHistory:
        person_id = person.person_id
        if person_id is None:
            person_id = self._identifiers.get((person.identifier_type or "", person.identifier_value or ""))
        if person_id is None or person_id not in self._events:
            raise person_not_found(person)
        return PersonHistory(person_id, [e for e in self._events[person_id] if before is None or e.time < before])
