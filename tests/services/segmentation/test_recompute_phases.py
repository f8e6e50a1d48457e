"""A recompute whose rule's traits decide most persons reads no events of those (two phases), over the real
profile service and Cassandra: the members and the re-evaluation schedule are those of one phase, and the events
read are those of the persons the traits leave undecided, by person id."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta

import pytest
from onecdp.profile.v1 import profile_service_pb2_grpc as profile_grpc

from services.segmentation.catalog import RuleInput, SegmentCatalog
from services.segmentation.evaluation import ProfileFacts
from services.segmentation.follower import Memberships
from services.segmentation.profile_source import GrpcProfileSource
from services.segmentation.realtime import EVERY_FIELD, EventReads, ProfileReads
from services.segmentation.recompute import Recomputer
from services.segmentation.store import SegmentStore
from services.segmentation.text import parse
from shared.cassandra import CassandraSession
from tests.services.segmentation.conftest import identify, ingest, order, recomputed

pytestmark = pytest.mark.integration
NOW = datetime.now(UTC).replace(microsecond=0)


def days_ago(days: float) -> str:
    return (NOW - timedelta(days=days)).replace(tzinfo=None).isoformat()


class CountingSource(GrpcProfileSource):
    """The real profile source, noting what each scan asks for: the events of whole-shard scans, and the persons
    whose events are read by id."""

    def __init__(self, stub: profile_grpc.ProfileServiceStub) -> None:
        super().__init__(stub)
        self.shard_scans: list[EventReads] = []
        self.events_read_of: list[str] = []

    def scan(self, shard: str, as_of: datetime, events: EventReads,
             fields: ProfileReads = EVERY_FIELD) -> Iterator[list[ProfileFacts]]:
        self.shard_scans.append(events)
        yield from super().scan(shard, as_of, events, fields)

    def scan_events(self, shard: str, person_ids: Sequence[str], as_of: datetime,
                    events: EventReads) -> Iterator[list[ProfileFacts]]:
        self.events_read_of += person_ids
        yield from super().scan_events(shard, person_ids, as_of, events)


class RecordingStore(SegmentStore):
    """The real store, noting whom a recompute schedules for re-evaluation."""

    scheduled: set[str]

    def start_schedule(self, due: Iterable[tuple[str, datetime]]) -> Callable[[], None]:
        due = list(due)
        self.scheduled.update(person_id for person_id, _ in due)
        return super().start_schedule(due)


def test_a_recompute_reads_events_only_of_the_persons_its_traits_leave_undecided(
        segmentation_session: CassandraSession, profiles: profile_grpc.ProfileServiceStub) -> None:
    ids = ingest(profiles,
                 identify("pro-two", days_ago(90), {"plan": "pro"}), order("pro-two", "a1", 5, days_ago(3)),
                 order("pro-two", "a2", 5, days_ago(10)),
                 identify("pro-one", days_ago(90), {"plan": "pro"}), order("pro-one", "b1", 5, days_ago(5)),
                 identify("pro-old", days_ago(90), {"plan": "pro"}), order("pro-old", "c1", 5, days_ago(40)),
                 order("pro-old", "c2", 5, days_ago(45)),
                 identify("free-three", days_ago(90), {"plan": "free"}), order("free-three", "d1", 5, days_ago(1)),
                 order("free-three", "d2", 5, days_ago(2)), order("free-three", "d3", 5, days_ago(3)),
                 order("no-plan", "e1", 5, days_ago(1)), order("no-plan", "e2", 5, days_ago(2)))
    store = RecordingStore(segmentation_session)
    store.scheduled = set()
    catalog = SegmentCatalog(store)  # recomputes started by hand
    catalog.create("pro-buyers", "", "", RuleInput(parse('traits.plan = "pro" AND event("order").count(last 30d) >= 2'),
                                                   "segment.rule_text", True))
    catalog.create("buyers", "", "", RuleInput(parse('event("order").count(last 30d) >= 2'), "segment.rule_text",
                                               True))
    source = CountingSource(profiles)
    recomputer = Recomputer(catalog, store, source, reconciler=Memberships(catalog, store, source))
    try:
        done = recomputed(recomputer, store, "pro-buyers", parallelism=2)
        assert (done.error_code, done.profiles_scanned, store.member_ids("pro-buyers")) == (None, 5, {ids["pro-two"]})
        # The shards were scanned without events; the events were read of the pros alone.
        assert source.shard_scans and all(events.since is None and not events.names for events in source.shard_scans)
        assert sorted(source.events_read_of) == sorted(ids[p] for p in ("pro-two", "pro-one", "pro-old"))
        # Re-evaluated when an order leaves the window: the pros with one in it. Nobody the traits decided.
        assert store.scheduled == {ids["pro-two"], ids["pro-one"]}

        # A rule on events alone: every person's events are read, in one phase.
        source.shard_scans, source.events_read_of, store.scheduled = [], [], set()
        done = recomputed(recomputer, store, "buyers", parallelism=2)
        assert (done.error_code, store.member_ids("buyers")) == (
            None, {ids["pro-two"], ids["free-three"], ids["no-plan"]})
        assert source.shard_scans and all(events.names == {"order"} for events in source.shard_scans)
        assert source.events_read_of == []
        assert store.scheduled == {ids[p] for p in ("pro-two", "pro-one", "free-three", "no-plan")}
    finally:
        recomputer.stop()
