"""A lease that lets one replica of a service do a singleton job at a time, e.g. follow a change feed.

The lease is a row of the service's `follower_leases` table, which each service that uses one creates
in a migration:

    CREATE TABLE follower_leases (name text PRIMARY KEY, owner text);

It is taken with `INSERT ... IF NOT EXISTS` and renewed with `UPDATE ... IF owner = ?` (lightweight
transactions only, never plain writes to the same row), both with a TTL: a holder that dies stops
renewing and the row expires, so another replica takes over within the TTL. A holder renews after a
third of the TTL, so two renewals can fail before it loses the lease. Holding a lease is a hint, not
a fence: a holder paused longer than the TTL finishes the step it is in while another replica
already works, so the work done under a lease must be idempotent.

`OwnedLeases` holds the leases of the long-running operations one process owns (name
`operations/<id>`), renewed together from one thread: what segmentation's recomputes and
prediction's trainings and score refreshes both need.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Protocol

from shared.cassandra import SERIAL_CONSISTENCY, CassandraSession
from shared.errors import Aborted, DomainError

log = logging.getLogger(__name__)
DEFAULT_TTL_SECONDS = 15


def new_owner() -> str:
    """A name for a lease holder that an operator can trace to a process: host, pid, and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


class FollowerLease:
    """The lease `name` in this session's keyspace, as seen by one would-be holder (`owner`)."""

    def __init__(self, session: CassandraSession, name: str, *, ttl_seconds: int = DEFAULT_TTL_SECONDS,
                 owner: str | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        if ttl_seconds < 1:
            raise ValueError(f"a lease lives at least 1 s (TTLs are whole seconds), got {ttl_seconds}")
        self._session = session
        self.name = name
        self.ttl_seconds = ttl_seconds
        self.owner = owner or new_owner()
        self._clock = clock
        self._renewed_at: float | None = None  # when this owner last took or renewed it (None: not held)

    @property
    def retry_seconds(self) -> float:
        """How long a replica that could not take the lease waits before trying again."""
        return self.ttl_seconds / 3

    def hold(self) -> bool:
        """True if this owner holds the lease now: taken or renewed when a third of the TTL has passed
        since the last renewal, otherwise taken on trust. False while another owner holds it."""
        if self._renewed_at is not None and self._clock() - self._renewed_at < self.ttl_seconds / 3:
            return True
        started = self._clock()
        held = self._renew() if self._renewed_at is not None else False
        held = held or self._take()
        self._renewed_at = started if held else None
        return held

    def renew(self) -> bool:
        """True while this owner still holds the lease it took: renewed when a third of the TTL has passed
        since the last renewal. Never takes it again: once it has expired or another owner took it, it is
        lost (False), even if nobody holds it now. For work that must not be resumed by a holder that was
        paused longer than the TTL (another may have done it meanwhile, and released the lease)."""
        if self._renewed_at is None:
            return False
        if self._clock() - self._renewed_at < self.ttl_seconds / 3:
            return True
        started = self._clock()
        held = self._renew()
        self._renewed_at = started if held else None
        return held

    def release(self) -> None:
        """Give the lease back (if this owner holds it), so another replica need not wait for the TTL."""
        self._renewed_at = None
        self._session.execute("DELETE FROM follower_leases WHERE name = ? IF owner = ?", (self.name, self.owner))

    def holder(self) -> str | None:
        """Who holds the lease now, read at SERIAL consistency; None when nobody does."""
        row = self._session.execute("SELECT owner FROM follower_leases WHERE name = ?", (self.name,),
                                    consistency=SERIAL_CONSISTENCY).one()
        return str(row.owner) if row is not None and row.owner else None

    def _take(self) -> bool:
        result = self._session.execute("INSERT INTO follower_leases (name, owner) VALUES (?, ?) IF NOT EXISTS "
                                       "USING TTL ?", (self.name, self.owner, self.ttl_seconds))
        if result.was_applied:
            return True
        # Not applied: the row exists. It may be ours, from an earlier attempt that timed out after Paxos
        # committed it; then renew it rather than wait for it to expire.
        current = result.one()
        return getattr(current, "owner", None) == self.owner and self._renew()

    def _renew(self) -> bool:
        result = self._session.execute("UPDATE follower_leases USING TTL ? SET owner = ? WHERE name = ? "
                                       "IF owner = ?", (self.ttl_seconds, self.owner, self.name, self.owner))
        return bool(result.was_applied)


def operation_lease_name(operation_id: str) -> str:
    """The name of the lease of the long-running operation `operation_id`: `operations/<id>`."""
    return f"operations/{operation_id}"


class LeaseOpener(Protocol):
    """Makes the FollowerLease `name` for `owner`: `functools.partial(FollowerLease, session)`, or a
    store's method doing the same."""

    def __call__(self, name: str, *, ttl_seconds: int, owner: str) -> FollowerLease: ...


def _ignore_loss(operation_id: str) -> None:
    return None


class OwnedLeases:
    """The leases of the operations one process owns, all under one owner name, renewed together every
    third of the lease time: by a thread of their own (named `renewer`) that runs while there are any,
    or, without `renewer`, by whoever calls `renew` that often (e.g. a supervisor thread doing more).

    A lease found taken by another, or expired, when it is renewed (the process was paused longer than the
    lease, and another replica may have taken the operation over, ended it, or finished it) is lost for
    good: it is no longer renewed, `holds` turns False, and `on_lost(operation_id)` is called once, from
    the renewing thread, so that the owner stops the operation's run. `what` names the operations in log
    messages ("an operation").
    """

    def __init__(self, open_lease: LeaseOpener, ttl_seconds: int, *, what: str = "an operation",
                 on_lost: Callable[[str], None] = _ignore_loss, renewer: str | None = None) -> None:
        self._open_lease = open_lease
        self.ttl_seconds = ttl_seconds
        self.owner = new_owner()
        self._what = what
        self._on_lost = on_lost
        self._renewer_name = renewer
        self._held: dict[str, FollowerLease] = {}
        self._lost: set[str] = set()
        self._lock = threading.Lock()
        self._renewer: threading.Thread | None = None

    @property
    def renew_seconds(self) -> float:
        """How often `renew` must run: a third of the lease time, so two renewals can fail before it ends."""
        return self.ttl_seconds / 3

    def take(self, operation_id: str) -> bool:
        """Take the operation's lease and own it; False (and nothing owned) while another process holds it."""
        lease = self._open_lease(operation_lease_name(operation_id), ttl_seconds=self.ttl_seconds, owner=self.owner)
        if not lease.hold():
            return False
        with self._lock:
            self._held[operation_id] = lease
            self._lost.discard(operation_id)
            if self._renewer_name is not None and self._renewer is None:
                self._renewer = threading.Thread(target=self._renew_while_owned, name=self._renewer_name,
                                                 daemon=True)
                self._renewer.start()
        return True

    def take_new(self, operation_id: str) -> None:
        """Own a new operation (a fresh id): its lease is taken before the operation is recorded, so none
        is ever seen unowned. Aborted in the unlikely case another process owns the id already."""
        if not self.take(operation_id):
            raise Aborted(f"operation operations/{operation_id} is already owned by another process; retry",
                          reason="OPERATION_OWNED")

    def holds(self, operation_id: str) -> bool:
        """True while this process owns the operation and has not lost its lease."""
        with self._lock:
            return operation_id in self._held and operation_id not in self._lost

    def release(self, operation_id: str) -> None:
        """Stop owning the operation and give its lease back (if still ours), so another process need not
        wait for it to expire. A failure to give it back is logged: the lease expires by itself."""
        lease = self._disown(operation_id)
        if lease is None:
            return
        try:
            lease.release()
        except DomainError as error:
            log.warning(f"could not release {self._what}'s lease; it expires by itself",
                        extra={"operation": operation_id, "lease": lease.name, "error": error.message})

    def forget(self, operation_id: str) -> None:
        """Stop owning the operation without giving its lease back: it expires within the lease time, and
        another process may take the operation over then."""
        self._disown(operation_id)

    def renew(self) -> list[str]:
        """Renew every lease not lost yet (each when a third of the lease time has passed since it was
        last renewed); returns the operations whose lease was found lost in this round, after calling
        `on_lost` for each. A lease that could not be renewed (Cassandra failed) is tried again next round."""
        with self._lock:
            renewing = [(operation_id, lease) for operation_id, lease in self._held.items()
                        if operation_id not in self._lost]
        lost = []
        for operation_id, lease in renewing:
            try:
                # `renew`, not `hold`: a lease that expired is lost even if its row is gone (another process
                # may have taken the operation over, finished it and released the lease meanwhile).
                held = lease.renew()
            except DomainError as error:  # the next round tries again: two can fail within the lease time
                log.warning(f"could not renew {self._what}'s lease",
                            extra={"operation": operation_id, "lease": lease.name, "error": error.message})
                continue
            if held:
                continue
            with self._lock:
                if self._held.get(operation_id) is not lease:
                    continue  # released (or taken again) meanwhile: not this round's to report
                self._lost.add(operation_id)
            lost.append(operation_id)
            self._on_lost(operation_id)
        return lost

    def _disown(self, operation_id: str) -> FollowerLease | None:
        with self._lock:
            self._lost.discard(operation_id)
            return self._held.pop(operation_id, None)

    def _renew_while_owned(self) -> None:
        while True:
            time.sleep(self.renew_seconds)
            with self._lock:
                if not self._held:
                    self._renewer = None  # the next take starts another
                    return
            try:
                self.renew()
            except Exception as error:  # e.g. a bug in on_lost: the thread must go on renewing the others
                log.warning("renewing the leases of owned operations failed; the next round tries again",
                            extra={"error": f"{type(error).__name__}: {error}"})
