"""The identity change feed: merges, splits and erasures, in order, resumable from a cursor.

Changes live in day partitions ordered by a time-based UUID; the cursor is that UUID. A writer
takes its UUID just before it writes, so a change can land slightly after a later-stamped one.
Readers therefore stop `SETTLE_SECONDS` short of now: a change stamped earlier than that has been
written (a write taking longer than that is reported as failed to its caller and retried).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import IntEnum

from shared.cassandra import CassandraSession
from shared.errors import InvalidArgument

SETTLE_SECONDS = 1.0
FEED = 0
_UUID_EPOCH_OFFSET = 0x01B21DD213814000  # 100-ns intervals between 1582-10-15 and 1970-01-01
# The cursor before every change (a version-1 UUID at the UUID epoch), so a feed's token is never empty.
FEED_START = uuid.UUID(fields=(0, 0, 0x1000, 0x80, 0, 0))


class ChangeType(IntEnum):
    # Values match onecdp.identity.v1.IdentityChangeType.
    MERGE = 1
    SPLIT = 2
    ERASE = 3


@dataclass(frozen=True)
class Change:
    cursor: str
    change_type: ChangeType
    change_time: datetime
    source_person_ids: list[str]
    result_person_ids: list[str]
    reason: str


def time_of(change_id: uuid.UUID) -> datetime:
    return datetime.fromtimestamp((change_id.time - _UUID_EPOCH_OFFSET) / 1e7, UTC)


def record(session: CassandraSession, change_type: ChangeType, sources: Sequence[str], results: Sequence[str],
           reason: str) -> Change:
    change_id = uuid.uuid1()
    when = time_of(change_id)
    session.execute("INSERT INTO change_days (feed, bucket) VALUES (?, ?)", (FEED, when.date()))
    session.execute(
        "INSERT INTO changes (bucket, change_id, change_type, source_person_ids, result_person_ids, reason) "
        "VALUES (?, ?, ?, ?, ?, ?)", (when.date(), change_id, int(change_type), list(sources), list(results), reason))
    return Change(str(change_id), change_type, when, list(sources), list(results), reason)


def parse_cursor(token: str, field_path: str = "page_token") -> uuid.UUID | None:
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


def read(session: CassandraSession, after: uuid.UUID | None, limit: int,
         now: datetime | None = None) -> tuple[list[Change], uuid.UUID]:
    """Up to `limit` changes after `after`, oldest first, and the cursor to continue from."""
    horizon = (now or datetime.now(UTC)) - timedelta(seconds=SETTLE_SECONDS)
    # The driver returns cassandra.util.Date for `date` columns.
    days = [row.bucket.date() for row in session.execute("SELECT bucket FROM change_days WHERE feed = ?", (FEED,))]
    start_day = time_of(after).date() if after else None
    changes: list[Change] = []
    last = after
    for day in days:
        if start_day and day < start_day:
            continue
        if day > horizon.date():
            break
        if last is not None and time_of(last).date() == day:
            rows = session.execute(
                "SELECT change_id, change_type, source_person_ids, result_person_ids, reason FROM changes "
                "WHERE bucket = ? AND change_id > ? AND change_id <= maxTimeuuid(?) LIMIT ?",
                (day, last, horizon, limit - len(changes)))
        else:
            rows = session.execute(
                "SELECT change_id, change_type, source_person_ids, result_person_ids, reason FROM changes "
                "WHERE bucket = ? AND change_id <= maxTimeuuid(?) LIMIT ?", (day, horizon, limit - len(changes)))
        for row in rows:
            changes.append(Change(str(row.change_id), ChangeType(row.change_type), time_of(row.change_id),
                                  list(row.source_person_ids or ()), list(row.result_person_ids or ()),
                                  row.reason or ""))
            last = row.change_id
        if len(changes) >= limit:
            break
    return changes, last or FEED_START
