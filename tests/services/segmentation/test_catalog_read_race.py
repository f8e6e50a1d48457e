"""A segment created while a request reads the catalog is evaluated with its own rule, not refused.

EvaluatePersonSegments and EstimateSegmentSize read every rule, then the named segment's record. Here two
segments ("late-base", and "late", whose rule refers to it) are created by another catalog, as another
process would, exactly between those two reads: as the service reads the record of "late". Real gRPC,
real Cassandra; only the moment of the creation is chosen."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest
from onecdp.common.v1 import common_pb2
from onecdp.profile.v1 import profile_service_pb2_grpc as profile_grpc
from onecdp.segmentation.v1 import segmentation_service_pb2 as pb
from onecdp.segmentation.v1 import segmentation_service_pb2_grpc as pb_grpc

from services.segmentation.catalog import RuleInput, SegmentCatalog
from services.segmentation.store import SegmentRecord, SegmentStore
from services.segmentation.text import parse
from shared.cassandra import CassandraSession
from tests.services.segmentation.conftest import identify, ingest
from tests.services.segmentation.test_segments import failure

pytestmark = pytest.mark.integration


@pytest.fixture
def created_between_reads(monkeypatch: pytest.MonkeyPatch, segmentation_session: CassandraSession) -> list[str]:
    """The first read of segment "late"'s record creates "late-base" and "late" just before it; the list
    records that it happened."""
    other = SegmentCatalog(SegmentStore(segmentation_session))  # another process: no recompute started
    real_get = SegmentStore.get
    created: list[str] = []

    def get(self: SegmentStore, segment_id: str) -> SegmentRecord | None:
        if segment_id == "late" and not created:
            created.append(segment_id)
            for new_id, text in [("late-base", 'traits.plan = "pro"'), ("late", 'segment("late-base")')]:
                other.create(new_id, "", "", RuleInput(parse(text), "segment.rule_text", True))
        return real_get(self, segment_id)

    monkeypatch.setattr(SegmentStore, "get", get)
    return created


def test_evaluation_of_a_segment_created_after_the_rules_were_read(
        stack: pb_grpc.SegmentationServiceStub, profiles: profile_grpc.ProfileServiceStub,
        created_between_reads: list[str]) -> None:
    person_id = ingest(profiles, identify("ann", "2026-01-01T00:00:00", {"plan": "pro"}))["ann"]
    response = stack.EvaluatePersonSegments(pb.EvaluatePersonSegmentsRequest(
        person=common_pb2.PersonSelector(person_id=person_id), segments=["segments/late"]), timeout=30)
    assert created_between_reads == ["late"]
    [evaluation] = response.evaluations
    # Matched through "late-base", as new as "late" itself: its rule is there too.
    assert (evaluation.segment, evaluation.matched) == ("segments/late", True)
    assert [c.matched for c in evaluation.conditions] == [True]


def test_estimate_of_a_segment_created_after_the_rules_were_read(
        stack: pb_grpc.SegmentationServiceStub, profiles: profile_grpc.ProfileServiceStub,
        created_between_reads: list[str]) -> None:
    ingest(profiles, identify("ann", "2026-01-01T00:00:00", {"plan": "pro"}))
    estimate = stack.EstimateSegmentSize(pb.EstimateSegmentSizeRequest(segment="segments/late"), timeout=30)
    assert created_between_reads == ["late"]
    assert (estimate.sample_matches, estimate.sample_size) == (1, 1)


@pytest.mark.parametrize("call", ["EvaluatePersonSegments", "EstimateSegmentSize"])
def test_a_segment_that_does_not_exist_is_still_not_found(stack: pb_grpc.SegmentationServiceStub, call: str) -> None:
    requests: dict[str, Any] = {
        "EvaluatePersonSegments": pb.EvaluatePersonSegmentsRequest(
            person=common_pb2.PersonSelector(person_id="p-1"), segments=["segments/nowhere"]),
        "EstimateSegmentSize": pb.EstimateSegmentSizeRequest(segment="segments/nowhere")}
    method: Callable[..., Any] = getattr(stack, call)
    code, reason, _ = failure(method, requests[call])
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "SEGMENT_NOT_FOUND")
