"""The Cassandra session every service uses: token-aware, LOCAL_QUORUM, protocol v5, prepared statements.

`CassandraSession` is the only way service code talks to Cassandra. It prepares each CQL string once
and binds values (no string-built queries), clamps query timeouts to the RPC deadline, and turns
driver exceptions into domain errors (UNAVAILABLE, DEADLINE_EXCEEDED) a caller can act on.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import re
import struct
import threading
from collections import namedtuple
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any

from cassandra import (
    ConsistencyLevel,
    CoordinationFailure,
    OperationTimedOut,
    ReadTimeout,
    RequestExecutionException,
    WriteTimeout,
)
from cassandra import Unavailable as CassandraUnavailable
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import (
    EXEC_PROFILE_DEFAULT,
    Cluster,
    ExecutionProfile,
    NoHostAvailable,
    ResponseFuture,
    Session,
)
from cassandra.concurrent import execute_concurrent_with_args
from cassandra.policies import DCAwareRoundRobinPolicy, ExponentialReconnectionPolicy, TokenAwarePolicy
from cassandra.query import (
    UNSET_VALUE,
    BatchStatement,
    BatchType,
    BoundStatement,
    PreparedStatement,
    _clean_column_name,
    tuple_factory,
)

from shared import deadline
from shared.config import CassandraSettings
from shared.errors import DeadlineExceeded, DomainError, Unavailable

log = logging.getLogger(__name__)

# The execution profile CassandraSession uses for every statement that is not a lightweight transaction.
ROWS_PROFILE = "onecdp-rows"
# The same, for reads asked for as plain tuples (`tuples=True`): the columns by position, no Row made per row.
TUPLES_PROFILE = "onecdp-tuples"
# Lightweight transactions run their Paxos round among local replicas.
SERIAL_CONSISTENCY = ConsistencyLevel.LOCAL_SERIAL

# Each statement the driver runs costs ~150-250 us of Python CPU in this process; a row inside a batch
# or a key inside an IN list costs ~5-20 us (bench: see `select_in` and `write_all`). Services that
# touch many partitions per request therefore read with IN lists and write with unlogged batches.
IN_LIST_SIZE = 100
# An IN read carries this LIMIT, no larger than the page the driver asks for (its default fetch size):
# Cassandra then reads the IN list's partitions all at once, where it pages a query without one through
# its partitions one after the other (MultiPartitionPager), 2-3x its time and the wall time of a read of
# 100 small partitions (measured here on profile's timeline reads). A read that fills the limit may have
# more rows: it is read again without it, paged.
IN_READ_ROWS = 5000
_ALLOW_FILTERING = " ALLOW FILTERING"
# Cassandra warns about an unlogged batch spanning more than 10 partitions
# (unlogged_batch_across_partitions_warn_threshold) and about a multi-partition batch larger than
# batch_size_warn_threshold (5 KiB by default; it refuses one over batch_size_fail_threshold, 50 KiB), in its
# log and to the client, whose driver logs it: a warning per batch drowns a service's log. Shared batches hold at
# most 10 partitions and, of data as Cassandra counts it (see _bound_size), the smaller of BATCH_BYTES and the
# cluster's warning threshold (read once per session, system_views.settings). BATCH_BYTES is 12 KiB,
# as fast as the largest tried (identity's links: batches cut at 5 KiB linked ~15% slower: more round trips);
# OneCDP's own Cassandra configurations warn from 16 KiB (deploy/cassandra.py, the k8s datacenter), so they take
# 12 KiB batches, and a cluster left at the default takes 5 KiB ones. A batch within one partition is exempt from
# the size checks and is what Cassandra applies most cheaply.
BATCH_PARTITIONS = 10
BATCH_BYTES = 12 * 1024
DEFAULT_BATCH_WARN_BYTES = 5 * 1024
# What Cassandra 5.0 counts of a cell beside its value in a row's data size: an 8-byte timestamp, a 4-byte TTL
# and an 8-byte expiry, TTL or not. A key's values count nothing there, and a row adds its liveness and
# deletion (20 + 12 bytes at most), so a statement's values plus this per value and once for the row is never
# less than its size, but for a non-frozen collection (each element a cell of its own, with its path): shared
# batches write none but a one-element set.
CELL_OVERHEAD_BYTES = 20
BATCH_STATEMENTS = 200
# The batches one start_writes/write_all keeps in flight. Sending every batch of a large write at once
# (a recompute writes a million rows: thousands of batches) overflows Cassandra's native-transport queue
# (overloaded errors, timeouts), holds them all in memory and queues the process's other requests behind
# them: measured here, while a 200k-row write (20k batches) went out at once, a single-row read of the same
# process waited up to 2-4 s; with 32 in flight, 0.2 s. A node applies writes on concurrent_writes (32 by
# default) threads; 64 or 128 in flight wrote no faster than 32 here (noisy, shared 2-core machine).
WRITE_BATCHES_IN_FLIGHT = 32


@functools.lru_cache(maxsize=4096)
def _row_type(column_names: tuple[str, ...]) -> Any:
    # The driver's own names for the columns (e.g. `count` for count(*)); rename=True turns any name a
    # namedtuple cannot take into _0, _1, ... instead of failing.
    return namedtuple("Row", [_clean_column_name(name) for name in column_names], rename=True)


@functools.lru_cache(maxsize=4096)
def _row_maker(column_names: tuple[str, ...]) -> Callable[[Sequence[Any]], Any]:
    # A Row of a row's values, made as the namedtuple's own __new__ makes it (tuple.__new__ of its class) but
    # without a Python call per row: a scan makes one per row read, and `Row(*values)` cost twice as much.
    return functools.partial(tuple.__new__, _row_type(column_names))


def cached_named_tuple_factory(column_names: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[Any]:
    """Rows as namedtuples, like the driver's default factory, but with one Row class per column list.

    The driver's `named_tuple_factory` builds a new namedtuple class for every result set, which
    costs ~0.1-0.3 ms of CPU each: more than the rest of handling a small query, and the largest
    single cost of a service doing dozens of reads per request. The driver gives each row as many
    values as there are columns, which is all a Row's own constructor checks.
    """
    return list(map(_row_maker(tuple(column_names)), rows))


# Values of these exact types that are equal serialize to equal bytes for one column type (a bool, a
# Decimal or a float may not: True == 1, Decimal("1.0") == Decimal("1.00"), 0.0 == -0.0).
_MEMOIZED_TYPES = frozenset({str, int, datetime})


def bind_memoized(statement: PreparedStatement, params: Sequence[Any],
                  serialized: dict[tuple[Any, type, Any], bytes]) -> BoundStatement:
    """`statement.bind(params)`, serializing each value of a column type once per `serialized` memo.

    The rows of one write repeat most of their values (an identifier in each of its links, a message
    id and its times in each row of an observation), and the driver's bind serializes every one again,
    building a namedtuple per value for its column encryption lookup: ~2-4 us a value, the largest
    part of the ~20 us a row costs. Anything the driver treats specially (a dict, unset values, a
    length that does not match, column encryption, a value it refuses) goes through its own bind.
    """
    columns = statement.column_metadata
    if statement.column_encryption_policy is not None or isinstance(params, dict) or len(params) != len(columns):
        return statement.bind(params)
    version = statement.protocol_version
    values: list[bytes | None] = []
    try:
        for value, column in zip(params, columns, strict=True):
            value_type = type(value)
            if value is None:
                values.append(None)
            elif value_type in _MEMOIZED_TYPES:
                key = (column.type, value_type, value)
                data = serialized.get(key)
                if data is None:
                    data = serialized[key] = column.type.serialize(value, version)
                values.append(data)
            elif value is UNSET_VALUE:
                return statement.bind(params)
            else:
                values.append(column.type.serialize(value, version))
    except (TypeError, struct.error):
        return statement.bind(params)  # raises the driver's message naming the column
    bound = BoundStatement(statement)
    bound.raw_values = params
    bound.values = values
    return bound


def _execution_profile(settings: CassandraSettings, **options: Any) -> ExecutionProfile:
    return ExecutionProfile(
        load_balancing_policy=TokenAwarePolicy(DCAwareRoundRobinPolicy(local_dc=settings.local_dc)),
        consistency_level=ConsistencyLevel.name_to_value[settings.consistency],
        serial_consistency_level=SERIAL_CONSISTENCY,
        request_timeout=settings.request_timeout_seconds,
        **options,
    )


# How the driver tries a node it lost again: after 0.5 s, doubling, at most every 5 s, for ever. Its default
# (1 s doubling to 10 minutes, 64 tries) left services answering UNAVAILABLE long after Cassandra was back:
# 33 s after a 90 s outage here, minutes after a longer one, and never once the tries ran out.
RECONNECT_FIRST_SECONDS = 0.5
RECONNECT_MAX_SECONDS = 5.0


def connect_cluster(settings: CassandraSettings) -> Cluster:
    """A connected driver Cluster for the settings; call `.shutdown()` when done."""
    profile = _execution_profile(settings)
    # The same, with rows built by the cached factory. Lightweight transactions keep the driver's own
    # factory: ResultSet.was_applied only accepts the driver's factories.
    rows_profile = _execution_profile(settings, row_factory=cached_named_tuple_factory)
    tuples_profile = _execution_profile(settings, row_factory=tuple_factory)
    auth = None
    if settings.username:
        password = settings.password.get_secret_value() if settings.password else ""
        auth = PlainTextAuthProvider(username=settings.username, password=password)
    cluster = Cluster(
        contact_points=settings.contact_points,
        port=settings.port,
        protocol_version=5,
        execution_profiles={EXEC_PROFILE_DEFAULT: profile, ROWS_PROFILE: rows_profile, TUPLES_PROFILE: tuples_profile},
        auth_provider=auth,
        connect_timeout=settings.connect_timeout_seconds,
        reconnection_policy=ExponentialReconnectionPolicy(RECONNECT_FIRST_SECONDS, RECONNECT_MAX_SECONDS,
                                                          max_attempts=None),
    )
    return cluster


class CassandraSession:
    """A driver session bound to one keyspace, with a prepared-statement cache."""

    def __init__(self, session: Session, request_timeout: float) -> None:
        self._session = session
        self._request_timeout = request_timeout
        self._prepared: dict[str, PreparedStatement] = {}
        self._lock = threading.Lock()
        self._batch_bytes: int | None = None

    @property
    def keyspace(self) -> str | None:
        keyspace: str | None = self._session.keyspace
        return keyspace

    @property
    def driver_session(self) -> Session:
        """The raw driver session, for the few places that need it (benchmark baselines, token maps)."""
        return self._session

    def prepare(self, cql: str) -> PreparedStatement:
        statement = self._prepared.get(cql)
        if statement is None:
            with self._lock:
                statement = self._prepared.get(cql)
                if statement is None:
                    statement = self._call(self._session.prepare, cql)
                    self._prepared[cql] = statement
        return statement

    def execute(self, cql: str, params: Sequence[Any] = (), *, timeout: float | None = None,
                consistency: int | None = None, fetch_size: int | None = None, tuples: bool = False) -> Any:
        """Prepare (once), bind and run one statement; returns the driver ResultSet.

        `consistency` overrides the profile's level for this statement, e.g. SERIAL_CONSISTENCY to read
        back the outcome of a lightweight transaction that timed out. `fetch_size` sets the page size of
        a long read; iterating the result fetches the next pages (each within the request timeout).
        `tuples`: rows as plain tuples of the columns in order, for hot reads that make thousands of rows
        (a Row namedtuple costs more per row than decoding it).
        """
        statement: Any = self.prepare(cql).bind(params)
        if consistency is not None:
            statement.consistency_level = consistency
        if fetch_size is not None:
            statement.fetch_size = fetch_size
        limit = deadline.timeout_within(timeout or self._request_timeout)
        return self._call(self._session.execute, statement, timeout=limit,
                          execution_profile=_profile_for(cql, tuples))

    def rows(self, cql: str, params: Sequence[Any] = (), *, timeout: float | None = None,
             consistency: int | None = None, fetch_size: int | None = None) -> list[Any]:
        """Every row of the statement (`execute`'s options), all its pages read now (see `rows_of`)."""
        return list(self.iterate(cql, params, timeout=timeout, consistency=consistency, fetch_size=fetch_size))

    def iterate(self, cql: str, params: Sequence[Any] = (), *, timeout: float | None = None,
                consistency: int | None = None, fetch_size: int | None = None, tuples: bool = False) -> Iterator[Any]:
        """The rows of the statement (`execute`'s options) as the caller reads them: it runs now, and each
        later page is fetched when the iteration reaches it (see `rows_of`), for a long scan that streams."""
        return self.rows_of(self.execute(cql, params, timeout=timeout, consistency=consistency,
                                         fetch_size=fetch_size, tuples=tuples))

    def rows_of(self, result: Any) -> Iterator[Any]:
        """The rows of a driver result (of `execute` or `result`), fetching its later pages inside driver-error
        translation. Iterating the ResultSet itself fetches them outside the call that ran the statement: a
        timeout on page 2 would reach the caller untranslated (INTERNAL), not as UNAVAILABLE/DEADLINE_EXCEEDED."""
        while True:
            yield from result.current_rows
            if not result.has_more_pages:
                return
            self._call(result.fetch_next_page)

    def execute_async(self, cql: str, params: Sequence[Any] = (), *, timeout: float | None = None,
                      tuples: bool = False) -> ResponseFuture:
        statement = self.prepare(cql)
        limit = deadline.timeout_within(timeout or self._request_timeout)
        return self._call(self._session.execute_async, statement, params, timeout=limit,
                          execution_profile=_profile_for(cql, tuples))

    def execute_batch_async(self, cql: str, rows: Sequence[Sequence[Any]], *, logged: bool = False,
                            timeout: float | None = None) -> ResponseFuture:
        """One batch of the same prepared statement bound to each row (e.g. conditional writes to one
        partition, which Cassandra applies in a single Paxos round); wait with `result`."""
        statement = self.prepare(cql)
        batch = BatchStatement(batch_type=BatchType.LOGGED if logged else BatchType.UNLOGGED)
        serialized: dict[tuple[Any, type, Any], bytes] = {}
        for row in rows:
            batch.add(bind_memoized(statement, row, serialized))
        limit = deadline.timeout_within(timeout or self._request_timeout)
        return self._call(self._session.execute_async, batch, timeout=limit, execution_profile=_profile_for(cql))

    def select_in(self, cql: str, params: Sequence[Any], keys: Iterable[Any], *, tuples: bool = False) -> PendingRows:
        """Start reading `cql`, whose last bind marker is an IN list, for every key in `keys`.

        The keys are sent in IN lists of IN_LIST_SIZE, all concurrently; `PendingRows.rows()` waits for
        them. Use it for many partitions of one table, e.g. `... WHERE id_type = ? AND id_value IN ?`.
        `tuples`: rows as plain tuples (see `execute`).
        """
        ordered = list(dict.fromkeys(keys))
        return self.start_reads(cql, [(*params, ordered[i:i + IN_LIST_SIZE])
                                      for i in range(0, len(ordered), IN_LIST_SIZE)], tuples=tuples)

    def start_reads(self, cql: str, param_sets: Iterable[Sequence[Any]], *, limited: bool = True,
                    tuples: bool = False) -> PendingRows:
        """Start `cql` once per parameter set, all concurrently: `PendingRows.rows()` waits for all of them.

        `limited` (for reads of several partitions named in IN lists): each read carries LIMIT
        IN_READ_ROWS (see there), and one that fills it is read again without it. Otherwise (e.g. a
        token-range read, which ends with ALLOW FILTERING) each read is paged by the driver. `tuples`: rows
        as plain tuples (see `execute`).
        """
        statement = cql
        if limited:  # LIMIT goes before a closing ALLOW FILTERING (a filtered IN read: profile's timeline)
            filtering = cql.endswith(_ALLOW_FILTERING)
            statement = (f"{cql.removesuffix(_ALLOW_FILTERING) if filtering else cql} LIMIT {IN_READ_ROWS}"
                         f"{_ALLOW_FILTERING if filtering else ''}")
        return PendingRows(self, [(cql if limited else None, params, self.execute_async(statement, params,
                                                                                        tuples=tuples))
                                  for params in param_sets], tuples=tuples)

    def batch_bytes(self) -> int:
        """How large a shared batch may be (see BATCH_BYTES): read once from a node of the cluster (they share
        their configuration), then remembered; the default threshold's when it cannot be read (a role without
        access to system_views)."""
        if self._batch_bytes is None:
            try:
                row = self.execute("SELECT value FROM system_views.settings WHERE name = ?",
                                   ("batch_size_warn_threshold",)).one()
                setting = row.value if row is not None else None
            except DomainError as error:
                log.warning("could not read batch_size_warn_threshold; batches stay under the default",
                            extra={"error": error.message})
                setting = None
            self._batch_bytes = batch_bytes_for(setting)
        return self._batch_bytes

    def write_all(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> None:
        """Apply many plain (not conditional) writes in unlogged batches, and wait for all of them.

        Batches run concurrently and in no particular order, so the writes must not depend on each
        other (order what must be ordered with two calls). Every write in this project is idempotent:
        a failure (raised once every batch sent has finished; see start_writes) is retried by the caller
        as a whole.
        """
        self.start_writes(statements)()

    def start_writes(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> Callable[[], None]:
        """`write_all`, returning as soon as the first batches are sent: call the result to wait for them.

        Lets a caller overlap the writes with other work that does not depend on them. At most
        WRITE_BATCHES_IN_FLIGHT batches run at a time; the rest are sent in the background, each as one
        finishes, with a timeout clamped to the caller's deadline when it is sent. After the first
        failure no further batch is sent (the caller retries the whole write); the result raises it once
        every batch sent has finished.
        """
        by_partition: dict[Any, list[Any]] = {}
        serialized: dict[tuple[Any, type, Any], bytes] = {}
        for cql, params in statements:
            bound = bind_memoized(self.prepare(cql), params, serialized)
            by_partition.setdefault(bound.routing_key, []).append(bound)
        deadline.timeout_within(self._request_timeout)  # a deadline already passed fails here, before any send
        writes = _BatchWrites(self._session, pack_batches(list(by_partition.values()), _bound_size,
                                                          self.batch_bytes()), self._request_timeout)
        writes.start()

        def wait() -> None:
            failure = writes.wait()
            if failure is not None:
                self._call(_raise, failure)  # translated here, against the caller's deadline
        return wait

    def result(self, future: ResponseFuture) -> Any:
        """Wait for an execute_async future, translating driver errors."""
        return self._call(future.result)

    def execute_many(self, cql: str, params: Iterable[Sequence[Any]], *, concurrency: int = 64) -> list[Any]:
        """Run one statement for many parameter rows concurrently; raise the first failure."""
        statement = self.prepare(cql)
        results = self._call(
            execute_concurrent_with_args, self._session, statement, list(params),
            execution_profile=_profile_for(cql),
            concurrency=concurrency, raise_on_first_error=True,
        )
        return [rows for _, rows in results]

    def _call(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except DomainError:
            raise
        except Exception as error:  # translated below, or re-raised untouched
            raise translate_driver_error(error) from error


def _raise(error: BaseException) -> None:
    raise error


class _BatchWrites:
    """The unlogged batches of one `start_writes`, at most WRITE_BATCHES_IN_FLIGHT of them in flight.

    Each batch that finishes sends the next one from its driver callback, on the driver's event loop
    thread: that code must not block (it takes one short lock) and must not raise, since the driver
    drops exceptions from callbacks. Every failure, of a batch or of sending one, is recorded and ends
    the sending, so `wait` cannot hang on a batch that was never sent nor lose an error.
    """

    def __init__(self, session: Session, batches: list[list[Any]], request_timeout: float) -> None:
        self._session = session
        self._batches = batches
        self._request_timeout = request_timeout
        # The caller's context, for its RPC deadline (a contextvar) when a later batch is sent from a callback.
        self._context = contextvars.copy_context()
        self._lock = threading.Lock()
        self._next = 0  # index of the next batch to send
        self._in_flight = 0
        self._failure: BaseException | None = None
        self._finished = threading.Event()

    def start(self) -> None:
        for _ in range(min(WRITE_BATCHES_IN_FLIGHT, len(self._batches))):
            self._send_next()
        self._finish_if_done()

    def wait(self) -> BaseException | None:
        """Wait for every batch sent to finish; the first failure, or None."""
        self._finished.wait()
        return self._failure

    def _send_next(self) -> None:
        with self._lock:
            if self._failure is not None or self._next == len(self._batches):
                return
            statements = self._batches[self._next]
            self._batches[self._next] = []  # sent: let its statements go once the batch is done
            self._next += 1
            self._in_flight += 1
        try:
            batch = BatchStatement(batch_type=BatchType.UNLOGGED)
            for bound in statements:
                batch.add(bound)
            # A copy per send: a Context can be entered by only one thread at a time, and this runs both
            # in the caller's thread and in the event loop's. DeadlineExceeded once the deadline passed.
            limit = self._context.copy().run(deadline.timeout_within, self._request_timeout)
            future = self._session.execute_async(batch, timeout=limit, execution_profile=ROWS_PROFILE)
        except Exception as error:  # recorded: ends the sending, raised by wait()
            self._done(error)
            return
        # Runs the callback at once, in this thread, when the batch already finished: a failure sends nothing
        # more, and a success needs a response, which the event loop cannot read while it runs this.
        future.add_callbacks(self._succeeded, self._failed)

    def _succeeded(self, _rows: Any) -> None:
        self._done(None)
        self._send_next()

    def _failed(self, error: BaseException) -> None:
        self._done(error)

    def _done(self, failure: BaseException | None) -> None:
        with self._lock:
            self._in_flight -= 1
            if failure is not None and self._failure is None:
                self._failure = failure
        self._finish_if_done()

    def _finish_if_done(self) -> None:
        with self._lock:
            done = self._in_flight == 0 and (self._failure is not None or self._next == len(self._batches))
        if done:
            self._finished.set()


def _bound_size(bound: Any) -> int:
    """What Cassandra counts of a statement against batch_size_warn_threshold (a row's data size), at most: its
    values, plus CELL_OVERHEAD_BYTES for each value and for the row. By the values alone, rows of short values
    were counted at a third of their size (a sixth for small numbers): batches passed the warning."""
    return sum(len(value) for value in bound.values if value) + CELL_OVERHEAD_BYTES * (len(bound.values) + 1)


_DATA_SIZE = re.compile(r"\s*(\d+)\s*(B|KiB|MiB|GiB)?\s*")
_UNIT_BYTES = {"B": 1, "KiB": 1024, "MiB": 1024 ** 2, "GiB": 1024 ** 3}


def batch_bytes_for(warn_threshold: str | None) -> int:
    """The largest shared batch under a node's batch_size_warn_threshold setting (None: not known, its default)."""
    threshold = data_size_bytes(warn_threshold) if warn_threshold is not None else None
    return min(BATCH_BYTES, DEFAULT_BATCH_WARN_BYTES if threshold is None else threshold)


def data_size_bytes(value: str) -> int | None:
    """A Cassandra data size setting ("16KiB", "5KiB"; a bare number is KiB, as the older `_in_kb` settings) in
    bytes; None for anything else."""
    match = _DATA_SIZE.fullmatch(value)
    return int(match.group(1)) * _UNIT_BYTES[match.group(2) or "KiB"] if match else None


def pack_batches(partitions: Sequence[list[Any]], size_of: Callable[[Any], int],
                 max_bytes: int = BATCH_BYTES) -> list[list[Any]]:
    """Statements grouped by partition, packed into batches Cassandra takes without a warning.

    A partition whose statements are large goes alone (a batch within one partition is exempt from
    the size checks), in slices of BATCH_STATEMENTS; small partitions share a batch up to
    BATCH_PARTITIONS partitions and `max_bytes` as `size_of` counts them.
    """
    batches: list[list[Any]] = []
    current: list[Any] = []
    current_partitions = current_bytes = 0
    for statements in partitions:
        size = sum(size_of(statement) for statement in statements)
        if size > max_bytes or len(statements) > BATCH_STATEMENTS:
            batches += [statements[i:i + BATCH_STATEMENTS] for i in range(0, len(statements), BATCH_STATEMENTS)]
            continue
        if current and (current_partitions == BATCH_PARTITIONS or current_bytes + size > max_bytes
                        or len(current) + len(statements) > BATCH_STATEMENTS):
            batches.append(current)
            current, current_partitions, current_bytes = [], 0, 0
        current += statements
        current_partitions += 1
        current_bytes += size
    if current:
        batches.append(current)
    return batches


class PendingRows:
    """The rows of several concurrent reads (see CassandraSession.select_in); `rows()` waits for them."""

    def __init__(self, session: CassandraSession,
                 reads: Sequence[tuple[str | None, Sequence[Any], ResponseFuture]], *, tuples: bool = False) -> None:
        self._session = session
        # (the statement without its LIMIT, or None for a read without one; its parameters; the read)
        self._reads = reads
        self._tuples = tuples  # rows as plain tuples, the reads again without the limit too

    def rows(self) -> list[Any]:
        rows: list[Any] = []
        for cql, params, future in self._reads:
            result = self._session.result(future)
            if cql is not None and len(result.current_rows) >= IN_READ_ROWS:
                result = self._session.execute(cql, params, tuples=self._tuples)  # maybe cut off: all, paged
            rows.extend(self._session.rows_of(result))
        return rows


_CONDITIONAL_WRITE = re.compile(r"^\s*(INSERT|UPDATE|DELETE)\b.*\sIF\s", re.IGNORECASE | re.DOTALL)


@functools.lru_cache(maxsize=4096)
def _profile_for(cql: str, tuples: bool = False) -> Any:
    """The default profile (the driver's row factory) for lightweight transactions (a write with an IF
    clause), else TUPLES_PROFILE for rows asked for as tuples, ROWS_PROFILE otherwise. The driver has no
    is_lwt() on prepared statements in 3.30."""
    if _CONDITIONAL_WRITE.match(cql):
        return EXEC_PROFILE_DEFAULT
    return TUPLES_PROFILE if tuples else ROWS_PROFILE


def translate_driver_error(error: Exception) -> Exception:
    """A domain error for driver failures a caller can act on; other exceptions unchanged."""
    left = deadline.remaining()
    if isinstance(error, OperationTimedOut | ReadTimeout | WriteTimeout) and left is not None and left <= 0.05:
        return DeadlineExceeded(
            "the caller's deadline passed while waiting for Cassandra; retry with a longer deadline",
            reason="STORAGE_DEADLINE")
    if isinstance(error, NoHostAvailable | OperationTimedOut | CassandraUnavailable | ReadTimeout | WriteTimeout
                  | CoordinationFailure | RequestExecutionException):
        return Unavailable(f"Cassandra could not serve the request ({type(error).__name__}: {error}); "
                           "retry with backoff", reason="STORAGE_UNAVAILABLE")
    return error


def open_session(cluster: Cluster, keyspace: str | None, request_timeout: float) -> CassandraSession:
    """A CassandraSession on the cluster, using `keyspace` for unqualified table names."""
    try:
        session = cluster.connect(keyspace)
    except Exception as error:
        raise translate_driver_error(error) from error
    opened = CassandraSession(session, request_timeout)
    opened.batch_bytes()  # read now, so that no write waits for it
    return opened
