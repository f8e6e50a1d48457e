"""RecomputeSegment while a recompute of the same rule runs answers with that operation (a double click, or
concurrent callers, recompute once); a finished one, or a changed rule, starts a new one. Real Cassandra."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import pytest

from services.segmentation.catalog import RuleInput, SegmentCatalog
from services.segmentation.evaluation import ProfileFacts
from services.segmentation.follower import Memberships
from services.segmentation.profile_source import FeedChange
from services.segmentation.recompute import Recomputer
from services.segmentation.store import SegmentStore
from services.segmentation.text import parse
from shared.cassandra import CassandraSession

pytestmark = pytest.mark.integration


class HeldSource:
    """A profile source of one empty shard whose scan waits until released."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self.scans = 0

    def shards(self, count: int) -> list[str]:
        return ["0"]

    def changes(self, cursor: str, limit: int) -> tuple[list[FeedChange], str]:
        return [], cursor

    def persons(self, person_ids: Any, as_of: datetime, events: Any,
                fields: Any = None) -> dict[str, ProfileFacts | None]:
        raise AssertionError("nobody is reconciled: no profile changed")

    def scan(self, shard: str, as_of: datetime, events: Any, fields: Any = None) -> Iterator[list[ProfileFacts]]:
        self.scans += 1
        assert self.released.wait(60), "never released"
        return iter([])

    def scan_events(self, shard: str, person_ids: Any, as_of: datetime, events: Any) -> Iterator[list[ProfileFacts]]:
        raise AssertionError("a rule on traits alone reads no events")


def _done(store: SegmentStore, operation_id: str) -> None:
    deadline = time.monotonic() + 60
    while not ((operation := store.get_operation(operation_id)) and operation.done):
        assert time.monotonic() < deadline, f"operation {operation_id} did not finish"
        time.sleep(0.1)


def test_a_running_recompute_is_joined_not_repeated(segmentation_session: CassandraSession) -> None:
    store = SegmentStore(segmentation_session)
    catalog = SegmentCatalog(store)  # no recompute started by create: started below, by hand
    catalog.create("pros", "", "", RuleInput(parse('traits.plan = "pro"'), "segment.rule_text", True))
    source = HeldSource()
    recomputer = Recomputer(catalog, store, source, reconciler=Memberships(catalog, store, source))
    try:
        first = recomputer.start("pros", parallelism=2)
        again = recomputer.start("pros", parallelism=5)
        assert again.operation_id == first.operation_id and again.parallelism == 2
        with ThreadPoolExecutor(4) as pool:
            joined = list(pool.map(lambda _: recomputer.start("pros").operation_id, range(4)))
        assert joined == [first.operation_id] * 4

        # A changed rule is a new computation, even while the old one runs.
        segment = catalog.get("pros")
        catalog.update("pros", ["rule_text"], display_name="", description="",
                       rule_input=RuleInput(parse('traits.plan = "max"'), "segment.rule_text", True), etag=segment.etag)
        changed = recomputer.start("pros")
        assert changed.operation_id != first.operation_id

        source.released.set()
        _done(store, first.operation_id)
        _done(store, changed.operation_id)
        # Once finished, asking again computes again: concurrent askers start one operation between them.
        source.released.clear()
        with ThreadPoolExecutor(4) as pool:
            started = set(pool.map(lambda _: recomputer.start("pros").operation_id, range(4)))
        assert len(started) == 1 and changed.operation_id not in started
        source.released.set()
        _done(store, started.pop())
        assert source.scans == 3
    finally:
        source.released.set()
        recomputer.stop()
