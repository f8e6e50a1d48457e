"""Cassandra storage of the segmentation service (tables in schema/0001_segments.cql; the change log in
day partitions per segment since schema/0006_membership_change_days.cql; members in MEMBER_BUCKETS
partitions per segment since schema/0007_member_buckets.cql).

Every statement is prepared once and bound (shared.cassandra). Segment rows are only written with
lightweight transactions (create IF NOT EXISTS, update/delete IF etag), never mixed with plain writes; rule
changes also move the partition's `catalog_version` in the same conditional batch (schema 0005).
"""

from __future__ import annotations

import hashlib
import heapq
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from shared.cassandra import SERIAL_CONSISTENCY, CassandraSession
from shared.changefeed import FEED_START, uuid_ticks
from shared.leases import FollowerLease

CATALOG = 0  # the one partition of the segments table (and of running_operations)
_OPERATION_COLUMNS = ("operation_id, segment_id, done, shards_done, shards_total, profiles_scanned, start_time, "
                      "member_count, entered_count, exited_count, elapsed_seconds, error_code, error_message, "
                      "attempt, parallelism, revision, error_reason, error_metadata, profiles_skipped")
_OPERATION_MARKERS = ", ".join("?" * (_OPERATION_COLUMNS.count(",") + 1))
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# A re-evaluation row this process wrote stays until its time: only a sweep of rows already due deletes one.
# Writing it again changes nothing, and a recompute schedules most of a segment's persons at the times the
# recompute before it did (real time at the times its last evaluation did), so the rows written are
# remembered (the latest SCHEDULE_MEMORY, about 150 bytes each) and not sent again. Only rows due more than
# SCHEDULE_SKIP_MARGIN from now are skipped: a replica whose clock runs that far ahead could sweep earlier ones.
SCHEDULE_MEMORY = 200_000
SCHEDULE_SKIP_MARGIN = timedelta(minutes=10)


# Times of change ids are in a version-1 UUID's ticks (100 ns since 1582-10-15, `uuid_ticks`); its 60-bit
# clock ends in 5236.
LAST_CHANGE_TICKS = 1 << 60
# The greatest clock sequence and node in Cassandra's timeuuid order (compared as signed bytes), as in
# cassandra.util.max_uuid_from_time.
_MAX_CLOCK_SEQ, _MAX_NODE = 0x3F7F, 0x7F7F7F7F7F7F


def cursor_before(ticks: int) -> uuid.UUID:
    """The cursor that the changes stamped at or after `ticks` (a change id's time, `uuid_ticks`, before
    `LAST_CHANGE_TICKS`) follow: the last possible change id of the tick before. Before the first time a
    change id can name (1582-10-15), the feed's start."""
    if ticks >= LAST_CHANGE_TICKS:
        raise ValueError(f"{ticks} is past the last time a change id can name")
    before = ticks - 1
    if before < 0:
        return FEED_START
    return uuid.UUID(fields=(before & 0xFFFFFFFF, (before >> 32) & 0xFFFF, 0x1000 | (before >> 48),
                             0x80 | (_MAX_CLOCK_SEQ >> 8), _MAX_CLOCK_SEQ & 0xFF, _MAX_NODE))


_TICKS_PER_DAY = 864_000_000_000
_DAY_ZERO = date(1970, 1, 1)
_DAY_ZERO_TICKS = uuid_ticks(_EPOCH)  # a change id's time at the start of _DAY_ZERO
# Rows of the change log written per chunk: each chunk's change ids are taken just before it is sent.
_CHANGES_CHUNK = 256
_INSERT_CHANGE = ("INSERT INTO membership_change_log (segment_id, day, change_id, person_id, entered, cause) "
                  "VALUES (?, ?, ?, ?, ?, ?)")


# How many partitions of `segment_members` each segment's members are spread over. NEVER change it once
# members are stored: a person's bucket is `bucket_of(person_id)`, so with another count reads would look
# for stored members in the wrong partitions (changing it means a new table and a migration of the rows).
MEMBER_BUCKETS = 16
_INSERT_MEMBER = "INSERT INTO segment_members (segment_id, bucket, person_id, enter_time) VALUES (?, ?, ?, ?)"
_DELETE_MEMBER = "DELETE FROM segment_members WHERE segment_id = ? AND bucket = ? AND person_id = ?"


def bucket_of(person_id: str) -> int:
    """The `segment_members` bucket of a person: the first 8 bytes of the BLAKE2b digest of its id, modulo
    MEMBER_BUCKETS. Stable across processes and Python versions (unlike the salted built-in `hash`)."""
    digest = hashlib.blake2b(person_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % MEMBER_BUCKETS


def day_of(change_id: uuid.UUID) -> date:
    """The UTC day of the time a change id was taken: the day partition of the change log it is written to.
    In whole ticks (no float rounding near midnight), so writers and readers always agree."""
    return _DAY_ZERO + timedelta(days=(change_id.time - _DAY_ZERO_TICKS) // _TICKS_PER_DAY)


def timeuuid_order(change_id: uuid.UUID) -> tuple[int, bytes]:
    """A sort key putting change ids in Cassandra's timeuuid order: by time, then the clock sequence and
    node compared as signed bytes (flipping each byte's sign bit makes them compare as unsigned)."""
    return change_id.time, bytes(b ^ 0x80 for b in change_id.bytes[8:])


@dataclass(frozen=True)
class CatalogVersion:
    """How many rule changes the catalog has saved (None: none yet), as read with the references."""

    value: int | None


class CatalogChanged(Exception):
    """A rule change was saved since the catalog version a write was checked against: check it again."""


@dataclass(frozen=True)
class SegmentRecord:
    segment_id: str
    display_name: str
    description: str
    rule_text: str
    referenced: frozenset[str]
    revision: int
    state: int
    last_recompute_time: datetime | None
    create_time: datetime
    update_time: datetime
    etag: str
    operation_id: str = ""  # the latest recompute operation started for the segment ("" for none)
    operation_revision: int = 0  # the revision that operation computes


@dataclass(frozen=True)
class StoredChange:
    change_id: uuid.UUID
    person_id: str
    entered: bool
    cause: str


@dataclass(frozen=True)
class OperationRecord:
    operation_id: str
    segment_id: str
    done: bool
    shards_done: int
    shards_total: int
    profiles_scanned: int
    start_time: datetime
    member_count: int
    entered_count: int
    exited_count: int
    elapsed_seconds: float
    error_code: str | None
    error_message: str | None
    attempt: int = 1  # which run: 1, then +1 per takeover after the running process stopped
    parallelism: int = 0  # scan workers (0: the recompute's default)
    revision: int = 0  # the segment revision the current run computes
    # The failure's ErrorInfo reason and metadata (schema 0008); None for failures recorded before.
    error_reason: str | None = None
    error_metadata: Mapping[str, str] = field(default_factory=dict)
    # Profiles whose evaluation failed, left as they were (schema 0009; 0 for operations recorded before).
    profiles_skipped: int = 0


_SEGMENT_COLUMNS = ("segment_id, display_name, description, rule_text, referenced, revision, state, "
                    "last_recompute_time, create_time, update_time, etag")


# Read also what only the recompute writes (`set_operation`/`claim_operation`).
_SEGMENT_READ_COLUMNS = f"{_SEGMENT_COLUMNS}, operation_id, operation_revision"


def _utc(value: datetime | None) -> datetime | None:
    # The driver returns naive UTC datetimes for timestamp columns.
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


def _segment(row: Any) -> SegmentRecord:
    return SegmentRecord(
        segment_id=row.segment_id, display_name=row.display_name or "", description=row.description or "",
        rule_text=row.rule_text, referenced=frozenset(row.referenced or ()), revision=row.revision, state=row.state,
        last_recompute_time=_utc(row.last_recompute_time), create_time=_utc(row.create_time) or _EPOCH,
        update_time=_utc(row.update_time) or _EPOCH, etag=row.etag, operation_id=row.operation_id or "",
        operation_revision=row.operation_revision or 0)


class SegmentStore:
    def __init__(self, session: CassandraSession) -> None:
        self._session = session
        # The latest day of each segment's change log this process recorded in the day index: one index
        # write per segment a day instead of one per chunk of changes.
        self._indexed_day: dict[str, date] = {}
        # (person id, due time) of the re-evaluation rows written, oldest first (see SCHEDULE_MEMORY).
        self._scheduled: OrderedDict[tuple[str, datetime], None] = OrderedDict()
        self._scheduled_lock = threading.Lock()

    # ---- segments ----

    def references(self) -> tuple[dict[str, frozenset[str]], CatalogVersion]:
        """Every segment's references, and the catalog version they are at (read at SERIAL: the latest
        rule change saved, even one whose lightweight transaction has not reached every replica)."""
        rows = self._session.rows("SELECT segment_id, referenced, catalog_version FROM segments WHERE catalog = ?",
                                  (CATALOG,), consistency=SERIAL_CONSISTENCY)
        references, version = {}, None
        for row in rows:
            version = row.catalog_version
            if row.segment_id is not None:  # a partition whose segments were all deleted keeps its version
                references[row.segment_id] = frozenset(row.referenced or ())
        return references, CatalogVersion(version)

    def insert(self, record: SegmentRecord, version: CatalogVersion | None = None) -> bool:
        """Create the segment; False when the id is taken. With `version`, only if no rule change was saved
        since it was read (CatalogChanged otherwise), moving it on."""
        statement = (f"INSERT INTO segments (catalog, {_SEGMENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                     "IF NOT EXISTS")
        return self._write(statement, (CATALOG, *_values(record)), version)

    def replace(self, record: SegmentRecord, expected_etag: str, version: CatalogVersion | None = None) -> bool:
        """Overwrite the segment if its etag is still `expected_etag` (and with `version`, as `insert`)."""
        return self._write(
            "UPDATE segments SET display_name = ?, description = ?, rule_text = ?, referenced = ?, revision = ?, "
            "state = ?, last_recompute_time = ?, update_time = ?, etag = ? WHERE catalog = ? AND segment_id = ? "
            "IF etag = ?",
            (record.display_name, record.description, record.rule_text, set(record.referenced), record.revision,
             record.state, record.last_recompute_time, record.update_time, record.etag, CATALOG, record.segment_id,
             expected_etag), version)

    def _write(self, statement: str, params: Sequence[Any], version: CatalogVersion | None) -> bool:
        """Run a conditional write on one segment row; with `version`, in one conditional batch with moving the
        catalog version on from it: one partition, so both conditions are checked and both writes applied
        together, or neither. Rule changes are serialised this way: each is checked against the references
        of one version and saved only if the version has not moved meanwhile."""
        if version is None:
            return bool(self._session.execute(statement, params).was_applied)
        rows = list(self._session.execute(
            f"BEGIN BATCH {statement}; UPDATE segments SET catalog_version = ? WHERE catalog = ? "
            "IF catalog_version = ? APPLY BATCH", (*params, (version.value or 0) + 1, CATALOG, version.value)))
        if rows[0][0]:  # [applied]
            return True
        # A refused batch returns the rows its conditions read: the version (static) is in every one.
        if any(getattr(row, "catalog_version", version.value) != version.value for row in rows):
            raise CatalogChanged()
        return False

    def mark_failed(self, segment_id: str, failed: int, computing: int, revision: int) -> bool:
        """Record that the computation of `revision` failed: state `computing` becomes `failed` (a segment
        whose members were complete before stays as it is); a no-op when the rule changed meanwhile."""
        result = self._session.execute(
            "UPDATE segments SET state = ? WHERE catalog = ? AND segment_id = ? IF revision = ? AND state = ?",
            (failed, CATALOG, segment_id, revision, computing))
        return bool(result.was_applied)

    def set_state(self, segment_id: str, state: int, revision: int, last_recompute_time: datetime | None) -> bool:
        """Record a finished computation of `revision`; a no-op when the rule changed meanwhile."""
        result = self._session.execute(
            "UPDATE segments SET state = ?, last_recompute_time = ? WHERE catalog = ? AND segment_id = ? "
            "IF revision = ?", (state, last_recompute_time, CATALOG, segment_id, revision))
        return bool(result.was_applied)

    def set_operation(self, segment_id: str, revision: int, operation_id: str) -> bool:
        """Record `operation_id` as the segment's latest operation, computing `revision`; a no-op when the rule
        changed meanwhile."""
        result = self._session.execute(
            "UPDATE segments SET operation_id = ?, operation_revision = ? WHERE catalog = ? AND segment_id = ? "
            "IF revision = ?", (operation_id, revision, CATALOG, segment_id, revision))
        return bool(result.was_applied)

    def claim_operation(self, segment_id: str, revision: int, expected_operation_id: str,
                        operation_id: str) -> bool:
        """Like `set_operation`, only if the latest operation is still `expected_operation_id` ("" for none):
        of the processes that found the same segment stuck, one starts the operation that completes it."""
        result = self._session.execute(
            "UPDATE segments SET operation_id = ?, operation_revision = ? WHERE catalog = ? AND segment_id = ? "
            "IF revision = ? AND operation_id = ?",
            (operation_id, revision, CATALOG, segment_id, revision, expected_operation_id or None))
        return bool(result.was_applied)

    def delete(self, segment_id: str, expected_etag: str, version: CatalogVersion | None = None) -> bool:
        return self._write("DELETE FROM segments WHERE catalog = ? AND segment_id = ? IF etag = ?",
                           (CATALOG, segment_id, expected_etag), version)

    def get(self, segment_id: str, *, serial: bool = False) -> SegmentRecord | None:
        rows = self._session.execute(f"SELECT {_SEGMENT_READ_COLUMNS} FROM segments WHERE catalog = ? "
                                     "AND segment_id = ?", (CATALOG, segment_id),
                                     consistency=SERIAL_CONSISTENCY if serial else None)
        row = rows.one()
        return _segment(row) if row is not None else None

    def page(self, after: str, limit: int) -> list[SegmentRecord]:
        rows = self._session.execute(f"SELECT {_SEGMENT_READ_COLUMNS} FROM segments WHERE catalog = ? "
                                     "AND segment_id > ? LIMIT ?", (CATALOG, after, limit))
        return [_segment(row) for row in rows]

    def all(self) -> list[SegmentRecord]:
        rows = self._session.rows(f"SELECT {_SEGMENT_READ_COLUMNS} FROM segments WHERE catalog = ?", (CATALOG,),
                                  fetch_size=1000)
        # Once every segment is deleted the partition still holds its catalog version (a static column), and
        # reads as one row of nulls (see `references`).
        return [_segment(row) for row in rows if row.segment_id is not None]

    def add_revision(self, segment_id: str, revision: int, rule_text: str, when: datetime) -> None:
        self._session.execute("INSERT INTO segment_revisions (segment_id, revision, rule_text, create_time) "
                              "VALUES (?, ?, ?, ?)", (segment_id, revision, rule_text, when))

    def delete_history(self, segment_id: str) -> None:
        """Drop a deleted segment's revisions, members and changes (whole partitions: the day partitions of
        the change log listed in its day index, then the index but for its last two days: see below)."""
        for table in ("segment_revisions", "members", "membership_changes"):
            self._session.execute(f"DELETE FROM {table} WHERE segment_id = ?", (segment_id,))
        self._session.execute_many("DELETE FROM segment_members WHERE segment_id = ? AND bucket = ?",
                                   [(segment_id, bucket) for bucket in range(MEMBER_BUCKETS)])
        days = self._change_days(segment_id, None, None)
        self._session.execute_many("DELETE FROM membership_change_log WHERE segment_id = ? AND day = ?",
                                   [(segment_id, day) for day in days])
        # The index rows of the last two days stay (pointing at partitions now empty): another process that
        # remembers having indexed one of them (`_indexed_day`) writes its next changes of that day without
        # indexing it again, and a segment created again under this id must still find them. Two days, not
        # one, for clocks a little apart around midnight.
        self._indexed_day.pop(segment_id, None)
        self._session.execute("DELETE FROM membership_change_days WHERE segment_id = ? AND day < ?",
                              (segment_id, datetime.now(UTC).date() - timedelta(days=1)))

    # ---- members ----
    #
    # Members live in `segment_members`, MEMBER_BUCKETS partitions per segment (schema 0007). Those stored
    # before it are still in `members`, one partition per segment, which CQL cannot copy: every read merges
    # that partition in as one more source, and `apply_changes` moves a person out of it (deletes the row
    # there, before writing the new table) whenever it records an enter or exit of someone found there. So
    # the old partitions only shrink, and a person is never in both tables: counts add up without counting
    # anyone twice. A crash between the delete and the insert loses an enter, which the next recompute
    # repairs (as for a crash after the change log is written). Only persons found in the old table are
    # deleted from it: a tombstone per enter or exit of a big recompute would make reads of the old
    # partition fail (tombstone_failure_threshold) long after it is empty.

    def member_count(self, segment_id: str) -> int:
        return self.member_counts([segment_id])[segment_id]

    def member_counts(self, segment_ids: Sequence[str]) -> dict[str, int]:
        """The current number of members of each segment: the sum of the counts of its buckets and of its old
        partition in `members`, all counted concurrently."""
        segment_ids = list(dict.fromkeys(segment_ids))
        # At most `concurrency` counts in flight (a page of segments makes MEMBER_BUCKETS + 1 counts each).
        buckets = self._session.execute_many(
            "SELECT COUNT(*) AS members FROM segment_members WHERE segment_id = ? AND bucket = ?",
            [(segment_id, bucket) for segment_id in segment_ids for bucket in range(MEMBER_BUCKETS)])
        legacy = self._session.execute_many("SELECT COUNT(*) AS members FROM members WHERE segment_id = ?",
                                            [(segment_id,) for segment_id in segment_ids])
        counts = {segment_id: int(rows.one().members) for segment_id, rows in zip(segment_ids, legacy, strict=True)}
        for index, rows in enumerate(buckets):
            counts[segment_ids[index // MEMBER_BUCKETS]] += int(rows.one().members)
        return counts

    def members_page(self, segment_id: str, after: str, limit: int) -> list[tuple[str, datetime]]:
        """Up to `limit` members after the person id `after`, in person id order across all buckets (and the
        old partition): each source's next `limit` rows are read concurrently, merged and cut; the first
        `limit` of all sources are among them."""
        if limit <= 0:
            return []
        futures = [self._session.execute_async(
            "SELECT person_id, enter_time FROM segment_members WHERE segment_id = ? AND bucket = ? "
            "AND person_id > ? LIMIT ?", (segment_id, bucket, after, limit)) for bucket in range(MEMBER_BUCKETS)]
        futures.append(self._session.execute_async(
            "SELECT person_id, enter_time FROM members WHERE segment_id = ? AND person_id > ? LIMIT ?",
            (segment_id, after, limit)))
        # A page of up to 10,000 members spans driver pages: read through rows_of (translated fetches).
        sources = [[(row.person_id, _utc(row.enter_time) or _EPOCH)
                    for row in self._session.rows_of(self._session.result(future))] for future in futures]
        page: list[tuple[str, datetime]] = []
        for person_id, enter_time in heapq.merge(*sources, key=lambda member: member[0]):
            if page and page[-1][0] == person_id:
                continue  # in both tables (only while a process not upgraded yet writes `members`)
            page.append((person_id, enter_time))
            if len(page) == limit:
                break
        return page

    def member_ids(self, segment_id: str) -> set[str]:
        futures = [self._session.execute_async(
            "SELECT person_id FROM segment_members WHERE segment_id = ? AND bucket = ?", (segment_id, bucket))
            for bucket in range(MEMBER_BUCKETS)]
        futures.append(self._session.execute_async("SELECT person_id FROM members WHERE segment_id = ?",
                                                   (segment_id,)))
        # A big segment's buckets span pages: each later page is fetched inside driver-error translation too.
        return {row.person_id for future in futures for row in self._session.rows_of(self._session.result(future))}

    def is_member(self, segment_id: str, person_id: str) -> bool:
        return (segment_id, person_id) in self.memberships([(segment_id, person_id)])

    def _legacy_segments(self, segment_ids: Iterable[str]) -> set[str]:
        """The segments of `segment_ids` that still have members in the old table (read concurrently)."""
        futures = [(segment_id, self._session.execute_async(
            "SELECT person_id FROM members WHERE segment_id = ? LIMIT 1", (segment_id,)))
            for segment_id in dict.fromkeys(segment_ids)]
        return {segment_id for segment_id, future in futures if self._session.result(future).one() is not None}

    def apply_changes(self, segment_id: str, entered: Sequence[str], exited: Sequence[str], cause: str,
                      when: datetime) -> None:
        """Record enters and exits: the change log first, so a crash in between leaves the log ahead of the
        members (a recompute repairs members; a log missing a change could not be repaired)."""
        pairs = [(p, True) for p in entered] + [(p, False) for p in exited]
        # Change ids are taken a chunk at a time, just before the chunk is sent, not all up front: a
        # reader's settled horizon (`changes_page`) relies on a change being written within SETTLE_SECONDS
        # of its stamp, and a recompute writes thousands of rows.
        for start in range(0, len(pairs), _CHANGES_CHUNK):
            # The chunk's day is indexed after its first stamp but before the others, so at most one index
            # write runs between a stamp and its row (a chunk stamped across midnight indexes the new day
            # after stamping).
            chunk = pairs[start:start + _CHANGES_CHUNK]
            first = uuid.uuid1()
            self._index_days(segment_id, {day_of(first)})
            stamped = [(first, *chunk[0])] + [(uuid.uuid1(), person_id, was_entered)
                                              for person_id, was_entered in chunk[1:]]
            self._index_days(segment_id, {day_of(change_id) for change_id, _, _ in stamped})
            self._session.write_all([(_INSERT_CHANGE, (segment_id, day_of(change_id), change_id, person_id,
                                                       was_entered, cause))
                                     for change_id, person_id, was_entered in stamped])
        if not entered and not exited:
            return
        # Out of the old table first (see "members" above): whoever of these is still there.
        if self._legacy_segments([segment_id]):
            legacy = self._session.select_in("SELECT person_id FROM members WHERE segment_id = ? AND person_id IN ?",
                                             (segment_id,), [*entered, *exited]).rows()
            if legacy:
                self._session.write_all([("DELETE FROM members WHERE segment_id = ? AND person_id = ?",
                                          (segment_id, row.person_id)) for row in legacy])
        self._session.write_all(
            [(_INSERT_MEMBER, (segment_id, bucket_of(person_id), person_id, when)) for person_id in entered]
            + [(_DELETE_MEMBER, (segment_id, bucket_of(person_id), person_id)) for person_id in exited])

    def _index_days(self, segment_id: str, days: set[date]) -> None:
        """Record in the day index the days of changes about to be written (before them: a reader lists the
        days first), except the one this process already recorded for the segment."""
        for day in sorted(days - {self._indexed_day.get(segment_id)}):
            self._session.execute("INSERT INTO membership_change_days (segment_id, day) VALUES (?, ?)",
                                  (segment_id, day))
            self._indexed_day[segment_id] = day

    def _change_days(self, segment_id: str, first: date | None, last: date | None) -> list[date]:
        """The days of the segment's change log from `first` through `last` (None: unbounded), in order."""
        if first is None:
            rows = self._session.rows("SELECT day FROM membership_change_days WHERE segment_id = ?",
                                      (segment_id,), fetch_size=1000)
        elif last is None:
            rows = self._session.rows("SELECT day FROM membership_change_days WHERE segment_id = ? AND day >= ?",
                                      (segment_id, first), fetch_size=1000)
        else:
            rows = self._session.rows("SELECT day FROM membership_change_days WHERE segment_id = ? AND day >= ? "
                                      "AND day <= ?", (segment_id, first, last), fetch_size=1000)
        # The driver returns cassandra.util.Date for `date` columns.
        return [row.day.date() for row in rows]

    def changes_page(self, segment_id: str, after: uuid.UUID, limit: int,
                     through: uuid.UUID | None = None) -> list[StoredChange]:
        """Up to `limit` changes after the cursor `after`, oldest first; with `through`, only those up to it.

        The history lives in two places: `membership_changes`, the one partition per segment written before
        schema 0006 (and by processes not upgraded yet, during a rolling upgrade), and the day partitions of
        `membership_change_log` listed in `membership_change_days`. The page is the merge of both in change
        id order, not the old table read first as a bucket before the days: while old and new processes run
        side by side both tables receive changes, and reading one before the other would return a change
        after a later one and move the cursor past changes not returned yet. Once the old partition has no
        change after the cursor, its read is one cheap, empty slice of one partition."""
        if limit <= 0:
            return []
        if through is None:
            legacy = self._session.execute_async(
                "SELECT change_id, person_id, entered, cause FROM membership_changes WHERE segment_id = ? "
                "AND change_id > ? LIMIT ?", (segment_id, after, limit))
        else:
            legacy = self._session.execute_async(
                "SELECT change_id, person_id, entered, cause FROM membership_changes WHERE segment_id = ? "
                "AND change_id > ? AND change_id <= ? LIMIT ?", (segment_id, after, through, limit))
        changes: list[StoredChange] = []
        for day in self._change_days(segment_id, day_of(after), day_of(through) if through is not None else None):
            if through is None:
                rows = self._session.execute(
                    "SELECT change_id, person_id, entered, cause FROM membership_change_log WHERE segment_id = ? "
                    "AND day = ? AND change_id > ? LIMIT ?", (segment_id, day, after, limit - len(changes)))
            else:
                rows = self._session.execute(
                    "SELECT change_id, person_id, entered, cause FROM membership_change_log WHERE segment_id = ? "
                    "AND day = ? AND change_id > ? AND change_id <= ? LIMIT ?",
                    (segment_id, day, after, through, limit - len(changes)))
            changes += [StoredChange(row.change_id, row.person_id, row.entered, row.cause)
                        for row in self._session.rows_of(rows)]
            if len(changes) >= limit:
                break
        changes += [StoredChange(row.change_id, row.person_id, row.entered, row.cause)
                    for row in self._session.rows_of(self._session.result(legacy))]
        # Each source gave its first `limit` changes after the cursor: the first `limit` of both are among them.
        return sorted(changes, key=lambda change: timeuuid_order(change.change_id))[:limit]

    def memberships(self, pairs: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
        """The (segment id, person id) pairs of `pairs` that are current members (read concurrently)."""
        # The old table is read only for segments that still have rows there (one cheap probe per segment).
        legacy = self._legacy_segments(segment_id for segment_id, _ in pairs)
        futures = [(pair, self._session.execute_async(
            "SELECT person_id FROM segment_members WHERE segment_id = ? AND bucket = ? AND person_id = ?",
            (pair[0], bucket_of(pair[1]), pair[1]))) for pair in pairs]
        futures += [(pair, self._session.execute_async(
            "SELECT person_id FROM members WHERE segment_id = ? AND person_id = ?", pair))
            for pair in pairs if pair[0] in legacy]
        return {pair for pair, future in futures if self._session.result(future).one() is not None}

    # ---- following the profile feed, and re-evaluations due at a time ----

    def feed_position(self, feed: str) -> str | None:
        row = self._session.execute("SELECT cursor FROM feed_positions WHERE feed = ?", (feed,)).one()
        return row.cursor if row is not None else None

    def save_feed_position(self, feed: str, cursor: str, when: datetime) -> None:
        self._session.execute("INSERT INTO feed_positions (feed, cursor, update_time) VALUES (?, ?, ?)",
                              (feed, cursor, when))

    def lease(self, name: str, ttl_seconds: int, owner: str | None = None) -> FollowerLease:
        """The lease `name` in `follower_leases` (the profile feed's follower, a running operation)."""
        return FollowerLease(self._session, name, ttl_seconds=ttl_seconds, owner=owner)

    def schedule(self, due: Iterable[tuple[str, datetime]]) -> None:
        """Evaluate each person again at its time (rows in the day partition of that time)."""
        self.start_schedule(due)()

    def start_schedule(self, due: Iterable[tuple[str, datetime]]) -> Callable[[], None]:
        """`schedule`, returning once the writes are sent: call the result to wait for them. Rows this
        process wrote before and that are not due soon are not written again (see SCHEDULE_MEMORY)."""
        horizon = datetime.now(UTC) + SCHEDULE_SKIP_MARGIN
        with self._scheduled_lock:
            unwritten = [entry for entry in dict.fromkeys(due) if entry[1] <= horizon or entry not in self._scheduled]
        # In unlogged batches by day: a recompute schedules most of a segment's persons, in few day partitions.
        sent = self._session.start_writes([("INSERT INTO reevaluations (day, due_time, person_id) VALUES (?, ?, ?)",
                                            (when.date(), when, person_id)) for person_id, when in unwritten])

        def wait() -> None:
            sent()  # raises if a write failed: then none of them is remembered
            with self._scheduled_lock:
                for entry in unwritten:
                    if entry[1] > horizon:
                        self._scheduled[entry] = None
                        self._scheduled.move_to_end(entry)
                while len(self._scheduled) > SCHEDULE_MEMORY:
                    self._scheduled.popitem(last=False)
        return wait

    def due(self, day: date, now: datetime, limit: int) -> list[tuple[datetime, str]]:
        rows = self._session.execute("SELECT due_time, person_id FROM reevaluations WHERE day = ? AND due_time <= ? "
                                     "LIMIT ?", (day, now, limit))
        return [(_utc(row.due_time) or _EPOCH, row.person_id) for row in rows]

    def delete_due(self, day: date, rows: Sequence[tuple[datetime, str]]) -> None:
        if rows:
            self._session.execute_many("DELETE FROM reevaluations WHERE day = ? AND due_time = ? AND person_id = ?",
                                       [(day, when, person_id) for when, person_id in rows])

    # ---- operations ----

    def save_operation(self, operation: OperationRecord) -> None:
        self._session.execute(
            f"INSERT INTO operations ({_OPERATION_COLUMNS}) VALUES ({_OPERATION_MARKERS})",
            (operation.operation_id, operation.segment_id, operation.done, operation.shards_done,
             operation.shards_total, operation.profiles_scanned, operation.start_time, operation.member_count,
             operation.entered_count, operation.exited_count, operation.elapsed_seconds, operation.error_code,
             operation.error_message, operation.attempt, operation.parallelism, operation.revision,
             operation.error_reason, dict(operation.error_metadata) or None, operation.profiles_skipped))

    def get_operation(self, operation_id: str) -> OperationRecord | None:
        row = self._session.execute(f"SELECT {_OPERATION_COLUMNS} FROM operations WHERE operation_id = ?",
                                    (operation_id,)).one()
        if row is None:
            return None
        return OperationRecord(row.operation_id, row.segment_id, row.done, row.shards_done, row.shards_total,
                               row.profiles_scanned, _utc(row.start_time) or _EPOCH, row.member_count,
                               row.entered_count, row.exited_count, row.elapsed_seconds, row.error_code,
                               row.error_message, attempt=row.attempt or 1, parallelism=row.parallelism or 0,
                               revision=row.revision or 0, error_reason=row.error_reason,
                               error_metadata=dict(row.error_metadata or {}),
                               profiles_skipped=row.profiles_skipped or 0)

    def add_running(self, operation_id: str) -> None:
        self._session.execute("INSERT INTO running_operations (catalog, operation_id) VALUES (?, ?)",
                              (CATALOG, operation_id))

    def remove_running(self, operation_id: str) -> None:
        self._session.execute("DELETE FROM running_operations WHERE catalog = ? AND operation_id = ?",
                              (CATALOG, operation_id))

    def running_operations(self) -> list[str]:
        """The operations not done yet, whichever process runs them (or ran them and stopped)."""
        rows = self._session.rows("SELECT operation_id FROM running_operations WHERE catalog = ?", (CATALOG,))
        return [row.operation_id for row in rows]


def _values(record: SegmentRecord) -> Iterable[object]:
    return (record.segment_id, record.display_name, record.description, record.rule_text, set(record.referenced),
            record.revision, record.state, record.last_recompute_time, record.create_time, record.update_time,
            record.etag)
