"""Short leases that serialize recomputation of a component, many per lightweight transaction.

A lease is a row `(bucket, lease_key) -> owner` written with `IF NOT EXISTS` and removed with
`IF owner = ?`; rows expire after 30 s, so a writer that dies frees its leases. Keys are spread over
`LEASE_BUCKETS` partitions, and all keys of one acquisition that fall in one bucket are taken by one
conditional batch (a batch of conditional statements is one Paxos round when it stays in one
partition). A call linking 200 observations thus takes its few hundred leases in at most
`LEASE_BUCKETS` lightweight transactions instead of one each, and releases them the same way.

A conditional batch is all-or-nothing: when a key of a bucket is held by someone else, the batch
applies nothing and returns the rows that exist. `acquire_groups` then gives up the groups that need
those keys and retries the bucket for the others, so one busy component does not hold back the rest.
"""

from __future__ import annotations

import logging
import threading
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from typing import Any

from shared.cassandra import SERIAL_CONSISTENCY, CassandraSession, translate_driver_error
from shared.errors import DomainError, Unavailable

log = logging.getLogger(__name__)

# Few enough that a large call needs few transactions, enough that concurrent writers rarely contend
# for one partition's Paxos state. A conditional batch costs Cassandra about as much as a single
# lightweight transaction however many leases it carries, and a link call of a few hundred
# observations has keys in every bucket: 8 instead of 16 took 0.19 instead of 0.33 lightweight
# transactions and 0.68 instead of 1.01 Paxos writes per observation in bench.identity.
# Changing it moves leases to other partitions: processes with different values do not exclude each
# other, so every identity process must run the same value (stop the old ones before the new ones
# link, as when `locks` became `leases`).
LEASE_BUCKETS = 8
# Retries of a bucket within one acquisition, each without the groups found blocked so far.
BUCKET_ATTEMPTS = 3

_TAKE = "INSERT INTO leases (bucket, lease_key, owner) VALUES (?, ?, ?) IF NOT EXISTS"
_GIVE_BACK = "DELETE FROM leases WHERE bucket = ? AND lease_key = ? IF owner = ?"
_READ_BACK = "SELECT lease_key, owner FROM leases WHERE bucket = ? AND lease_key IN ?"


def bucket_of(key: str) -> int:
    return zlib.crc32(key.encode()) % LEASE_BUCKETS


def _by_bucket(keys: Iterable[str]) -> dict[int, set[str]]:
    buckets: dict[int, set[str]] = defaultdict(set)
    for key in keys:
        buckets[bucket_of(key)].add(key)
    return buckets


class Leases:
    def __init__(self, session: CassandraSession) -> None:
        self._session = session
        # Leases held by threads of this process, so that they contend here (and are woken when a
        # lease comes back) instead of polling Cassandra with lightweight transactions bound to fail.
        self._changed = threading.Condition()
        self._local: dict[str, str] = {}
        self._waiting_for: Counter[str] = Counter()

    def acquire_groups(self, groups: Sequence[Set[str]], owner: str) -> list[bool]:
        """Take every key of as many groups as possible for `owner`; which groups are wholly held.

        Groups must be disjoint. Keys of a group that could not be wholly taken are given back at once.
        Keys another thread of this process holds are not even tried: that group waits (`wait`).
        """
        with self._changed:
            free = [all(k not in self._local for k in group) for group in groups]
            for group, ok in zip(groups, free, strict=True):
                if ok:
                    self._local.update(dict.fromkeys(group, owner))
        candidates = [index for index, ok in enumerate(free) if ok]
        group_of = {key: position for position, index in enumerate(candidates) for key in groups[index]}
        try:
            taken = self._acquire_stored(len(candidates), group_of, owner)
        except DomainError:
            # A batch that failed half way may still have applied: give back whatever we may hold.
            self.release_held(dict.fromkeys(group_of, owner))
            raise
        granted = [False] * len(groups)
        refused: dict[str, str] = {}
        for index, ok in zip(candidates, taken, strict=True):
            granted[index] = ok
            if not ok:
                refused.update(dict.fromkeys(groups[index], owner))
        self._release_local(refused)
        return granted

    def acquire_all(self, keys: Set[str], owner: str) -> bool:
        """Take every key or none."""
        return self.acquire_groups([keys], owner)[0] if keys else True

    def release(self, keys: Iterable[str], owner: str) -> None:
        """Give back leases; a failure is logged, not raised (the leases expire on their own)."""
        self.release_held(dict.fromkeys(keys, owner))

    def release_held(self, owners: Mapping[str, str]) -> None:
        """Give back leases taken by several acquisitions at once: `owners` maps each key to its owner."""
        self.start_release(owners)()

    def start_release(self, owners: Mapping[str, str]) -> Callable[[], None]:
        """`release_held`, returning once the releases are sent: call the result to wait for them.

        The leases count as held in this process until then.
        """
        given_back = self._start_give_back(owners)

        def wait() -> None:
            try:
                given_back()
            finally:
                self._release_local(owners)
        return wait

    def wanted(self, keys: Iterable[str]) -> bool:
        """Whether a thread of this process waits for any of `keys`."""
        with self._changed:
            return any(self._waiting_for[k] for k in keys)

    def wait(self, keys: Set[str], timeout: float | None, unless: Callable[[], bool] = lambda: False) -> None:
        """Wait until leases are given back in this process, `notify` is called, or `timeout` passes.

        `unless` is checked under the same lock `notify` takes, so a notification sent just before
        the wait is not lost. While waiting, `keys` are announced as wanted, so holders that finished
        give them back on their next look instead of at the end of their call.
        """
        with self._changed:
            if unless():
                return
            self._waiting_for.update(keys)
            try:
                self._changed.wait(timeout)
            finally:
                self._waiting_for.subtract(keys)

    def notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def _release_local(self, owners: Mapping[str, str]) -> None:
        if not owners:
            return
        with self._changed:
            for key, owner in owners.items():
                if self._local.get(key) == owner:
                    del self._local[key]
            self._changed.notify_all()

    def _acquire_stored(self, count: int, group_of: Mapping[str, int], owner: str) -> list[bool]:
        blocked: set[int] = set()
        held: set[str] = set()
        wanted = _by_bucket(group_of)
        for _ in range(BUCKET_ATTEMPTS):
            if not wanted:
                break
            outcomes = self._take(wanted, owner)
            retry: dict[int, set[str]] = {}
            for bucket, taken_by_others in outcomes.items():
                if taken_by_others is None:
                    held |= wanted[bucket]
                    continue
                # Unknown culprits (an unresolved timeout): every group of the bucket waits a round.
                culprits = taken_by_others or wanted[bucket]
                blocked |= {group_of[k] for k in culprits if k in group_of}
                retry[bucket] = wanted[bucket]
            wanted = {b: kept for b, keys in retry.items() if (kept := {k for k in keys if group_of[k] not in blocked})}
        blocked |= {group_of[k] for keys in wanted.values() for k in keys}
        surplus = [k for k in held if group_of[k] in blocked]
        if surplus:
            self._give_back(dict.fromkeys(surplus, owner))
        return [index not in blocked for index in range(count)]

    def _give_back(self, owners: Mapping[str, str]) -> None:
        self._start_give_back(owners)()

    def _start_give_back(self, owners: Mapping[str, str]) -> Callable[[], None]:
        """Send the conditional deletes of `owners`' leases; the result waits for them. Neither raises:
        a lease that could not be given back expires on its own."""
        buckets = _by_bucket(owners)
        futures: dict[int, Any] = {}

        def failed(error: DomainError) -> None:
            log.warning("could not release identity leases; they expire within 30 s",
                        extra={"leases": len(owners), "error": error.message})

        try:
            for bucket, keys in buckets.items():
                futures[bucket] = self._start_batch(_GIVE_BACK, [(bucket, k, owners[k]) for k in sorted(keys)])
        except DomainError as error:
            failed(error)

        def wait() -> None:
            try:
                for bucket, future in futures.items():
                    if not self._wait(future).was_applied:
                        # A lease of ours expired and was taken by another writer: give back the rest one by one.
                        for key in buckets[bucket]:
                            self._session.execute(_GIVE_BACK, (bucket, key, owners[key]))
            except DomainError as error:
                failed(error)
        return wait

    def _take(self, wanted: Mapping[int, set[str]], owner: str) -> dict[int, set[str] | None]:
        """Per bucket: None when its batch applied, else the keys found held by others."""
        rows = {b: [(b, k, owner) for k in sorted(keys)] for b, keys in wanted.items()}
        futures = {b: self._start_batch(_TAKE, rows[b]) for b in rows}
        outcomes: dict[int, set[str] | None] = {}
        for bucket, future in futures.items():
            try:
                result = self._wait(future)
            except Unavailable:
                # A compare-and-set that timed out may still have been applied: read back at SERIAL.
                outcomes[bucket] = self._read_back(bucket, wanted[bucket], owner)
                continue
            if result.was_applied:
                outcomes[bucket] = None
            else:
                outcomes[bucket] = {row.lease_key for row in result if row.lease_key is not None}
        return outcomes

    def _read_back(self, bucket: int, keys: set[str], owner: str) -> set[str] | None:
        rows = self._session.execute(_READ_BACK, (bucket, sorted(keys)), consistency=SERIAL_CONSISTENCY)
        owners = {row.lease_key: row.owner for row in rows}
        if keys and all(owners.get(k) == owner for k in keys):
            return None
        return {k for k, o in owners.items() if o != owner}

    def _start_batch(self, cql: str, rows: Sequence[Sequence[Any]]) -> Any:
        return self._session.execute_batch_async(cql, rows, timeout=10.0)

    @staticmethod
    def _wait(future: Any) -> Any:
        try:
            return future.result()
        except DomainError:
            raise
        except Exception as error:  # driver errors become domain errors a caller can act on
            raise translate_driver_error(error) from error
