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
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable

from shared.cassandra import SERIAL_CONSISTENCY, CassandraSession

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
