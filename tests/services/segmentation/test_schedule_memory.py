"""Re-evaluation rows a store wrote are not written again while they cannot have been swept (SCHEDULE_MEMORY),
against real Cassandra: a row deleted behind the store's back shows whether a second schedule wrote it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.segmentation import store as store_module
from services.segmentation.store import SCHEDULE_SKIP_MARGIN, SegmentStore
from shared.cassandra import CassandraSession

pytestmark = pytest.mark.integration


def scheduled(session: CassandraSession, person_id: str, when: datetime) -> bool:
    return session.execute("SELECT person_id FROM reevaluations WHERE day = ? AND due_time = ? AND person_id = ?",
                           (when.date(), when, person_id)).one() is not None


def delete_behind_the_store(session: CassandraSession, person_id: str, when: datetime) -> None:
    session.execute("DELETE FROM reevaluations WHERE day = ? AND due_time = ? AND person_id = ?",
                    (when.date(), when, person_id))


def test_a_row_written_before_and_not_due_soon_is_not_written_again(segmentation_session: CassandraSession) -> None:
    store = SegmentStore(segmentation_session)
    later = (datetime.now(UTC) + timedelta(days=3)).replace(microsecond=0)
    store.schedule([("sched-ann", later)])
    assert scheduled(segmentation_session, "sched-ann", later)
    delete_behind_the_store(segmentation_session, "sched-ann", later)
    store.schedule([("sched-ann", later), ("sched-bob", later)])
    assert not scheduled(segmentation_session, "sched-ann", later)  # remembered: not sent again
    assert scheduled(segmentation_session, "sched-bob", later)
    # Another store (another replica, a restart) remembers nothing and writes it.
    SegmentStore(segmentation_session).schedule([("sched-ann", later)])
    assert scheduled(segmentation_session, "sched-ann", later)


def test_a_row_due_soon_is_always_written(segmentation_session: CassandraSession) -> None:
    store = SegmentStore(segmentation_session)
    soon = (datetime.now(UTC) + SCHEDULE_SKIP_MARGIN / 2).replace(microsecond=0)
    store.schedule([("sched-cat", soon)])
    delete_behind_the_store(segmentation_session, "sched-cat", soon)
    store.schedule([("sched-cat", soon)])
    assert scheduled(segmentation_session, "sched-cat", soon)


def test_the_memory_keeps_the_latest_rows(segmentation_session: CassandraSession,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "SCHEDULE_MEMORY", 2)
    store = SegmentStore(segmentation_session)
    later = (datetime.now(UTC) + timedelta(days=3)).replace(microsecond=0)
    store.schedule([("sched-dan", later)])
    store.schedule([("sched-eve", later), ("sched-fay", later)])  # dan is forgotten
    for person_id in ("sched-dan", "sched-eve"):
        delete_behind_the_store(segmentation_session, person_id, later)
    store.schedule([("sched-dan", later), ("sched-eve", later)])
    assert scheduled(segmentation_session, "sched-dan", later)
    assert not scheduled(segmentation_session, "sched-eve", later)
