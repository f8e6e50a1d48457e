"""Batch recompute of one segment over every profile, in parallel over token-range shards, as an operation.

Each shard is scanned (profile's ScanProfiles) by its own worker and evaluated with the same
`evaluation.matches` the rest of the service uses; the matches are then diffed against the stored
members and the difference recorded as enters/exits with cause `recompute`. Persons whose value can change
with time alone (a `last N days` window) are scheduled for the real-time sweeper. Progress (shards done,
profiles scanned) is saved after every shard so GetOperation can show it.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import replace
from datetime import UTC, datetime
from typing import Protocol

from services.segmentation.catalog import SegmentCatalog, SegmentState
from services.segmentation.evaluation import ProfileFacts, matches
from services.segmentation.realtime import next_change_time
from services.segmentation.rules import EventAggregateCondition, EventCountCondition, Rule, conditions
from services.segmentation.store import OperationRecord, SegmentStore
from shared.errors import DomainError, InvalidArgument, NotFound, StatusCode

log = logging.getLogger(__name__)
RECOMPUTE_ATTEMPTS = 4
_RETRYABLE = frozenset({StatusCode.UNAVAILABLE, StatusCode.DEADLINE_EXCEEDED})

DEFAULT_PARALLELISM = 8
MAX_PARALLELISM = 64
SHARDS_PER_WORKER = 2
CAUSE = "recompute"


class ProfileSource(Protocol):
    def shards(self, count: int) -> list[str]: ...

    def scan(self, shard: str, as_of: datetime, with_events: bool) -> Iterator[list[ProfileFacts]]: ...


def needs_events(rule: Rule, rules: dict[str, Rule]) -> bool:
    """Whether evaluating `rule` (and the segments it refers to) looks at events."""
    seen: set[str] = set()
    pending = [rule]
    while pending:
        current = pending.pop()
        for condition in conditions(current):
            if isinstance(condition, EventCountCondition | EventAggregateCondition):
                return True
            segment_id = getattr(condition, "segment_id", None)
            if isinstance(segment_id, str) and segment_id not in seen and segment_id in rules:
                seen.add(segment_id)
                pending.append(rules[segment_id])
    return False


class Recomputer:
    def __init__(self, catalog: SegmentCatalog, store: SegmentStore, source: ProfileSource,
                 max_running: int = 2) -> None:
        self._catalog = catalog
        self._store = store
        self._source = source
        self._runner = ThreadPoolExecutor(max_workers=max_running, thread_name_prefix="segment-recompute")
        # One recompute of a segment at a time in this process: two diffs against the same members would
        # record the same enters twice.
        self._segment_locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    def start(self, segment_id: str, parallelism: int = 0) -> OperationRecord:
        if parallelism < 0 or parallelism > MAX_PARALLELISM:
            raise InvalidArgument.for_field("parallelism", f"must be 0 (default {DEFAULT_PARALLELISM}) to "
                                                           f"{MAX_PARALLELISM}, got {parallelism}")
        self._catalog.record(segment_id)  # NOT_FOUND before an operation exists
        workers = parallelism or DEFAULT_PARALLELISM
        operation = OperationRecord(uuid.uuid4().hex, segment_id, False, 0, workers * SHARDS_PER_WORKER, 0,
                                    datetime.now(UTC), 0, 0, 0, 0.0, None, None)
        self._store.save_operation(operation)
        self._runner.submit(self._run, operation, workers)
        return operation

    def operation(self, operation_id: str) -> OperationRecord:
        operation = self._store.get_operation(operation_id)
        if operation is None:
            raise NotFound(f"operations/{operation_id} does not exist", reason="OPERATION_NOT_FOUND")
        return operation

    def stop(self) -> None:
        self._runner.shutdown(wait=True, cancel_futures=True)

    def _recompute_retrying(self, operation: OperationRecord, workers: int, started: float) -> OperationRecord:
        """A recompute that a passing profile or Cassandra failure (UNAVAILABLE, DEADLINE_EXCEEDED) does not
        end: nobody waits on the operation of a segment's first computation, so it must finish by itself.
        Rerunning is safe: memberships are written idempotently and diffed against what is stored."""
        for attempt in range(1, RECOMPUTE_ATTEMPTS + 1):
            try:
                return self._recompute(operation, workers, started)
            except DomainError as error:
                if error.code not in _RETRYABLE or attempt == RECOMPUTE_ATTEMPTS:
                    raise
                log.warning("recompute interrupted; retrying", extra={"segment": operation.segment_id,
                                                                      "attempt": attempt, "error": error.message})
                time.sleep(min(2.0 ** attempt, 30.0))
        raise AssertionError("unreachable")

    def _run(self, operation: OperationRecord, workers: int) -> None:
        started = time.perf_counter()
        with self._locks_lock:
            segment_lock = self._segment_locks.setdefault(operation.segment_id, threading.Lock())
        try:
            with segment_lock:
                operation = self._recompute_retrying(operation, workers, started)
        except DomainError as error:
            log.warning("recompute failed", extra={"segment": operation.segment_id, "error": error.message})
            operation = replace(operation, done=True, error_code=error.code.value, error_message=error.message)
        except Exception as error:  # a bug: recorded on the operation, traceback in the log
            log.exception("recompute failed", extra={"segment": operation.segment_id})
            operation = replace(operation, done=True, error_code="INTERNAL",
                                error_message=f"recompute failed: {type(error).__name__}")
        self._store.save_operation(replace(operation, elapsed_seconds=time.perf_counter() - started))

    def _recompute(self, operation: OperationRecord, workers: int, started: float) -> OperationRecord:
        segment_id = operation.segment_id
        record = self._catalog.record(segment_id)
        rules = self._catalog.rules()
        rule = rules[segment_id]
        as_of = datetime.now(UTC)
        with_events = needs_events(rule, rules)
        shards = self._source.shards(operation.shards_total)
        operation = replace(operation, shards_total=len(shards))
        matched: set[str] = set()

        def scan(shard: str) -> tuple[set[str], int]:
            members: set[str] = set()
            scanned = 0
            for batch in self._source.scan(shard, as_of, with_events):
                scanned += len(batch)
                members.update(f.person_id for f in batch if matches(rule, f, as_of, rules.get))
                # The real-time sweeper evaluates these persons again when a window moves past their events.
                due = [(f.person_id, when) for f in batch
                       if (when := next_change_time(rule, f, as_of, rules.get)) is not None]
                self._store.schedule(due)
            return members, scanned

        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"scan-{segment_id}") as pool:
            for future in as_completed([pool.submit(scan, shard) for shard in shards]):
                members, scanned = future.result()
                matched |= members
                operation = replace(operation, shards_done=operation.shards_done + 1,
                                    profiles_scanned=operation.profiles_scanned + scanned,
                                    elapsed_seconds=time.perf_counter() - started)
                self._store.save_operation(operation)
        current = self._store.member_ids(segment_id)
        entered = sorted(matched - current)
        exited = sorted(current - matched)
        self._store.apply_changes(segment_id, entered, exited, CAUSE, datetime.now(UTC))
        self._store.set_state(segment_id, SegmentState.READY, record.revision, datetime.now(UTC))
        return replace(operation, done=True, member_count=len(matched), entered_count=len(entered),
                       exited_count=len(exited))
