"""The online store's table: a batch laid out from it is each person's own history, whatever was kept, dropped,
compacted or evicted before, and scores from it are the scores of the per-person path."""

from __future__ import annotations

import random
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from services.prediction.features import features_at, features_of_runs
from services.prediction.history import (
    ActivityEvent,
    InMemoryProfileSource,
    PersonHistory,
    PersonRef,
    ReadRuns,
    RefsByPersonId,
    columns_of,
)
from services.prediction.history_table import HistoryTable
from services.prediction.online import ChangeKind, HistoryChange, OnlineHistories
from tests.services.prediction.synthetic import synthetic_events

pytestmark = pytest.mark.unit

NOW = datetime(2024, 7, 1, tzinfo=UTC)


def random_history(rng: random.Random, person_id: str) -> PersonHistory:
    """0-40 events with ties in time, refunds, names and categories."""
    times = sorted(NOW - timedelta(days=rng.uniform(0, 800)) for _ in range(rng.randrange(41)))
    if len(times) > 3:
        times[2] = times[1]  # a tie
    events = [ActivityEvent(rng.choice(["order", "page_view", "signup"]), time,
                            rng.choice([None, 12.5, -3.0, rng.uniform(0, 200)]), rng.choice([None, "a", "b", "c"]))
              for time in times]
    return PersonHistory(person_id, events)


def test_batches_from_the_table_are_each_persons_history_through_drops_compaction_and_growth() -> None:
    rng = random.Random(3)
    table = HistoryTable()
    kept: dict[int, PersonHistory] = {}
    for step in range(3000):
        if kept and rng.random() < 0.4:
            slot = rng.choice(list(kept))
            table.remove(slot)
            del kept[slot]
        else:
            history = random_history(rng, f"p{step}")
            slot = table.add(history)
            assert slot not in kept
            kept[slot] = history
        if step % 97 == 0 and kept:
            slots = np.asarray(rng.choices(list(kept), k=rng.randrange(1, 60)), dtype=np.int64)  # repeats too
            runs, person_ids = table.runs(slots, with_names=True)
            expected = [kept[slot] for slot in slots.tolist()]
            assert person_ids == [h.person_id for h in expected]
            assert runs.sizes.tolist() == [len(h.events) for h in expected]
            reference = ReadRuns.of(expected, with_names=True).runs.columns
            assert np.array_equal(runs.columns.table, reference.table)
            assert runs.columns.names is not None and reference.names is not None
            assert runs.columns.names.tolist() == reference.names.tolist()
    assert table.persons == len(kept) and table.events == sum(len(h.events) for h in kept.values())


def test_the_least_recently_used_slot_is_the_one_touched_longest_ago() -> None:
    table = HistoryTable()
    rng = random.Random(1)
    slots = [table.add(random_history(rng, f"p{n}")) for n in range(5)]
    table.touch(np.asarray([slots[0], slots[2]], dtype=np.int64))
    assert table.least_recently_used() == slots[1]
    table.remove(slots[1])
    assert table.least_recently_used() == slots[3]
    for slot in (slots[0], slots[2], slots[3], slots[4]):
        table.remove(slot)
    assert table.least_recently_used() is None


def current_store(source: InMemoryProfileSource, max_events: int = 1_000_000) -> OnlineHistories:
    online = OnlineHistories(source, max_events=max_events, monotonic=lambda: 0.0)
    online.mark_current(0.0)
    return online


def test_a_batch_from_the_store_has_the_features_of_each_person_computed_alone() -> None:
    events = synthetic_events(150, seed=9)
    events["nobody yet"] = []
    online = current_store(InMemoryProfileSource(events))
    refs = [PersonRef(person_id=name) for name in sorted(events)]
    random.Random(2).shuffle(refs)
    online.histories_of(refs[::2], None)  # some kept, in another order
    cold = online.whole_runs_of(refs, with_names=False)  # the rest read from the source
    warm = online.whole_runs_of(refs, with_names=False)  # all from the table
    for read in (cold, warm):
        assert read.person_ids == [ref.person_id for ref in refs] and not read.errors
        assert read.positions.tolist() == list(range(len(refs)))
        for cutoff in (NOW - timedelta(days=400), NOW, NOW + timedelta(days=900)):
            matrix = features_of_runs(read.runs, cutoff)
            for row, ref in zip(matrix, refs, strict=True):
                alone = features_at([columns_of(events[ref.person_id or ""])], cutoff)[0]
                # Bit for bit: a score must not depend on the batch it came in.
                assert np.array_equal(row, alone, equal_nan=True)


def test_selectors_never_lead_to_a_slot_reused_by_someone_else() -> None:
    rng = random.Random(5)
    histories = {f"p{n}": random_history(rng, f"p{n}").events for n in range(40)}
    source = InMemoryProfileSource(histories, {("email", f"e{n}"): f"p{n}" for n in range(40)})
    online = current_store(source, max_events=300)  # evictions all along
    for _ in range(600):
        numbers = [rng.randrange(40) for _ in range(rng.randrange(1, 8))]
        if rng.random() < 0.2:
            online.apply([HistoryChange(uuid.uuid1(), f"p{rng.choice(numbers)}", ChangeKind.EVENTS)])
        refs: Sequence[PersonRef]
        if rng.random() < 0.5:  # as the server passes a batch of ids
            refs = RefsByPersonId([f"p{n}" for n in numbers])
        else:
            refs = [PersonRef(person_id=f"p{n}") if rng.random() < 0.5 else
                    PersonRef(identifier_type="email", identifier_value=f"e{n}") for n in numbers]
        read = online.whole_runs_of(refs, with_names=True)
        assert read.person_ids == [f"p{n}" for n in numbers]
        assert read.runs.sizes.tolist() == [len(histories[f"p{n}"]) for n in numbers]
        assert online.size()[1] <= 300


def test_refs_by_person_id_are_the_refs_of_the_ids() -> None:
    refs = RefsByPersonId(["a", "b", "c"])
    assert list(refs) == [PersonRef(person_id=i) for i in "abc"] and len(refs) == 3
    assert refs[1] == PersonRef(person_id="b") and refs[1:] == [PersonRef(person_id="b"), PersonRef(person_id="c")]


def test_a_batch_with_an_unknown_person_has_its_error_at_its_position() -> None:
    events = synthetic_events(5, seed=1)
    online = current_store(InMemoryProfileSource(events))
    refs = [PersonRef(person_id=name) for name in sorted(events)]
    online.histories_of(refs, None)
    read = online.whole_runs_of([refs[0], PersonRef(person_id="ghost"), refs[1]], with_names=False)
    assert read.person_ids == [refs[0].person_id, refs[1].person_id]
    assert read.positions.tolist() == [0, 2] and list(read.errors) == [1] and read.requested == 3
