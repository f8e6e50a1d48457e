"""The online store's histories in one table: what a batch score reads with one gather, not a step per person.

Each kept person has a slot; the slot's events are a stretch of columns of one int64 table laid out as
`EventColumns.table` (micros, is_order, amount bits, category), with the events' names in a parallel
object array. A batch of slots becomes `EventRuns` (every person's events end to end, in request order)
by one index computation and one `take`, whatever the batch size: the histories are never concatenated
one array per person, and the persons' ids come out of an object array by the same slots.

Removed histories leave holes; new ones are appended at the end. When the end is reached the live
stretches are copied, in slot order, to the front of a table large enough for twice what is live
(amortised: each event is copied a bounded number of times). Least recently used order is a stamp per
slot, set for a whole batch by one array assignment; eviction takes the smallest stamp.

Not thread-safe: OnlineHistories calls it under its lock.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from services.prediction.history import TABLE_ROWS, EventColumns, EventRuns, PersonHistory

_FIRST_EVENTS = 4096
_FIRST_SLOTS = 256
_UNUSED = np.iinfo(np.int64).max  # the stamp of a free slot: never the least recently used


class HistoryTable:
    """Kept histories by slot, their columns laid end to end in one table."""

    def __init__(self) -> None:
        self._columns = np.empty((TABLE_ROWS, _FIRST_EVENTS), dtype=np.int64)
        self._names = np.empty(_FIRST_EVENTS, dtype=np.object_)
        self._end = 0  # columns in use, holes included
        self._starts = np.zeros(_FIRST_SLOTS, dtype=np.int64)
        self._sizes = np.zeros(_FIRST_SLOTS, dtype=np.int64)
        self._stamps = np.full(_FIRST_SLOTS, _UNUSED, dtype=np.int64)
        self._person_ids = np.empty(_FIRST_SLOTS, dtype=np.object_)
        self._histories = np.empty(_FIRST_SLOTS, dtype=np.object_)  # the PersonHistory of each slot, for one read
        self._free = list(range(_FIRST_SLOTS - 1, -1, -1))  # popped from the end: lowest slots first
        self._clock = 0
        self.events = 0  # live events
        self.persons = 0  # live slots

    def add(self, history: PersonHistory) -> int:
        """Keep `history` (its columns computed) in a new slot, as the most recently used; returns the slot."""
        columns = history.columns
        size = len(columns)
        if self._end + size > self._columns.shape[1]:
            self._compact(size)
        if not self._free:
            self._grow_slots()
        slot = self._free.pop()
        start = self._end
        self._columns[:, start:start + size] = columns.table
        if columns.names is not None:
            self._names[start:start + size] = columns.names
        self._end += size
        self._starts[slot], self._sizes[slot] = start, size
        self._person_ids[slot], self._histories[slot] = history.person_id, history
        self.events += size
        self.persons += 1
        self.touch(slot)
        return slot

    def remove(self, slot: int) -> None:
        """Forget the slot's history (its columns become a hole)."""
        self.events -= int(self._sizes[slot])
        self.persons -= 1
        self._sizes[slot] = 0
        self._stamps[slot] = _UNUSED
        self._person_ids[slot] = self._histories[slot] = None
        self._free.append(slot)

    def history(self, slot: int) -> PersonHistory:
        history: PersonHistory = self._histories[slot]
        return history

    def person_id(self, slot: int) -> str:
        person_id: str = self._person_ids[slot]
        return person_id

    def touch(self, slots: int | npt.NDArray[np.int64]) -> None:
        """The slots were just used (least recently used order)."""
        self._clock += 1
        self._stamps[slots] = self._clock

    def least_recently_used(self) -> int | None:
        """The slot used longest ago, None when none is kept."""
        if not self.persons:
            return None
        return int(self._stamps.argmin())

    def runs(self, slots: npt.NDArray[np.int64], *, with_names: bool) -> tuple[EventRuns, list[str]]:
        """The histories of `slots` laid end to end (run i is `slots[i]`'s, copies), and their person ids."""
        sizes = self._sizes[slots]
        ends = np.cumsum(sizes)
        total = int(ends[-1]) if len(ends) else 0
        # Event j of the result is column (its run's start) + (its place in the run) of the table.
        index = np.arange(total, dtype=np.int64)
        index += np.repeat(self._starts[slots] - (ends - sizes), sizes)
        columns = EventColumns(self._columns.take(index, axis=1), self._names.take(index) if with_names else None)
        person_ids: list[str] = self._person_ids.take(slots).tolist()
        return EventRuns(columns, sizes), person_ids

    def _compact(self, incoming: int) -> None:
        """Move the live stretches to the front of a table with room for `incoming` more events."""
        live = np.flatnonzero(self._sizes > 0)  # slots of empty histories keep no columns
        sizes = self._sizes[live]
        capacity = max(self._columns.shape[1], 2 * (self.events + incoming))
        runs, _ = self.runs(live, with_names=True)
        columns = np.empty((TABLE_ROWS, capacity), dtype=np.int64)
        names = np.empty(capacity, dtype=np.object_)
        columns[:, :self.events] = runs.columns.table
        names[:self.events] = runs.columns.names
        self._columns, self._names, self._end = columns, names, self.events
        self._starts[live] = np.cumsum(sizes) - sizes

    def _grow_slots(self) -> None:
        slots = len(self._stamps)
        self._starts = np.concatenate([self._starts, np.zeros(slots, dtype=np.int64)])
        self._sizes = np.concatenate([self._sizes, np.zeros(slots, dtype=np.int64)])
        self._stamps = np.concatenate([self._stamps, np.full(slots, _UNUSED, dtype=np.int64)])
        self._person_ids = np.concatenate([self._person_ids, np.empty(slots, dtype=np.object_)])
        self._histories = np.concatenate([self._histories, np.empty(slots, dtype=np.object_)])
        self._free.extend(range(2 * slots - 1, slots - 1, -1))
