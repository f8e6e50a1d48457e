"""A failed recompute's Operation.error carries an ErrorInfo (reason, domain, metadata) like a synchronous
error: the reason the recompute failed with is stored with the operation (schema 0008) and given back by
GetOperation; an operation stored before reasons were gets its code's name. Real Cassandra."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import pytest
from google.rpc import code_pb2

from services.segmentation.catalog import RuleInput, SegmentCatalog
from services.segmentation.follower import Memberships
from services.segmentation.recompute import Recomputer
from services.segmentation.server import operation_message
from services.segmentation.store import OperationRecord, SegmentRecord, SegmentStore
from services.segmentation.text import parse
from shared.cassandra import CassandraSession
from shared.errors import FailedPrecondition, Unavailable
from tests.status_details import error_info

pytestmark = pytest.mark.integration


class RefusingSource:
    """A profile source that refuses the scan, as the profile service would refuse a bad request."""

    def shards(self, count: int) -> list[str]:
        raise FailedPrecondition("the profile service refused the scan", reason="PROFILE_SCAN_REFUSED",
                                 metadata={"shards": str(count)})


class ListingFails(SegmentStore):
    def add_running(self, operation_id: str) -> None:
        raise Unavailable("Cassandra could not serve the request", reason="STORAGE_UNAVAILABLE")


def _finished(store: SegmentStore, operation_id: str) -> OperationRecord:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        operation = store.get_operation(operation_id)
        if operation is not None and operation.done:
            return operation
        time.sleep(0.05)
    raise AssertionError(f"operation {operation_id} did not finish")


def _catalog_with_pros(store: SegmentStore) -> SegmentCatalog:
    catalog = SegmentCatalog(store)  # no recompute started by create: started below, by hand
    catalog.create("pros", "", "", RuleInput(parse('traits.plan = "pro"'), "segment.rule_text", True))
    return catalog


def _refused_recompute(store: SegmentStore) -> OperationRecord:
    """A recompute of `pros` that the profile service refused, once it ended."""
    catalog = _catalog_with_pros(store)
    source: Any = RefusingSource()
    recomputer = Recomputer(catalog, store, source, reconciler=Memberships(catalog, store, source))
    try:
        return _finished(store, recomputer.start("pros").operation_id)
    finally:
        recomputer.stop()


def test_a_failed_recompute_gives_its_reason_and_metadata(segmentation_session: CassandraSession) -> None:
    store = SegmentStore(segmentation_session)
    operation = _refused_recompute(store)
    error = operation_message(operation).error
    assert (error.code, error.message) == (code_pb2.FAILED_PRECONDITION, "the profile service refused the scan")
    info = error_info(error)
    assert (info.reason, info.domain, dict(info.metadata)) == (
        "PROFILE_SCAN_REFUSED", "onecdp.segmentation",
        {"segment": "segments/pros", "shards": str(operation.shards_total)})


def test_a_recompute_that_could_not_start_says_so(segmentation_session: CassandraSession) -> None:
    store = ListingFails(segmentation_session)
    catalog = _catalog_with_pros(store)
    source: Any = object()  # never read: the run never starts
    recomputer = Recomputer(catalog, store, source, reconciler=Memberships(catalog, store, source))
    try:
        with pytest.raises(Unavailable):
            recomputer.start("pros")
        operation = store.get_operation(catalog.get("pros").operation_id)
    finally:
        recomputer.stop()
    assert operation is not None and operation.done
    error = operation_message(operation).error
    assert error.code == code_pb2.UNAVAILABLE
    info = error_info(error)
    assert (info.reason, info.domain, dict(info.metadata)) == (
        "OPERATION_NOT_STARTED", "onecdp.segmentation", {"segment": "segments/pros"})


def test_an_operation_failed_before_reasons_were_stored_gets_its_codes_name(
        segmentation_session: CassandraSession) -> None:
    store = SegmentStore(segmentation_session)
    operation = _refused_recompute(store)
    store.save_operation(replace(operation, error_reason=None, error_metadata={}))  # as written before 0008
    old = store.get_operation(operation.operation_id)
    assert old is not None and old.error_reason is None
    info = error_info(operation_message(old).error)
    assert (info.reason, info.domain, dict(info.metadata)) == ("FAILED_PRECONDITION", "onecdp.segmentation", {})


class DeletedOnceTheRecordIsRead(SegmentStore):
    """The real store; the segment `doomed` is deleted just before the catalog is first read in full (between
    a recompute's read of the segment's record and its read of every rule)."""

    doomed = ""

    def all(self) -> list[SegmentRecord]:
        if self.doomed:
            record = self.get(self.doomed)
            assert record is not None
            assert self.delete(self.doomed, record.etag)
            self.doomed = ""
        return super().all()


def test_a_segment_deleted_as_its_recompute_starts_ends_it_not_found(segmentation_session: CassandraSession) -> None:
    store = DeletedOnceTheRecordIsRead(segmentation_session)
    catalog = _catalog_with_pros(store)
    source: Any = RefusingSource()  # never reached
    recomputer = Recomputer(catalog, store, source, reconciler=Memberships(catalog, store, source))
    try:
        store.doomed = "pros"
        operation = _finished(store, recomputer.start("pros").operation_id)
    finally:
        recomputer.stop()
    error = operation_message(operation).error
    assert (error.code, error_info(error).reason) == (code_pb2.NOT_FOUND, "SEGMENT_NOT_FOUND")
    assert error.message == "segments/pros does not exist"
