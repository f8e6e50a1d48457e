"""A recompute never undoes a newer real-time decision: persons who entered or left through real time while
the recompute scanned (from facts newer than its scan saw) keep that decision, over the real profile service
and Cassandra."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from onecdp.profile.v1 import profile_service_pb2_grpc as profile_grpc

from services.segmentation.catalog import RuleInput, SegmentCatalog
from services.segmentation.evaluation import ProfileFacts
from services.segmentation.follower import Memberships
from services.segmentation.profile_source import GrpcProfileSource
from services.segmentation.realtime import EVERY_FIELD, EventReads, ProfileReads
from services.segmentation.recompute import Recomputer
from services.segmentation.store import OperationRecord, SegmentStore, StoredChange
from services.segmentation.text import parse
from shared import changefeed
from shared.cassandra import CassandraSession
from shared.changefeed import FEED_START
from tests.services.segmentation.conftest import identify, ingest, recomputed

pytestmark = pytest.mark.integration


class ChangesAfterTheScan(GrpcProfileSource):
    """The real profile source; once every shard is scanned, `after_scan` runs (what happens in the world
    between a recompute's scan and its diff)."""

    def __init__(self, stub: profile_grpc.ProfileServiceStub) -> None:
        super().__init__(stub)
        self.after_scan: Callable[[], None] = lambda: None
        self._unscanned = 0

    def shards(self, count: int) -> list[str]:
        shards = super().shards(count)
        self._unscanned = len(shards)
        return shards

    def scan(self, shard: str, as_of: datetime, events: EventReads,
             fields: ProfileReads = EVERY_FIELD) -> Iterator[list[ProfileFacts]]:
        yield from super().scan(shard, as_of, events, fields)
        self._unscanned -= 1
        if self._unscanned == 0:
            self.after_scan()


class RealTimeAfterTheMovesRead(SegmentStore):
    """The real store; `after_moves_read` runs once, after the next read of the segment's change log (the
    recompute's last read before it writes its diff)."""

    after_moves_read: Callable[[], object] | None = None

    def changes_page(self, *args: Any, **kwargs: Any) -> list[StoredChange]:
        page = super().changes_page(*args, **kwargs)
        hook, self.after_moves_read = self.after_moves_read, None
        if hook is not None:
            hook()
        return page


def outcome(store: SegmentStore, operation: OperationRecord, seen: uuid.UUID
            ) -> tuple[set[str], list[tuple[str, bool, str]], tuple[str | None, int, int, int]]:
    """A finished recompute's segment: its members, the changes logged after `seen` (person, entered, cause),
    and the operation's (error code, member, entered and exited counts)."""
    changes = [(c.person_id, c.entered, c.cause) for c in store.changes_page(operation.segment_id, seen, 100)]
    return (store.member_ids(operation.segment_id), changes,
            (operation.error_code, operation.member_count, operation.entered_count, operation.exited_count))


def test_a_recompute_keeps_real_time_decisions_taken_during_its_scan(
        segmentation_session: CassandraSession, profiles: profile_grpc.ProfileServiceStub) -> None:
    long_ago = (datetime.now(UTC) - timedelta(days=3)).replace(tzinfo=None).isoformat()
    ids = ingest(profiles, identify("ann", long_ago, {"plan": "free"}), identify("bob", long_ago, {"plan": "pro"}),
                 identify("cat", long_ago, {"plan": "pro"}))
    ann, bob, cat = ids["ann"], ids["bob"], ids["cat"]
    store = SegmentStore(segmentation_session)
    catalog = SegmentCatalog(store)  # recomputes started by hand
    catalog.create("pros", "", "", RuleInput(parse('traits.plan = "pro"'), "segment.rule_text", True))
    source = ChangesAfterTheScan(profiles)
    recomputer = Recomputer(catalog, store, source, reconciler=Memberships(catalog, store, source))
    try:
        first = recomputed(recomputer, store, "pros", parallelism=1)
        assert (first.error_code, store.member_ids("pros")) == (None, {bob, cat})
        seen = store.changes_page("pros", FEED_START, 100)[-1].change_id

        def real_time_moves_ann_and_bob() -> None:
            # Ann turns pro and bob free after the scan read them; real time applies both at once.
            now = datetime.now(UTC).replace(tzinfo=None).isoformat()
            ingest(profiles, identify("ann", now, {"plan": "pro"}), identify("bob", now, {"plan": "free"}))
            Memberships(catalog, store, source).refresh({ann: {"pros"}, bob: {"pros"}}, "realtime")

        source.after_scan = real_time_moves_ann_and_bob
        second = recomputed(recomputer, store, "pros", parallelism=1)
    finally:
        recomputer.stop()
    assert outcome(store, second, seen) == (
        {ann, cat}, [(ann, True, "realtime"), (bob, False, "realtime")], (None, 2, 0, 0))


def test_a_recompute_does_not_record_again_a_change_real_time_just_recorded(
        segmentation_session: CassandraSession, profiles: profile_grpc.ProfileServiceStub) -> None:
    """Real time lags the ingest: it can decide a profile change from before the recompute's scan (so not
    among the moves the recompute leaves to it) after the recompute read those moves. When both agree, the
    change log holds that ENTER once."""
    long_ago = (datetime.now(UTC) - timedelta(days=3)).replace(tzinfo=None).isoformat()
    ids = ingest(profiles, identify("dan", long_ago, {"plan": "free"}), identify("eve", long_ago, {"plan": "pro"}))
    dan, eve = ids["dan"], ids["eve"]
    store = RealTimeAfterTheMovesRead(segmentation_session)
    catalog = SegmentCatalog(store)
    catalog.create("payers", "", "", RuleInput(parse('traits.plan = "pro"'), "segment.rule_text", True))
    source = GrpcProfileSource(profiles)
    recomputer = Recomputer(catalog, store, source, reconciler=Memberships(catalog, store, source))
    try:
        first = recomputed(recomputer, store, "payers", parallelism=1)
        assert (first.error_code, store.member_ids("payers")) == (None, {eve})
        seen = store.changes_page("payers", FEED_START, 100)[-1].change_id
        ingest(profiles, identify("dan", datetime.now(UTC).replace(tzinfo=None).isoformat(), {"plan": "pro"}))
        time.sleep(changefeed.SETTLE_SECONDS + 1)  # dan's change is older than any move the recompute looks for
        store.after_moves_read = lambda: Memberships(catalog, store, source).refresh({dan: {"payers"}}, "realtime")
        second = recomputed(recomputer, store, "payers", parallelism=1)
    finally:
        recomputer.stop()
    assert outcome(store, second, seen) == ({dan, eve}, [(dan, True, "realtime")], (None, 2, 0, 0))
