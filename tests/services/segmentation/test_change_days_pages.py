"""A driver failure while the day index of the change log is read past its first page is a domain error.

The day index is read in pages of 1000 days; the driver fetches the next page while the rows are iterated,
outside the call that ran the statement. Against real Cassandra: the reading session's cluster is shut down
as soon as the first page has arrived, so fetching the second one fails in the driver (NoHostAvailable),
which must come out as UNAVAILABLE (retry with backoff), not as an untranslated exception (INTERNAL)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, timedelta
from typing import Any

import pytest

from services.segmentation.store import SegmentStore
from shared.cassandra import CassandraSession, connect_cluster, open_session
from shared.changefeed import FEED_START
from shared.config import CassandraSettings
from shared.errors import Unavailable

pytestmark = pytest.mark.integration

_DAY_PAGE = 1000  # the page size `SegmentStore._change_days` reads the day index with


class ShutDownAfterFirstPage(CassandraSession):
    """A session whose cluster shuts down right after a read of the day index returns its first page."""

    def execute(self, cql: str, params: Sequence[Any] = (), **options: Any) -> Any:
        rows = super().execute(cql, params, **options)
        if "FROM membership_change_days" in cql:
            assert rows.has_more_pages  # the second page is fetched while the caller iterates
            self.driver_session.cluster.shutdown()
        return rows


def test_a_failure_fetching_a_later_page_of_days_is_unavailable(segmentation_session: CassandraSession,
                                                                 cassandra_settings: CassandraSettings) -> None:
    days = [date(2020, 1, 1) + timedelta(days=n) for n in range(_DAY_PAGE + 1)]
    segmentation_session.write_all([("INSERT INTO membership_change_days (segment_id, day) VALUES (?, ?)",
                                     ("s", day)) for day in days])
    cluster = connect_cluster(cassandra_settings)
    try:
        session = open_session(cluster, cassandra_settings.keyspace("segmentation"), 10)
        store = SegmentStore(ShutDownAfterFirstPage(session.driver_session, 10))
        with pytest.raises(Unavailable) as raised:
            store.changes_page("s", FEED_START, 10)
        assert raised.value.reason == "STORAGE_UNAVAILABLE"
        assert "NoHostAvailable" in raised.value.message
    finally:
        cluster.shutdown()
