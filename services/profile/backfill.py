"""The copy of the month-bucketed `timeline` table into `person_timeline` (migration 0004), once per keyspace.

The service reads and writes timelines in `person_timeline` only. What an older version stored in
`timeline` is copied when a profile process starts and the `backfills` table does not record the
copy as done: by token range, each row written with its original write time (`USING TIMESTAMP`). So
the copy can run in several processes at once and again after an interruption, and it never brings
back a row that a newer process moved or erased in the meantime: that delete is newer than the copy.
The old tables are left in place (an erasure deletes there too) until a later migration drops them.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

from services.profile.shards import split_ring
from services.profile.store import micros
from shared.cassandra import CassandraSession

log = logging.getLogger(__name__)

PERSON_TIMELINE = "person_timeline"
_RANGES = 64
_PAGE_ROWS = 1000
_COPIED_COLUMNS = ("person_id, event_time, message_id, event_micros, event_type, event_name, order_id, amount, "
                   "currency_code, item_count, categories, brands, payload, receive_time")
_READ_OLD = (f"SELECT {_COPIED_COLUMNS}, writetime(event_type) AS written FROM timeline "
             "WHERE token(person_id, bucket) > ? AND token(person_id, bucket) <= ?")
_WRITE_NEW = (f"INSERT INTO person_timeline ({_COPIED_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
              "USING TIMESTAMP ?")


def backfill_done(session: CassandraSession, name: str) -> bool:
    return session.execute("SELECT done_time FROM backfills WHERE name = ?", (name,)).one() is not None


def copy_timeline(session: CassandraSession) -> int:
    """Copy every row of `timeline` to `person_timeline` unless done before; returns the rows copied."""
    if backfill_done(session, PERSON_TIMELINE):
        return 0
    started = time.perf_counter()
    copied = 0
    for start, end in split_ring(_RANGES):
        page: list[tuple[object, ...]] = []
        for row in session.execute(_READ_OLD, (start, end), fetch_size=_PAGE_ROWS):
            # A row's write time is that of its columns (one INSERT); one without it is copied as of now.
            written = row.written if row.written is not None else micros(datetime.now(UTC))
            page.append((*row[:-1], written))
            if len(page) >= _PAGE_ROWS:
                session.execute_many(_WRITE_NEW, page)
                copied += len(page)
                page = []
        session.execute_many(_WRITE_NEW, page)
        copied += len(page)
    session.execute("INSERT INTO backfills (name, done_time, rows_copied) VALUES (?, ?, ?)",
                    (PERSON_TIMELINE, datetime.now(UTC), copied))
    log.info("copied the month-bucketed timeline into person_timeline",
             extra={"rows": copied, "seconds": round(time.perf_counter() - started, 1)})
    return copied
