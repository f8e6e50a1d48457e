"""A recompute whose start fails after its operation was recorded (Cassandra failing to list it as running)
is ended and disowned, not left owned and renewed forever with its segment COMPUTING. Real Cassandra."""

from __future__ import annotations

from typing import Any

import pytest

from services.segmentation.catalog import RuleInput, SegmentCatalog, SegmentState
from services.segmentation.follower import Memberships
from services.segmentation.recompute import Recomputer
from services.segmentation.store import SegmentStore
from services.segmentation.text import parse
from shared.cassandra import CassandraSession
from shared.errors import Unavailable
from shared.leases import operation_lease_name

pytestmark = pytest.mark.integration


class ListingFails(SegmentStore):
    def add_running(self, operation_id: str) -> None:
        raise Unavailable("Cassandra could not serve the request", reason="STORAGE_UNAVAILABLE")


def test_a_recompute_that_cannot_be_listed_is_ended_and_disowned(segmentation_session: CassandraSession) -> None:
    store = ListingFails(segmentation_session)
    catalog = SegmentCatalog(store)  # no recompute started by create: started below, by hand
    catalog.create("pros", "", "", RuleInput(parse('traits.plan = "pro"'), "segment.rule_text", True))
    source: Any = object()  # never read: the run never starts
    recomputer = Recomputer(catalog, store, source, reconciler=Memberships(catalog, store, source))
    try:
        with pytest.raises(Unavailable):
            recomputer.start("pros")
        operation_id = catalog.get("pros").operation_id
        operation = store.get_operation(operation_id)
        assert operation is not None and operation.done and operation.error_code == "UNAVAILABLE"
        assert catalog.get("pros").state is SegmentState.FAILED
        # Its lease was given back: nothing renews it, and another replica could take it at once.
        assert store.lease(operation_lease_name(operation_id), 15, "someone else").holder() is None
    finally:
        recomputer.stop()
