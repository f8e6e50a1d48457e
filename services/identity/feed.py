"""The identity change feed: merges, splits and erasures, in order, resumable from a cursor.

Stored and read by the shared change feed (shared.changefeed: day partitions of time-ordered
changes, readers stay a settle window behind now); this module gives it identity's payload.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum

from shared.cassandra import CassandraSession
from shared.changefeed import FEED_START, SETTLE_SECONDS, ChangeFeed, parse_cursor

__all__ = ["FEED_START", "SETTLE_SECONDS", "Change", "ChangeType", "parse_cursor", "read", "record", "record_many"]

_COLUMNS = ("change_type", "source_person_ids", "result_person_ids", "reason")


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


@functools.lru_cache(maxsize=64)
def _feed(session: CassandraSession) -> ChangeFeed:
    # One feed per session, so its prepared CQL and the day it last recorded are kept between changes.
    return ChangeFeed(session, _COLUMNS)


def record(session: CassandraSession, change_type: ChangeType, sources: Sequence[str], results: Sequence[str],
           reason: str) -> Change:
    entry = _feed(session).record((int(change_type), list(sources), list(results), reason))
    return Change(str(entry.change_id), change_type, entry.change_time, list(sources), list(results), reason)


def record_many(session: CassandraSession,
                changes: Sequence[tuple[ChangeType, Sequence[str], Sequence[str], str]]) -> list[Change]:
    """Record several changes at once, in the order given."""
    if not changes:
        return []
    entries = _feed(session).record_many([(int(t), list(s), list(r), reason) for t, s, r, reason in changes])
    return [Change(str(e.change_id), t, e.change_time, list(s), list(r), reason)
            for e, (t, s, r, reason) in zip(entries, changes, strict=True)]


def read(session: CassandraSession, after: uuid.UUID | None, limit: int,
         now: datetime | None = None) -> tuple[list[Change], uuid.UUID]:
    """Up to `limit` changes after `after`, oldest first, and the cursor to continue from."""
    entries, cursor = _feed(session).read(after, limit, now)
    return [Change(str(e.change_id), ChangeType(e.row.change_type), e.change_time, list(e.row.source_person_ids or ()),
                   list(e.row.result_person_ids or ()), e.row.reason or "") for e in entries], cursor
