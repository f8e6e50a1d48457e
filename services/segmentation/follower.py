"""Real-time memberships: follow profile's change feed, re-evaluate the segments a change can affect, and
re-evaluate persons again when a time window moves past one of their facts.

`Memberships.refresh` is the one place enters and exits are decided outside a batch recompute: it
reads the persons' facts as of now (traits, computed traits and only the events the rules count),
evaluates each rule compiled once for the round (`evaluation.compile_rule`, what `matches` and recompute run;
EvaluatePersonSegments explains with the same conditions), diffs against
the stored members, records the difference in the same tables (`members`, `membership_changes`),
and schedules each person's next time-driven re-evaluation (`realtime.next_change_time`).

`FeedFollower` runs it in a background thread: each round applies the profile changes it has not applied
yet and then the re-evaluations that are due. It reads the feed's unsettled tail too
(shared.changefeed), so a change is applied as soon as profile has written it, not a settle time later;
the cursor it saves in `feed_positions` stays at the settled horizon, and the changes past it that it
reads again (every `TAIL_REREAD_SECONDS`; other rounds read on from the last change seen) are skipped
when already applied (`UnsettledTail`, in memory), so an earlier-stamped change that lands late is still
applied. With several replicas, a lease (`follower_leases`, lightweight transactions with a TTL) lets
one of them follow at a time; the others take over within the TTL if it stops. Every step is idempotent
(members rows are overwritten, a re-applied change evaluates to the same state), so the tail applied
twice after a crash or a lost lease records nothing new, except that an enter/exit decided by two
replicas in the same instant could be logged twice.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Protocol

from services.segmentation.catalog import SegmentCatalog
from services.segmentation.evaluation import ProfileFacts, compile_rule, evaluation_failed
from services.segmentation.profile_source import CHANGE_ERASE, CHANGE_MERGE, CHANGE_SPLIT, FeedChange
from services.segmentation.realtime import (
    EventReads,
    ProfileReads,
    compile_next_change,
    dependencies_of,
    events_read,
    profile_reads,
)
from services.segmentation.rules import Rule
from services.segmentation.store import SegmentStore
from shared.changefeed import UnsettledTail, parse_cursor, with_unsettled
from shared.polling import RepeatingWorker

log = logging.getLogger(__name__)

PROFILE_FEED = "profile"
EXPIRY_FEED = "expiry"
LEASE = "profile-feed"
FEED_PAGE = 1000
DUE_PAGE = 1000
# An idle follower asks profile for new changes this often (what a change waits at most before it is read).
POLL_SECONDS = 0.05
# The unsettled tail is read again this often, for changes stamped earlier than ones already read that landed
# after them (rare: a slow write): how late such a change is applied at most, past its landing.
TAIL_REREAD_SECONDS = 0.25
# Due re-evaluations are looked for this often (how late past its time a window expires someone at most).
SWEEP_SECONDS = 1.0
# The causes recorded with enters/exits (MembershipChange.cause); recompute.py records `recompute`.
CAUSE_REALTIME = "realtime"  # a trait or event change
CAUSE_MERGE = "merge"
CAUSE_SPLIT = "split"
CAUSE_ERASE = "erase"  # a privacy erase: an exit with this cause must not be re-targeted
CAUSE_EXPIRY = "expiry"
# Changes of who is who, by feed change type: they re-evaluate the person against every segment.
IDENTITY_CAUSES = {CHANGE_MERGE: CAUSE_MERGE, CHANGE_SPLIT: CAUSE_SPLIT, CHANGE_ERASE: CAUSE_ERASE}
# The order a round's refreshes run in. Each reads the facts as of now, so a person's enters/exits are
# recorded by the first refresh that evaluates them: an erase's exits say `erase` even when a trait change of
# the same person is in the same round, and a person already evaluated against every segment is not
# evaluated again.
CAUSE_ORDER = (CAUSE_ERASE, CAUSE_SPLIT, CAUSE_MERGE, CAUSE_REALTIME)


class PersonSource(Protocol):
    def changes(self, cursor: str, limit: int) -> tuple[list[FeedChange], str]: ...

    def persons(self, person_ids: Sequence[str], as_of: datetime, events: EventReads,
                fields: ProfileReads) -> Mapping[str, ProfileFacts | None]: ...


@dataclass(frozen=True)
class _Refreshed:
    """What a refresh did: how many (person, segment) pairs it evaluated, who entered and who exited, by segment."""

    evaluated: int
    entered: dict[str, list[str]]
    exited: dict[str, list[str]]


class Memberships:
    """Decides and records enters/exits of persons in segments, outside batch recomputes."""

    def __init__(self, catalog: SegmentCatalog, store: SegmentStore, source: PersonSource,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._catalog = catalog
        self._store = store
        self._source = source
        self._clock = clock

    def apply_changes(self, changes: Sequence[FeedChange]) -> int:
        """Re-evaluate what `changes` can affect; returns how many (person, segment) pairs were evaluated."""
        if not changes:
            return 0
        now = self._clock()
        rules = self._catalog.rules()
        dependencies = {segment_id: dependencies_of(rule, rules, now) for segment_id, rule in rules.items()}
        wanted: dict[str, dict[str, set[str]]] = {cause: {} for cause in CAUSE_ORDER}
        for change in changes:
            identity_cause = IDENTITY_CAUSES.get(change.change_type)
            if identity_cause is not None:
                # Who is who changed: every segment, for the person and the persons merged into it.
                for person_id in (change.person_id, *change.merged_person_ids):
                    wanted[identity_cause].setdefault(person_id, set()).update(rules)
                continue
            affected = {segment_id for segment_id, needs in dependencies.items()
                        if needs.affected_by(change.trait_names, change.event_names)}
            if affected:
                wanted[CAUSE_REALTIME].setdefault(change.person_id, set()).update(affected)
        evaluated = 0
        everywhere: set[str] = set()  # persons already evaluated against every segment this round
        for cause in CAUSE_ORDER:
            persons = {p: segment_ids for p, segment_ids in wanted[cause].items() if p not in everywhere}
            if persons:
                evaluated += self.refresh(persons, cause, rules, now)
            if cause in IDENTITY_CAUSES.values():
                everywhere |= persons.keys()
        return evaluated

    def refresh(self, persons: Mapping[str, set[str]], cause: str, rules: Mapping[str, Rule] | None = None,
                now: datetime | None = None) -> int:
        """Evaluate each person against the given segments now; record enters/exits with `cause`."""
        return self._refresh(persons, cause, rules, now).evaluated

    def reconcile(self, segment_id: str, person_ids: Sequence[str], cause: str) -> tuple[list[str], list[str]]:
        """`refresh` of one segment for these persons: their facts read now, decided against the members
        stored now; returns who entered and who exited."""
        refreshed = self._refresh({person_id: {segment_id} for person_id in person_ids}, cause, None, None)
        return refreshed.entered.get(segment_id, []), refreshed.exited.get(segment_id, [])

    def _refresh(self, persons: Mapping[str, set[str]], cause: str, rules: Mapping[str, Rule] | None,
                 now: datetime | None) -> _Refreshed:
        now = now or self._clock()
        rules = rules if rules is not None else self._catalog.rules()
        segments_of = {p: {s for s in segment_ids if s in rules} for p, segment_ids in persons.items()}
        segments_of = {p: segment_ids for p, segment_ids in segments_of.items() if segment_ids}
        if not segments_of:
            return _Refreshed(0, {}, {})
        evaluated_rules = [rules[s] for segment_ids in segments_of.values() for s in segment_ids]
        # Only the events, traits and computed traits these rules read: a person with megabytes of other traits
        # (each write within profile's limits) made every batch read holding them pass the message limit, and
        # real time stalled for everyone behind it.
        facts = self._source.persons(sorted(segments_of), now, events_read(set(evaluated_rules), rules, now),
                                     profile_reads(set(evaluated_rules), rules, now))
        pairs = [(segment_id, person_id) for person_id, segment_ids in segments_of.items()
                 for segment_id in sorted(segment_ids)]
        current = self._store.memberships(pairs)
        # Each rule compiled once for every person of this round.
        evaluated = {s for segment_ids in segments_of.values() for s in segment_ids}
        member_of = {s: compile_rule(rules[s], now, rules.get) for s in evaluated}
        next_change_of = {s: compile_next_change(rules[s], now, rules.get) for s in evaluated}
        entered: dict[str, list[str]] = {}
        exited: dict[str, list[str]] = {}
        due: list[tuple[str, datetime]] = []
        for person_id, segment_ids in segments_of.items():
            person = facts.get(person_id)
            next_times = []
            for segment_id in sorted(segment_ids):
                try:
                    matched = person is not None and member_of[segment_id](person)
                    if person is not None:
                        next_times.append(next_change_of[segment_id](person))
                except Exception as error:  # contained: see `evaluation_failed`
                    evaluation_failed(segment_id, person_id, error)
                    continue
                member = (segment_id, person_id) in current
                if matched and not member:
                    entered.setdefault(segment_id, []).append(person_id)
                elif member and not matched:
                    exited.setdefault(segment_id, []).append(person_id)
            upcoming = [when for when in next_times if when is not None]
            if upcoming:
                due.append((person_id, min(upcoming)))
        for segment_id in sorted(set(entered) | set(exited)):
            self._store.apply_changes(segment_id, entered.get(segment_id, []), exited.get(segment_id, []), cause, now)
        self._store.schedule(due)
        return _Refreshed(len(pairs), entered, exited)

    def sweep_due(self, day: date, now: datetime, limit: int = DUE_PAGE) -> int:
        """Evaluate again, against every segment, the persons due on `day` by `now`; returns how many."""
        rows = self._store.due(day, now, limit)
        if not rows:
            return 0
        rules = self._catalog.rules()
        self.refresh({person_id: set(rules) for _, person_id in rows}, CAUSE_EXPIRY, rules, now)
        self._store.delete_due(day, rows)
        return len(rows)


class FeedFollower:
    """Background thread: apply profile changes and due re-evaluations while holding the follower lease."""

    def __init__(self, memberships: Memberships, store: SegmentStore, source: PersonSource, *,
                 poll_seconds: float = POLL_SECONDS, sweep_seconds: float = SWEEP_SECONDS,
                 tail_reread_seconds: float = TAIL_REREAD_SECONDS, lease_seconds: int = 15,
                 error_backoff_seconds: float = 2.0,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._memberships = memberships
        self._store = store
        self._source = source
        self._sweep_seconds = sweep_seconds
        self._next_sweep = float("-inf")
        self._clock = clock
        self._lease = store.lease(LEASE, lease_seconds)
        # Where this follower reads from while it holds the lease (None: load the saved position first),
        # and what it applied past that settled position.
        self._cursor: str | None = None
        self._tail = UnsettledTail()
        self._last_seen: uuid.UUID | None = None  # the latest change read, settled or not
        self._tail_reread_seconds = tail_reread_seconds
        self._next_tail_reread = float("-inf")
        self._expiry_day: date | None = None  # the first day of due re-evaluations not swept (None: load it)
        self._worker = RepeatingWorker(
            "segment-feed-follower", self.round, idle_seconds=poll_seconds, lease=self._lease,
            on_lease_lost=self._forget_positions, error_backoff_seconds=error_backoff_seconds,
            failure_message="following profile changes failed; retrying")

    def start(self) -> None:
        self._worker.start()

    def stop(self) -> None:
        self._worker.stop()

    def round(self) -> bool:
        """One round: the changes not applied yet, then (every sweep period) the re-evaluations that are due;
        True when it did anything (the next round then starts at once)."""
        busy = self.follow_once()
        if time.monotonic() >= self._next_sweep:
            swept = self.sweep_once()
            busy += swept
            # A full page means more are due now; otherwise the next ones can wait a sweep period.
            self._next_sweep = time.monotonic() + (0.0 if swept >= DUE_PAGE else self._sweep_seconds)
        return busy > 0

    def _forget_positions(self) -> None:
        # Another replica follows now: start from its saved positions when this one leads again.
        self._cursor = None
        self._expiry_day = None

    def follow_once(self) -> int:
        """Apply the next profile changes not applied yet, settled or not; returns how many.

        Most rounds read only what follows the last change seen, so that a busy feed's unsettled tail is
        not read again on every round; every `tail_reread_seconds` (and while catching up) a round reads
        from the settled cursor instead, applying the changes that landed late and moving the cursor."""
        if self._cursor is None:
            self._cursor = with_unsettled(self._store.feed_position(PROFILE_FEED) or "")
            self._tail.clear()
            self._last_seen = None
        from_settled = self._last_seen is None or time.monotonic() >= self._next_tail_reread
        start = self._cursor if from_settled else with_unsettled(str(self._last_seen))
        changes, following = self._source.changes(start, FEED_PAGE)
        unapplied = set(self._tail.unapplied(c.change_id for c in changes))
        fresh = [c for c in changes if c.change_id in unapplied]
        self._memberships.apply_changes(fresh)
        self._tail.applied(c.change_id for c in fresh)
        if changes:
            self._last_seen = changes[-1].change_id  # the feed's order: later than every change read so far
        if from_settled:
            caught_up = len(changes) < FEED_PAGE
            self._next_tail_reread = time.monotonic() + (self._tail_reread_seconds if caught_up else 0.0)
            if following and following != self._cursor:
                self._store.save_feed_position(PROFILE_FEED, following, self._clock())
                self._cursor = following
                settled = parse_cursor(following)
                if settled is not None:
                    self._tail.settled_through(settled)
        return len(fresh)

    def sweep_once(self) -> int:
        """Re-evaluate the persons whose next time-driven change is due; returns how many."""
        now = self._clock()
        if self._expiry_day is None:
            saved = self._store.feed_position(EXPIRY_FEED)
            # Rows are always scheduled after the moment they are computed at, so nothing is due before the
            # first day this service swept; on the first round that is yesterday (clock skew between replicas).
            self._expiry_day = date.fromisoformat(saved) if saved else now.date() - timedelta(days=1)
            if not saved:
                self._store.save_feed_position(EXPIRY_FEED, self._expiry_day.isoformat(), now)
        swept = 0
        while True:
            count = self._memberships.sweep_due(self._expiry_day, now)
            swept += count
            if count >= DUE_PAGE or self._expiry_day >= now.date():
                return swept  # a full page: more of this day next round
            self._expiry_day += timedelta(days=1)
            self._store.save_feed_position(EXPIRY_FEED, self._expiry_day.isoformat(), now)
