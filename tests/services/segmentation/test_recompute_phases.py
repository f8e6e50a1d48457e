"""A recompute whose rule traits settle for some persons reads the events of the others only (two phases: a
scan without events, then BatchGetProfiles of the unsettled), with the same members and schedule as reading
everybody's events; rules that traits cannot settle keep one scan with events. Over the real profile service."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, timedelta

import pytest
from onecdp.profile.v1 import profile_service_pb2_grpc as profile_grpc

from services.segmentation.catalog import RuleInput, SegmentCatalog
from services.segmentation.evaluation import ProfileFacts, compile_rule
from services.segmentation.profile_source import GrpcProfileSource
from services.segmentation.realtime import EventReads, compile_next_change, events_read
from services.segmentation.recompute import EVERY_FIELD, Recomputer
from services.segmentation.store import SegmentStore
from services.segmentation.text import parse
from shared.cassandra import CassandraSession
from shared.clients import profile_stub
from shared.config import GrpcSettings
from shared.runner import RunningService
from tests.services.segmentation.conftest import identify, ingest, order

pytestmark = pytest.mark.integration

RECENT_ORDERS = 'event("order").count(last 30d)'
# Rule text -> (the persons it has, the persons whose events the recompute reads; None: one scan with events).
RULES: dict[str, tuple[str, set[str], set[str] | None]] = {
    "pro-buyers": (f'traits.plan = "pro" AND {RECENT_ORDERS} >= 2', {"ann"}, {"ann", "bob", "eve"}),
    "free-or-buyers": (f'traits.plan = "free" OR {RECENT_ORDERS} >= 2', {"ann", "cid", "dan"},
                       {"ann", "bob", "dan", "eve"}),
    # Were the pros' events not read, ann and bob would wrongly be in.
    "idle-pros": (f'traits.plan = "pro" AND NOT {RECENT_ORDERS} >= 1', {"eve"}, {"ann", "bob", "eve"}),
    "planless-buyers": (f'NOT (traits.plan = "pro" OR traits.plan = "free") AND {RECENT_ORDERS} >= 1', {"dan"},
                        {"dan"}),
    "buyers": (f"{RECENT_ORDERS} >= 2", {"ann", "cid", "dan"}, None),
    # Traits can only make the OR true, which the AND cannot use.
    "pro-or-buyer-buyers": (f'(traits.plan = "pro" OR {RECENT_ORDERS} >= 1) AND {RECENT_ORDERS} >= 2',
                            {"ann", "cid", "dan"}, None),
    # Computed traits make profile read every event anyway.
    "pro-frequent-buyers": (f'traits.plan = "pro" AND computed.frequency >= 1 AND {RECENT_ORDERS} >= 2', {"ann"},
                            None),
}


class CountingSource(GrpcProfileSource):
    """The real source, remembering whose events it was asked to read; `before_events` runs before each read."""

    def __init__(self, stub: profile_grpc.ProfileServiceStub) -> None:
        super().__init__(stub)
        self.events_read_for: list[str] = []
        self.before_events: Callable[[Sequence[ProfileFacts]], None] = lambda persons: None

    def with_events(self, persons: Sequence[ProfileFacts], as_of: datetime, events: EventReads) -> list[ProfileFacts]:
        self.events_read_for += [facts.person_id for facts in persons]
        self.before_events(persons)
        return super().with_events(persons, as_of, events)


def days_ago(days: float) -> str:
    return (datetime.now(UTC) - timedelta(days=days)).replace(tzinfo=None).isoformat()


def recompute(recomputer: Recomputer, store: SegmentStore, segment_id: str) -> None:
    operation = recomputer.start(segment_id, parallelism=2)
    end = time.monotonic() + 60
    while not operation.done and time.monotonic() < end:
        time.sleep(0.2)
        found = store.get_operation(operation.operation_id)
        assert found is not None
        operation = found
    assert operation.done and operation.error_code is None, operation


def one_scan_with_events(source: GrpcProfileSource, rule_text: str, as_of: datetime,
                         ) -> tuple[set[str], dict[str, datetime]]:
    """Members and next change times of every profile read in one scan with its events (the recompute before
    two phases)."""
    rule = parse(rule_text)
    member, next_change = compile_rule(rule, as_of, lambda _: None), compile_next_change(rule, as_of, lambda _: None)
    members: set[str] = set()
    changes: dict[str, datetime] = {}
    for shard in source.shards(4):
        for batch in source.scan(shard, as_of, events_read([rule], {}, as_of), EVERY_FIELD):
            members |= {f.person_id for f in batch if member(f)}
            changes |= {f.person_id: when for f in batch if (when := next_change(f)) is not None}
    return members, changes


def scheduled(store: SegmentStore, person_ids: set[str]) -> dict[str, list[datetime]]:
    """The re-evaluations scheduled for these persons in the next 31 days."""
    today = datetime.now(UTC).date()
    later = datetime.now(UTC) + timedelta(days=40)
    rows = [row for day in range(32) for row in store.due(today + timedelta(days=day), later, 10_000)]
    found: dict[str, list[datetime]] = {}
    for when, person_id in rows:
        if person_id in person_ids:
            found.setdefault(person_id, []).append(when)
    return found


def clear_schedule(session: CassandraSession, days: list[date]) -> None:
    for day in days:
        session.execute("DELETE FROM reevaluations WHERE day = ?", (day,))


def test_only_the_persons_traits_leave_unsettled_have_their_events_read(
        segmentation_session: CassandraSession, grpc_settings: GrpcSettings, profile_service: RunningService,
        profiles: profile_grpc.ProfileServiceStub) -> None:
    month = days_ago(60)
    persons = ingest(profiles,
                     identify("ann", month, {"plan": "pro"}), order("ann", "a1", 10, days_ago(3)),
                     order("ann", "a2", 10, days_ago(5)),
                     identify("bob", month, {"plan": "pro"}), order("bob", "b1", 10, days_ago(2)),
                     order("bob", "b2", 10, days_ago(40)),
                     identify("cid", month, {"plan": "free"}), *[order("cid", f"c{n}", 5, days_ago(n + 1))
                                                                 for n in range(3)],
                     identify("dan", month, {"country": "FR"}), order("dan", "d1", 10, days_ago(4)),
                     order("dan", "d2", 10, days_ago(6)),
                     identify("eve", month, {"plan": "pro"}))
    name_of = {person_id: name for name, person_id in persons.items()}
    store = SegmentStore(segmentation_session)
    catalog = SegmentCatalog(store)  # starts no computation: the recomputer below runs them
    source = CountingSource(profile_stub(grpc_settings.model_copy(
        update={"profile_target": f"127.0.0.1:{profile_service.port}"})))
    recomputer = Recomputer(catalog, store, source)
    days = [datetime.now(UTC).date() + timedelta(days=day) for day in range(32)]
    try:
        for segment_id, (text, expected, events_read_for) in RULES.items():
            catalog.create(segment_id, "", "", RuleInput(parse(text), "segment.rule_text", from_text=True))
            clear_schedule(segmentation_session, days)
            source.events_read_for = []
            recompute(recomputer, store, segment_id)
            members = store.member_ids(segment_id)
            assert {name_of[p] for p in members} == expected, segment_id
            read_for = {name_of[p] for p in source.events_read_for}
            assert read_for == (events_read_for or set()), segment_id
            assert len(source.events_read_for) == len(read_for), segment_id  # each person's events once
            # The same members and re-evaluation times as one scan reading everybody's events.
            before_members, before_changes = one_scan_with_events(source, text, datetime.now(UTC))
            assert members == before_members, segment_id
            times = scheduled(store, set(persons.values()))
            assert set(times) == set(before_changes), segment_id
            for person_id, when in before_changes.items():  # as of a moment later: the same event's passing
                assert any(abs(t - when) < timedelta(minutes=5) for t in times[person_id]), segment_id
    finally:
        recomputer.stop()


def test_a_person_merged_into_another_between_the_phases_is_left_out_as_a_scan_would(
        segmentation_session: CassandraSession, grpc_settings: GrpcSettings, profile_service: RunningService,
        profiles: profile_grpc.ProfileServiceStub) -> None:
    month = days_ago(60)
    # gus (a device so far) is older: a merge keeps him.
    gus_device = identify("gus", month, {"country": "DE"})
    gus_device.identifiers[0].type = "cookie"
    persons = ingest(profiles, gus_device)
    persons |= ingest(profiles, identify("fay", month, {"plan": "pro"}), order("fay", "f1", 10, days_ago(2)),
                      order("fay", "f2", 10, days_ago(3)),
                      identify("hal", month, {"plan": "pro"}), order("hal", "h1", 10, days_ago(2)),
                      order("hal", "h2", 10, days_ago(3)))
    store = SegmentStore(segmentation_session)
    catalog = SegmentCatalog(store)
    source = CountingSource(profile_stub(grpc_settings.model_copy(
        update={"profile_target": f"127.0.0.1:{profile_service.port}"})))

    def merge_fay_into_gus(facts: Sequence[ProfileFacts]) -> None:
        if persons["fay"] in {f.person_id for f in facts}:
            login = identify("fay", days_ago(1), {})
            login.identifiers.add(type="cookie", value="gus")
            assert ingest(profiles, login)["fay"] == persons["gus"]  # fay's profile is gus's now
    source.before_events = merge_fay_into_gus
    recomputer = Recomputer(catalog, store, source)
    try:
        catalog.create("pro-buyers", "", "", RuleInput(parse(RULES["pro-buyers"][0]), "segment.rule_text",
                                                       from_text=True))
        recompute(recomputer, store, "pro-buyers")
    finally:
        recomputer.stop()
    assert persons["fay"] in source.events_read_for
    members = store.member_ids("pro-buyers")
    # fay has no profile of her own any more; gus has hers now, and is in if the scan reached him after the merge.
    assert persons["fay"] not in members and persons["hal"] in members
    assert members - {persons["gus"]} == {persons["hal"]}
    assert persons["fay"] not in scheduled(store, {persons["fay"]})
