"""An ordered, resumable change feed in Cassandra, shared by the services that publish changes.

Changes live in day partitions ordered by a time-based UUID; the cursor is that UUID. A writer
takes its UUID just before it writes, so a change can land slightly after a later-stamped one.
Readers therefore stop `SETTLE_SECONDS` short of now: a change stamped earlier than that has been
written (a write taking longer than that is reported as failed to its caller, who retries).

A reader that wants changes at once (real-time segments) asks for the *unsettled tail* too, with a
page token ending in `UNSETTLED_SUFFIX` (`with_unsettled`): it then gets the changes through now,
while the cursor it gets back still stops at the settled horizon (and keeps the suffix). The next
read therefore returns the unsettled changes again, together with any earlier-stamped change that
landed late; the reader skips the ones it has applied (`UnsettledTail`). Nothing is skipped, and a
change is seen as soon as it is written.

Each service keeps its feed in its own keyspace, in two tables it creates in a migration:

    CREATE TABLE change_days (feed int, bucket date, PRIMARY KEY ((feed), bucket));
    CREATE TABLE changes (bucket date, change_id timeuuid, <payload columns>,
                          PRIMARY KEY ((bucket), change_id));

and describes its payload columns to `ChangeFeed`.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from shared.cassandra import CassandraSession
from shared.errors import InvalidArgument

SETTLE_SECONDS = 1.0
# A version-1 UUID's time (a change id's `.time`, a cursor's) counts 100-ns ticks from this instant.
_UUID_EPOCH = datetime(1582, 10, 15, tzinfo=UTC)
_UUID_EPOCH_OFFSET = 0x01B21DD213814000  # 100-ns intervals between 1582-10-15 and 1970-01-01
# The cursor before every change (a version-1 UUID at the UUID epoch), so a feed's token is never empty.
FEED_START = uuid.UUID(fields=(0, 0, 0x1000, 0x80, 0, 0))
_COLUMN = re.compile(r"[a-z][a-z0-9_]{0,47}")  # fullmatch: `$` also matches before a final newline
# Ends the page token of a reader that also wants the unsettled tail (see the module's docstring).
UNSETTLED_SUFFIX = "+unsettled"
# How far past this host's now a cursor may be: the clock of the host that took a change id (a change's
# `cursor`, handed out at once) may be a little ahead. The feed already needs clocks far closer than this
# (SETTLE_SECONDS), so only a forged or corrupted cursor is further ahead.
MAX_CURSOR_SKEW = timedelta(seconds=60)


class UnsettledCursor(uuid.UUID):
    """A cursor whose reader also wants the unsettled changes: `ChangeFeed.read` returns changes through
    now for it, and its token form (`str`) carries `UNSETTLED_SUFFIX`, so a reader that sends back
    each next_page_token unchanged stays in this mode."""

    __slots__ = ()

    def __str__(self) -> str:
        return super().__str__() + UNSETTLED_SUFFIX


def with_unsettled(token: str) -> str:
    """The page token that reads from `token` (a cursor or next_page_token; empty: the feed's start) and
    also returns the unsettled changes."""
    return token if token.endswith(UNSETTLED_SUFFIX) else token + UNSETTLED_SUFFIX


def time_of(change_id: uuid.UUID) -> datetime:
    """The wall-clock time a change id was taken."""
    return datetime.fromtimestamp((change_id.time - _UUID_EPOCH_OFFSET) / 1e7, UTC)


@dataclass(frozen=True)
class FeedEntry:
    """One stored change: its id (the cursor), when it was taken, and its payload row."""

    change_id: uuid.UUID
    change_time: datetime
    row: Any


def parse_cursor(token: str, field_path: str = "page_token", *, now: datetime | None = None) -> uuid.UUID | None:
    """The cursor a client sent back (empty: the feed's start), an `UnsettledCursor` when it asks for the
    unsettled tail too; INVALID_ARGUMENT for anything else.

    Only the spelling the feed hands out is a cursor (a cursor's `str`, or UNSETTLED_SUFFIX alone for the
    feed's start): uuid.UUID also reads braces, `urn:uuid:`, upper case and hyphens anywhere or nowhere, which
    would make several tokens one position and take a token with text added or rearranged. And only a time
    the feed has reached is a position it handed out: a cursor later than `now` (plus MAX_CURSOR_SKEW) would
    be handed back as the next page token, and a follower that stored it would skip every change until then."""
    if not token:
        return None
    unsettled = token.endswith(UNSETTLED_SUFFIX)
    position = token.removesuffix(UNSETTLED_SUFFIX) if unsettled else token
    try:
        cursor = uuid.UUID(position) if position else FEED_START
    except ValueError:
        cursor = None
    if cursor is None or cursor.version != 1 or (position and position != str(cursor)):
        raise InvalidArgument.for_field(field_path, "not a cursor of this feed; start without one",
                                        reason="INVALID_CURSOR")
    latest = now or datetime.now(UTC)
    if cursor.time > uuid_ticks(latest + MAX_CURSOR_SKEW):
        raise InvalidArgument.for_field(
            field_path, f"not a cursor of this feed: it is at {_shown(cursor)}, later than now, and the feed hands "
            "out no position it has not reached; pass a next_page_token or a change's cursor unchanged, or start "
            "without one", reason="INVALID_CURSOR")
    return UnsettledCursor(int=cursor.int) if unsettled else cursor


def uuid_ticks(when: datetime) -> int:
    """`when` (aware) as a version-1 UUID's time, comparable with a change id's `.time`: 100-ns ticks since
    1582-10-15 UTC. Exact, in whole microseconds: a float timestamp times 1e7 is past 2**53 and would be off
    by a few ticks."""
    return (when - _UUID_EPOCH) // timedelta(microseconds=1) * 10


def cursor_at(when: datetime) -> str:
    """A feed's cursor before every change taken at or after `when`: the version-1 UUID of that instant with the
    lowest clock sequence and node (a follower starting at a time, rather than at a cursor it was handed)."""
    ticks = uuid_ticks(when)
    return str(uuid.UUID(fields=(ticks & 0xFFFFFFFF, (ticks >> 32) & 0xFFFF, 0x1000 | (ticks >> 48) & 0x0FFF,
                                 0x80, 0, 0)))


def _shown(cursor: uuid.UUID) -> str:
    try:
        return f"{time_of(cursor):%Y-%m-%dT%H:%M:%SZ}"
    except (OverflowError, ValueError, OSError):  # a time no datetime holds
        return f"{(cursor.time - _UUID_EPOCH_OFFSET) // 10**7} seconds from 1970-01-01"


class UnsettledTail:
    """What a reader of the unsettled tail has applied past its settled cursor, so that each change it
    reads again (until the cursor passes it) is applied once. Kept in memory: after a restart the tail
    is applied again, which a reader whose application is idempotent accepts."""

    def __init__(self) -> None:
        self._applied: set[uuid.UUID] = set()

    def unapplied(self, change_ids: Iterable[uuid.UUID]) -> list[uuid.UUID]:
        """The ids among `change_ids` not applied yet, in the order given."""
        return [change_id for change_id in change_ids if change_id not in self._applied]

    def applied(self, change_ids: Iterable[uuid.UUID]) -> None:
        self._applied.update(uuid.UUID(int=c.int) for c in change_ids)

    def settled_through(self, cursor: uuid.UUID) -> None:
        """Forget what the settled cursor has passed (reads after it never return those again)."""
        horizon = time_of(cursor)
        self._applied = {c for c in self._applied if time_of(c) >= horizon}

    def clear(self) -> None:
        self._applied.clear()

    def __len__(self) -> int:
        return len(self._applied)


class ChangeFeed:
    """Appends and reads the changes of one feed; `columns` are the payload columns of `changes`."""

    def __init__(self, session: CassandraSession, columns: Sequence[str], feed: int = 0) -> None:
        if not columns or not all(_COLUMN.fullmatch(c) for c in columns):
            raise ValueError(f"feed columns must be lower_snake_case names, got {columns!r}")
        self._session = session
        self._feed = feed
        # The last day this process recorded in change_days: one write a day instead of one a change.
        self._known_day: date | None = None
        self._columns = tuple(columns)
        names = ", ".join(self._columns)
        self._insert = (f"INSERT INTO changes (bucket, change_id, {names}) "
                        f"VALUES (?, ?, {', '.join('?' for _ in self._columns)})")
        self._select_after = (f"SELECT change_id, {names} FROM changes "
                              "WHERE bucket = ? AND change_id > ? AND change_id <= maxTimeuuid(?) LIMIT ?")
        self._select_day = (f"SELECT change_id, {names} FROM changes "
                            "WHERE bucket = ? AND change_id <= maxTimeuuid(?) LIMIT ?")

    def record(self, values: Sequence[Any]) -> FeedEntry:
        """Append one change with payload `values` (in `columns` order)."""
        return self.record_many([values])[0]

    def record_many(self, changes: Sequence[Sequence[Any]]) -> list[FeedEntry]:
        """Append several changes at once (written concurrently), in the order given."""
        entries = []
        for values in changes:
            if len(values) != len(self._columns):
                raise ValueError(f"expected {len(self._columns)} values, got {len(values)}")
            change_id = uuid.uuid1()
            entries.append(FeedEntry(change_id, time_of(change_id), values))
        for day in sorted({e.change_time.date() for e in entries} - {self._known_day}):
            self._session.execute("INSERT INTO change_days (feed, bucket) VALUES (?, ?)", (self._feed, day))
            self._known_day = day
        futures = [self._session.execute_async(self._insert, (e.change_time.date(), e.change_id, *e.row))
                   for e in entries]
        for future in futures:
            self._session.result(future)
        return entries

    def read(self, after: uuid.UUID | None, limit: int,
             now: datetime | None = None) -> tuple[list[FeedEntry], uuid.UUID]:
        """Up to `limit` settled changes after `after`, oldest first, and the cursor to continue from.

        For an `UnsettledCursor`, the changes through now, and an `UnsettledCursor` at the last settled
        one of them (or `after` when none is): see the module's docstring."""
        now = now or datetime.now(UTC)
        settled = now - timedelta(seconds=SETTLE_SECONDS)
        unsettled = isinstance(after, UnsettledCursor)
        horizon = now if unsettled else settled
        if after is not None and (unsettled or after == FEED_START):
            after = None if after == FEED_START else uuid.UUID(int=after.int)
        # The driver returns cassandra.util.Date for `date` columns.
        days = [row.bucket.date() for row in self._session.execute(
            "SELECT bucket FROM change_days WHERE feed = ?", (self._feed,))]
        start_day = time_of(after).date() if after else None
        entries: list[FeedEntry] = []
        last = after
        for day in days:
            if start_day and day < start_day:
                continue
            if day > horizon.date():
                break
            if last is not None and time_of(last).date() == day:
                rows = self._session.execute(self._select_after, (day, last, horizon, limit - len(entries)))
            else:
                rows = self._session.execute(self._select_day, (day, horizon, limit - len(entries)))
            for row in rows:
                entries.append(FeedEntry(row.change_id, time_of(row.change_id), row))
                last = row.change_id
            if len(entries) >= limit:
                break
        if not unsettled:
            return entries, last or FEED_START
        # Changes are in time order, so the settled ones are a prefix.
        through = next((e.change_id for e in reversed(entries) if e.change_time <= settled), after)
        return entries, UnsettledCursor(int=(through or FEED_START).int)
