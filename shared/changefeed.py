"""An ordered, resumable change feed in Cassandra, shared by the services that publish changes.

Changes live in day partitions ordered by a time-based UUID; the cursor is that UUID. A writer
takes its UUID just before it writes, so a change can land slightly after a later-stamped one.
Readers therefore stop `SETTLE_SECONDS` short of now: a change stamped earlier than that has been
written (a write taking longer than that is reported as failed to its caller, who retries).

Each service keeps its feed in its own keyspace, in two tables it creates in a migration:

    CREATE TABLE change_days (feed int, bucket date, PRIMARY KEY ((feed), bucket));
    CREATE TABLE changes (bucket date, change_id timeuuid, <payload columns>,
                          PRIMARY KEY ((bucket), change_id));

and describes its payload columns to `ChangeFeed`.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from shared.cassandra import CassandraSession
from shared.errors import InvalidArgument

SETTLE_SECONDS = 1.0
_UUID_EPOCH_OFFSET = 0x01B21DD213814000  # 100-ns intervals between 1582-10-15 and 1970-01-01
# The cursor before every change (a version-1 UUID at the UUID epoch), so a feed's token is never empty.
FEED_START = uuid.UUID(fields=(0, 0, 0x1000, 0x80, 0, 0))
_COLUMN = re.compile(r"^[a-z][a-z0-9_]{0,47}$")


def time_of(change_id: uuid.UUID) -> datetime:
    """The wall-clock time a change id was taken."""
    return datetime.fromtimestamp((change_id.time - _UUID_EPOCH_OFFSET) / 1e7, UTC)


@dataclass(frozen=True)
class FeedEntry:
    """One stored change: its id (the cursor), when it was taken, and its payload row."""

    change_id: uuid.UUID
    change_time: datetime
    row: Any


def parse_cursor(token: str, field_path: str = "page_token") -> uuid.UUID | None:
    """The cursor a client sent back (empty: the feed's start); INVALID_ARGUMENT for anything else."""
    if not token:
        return None
    try:
        cursor = uuid.UUID(token)
    except ValueError:
        cursor = None
    if cursor is None or cursor.version != 1:
        raise InvalidArgument.for_field(field_path, "not a cursor of this feed; start without one",
                                        reason="INVALID_CURSOR")
    return cursor


class ChangeFeed:
    """Appends and reads the changes of one feed; `columns` are the payload columns of `changes`."""

    def __init__(self, session: CassandraSession, columns: Sequence[str], feed: int = 0) -> None:
        if not columns or not all(_COLUMN.match(c) for c in columns):
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
        """Up to `limit` settled changes after `after`, oldest first, and the cursor to continue from."""
        horizon = (now or datetime.now(UTC)) - timedelta(seconds=SETTLE_SECONDS)
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
        return entries, last or FEED_START
