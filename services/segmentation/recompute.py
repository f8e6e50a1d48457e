"""Batch recompute of one segment over every profile, in parallel over token-range shards, as an operation
that outlives the process running it.

Each shard is scanned (profile's ScanProfiles) by its own worker and evaluated with the same
`evaluation.matches` the rest of the service uses. When the rule's traits can decide it without events
(`traits.plan = "pro" AND event(...)`: everyone not on pro), the shard is scanned without events, and
only the persons left undecided have their events read, by person id, in a second phase. The matches are
then diffed against the stored members and the difference recorded as enters/exits with cause `recompute`,
except for the persons real time may have decided about during the scan: those are decided again from fresh
facts (`Memberships.reconcile`).
Persons whose value can change with time alone (a `last N days` window) are scheduled for the real-time
sweeper. Progress (shards done, profiles scanned) is saved after every shard so GetOperation can show it.

An operation is owned: the process running it holds its lease (`follower_leases`, name
`operations/<id>`) and lists it in `running_operations` until it is done. Each process's supervisor
thread renews the leases of its own runs every third of the lease time and looks for listed operations
whose lease has expired (their process died or hung): it takes the lease and runs the operation again
from the start, as the next attempt. A run that loses its lease stops at its next batch. An operation
interrupted `MAX_ATTEMPTS` times ends with ABORTED; one that fails ends with its error; either way a
segment still COMPUTING for that revision becomes FAILED, never COMPUTING forever. A segment COMPUTING
with no live operation of its revision (its process stopped between saving the segment and starting the
operation) gets one from the supervisor after the lease time (`complete_stuck`). Running again is safe:
memberships are diffed against what is stored and written idempotently.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Protocol

from services.segmentation.catalog import SegmentCatalog, SegmentState
from services.segmentation.evaluation import ProfileFacts, compile_rule, evaluation_failed, reported_cycle
from services.segmentation.realtime import (
    EVERY_FIELD,
    NO_EVENTS,
    EventReads,
    ProfileReads,
    compile_next_change,
    compile_settled,
    events_read,
    profile_reads,
)
from services.segmentation.store import OperationRecord, SegmentRecord, SegmentStore, cursor_before
from shared import changefeed, deadline
from shared.changefeed import uuid_ticks, with_unsettled
from shared.errors import DomainError, FailedPrecondition, InvalidArgument, NotFound, StatusCode
from shared.leases import OwnedLeases

if TYPE_CHECKING:  # profile_source imports this module
    from services.segmentation.profile_source import FeedChange

log = logging.getLogger(__name__)
# Within one run, a passing profile or Cassandra failure is retried this many times in all.
RECOMPUTE_TRIES = 4
_RETRYABLE = frozenset({StatusCode.UNAVAILABLE, StatusCode.DEADLINE_EXCEEDED})
# A running operation's owner renews its lease every third of this; past it, another process takes over.
LEASE_SECONDS = 15
# Runs of one operation (the first and the takeovers) before it ends with ABORTED.
MAX_ATTEMPTS = 3

# Scan workers of a recompute by default: one per core (2-8). Their decoding and evaluation hold the GIL
# the real-time follower needs too. On 2 cores (load 11-24), with two recomputes running, real-time p50
# was 0.59/0.61 s with 8 workers each and 0.31/0.34 s with 2 (p99 too noisy to tell), and the
# recomputes were as fast with 2 workers (~1,000-2,000 profiles/s either way: profile's scans bound them).
DEFAULT_PARALLELISM = min(8, max(2, os.cpu_count() or 2))
MAX_PARALLELISM = 64
SHARDS_PER_WORKER = 2
CAUSE = "recompute"
# Persons decided again with fresh facts per round (one BatchGetProfiles read of them, chunked by profile).
RECONCILE_BATCH = 1000
# How long a RecomputeSegment that lost the claim to a concurrent one waits for that one's operation record
# (written just after its claim) before starting its own.
CLAIM_WAIT_SECONDS = 5.0
CHANGES_PAGE = 5000
PROFILE_CHANGES_PAGE = 1000
# Undecided persons of a shard whose events a recompute's second phase reads at a time (profile takes 1,000
# person ids a scan).
EVENT_READ_PERSONS = 1000


class ProfileSource(Protocol):
    def shards(self, count: int) -> list[str]: ...

    def changes(self, cursor: str, limit: int) -> tuple[list[FeedChange], str]: ...

    def scan(self, shard: str, as_of: datetime, events: EventReads,
             fields: ProfileReads = EVERY_FIELD) -> Iterator[list[ProfileFacts]]: ...

    def scan_events(self, shard: str, person_ids: Sequence[str], as_of: datetime,
                    events: EventReads) -> Iterator[list[ProfileFacts]]:
        """The events `events` reads of those of these persons of the shard that still have a profile of their
        own (facts with no traits), read by person id; the others are left out."""
        ...


class Reconciler(Protocol):
    """Decides persons' membership of a segment again from fresh facts (follower.Memberships)."""

    def reconcile(self, segment_id: str, person_ids: Sequence[str], cause: str) -> tuple[list[str], list[str]]: ...


class RunStopped(Exception):
    """A run ends early: its lease was lost (another process runs the operation now) or its process stops."""


def _ring(cycle: tuple[str, ...], segment_id: str) -> str:
    """The cycle (first id repeated last) as `segments/a -> segments/b -> segments/a`, from `segment_id` if on it."""
    ring = list(cycle[:-1])
    start = ring.index(segment_id) if segment_id in ring else 0
    ordered = ring[start:] + ring[:start]
    return " -> ".join(f"segments/{s}" for s in [*ordered, ordered[0]])


class Recomputer:
    def __init__(self, catalog: SegmentCatalog, store: SegmentStore, source: ProfileSource,
                 max_running: int = 2, *, reconciler: Reconciler, lease_seconds: int = LEASE_SECONDS,
                 max_attempts: int = MAX_ATTEMPTS, retry_base_seconds: float = 2.0) -> None:
        self._catalog = catalog
        self._store = store
        self._source = source
        self._lease_seconds = lease_seconds
        self._max_attempts = max_attempts
        self._retry_base = retry_base_seconds
        self._reconciler = reconciler
        self._runner = ThreadPoolExecutor(max_workers=max_running, thread_name_prefix="segment-recompute")
        # The leases of the operations this process owns, renewed by the supervisor.
        self._leases = OwnedLeases(store.lease, lease_seconds, what="a recompute", on_lost=self._stop_lost_run)
        # The operations this process owns, running or queued, and the events that stop their runs.
        self._runs: dict[str, threading.Event] = {}
        self._runs_lock = threading.Lock()
        self._stopping = threading.Event()
        self._supervisor = threading.Thread(target=self._supervise, name="recompute-supervisor", daemon=True)
        # One recompute of a segment at a time in this process: two diffs against the same members would
        # record the same enters twice.
        self._segment_locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    def start_supervisor(self) -> None:
        """Renew this process's leases and take over abandoned operations, in the background."""
        self._supervisor.start()

    def start(self, segment_id: str, parallelism: int = 0) -> OperationRecord:
        if parallelism < 0 or parallelism > MAX_PARALLELISM:
            raise InvalidArgument.for_field("parallelism", f"must be 0 (default {DEFAULT_PARALLELISM}) to "
                                                           f"{MAX_PARALLELISM}, got {parallelism}")
        record = self._catalog.record(segment_id)  # NOT_FOUND before an operation exists
        self._catalog.readable_rule(record)  # FAILED_PRECONDITION before one exists
        running = self._running(record)
        if running is not None:
            return running
        operation_id = uuid.uuid4().hex
        # Conditional on the operation read above: of concurrent calls, one starts an operation and the
        # others answer with it (a double click recomputes once).
        if not self._store.claim_operation(segment_id, record.revision, record.operation_id, operation_id):
            claimed = self._claimed_by_another(segment_id)
            if claimed is not None:
                return claimed
            record = self._catalog.record(segment_id)
            self._store.set_operation(segment_id, record.revision, operation_id)
        return self._launch(operation_id, record, parallelism or DEFAULT_PARALLELISM)

    def _claimed_by_another(self, segment_id: str) -> OperationRecord | None:
        """The operation a concurrent call claimed for the segment's current rule, once that call has recorded
        it (just after its claim); None if none appears within CLAIM_WAIT_SECONDS, or half the time the caller
        has left (that caller failed: this one starts its own), or the rule changed meanwhile."""
        left = deadline.remaining()
        give_up = time.monotonic() + (CLAIM_WAIT_SECONDS if left is None else min(CLAIM_WAIT_SECONDS, left / 2))
        while True:
            record = self._catalog.record(segment_id)
            if not record.operation_id or record.operation_revision != record.revision:
                return None
            operation = self._store.get_operation(record.operation_id)
            if operation is not None:
                return operation
            if time.monotonic() > give_up:
                return None
            time.sleep(0.05)

    def _running(self, record: SegmentRecord) -> OperationRecord | None:
        """The segment's latest operation if it computes the current rule and is still running (listed as
        running: a replica runs it, or takes it over when its owner stopped), else None."""
        if not record.operation_id or record.operation_revision != record.revision:
            return None
        operation = self._store.get_operation(record.operation_id)
        if operation is None:
            # Claimed a moment ago by a concurrent call, which records it next: answer with it, not a rival.
            return self._claimed_by_another(record.segment_id)
        if operation.done or operation.operation_id not in self._store.running_operations():
            return None
        return operation

    def _launch(self, operation_id: str, record: SegmentRecord, workers: int) -> OperationRecord:
        operation = OperationRecord(operation_id, record.segment_id, False, 0, workers * SHARDS_PER_WORKER, 0,
                                    datetime.now(UTC), 0, 0, 0, 0.0, None, None, attempt=1, parallelism=workers,
                                    revision=record.revision)
        self._leases.take_new(operation.operation_id)
        try:
            self._store.save_operation(operation)
        except BaseException:
            self._leases.forget(operation.operation_id)  # never recorded: its lease expires unrenewed
            raise
        stop = self._own(operation.operation_id)  # before it is listed: the supervisor never takes it twice
        try:
            self._store.add_running(operation.operation_id)
            self._runner.submit(self._run, operation, stop)
        except BaseException:
            # Recorded but neither listed nor running: stop owning it (else its lease is renewed forever) and
            # end it. If even that fails, its segment stays COMPUTING without a live operation, which
            # `complete_stuck` restarts after the grace time.
            with self._runs_lock:
                self._runs.pop(operation.operation_id, None)
            try:
                self._fail(operation, "UNAVAILABLE", "the recompute could not be started; call RecomputeSegment "
                                                     "again", "OPERATION_NOT_STARTED")
            except DomainError:
                self._leases.forget(operation.operation_id)
            raise
        return operation

    def complete_stuck(self, now: datetime | None = None) -> list[str]:
        """Start an operation for every segment COMPUTING for longer than the grace time without a live
        operation of its revision (its process stopped between saving the segment and starting the
        operation, or between finishing the operation and recording its outcome); returns their ids.

        An operation that is not done and still listed as running is live: `resume_abandoned` takes it
        over when its owner stops. Of several processes finding the same segment, the one whose claim
        on the segment row wins starts the operation.
        """
        now = now or datetime.now(UTC)
        grace = timedelta(seconds=self._lease_seconds)
        running = set(self._store.running_operations())
        started = []
        for record in self._store.all():
            if record.state != SegmentState.COMPUTING or now - record.update_time < grace:
                continue
            current = record.operation_id if record.operation_revision == record.revision else ""
            operation = self._store.get_operation(current) if current else None
            if operation is not None and (now - operation.start_time < grace
                                          or (not operation.done and current in running)):
                continue
            operation_id = uuid.uuid4().hex
            if not self._store.claim_operation(record.segment_id, record.revision, record.operation_id,
                                               operation_id):
                continue  # another process claimed it, or the rule changed (its change starts an operation)
            log.warning("a segment was left computing without an operation; starting one", extra={
                "segment": record.segment_id, "revision": record.revision, "operation": operation_id})
            self._launch(operation_id, record, DEFAULT_PARALLELISM)
            started.append(record.segment_id)
        return started

    def operation(self, operation_id: str) -> OperationRecord:
        operation = self._store.get_operation(operation_id)
        if operation is None:
            raise NotFound(f"operations/{operation_id} does not exist", reason="OPERATION_NOT_FOUND")
        return operation

    def stop(self) -> None:
        """Stop the runs at their next batch and hand their operations over: their leases are released, so
        another process takes them over at once rather than after the lease time."""
        self._stopping.set()
        with self._runs_lock:
            for stop in self._runs.values():
                stop.set()
        self._runner.shutdown(wait=True, cancel_futures=True)
        if self._supervisor.is_alive():
            self._supervisor.join(timeout=30)
        with self._runs_lock:
            queued = list(self._runs)  # never started: cancelled above
            self._runs.clear()
        for operation_id in queued:
            self._leases.release(operation_id)

    def resume_abandoned(self) -> int:
        """Take over the operations whose owner stopped renewing their lease; returns how many were taken."""
        taken = 0
        for operation_id in self._store.running_operations():
            with self._runs_lock:
                if operation_id in self._runs or self._stopping.is_set():
                    continue
            if not self._leases.take(operation_id):
                continue  # its owner is alive
            try:
                taken += self._take_over(operation_id)
            except BaseException:
                self._leases.forget(operation_id)  # its lease expires unrenewed, and a next round tries again
                raise
        return taken

    def _take_over(self, operation_id: str) -> bool:
        """Run again (or end) an abandoned operation whose lease was just taken; True if it runs again."""
        operation = self._store.get_operation(operation_id)
        if operation is None or operation.done:  # finished just before its owner could unlist it
            self._unlist(operation_id)
            return False
        if operation.attempt >= self._max_attempts:
            self._fail(operation, StatusCode.ABORTED.value,
                       f"the recompute of segments/{operation.segment_id} was interrupted {operation.attempt} "
                       "times (the process running it stopped); call RecomputeSegment to try again",
                       "OPERATION_INTERRUPTED", metadata={"attempts": str(operation.attempt)})
            return False
        operation = replace(operation, attempt=operation.attempt + 1, shards_done=0, profiles_scanned=0)
        log.warning("taking over an interrupted recompute", extra={
            "operation": operation_id, "segment": operation.segment_id, "attempt": operation.attempt})
        self._store.save_operation(operation)
        self._runner.submit(self._run, operation, self._own(operation_id))
        return True

    def renew_leases(self) -> None:
        """Renew the lease of every operation this process owns; stop the runs whose lease was lost."""
        self._leases.renew()

    def _stop_lost_run(self, operation_id: str) -> None:
        log.warning("lost the lease of a running recompute; its new owner runs it", extra={"operation": operation_id})
        with self._runs_lock:
            stop = self._runs.get(operation_id)
        if stop is not None:
            stop.set()

    def _supervise(self) -> None:
        while not self._stopping.wait(self._lease_seconds / 3):
            try:
                self.renew_leases()
                self.resume_abandoned()
                self.complete_stuck()
            except Exception as error:  # the next round tries again, well within the lease time
                log.warning("supervising recomputes failed", extra={"error": f"{type(error).__name__}: {error}"})

    def _own(self, operation_id: str) -> threading.Event:
        """Run the operation whose lease was just taken; returns the event that stops its run."""
        stop = threading.Event()
        with self._runs_lock:
            self._runs[operation_id] = stop
        if not self._leases.holds(operation_id):  # lost before its run was registered
            stop.set()
        return stop

    def _unlist(self, operation_id: str) -> None:
        self._store.remove_running(operation_id)
        self._leases.release(operation_id)

    def _fail(self, operation: OperationRecord, code: str, message: str, reason: str, *,
              metadata: Mapping[str, str] | None = None, elapsed: float = 0.0) -> None:
        """End the operation with the google.rpc code `code` and the ErrorInfo `reason` and `metadata` (the
        segment is added); its segment, if still COMPUTING, is FAILED."""
        failed = replace(operation, done=True, error_code=code, error_message=message, error_reason=reason,
                         error_metadata={"segment": f"segments/{operation.segment_id}", **(metadata or {})},
                         elapsed_seconds=elapsed)
        self._store.save_operation(failed)
        self._store.mark_failed(operation.segment_id, SegmentState.FAILED, SegmentState.COMPUTING, operation.revision)
        self._unlist(operation.operation_id)

    def _recompute_retrying(self, operation: OperationRecord, stop: threading.Event,
                            started: float) -> OperationRecord:
        """A recompute that a passing profile or Cassandra failure (UNAVAILABLE, DEADLINE_EXCEEDED) does not
        end: nobody waits on the operation of a segment's first computation, so it must finish by itself."""
        for attempt in range(1, RECOMPUTE_TRIES + 1):
            try:
                return self._recompute(operation, stop, started)
            except DomainError as error:
                if error.code not in _RETRYABLE or attempt == RECOMPUTE_TRIES:
                    raise
                log.warning("recompute interrupted; retrying", extra={"segment": operation.segment_id,
                                                                      "attempt": attempt, "error": error.message})
                if stop.wait(min(self._retry_base ** attempt, 30.0)):
                    raise RunStopped() from error
        raise AssertionError("unreachable")

    def _run(self, operation: OperationRecord, stop: threading.Event) -> None:
        started = time.perf_counter()
        operation_id = operation.operation_id
        with self._locks_lock:
            segment_lock = self._segment_locks.setdefault(operation.segment_id, threading.Lock())
        try:
            with segment_lock:
                operation = self._recompute_retrying(operation, stop, started)
            self._store.save_operation(replace(operation, elapsed_seconds=time.perf_counter() - started))
            self._unlist(operation_id)
        except RunStopped:
            if self._stopping.is_set():
                self._leases.release(operation_id)  # handed over at once
        except DomainError as error:
            log.warning("recompute failed", extra={"segment": operation.segment_id, "error": error.message})
            self._fail(operation, error.code.value, error.message, error.reason, metadata=error.metadata,
                       elapsed=time.perf_counter() - started)
        except Exception as error:  # a bug: recorded on the operation, traceback in the log
            log.exception("recompute failed", extra={"segment": operation.segment_id})
            self._fail(operation, "INTERNAL", f"recompute failed: {type(error).__name__}", "INTERNAL",
                       elapsed=time.perf_counter() - started)
        finally:
            # A lease still owned here was lost, or its outcome could not be recorded: it is no longer
            # renewed, and expires (a process still listing the operation then takes it over). Forgotten
            # before the run is unregistered, so that the supervisor cannot take it over in between.
            self._leases.forget(operation_id)
            with self._runs_lock:
                self._runs.pop(operation_id, None)

    def _recompute(self, operation: OperationRecord, stop: threading.Event, started: float) -> OperationRecord:
        segment_id = operation.segment_id
        record = self._catalog.record(segment_id)
        # Deleted since `record` was read: NOT_FOUND, as a delete before it would answer.
        rules = self._catalog.rules_for([segment_id])
        rule = rules[segment_id]
        cycle = reported_cycle(rule, rules.get)
        if cycle is not None:
            raise FailedPrecondition(
                f"segments/{segment_id} reaches a cycle of segment references ({_ring(cycle, segment_id)}), so it "
                "matches nobody; change one of those rules (then it is recomputed)", reason="SEGMENT_REFERENCE_CYCLE",
                metadata={"cycle": ",".join(f"segments/{s}" for s in cycle[:-1])})
        as_of = datetime.now(UTC)
        events = events_read([rule], rules, as_of)
        fields = profile_reads([rule], rules, as_of)
        shards = self._source.shards(operation.shards_total)
        operation = replace(operation, shards_total=len(shards), shards_done=0, profiles_scanned=0,
                            revision=record.revision)
        matched: set[str] = set()
        skipped: set[str] = set()  # persons whose evaluation failed: their membership is left as it was
        member = compile_rule(rule, as_of, rules.get)
        next_change = compile_next_change(rule, as_of, rules.get)
        # Two phases when traits can decide without events: the shard is scanned without events first, and
        # the events are read (by person id) only for the persons its traits leave undecided. Not when the rule
        # reads computed traits (profile derives them from every event: the first phase would read them all),
        # reads no events (one phase reads none), or reads no trait (nothing decides without events: a second
        # read of every person would only add to the first).
        two_phases = not fields.computed and bool(fields.trait_names) and events.since is not None
        settled = compile_settled(rule, as_of, rules.get) if two_phases else None

        def scan(shard: str) -> tuple[set[str], set[str], int, list[Callable[[], None]]]:
            """The shard's members, the persons whose evaluation failed (left as they are), its profile count,
            and the waits of its schedule writes: its worker goes on to the next shard while they land (the
            shard counts as done once they have)."""
            members: set[str] = set()
            failed: set[str] = set()
            scanned = 0
            writes = []

            def decide(batch: Iterable[ProfileFacts]) -> None:
                due = []
                for facts in batch:
                    try:
                        if member(facts):
                            members.add(facts.person_id)
                        # The real-time sweeper evaluates this person again when a window moves past an event.
                        when = next_change(facts)
                    except Exception as error:  # contained: see `evaluation_failed`
                        evaluation_failed(segment_id, facts.person_id, error)
                        members.discard(facts.person_id)
                        failed.add(facts.person_id)
                        continue
                    if when is not None:
                        due.append((facts.person_id, when))
                writes.append(self._store.start_schedule(due))

            def read_events(undecided: list[ProfileFacts]) -> None:
                """The second phase for these persons: their facts with their events, decided as in one phase."""
                waiting = {facts.person_id: facts for facts in undecided}
                for batch in self._source.scan_events(shard, list(waiting), as_of, events):
                    if stop.is_set():
                        raise RunStopped()
                    decide([replace(waiting.pop(read.person_id), events=read.events) for read in batch
                            if read.person_id in waiting])
                # Those left in `waiting` were merged into another person or erased since the first phase: no
                # member, as a scan starting now would find. Their merge or erasure is a profile change after
                # `as_of`, so if they were members, the diff leaves them to `reconcile` (`_moved_since`).

            undecided: list[ProfileFacts] = []
            for batch in self._source.scan(shard, as_of, NO_EVENTS if settled is not None else events, fields):
                if stop.is_set():
                    raise RunStopped()
                scanned += len(batch)
                if settled is None:
                    decide(batch)
                    continue
                for facts in batch:
                    try:
                        value = settled(facts)
                    except Exception:  # the full evaluation in the second phase decides, or contains it
                        value = None
                    if value is None:
                        undecided.append(facts)
                    elif value:
                        members.add(facts.person_id)
                    # A person decided here is not scheduled: compile_next_change names no time for a person
                    # `settled` decides (conditions that do not move with time decide the rule whatever the
                    # events, so no window passing an event can change it). Any later change of the profile
                    # (a trait, an event) reaches real time through profile's change feed as for every person.
            # Only once the first scan has ended: a second stream opened while it is open would hold a second of
            # profile's server threads per worker, and workers at least half as many as those threads would
            # each wait, with an open stream, for a thread that none gives back.
            for start in range(0, len(undecided), EVENT_READ_PERSONS):
                read_events(undecided[start:start + EVENT_READ_PERSONS])
            return members, failed, scanned, writes

        workers = operation.parallelism or DEFAULT_PARALLELISM
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"scan-{segment_id}") as pool:
            for future in as_completed([pool.submit(scan, shard) for shard in shards]):
                members, failed, scanned, writes = future.result()
                for wait in writes:
                    wait()
                matched |= members
                skipped |= failed
                operation = replace(operation, shards_done=operation.shards_done + 1,
                                    profiles_scanned=operation.profiles_scanned + scanned,
                                    elapsed_seconds=time.perf_counter() - started)
                self._store.save_operation(operation)
        if stop.is_set():
            raise RunStopped()  # the diff below belongs to whoever owns the operation now
        current = self._store.member_ids(segment_id)
        # The scan saw each profile as of its start; real time may have decided about some persons since, from
        # newer facts. Those are decided again now, with fresh facts, against the members stored now (as real
        # time decides), so that a recompute never undoes a newer decision; the others as the scan says.
        moved = self._moved_since(segment_id, as_of) & (matched ^ current)
        entered = sorted(matched - current - moved)
        exited = sorted(current - matched - moved - skipped)
        if entered or exited:
            # Real time may have recorded some of these very changes after `current` and the moves were read
            # (it lags the ingest: a profile change from before the scan can be decided only now). Recording
            # them again would put a second ENTER or EXIT in the change log, so the members are read once more
            # just before writing. This narrows the window to that read; it does not close it: real time and
            # a recompute do not serialise per (segment, person).
            members_now = self._store.member_ids(segment_id)
            entered = [person_id for person_id in entered if person_id not in members_now]
            exited = [person_id for person_id in exited if person_id in members_now]
        self._store.apply_changes(segment_id, entered, exited, CAUSE, datetime.now(UTC))
        members = (matched | (skipped & current)) - moved
        if skipped:
            log.error("a recompute left persons whose evaluation failed as they were", extra={
                "segment": segment_id, "operation": operation.operation_id, "skipped": len(skipped)})
        pending = sorted(moved)
        for start in range(0, len(pending), RECONCILE_BATCH):
            if stop.is_set():
                raise RunStopped()
            persons = pending[start:start + RECONCILE_BATCH]
            now_in, now_out = self._reconciler.reconcile(segment_id, persons, CAUSE)
            # A person the reconciliation left as it was is a member if the store says so now: real time
            # may have entered them after `current` was read.
            unchanged = [(segment_id, p) for p in persons if p not in now_in and p not in now_out]
            stored = self._store.memberships(unchanged) if unchanged else set()
            members.update(p for p in persons if p in now_in or (segment_id, p) in stored)
            entered += now_in
            exited += now_out
        self._store.set_state(segment_id, SegmentState.READY, record.revision, datetime.now(UTC))
        return replace(operation, done=True, member_count=len(members), entered_count=len(entered),
                       exited_count=len(exited), profiles_skipped=len(skipped))

    def _moved_since(self, segment_id: str, since: datetime) -> set[str]:
        """The persons real time may have decided about since `since`: those of the profile changes stamped
        from a settle time before it (a change lands up to that late), settled or not, and those whose
        membership of the segment changed since (a time window passing)."""
        moved: set[str] = set()
        start = with_unsettled(str(cursor_before(uuid_ticks(since - timedelta(seconds=changefeed.SETTLE_SECONDS)))))
        while True:
            changes, _ = self._source.changes(start, PROFILE_CHANGES_PAGE)
            for change in changes:
                moved.add(change.person_id)
                moved.update(change.merged_person_ids)
            if len(changes) < PROFILE_CHANGES_PAGE:
                break
            start = with_unsettled(str(changes[-1].change_id))
        after = cursor_before(uuid_ticks(since))
        while True:
            page = self._store.changes_page(segment_id, after, CHANGES_PAGE)
            moved.update(change.person_id for change in page)
            if len(page) < CHANGES_PAGE:
                return moved
            after = page[-1].change_id
