"""CassandraSession.start_writes keeps at most WRITE_BATCHES_IN_FLIGHT batches in flight, sending the rest in
the background, and its wait() neither hangs nor loses a failure (against the real Cassandra)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from cassandra import InvalidRequest
from cassandra.cluster import ResponseFuture

from shared import deadline
from shared.cassandra import WRITE_BATCHES_IN_FLIGHT, CassandraSession, connect_cluster, open_session
from shared.config import CassandraSettings
from shared.errors import DeadlineExceeded
from shared.migrations import create_keyspace

pytestmark = pytest.mark.integration

_INSERT = "INSERT INTO rows (k, c, v) VALUES (?, ?, ?)"
# One row per partition: BATCH_PARTITIONS (10) rows a batch, so 3000 rows are 300 batches.
_ROWS = 3000
_BATCHES = _ROWS // 10
# wait() is called on another thread and given this long: a hang fails the test instead of stalling the run.
_WAIT_SECONDS = 60


class _Sends:
    """Wraps the driver session's execute_async: counts the batches sent and those not finished yet."""

    def __init__(self, session: CassandraSession, fail_at: int | None = None, delay: float = 0.0) -> None:
        self._execute_async = session.driver_session.execute_async
        self._fail_at = fail_at
        self._delay = delay
        self._lock = threading.Lock()
        self.sent = 0
        self.outstanding = 0
        self.max_outstanding = 0
        self.sends: list[tuple[float, float]] = []  # (monotonic time of the call, its timeout)

    def execute_async(self, *args: Any, **kwargs: Any) -> ResponseFuture:
        called_at = time.monotonic()  # just after start_writes took the batch's timeout
        time.sleep(self._delay)
        if self._fail_at is not None and self.sent == self._fail_at:
            raise RuntimeError("the driver refused the send")
        future = self._execute_async(*args, **kwargs)
        with self._lock:
            self.sent += 1
            self.outstanding += 1
            self.max_outstanding = max(self.max_outstanding, self.outstanding)
            self.sends.append((called_at, kwargs["timeout"]))
        # Registered before start_writes' own callbacks, so it runs first: the count is down before the next send.
        future.add_callbacks(self._finished, self._finished)
        return future

    def _finished(self, _result: Any) -> None:
        with self._lock:
            self.outstanding -= 1


@pytest.fixture
def session(cassandra_settings: CassandraSettings, admin_session: CassandraSession) -> Iterator[CassandraSession]:
    keyspace = cassandra_settings.keyspace("bounded")
    create_keyspace(admin_session, keyspace, cassandra_settings)
    admin_session.execute(f"CREATE TABLE {keyspace}.rows (k text, c int, v text, PRIMARY KEY ((k), c))", timeout=60)
    cluster = connect_cluster(cassandra_settings)
    try:
        yield open_session(cluster, keyspace, 10)
    finally:
        cluster.shutdown()


def _counted(session: CassandraSession, monkeypatch: pytest.MonkeyPatch, **options: Any) -> _Sends:
    sends = _Sends(session, **options)
    monkeypatch.setattr(session.driver_session, "execute_async", sends.execute_async)
    return sends


def _writes(rows: int = _ROWS) -> list[tuple[str, tuple[str, int, str]]]:
    return [(_INSERT, (f"k{i}", 0, f"v{i}")) for i in range(rows)]


def _rows_in(session: CassandraSession, rows: int = _ROWS) -> int:
    return len(session.select_in("SELECT k FROM rows WHERE k IN ?", (), [f"k{i}" for i in range(rows)]).rows())


def _wait_on_a_thread(wait: Callable[[], None]) -> None:
    with ThreadPoolExecutor(1) as pool:
        pool.submit(wait).result(timeout=_WAIT_SECONDS)


def test_a_large_write_lands_whole_with_at_most_the_cap_in_flight(session: CassandraSession,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # 1000 batches: sent all at once, hundreds of them wait on the node at the same time.
    sends = _counted(session, monkeypatch)
    session.write_all(_writes(10 * _ROWS))
    assert sends.sent == 10 * _BATCHES
    assert 1 < sends.max_outstanding <= WRITE_BATCHES_IN_FLIGHT
    assert sends.outstanding == 0
    assert _rows_in(session, 10 * _ROWS) == 10 * _ROWS


def test_the_batches_go_on_in_the_background_while_the_caller_works(session: CassandraSession,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    sends = _counted(session, monkeypatch, delay=0.005)  # 300 sends: 1.5 s at least
    wait = session.start_writes(_writes())
    assert sends.sent < _BATCHES  # returned once the first batches were sent, not all of them
    # The caller's other work: meanwhile every batch is sent and finishes, without wait() being called.
    give_up = time.monotonic() + _WAIT_SECONDS
    while (sends.sent < _BATCHES or sends.outstanding) and time.monotonic() < give_up:
        time.sleep(0.01)
    assert (sends.sent, sends.outstanding) == (_BATCHES, 0)
    _wait_on_a_thread(wait)
    assert _rows_in(session) == _ROWS
    assert sends.max_outstanding <= WRITE_BATCHES_IN_FLIGHT


def test_a_rejected_batch_is_raised_once_every_batch_sent_has_finished(session: CassandraSession,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    writes = _writes()
    writes[_ROWS // 2] = (_INSERT, ("", 0, "empty"))  # Cassandra refuses an empty partition key
    sends = _counted(session, monkeypatch)
    wait = session.start_writes(writes)
    with pytest.raises(InvalidRequest, match="Key may not be empty"):
        _wait_on_a_thread(wait)
    assert sends.outstanding == 0
    assert sends.max_outstanding <= WRITE_BATCHES_IN_FLIGHT
    # Batches before the rejected one landed; after it none was sent (the caller retries the whole write).
    assert 0 < _rows_in(session) < _ROWS


def test_a_send_that_raises_ends_the_sending_and_is_raised_by_wait(session: CassandraSession,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # The 41st send is made from a driver callback (after the first WRITE_BATCHES_IN_FLIGHT), where an exception
    # would be dropped by the driver if start_writes did not record it.
    sends = _counted(session, monkeypatch, fail_at=40)
    wait = session.start_writes(_writes())
    with pytest.raises(RuntimeError, match="the driver refused the send"):
        _wait_on_a_thread(wait)
    assert (sends.sent, sends.outstanding) == (40, 0)
    monkeypatch.undo()  # the read back is sent as the driver would
    assert _rows_in(session) <= 40 * 10


def test_batches_sent_in_the_background_keep_to_the_callers_deadline(session: CassandraSession,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # 10 ms a send: the 300 batches take at least 3 s, six times the caller's deadline.
    sends = _counted(session, monkeypatch, delay=0.01)
    started = time.monotonic()
    with deadline.deadline_after(0.5):
        wait = session.start_writes(_writes())
        with pytest.raises(DeadlineExceeded):
            wait()  # the caller's thread, under its deadline, as in an RPC handler
    assert time.monotonic() - started < 5  # not the 10 s request timeout, nor the whole write
    ends = started + 0.5
    # Each batch was sent (from the driver's event loop thread too) with a timeout ending by the deadline.
    assert all(sent_at + timeout <= ends + 0.01 for sent_at, timeout in sends.sends)
    assert 0 < sends.sent < _BATCHES
    assert sends.outstanding == 0
