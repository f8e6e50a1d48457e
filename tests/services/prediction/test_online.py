"""The online store: answers from memory only while current, cut at each read's time, and never stale past a change.

The profile side is an InMemoryProfileSource whose histories the tests change, as profile's would,
and which counts the persons it is asked for; the feed is a list of changes the tests append to.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest

from services.prediction.history import (
    ActivityEvent,
    InMemoryProfileSource,
    PendingHistories,
    PersonHistory,
    PersonRef,
)
from services.prediction.online import (
    FEED_PAGE,
    ChangeFollower,
    ChangeKind,
    HistoryChange,
    OnlineHistories,
)
from shared.changefeed import FEED_START, parse_cursor, with_unsettled
from shared.errors import DomainError, NotFound

pytestmark = pytest.mark.unit

START = datetime(2024, 1, 1, tzinfo=UTC)
EMAIL = ("email", "ann@example.com")


def at(days: float) -> datetime:
    return START + timedelta(days=days)


def order(days: float, amount: float = 10.0) -> ActivityEvent:
    return ActivityEvent("order", at(days), amount)


class CountingProfile(InMemoryProfileSource):
    """Profile as the store sees it: histories the test can change, and how many persons were read."""

    def __init__(self, events: dict[str, list[ActivityEvent]], identifiers: dict[tuple[str, str], str]) -> None:
        super().__init__(events, identifiers)
        self.reads = 0

    def start_histories_of(self, persons: Sequence[PersonRef], before: datetime | None) -> PendingHistories:
        self.reads += len(persons)
        return super().start_histories_of(persons, before)

    def set_events(self, person_id: str, events: list[ActivityEvent]) -> None:
        self._events[person_id] = sorted(events, key=lambda e: e.time)

    def set_identifier(self, identifier: tuple[str, str], person_id: str) -> None:
        self._identifiers[identifier] = person_id


class ListFeed:
    """A change feed over `log`: every change is returned (unsettled) until `settle()` moves the settled
    cursor past it, so a reader gets it again on each read until then, as from profile's feed."""

    def __init__(self) -> None:
        self.log: list[HistoryChange] = []
        self.settled = 0  # changes before this position are settled

    def add(self, person_id: str, kind: ChangeKind, merged: tuple[str, ...] = ()) -> None:
        self.log.append(HistoryChange(uuid.uuid1(), person_id, kind, merged))

    def settle(self) -> None:
        self.settled = len(self.log)

    def cursor_at(self, time: datetime) -> str:
        return str(FEED_START)

    def changes(self, cursor: str, limit: int) -> tuple[list[HistoryChange], str]:
        after = parse_cursor(cursor)
        ids = [c.change_id for c in self.log]
        start = 0 if after is None or after == FEED_START else ids.index(after) + 1
        page = self.log[start:start + limit]
        settled = max(start, min(self.settled, start + len(page)))
        following = ids[settled - 1] if settled else FEED_START
        return page, with_unsettled(str(following))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


ANN, BOB = PersonRef(person_id="ann"), PersonRef(person_id="bob")
ANN_BY_EMAIL = PersonRef(identifier_type=EMAIL[0], identifier_value=EMAIL[1])


def world(max_events: int = 1000) -> tuple[CountingProfile, ListFeed, Clock, OnlineHistories, ChangeFollower]:
    profile = CountingProfile({"ann": [order(1), order(5), order(9)], "bob": [order(2)]}, {EMAIL: "ann"})
    feed = ListFeed()
    clock = Clock()
    online = OnlineHistories(profile, max_events=max_events, max_lag_seconds=5.0, monotonic=clock)
    follower = ChangeFollower(online, feed, monotonic=clock)
    return profile, feed, clock, online, follower


def times(history: PersonHistory | DomainError) -> list[datetime]:
    assert isinstance(history, PersonHistory)
    return [e.time for e in history.events]


def test_a_current_store_reads_each_person_once_and_cuts_every_answer_at_its_time() -> None:
    profile, _, _, online, follower = world()
    follower.follow_once()
    assert times(online.history(ANN, at(6))) == [at(1), at(5)]
    assert times(online.history(ANN, at(100))) == [at(1), at(5), at(9)]
    assert times(online.history(ANN, at(5))) == [at(1)]  # strictly before, as training sees it
    assert profile.reads == 1
    # By identifier: read once (the store cannot know which person it names), then from memory.
    assert online.history(ANN_BY_EMAIL, at(100)).person_id == "ann"
    assert online.history(ANN_BY_EMAIL, at(6)).person_id == "ann"
    assert profile.reads == 2
    results = online.histories_of([BOB, PersonRef(person_id="nobody"), ANN], None)
    assert isinstance(results[1], NotFound) and times(results[2]) == [at(1), at(5), at(9)]
    assert times(results[0]) == [at(2)] and profile.reads == 4  # bob and nobody (not found is never kept)


def test_without_a_current_follower_every_read_goes_to_profile() -> None:
    profile, _, clock, online, follower = world()
    online.history(ANN, None)
    online.history(ANN, None)
    assert profile.reads == 2  # never followed: nothing is kept
    follower.follow_once()
    online.history(ANN, None)
    online.history(ANN, None)
    assert profile.reads == 3
    clock.now += 6  # the follower has not reached the feed's end for longer than max_lag
    online.history(ANN, None)
    assert profile.reads == 4


def test_a_change_drops_the_person_so_the_next_read_sees_it() -> None:
    profile, feed, _, online, follower = world()
    follower.follow_once()
    online.history(ANN, None)
    online.history(BOB, None)
    profile.set_events("ann", [order(1), order(5), order(9), order(12)])
    assert times(online.history(ANN, None))[-1] == at(9)  # profile's change not followed yet: stale
    feed.add("ann", ChangeKind.EVENTS)
    feed.add("bob", ChangeKind.TRAITS)  # a score written back: history unchanged
    follower.follow_once()
    reads = profile.reads
    assert times(online.history(ANN, None))[-1] == at(12)
    online.history(BOB, None)
    assert profile.reads == reads + 1


def test_a_merge_split_or_erasure_forgets_where_selectors_lead() -> None:
    profile, feed, _, online, follower = world()
    follower.follow_once()
    assert online.history(ANN_BY_EMAIL, None).person_id == "ann"
    # Identity merged ann into bob: the email now leads to bob, whose history includes ann's.
    profile.set_identifier(EMAIL, "bob")
    profile.set_events("bob", [order(1), order(2), order(5), order(9)])
    feed.add("bob", ChangeKind.MERGE, ("ann",))
    follower.follow_once()
    merged = online.history(ANN_BY_EMAIL, None)
    assert merged.person_id == "bob" and len(merged.events) == 4
    profile.set_identifier(EMAIL, "ann")
    feed.add("bob", ChangeKind.SPLIT)
    follower.follow_once()
    assert online.history(ANN_BY_EMAIL, None).person_id == "ann"
    del profile._identifiers[EMAIL]
    feed.add("ann", ChangeKind.ERASE)
    follower.follow_once()
    with pytest.raises(NotFound):
        online.history(ANN_BY_EMAIL, None)


def test_a_read_in_flight_when_its_person_changed_is_not_kept() -> None:
    profile, feed, _, online, follower = world()
    follower.follow_once()
    pending = online.start_histories_of([ANN, BOB], None)  # ReadHistories: answered as of now
    feed.add("ann", ChangeKind.EVENTS)
    follower.follow_once()
    assert [h.person_id for h in pending.result() if isinstance(h, PersonHistory)] == ["ann", "bob"]
    reads = profile.reads
    online.history(ANN, None)
    online.history(BOB, None)
    assert profile.reads == reads + 1  # ann read again; bob, unchanged, was kept


def test_least_recently_used_persons_go_first_beyond_the_event_budget() -> None:
    profile, _, _, online, follower = world(max_events=3)
    follower.follow_once()
    online.history(ANN, None)  # 3 events
    online.history(BOB, None)  # 1 more: ann goes
    assert online.size() == (1, 1)
    reads = profile.reads
    online.history(BOB, None)
    online.history(ANN, None)
    assert profile.reads == reads + 1 and online.size() == (1, 3)


def test_the_follower_is_current_only_at_the_end_of_the_feed() -> None:
    _, feed, _, online, follower = world()
    for number in range(FEED_PAGE + 1):
        feed.add(f"p{number}", ChangeKind.EVENTS)
    feed.settle()
    assert follower.follow_once() == FEED_PAGE and not online.is_current()
    assert follower.follow_once() == 1 and online.is_current()


def test_a_change_read_again_before_it_settles_is_applied_once() -> None:
    profile, feed, _, online, follower = world()
    follower.follow_once()
    online.history(ANN, None)
    feed.add("ann", ChangeKind.EVENTS)
    follower.follow_once()  # unsettled: applied at once
    online.history(ANN, None)
    reads = profile.reads
    follower.follow_once()  # the same change again, still unsettled: not applied twice
    feed.settle()
    follower.follow_once()
    follower.follow_once()
    online.history(ANN, None)
    assert reads == profile.reads == 2
