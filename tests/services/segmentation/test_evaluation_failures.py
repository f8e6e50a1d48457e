"""A person whose facts no rule foresaw does not stop anything: huge order amounts (two of 1.7e308, whose sum
is beyond a double) are summed to +inf, and a person whose evaluation raises anyway is logged and left as they
were, while real time and recomputes go on with everybody else. Real gRPC, real profile, real Cassandra."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from onecdp.common.v1 import common_pb2
from onecdp.profile.v1 import profile_service_pb2_grpc as profile_grpc
from onecdp.segmentation.v1 import segmentation_service_pb2 as pb
from onecdp.segmentation.v1 import segmentation_service_pb2_grpc as pb_grpc

from services.segmentation import estimate as estimate_module
from services.segmentation import follower as follower_module
from services.segmentation import recompute as recompute_module
from services.segmentation import server as server_module
from services.segmentation.catalog import RuleInput, SegmentCatalog
from services.segmentation.estimate import estimate_size
from services.segmentation.evaluation import ProfileFacts, compile_rule
from services.segmentation.follower import FeedFollower, Memberships
from services.segmentation.profile_source import GrpcProfileSource
from services.segmentation.recompute import Recomputer
from services.segmentation.store import OperationRecord, SegmentStore
from services.segmentation.text import parse
from shared import changefeed
from shared.cassandra import CassandraSession
from shared.runner import RunningService
from tests.services.segmentation.conftest import eventually, ingest, track
from tests.services.segmentation.test_batch import finished, members_of, wait_ready
from tests.services.segmentation.test_segments import failure

pytestmark = pytest.mark.integration

SPENDERS = 'event("buy").sum(amount, last 30d) > 100'


def stamp(when: datetime) -> str:
    return when.astimezone(UTC).replace(tzinfo=None).isoformat()


def test_huge_amounts_sum_to_infinity_in_real_time_explanations_and_recomputes(
        stack: pb_grpc.SegmentationServiceStub, profiles: profile_grpc.ProfileServiceStub,
        monkeypatch: pytest.MonkeyPatch) -> None:
    stack.CreateSegment(pb.CreateSegmentRequest(segment_id="spenders", segment=pb.Segment(rule_text=SPENDERS)),
                        timeout=10)
    assert wait_ready(stack, "segments/spenders").state == pb.SEGMENT_STATE_READY
    now = datetime.now(UTC)
    big = ingest(profiles, track("big", "buy", stamp(now - timedelta(days=2)), {"amount": 1.7e308}),
                 track("big", "buy", stamp(now - timedelta(days=1)), {"amount": 1.7e308}))["big"]
    # A person whose change follows: real time does not stop at the one before.
    small = ingest(profiles, track("small", "buy", stamp(now - timedelta(days=1)), {"amount": 500}))["small"]
    expected = sorted([big, small])
    assert eventually(lambda: sorted(members_of(stack, "segments/spenders")), expected) == expected

    explained = stack.EvaluatePersonSegments(pb.EvaluatePersonSegmentsRequest(
        person=common_pb2.PersonSelector(person_id=big), segments=["segments/spenders"]), timeout=10)
    evaluation = explained.evaluations[0]
    assert (evaluation.matched, evaluation.stored_member) == (True, True)
    assert [(c.condition_text, c.matched, c.observed_value.string_value) for c in evaluation.conditions] == [
        (SPENDERS, True, "Infinity")]  # a double's +inf, as text protojson can write

    operation = finished(stack, stack.RecomputeSegment(pb.RecomputeSegmentRequest(name="segments/spenders"),
                                                       timeout=10))
    assert operation.done and not operation.HasField("error"), operation.error
    response = pb.RecomputeSegmentResponse()
    operation.response.Unpack(response)
    assert (response.member_count, response.profiles_skipped) == (2, 0)

    # Were an evaluation to fail anyway (a defect), the answer says so precisely, not INTERNAL.
    def evaluate(*args: Any) -> Any:
        raise ZeroDivisionError("a defect")
    monkeypatch.setattr(server_module, "evaluate", evaluate)  # the service runs in this process
    code, reason, _ = failure(stack.EvaluatePersonSegments, pb.EvaluatePersonSegmentsRequest(
        person=common_pb2.PersonSelector(person_id=big), segments=["segments/spenders"]))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "PERSON_NOT_EVALUABLE")


def failing_for(person_id: str, compile_rule: Callable[..., Any]) -> Callable[..., Any]:
    """`compile_rule` whose predicates raise for one person: a defect no test foresaw, in one profile."""
    def compile_failing(*args: Any) -> Callable[[ProfileFacts], bool]:
        predicate = compile_rule(*args)

        def matches(facts: ProfileFacts) -> bool:
            if facts.person_id == person_id:
                raise ZeroDivisionError("a defect")
            return bool(predicate(facts))
        return matches
    return compile_failing


def operation_done(store: SegmentStore, operation_id: str, timeout: float = 60) -> OperationRecord | None:
    end = time.monotonic() + timeout
    while True:
        operation = store.get_operation(operation_id)
        if (operation is not None and operation.done) or time.monotonic() > end:
            return operation
        time.sleep(0.2)


def test_a_person_whose_evaluation_fails_is_left_as_they_were_and_the_others_go_on(
        segmentation_session: CassandraSession, profile_service: RunningService,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    store = SegmentStore(segmentation_session)
    catalog = SegmentCatalog(store)  # no recompute on create: memberships come from what the test runs
    catalog.create("spenders", "", "", RuleInput(parse(SPENDERS), "segment.rule_text", True))
    catalog.create("pinged", "", "", RuleInput(parse('event("ping").count(last 1d) >= 1'), "segment.rule_text",
                                               True))
    now = datetime.now(UTC)
    with grpc.insecure_channel(f"127.0.0.1:{profile_service.port}") as channel:
        profiles = profile_grpc.ProfileServiceStub(channel)
        source = GrpcProfileSource(profiles)
        memberships = Memberships(catalog, store, source)
        follower = FeedFollower(memberships, store, source)  # driven by hand, no thread

        bad = ingest(profiles, track("bad", "buy", stamp(now - timedelta(days=1)), {"amount": 500}))["bad"]
        follower.follow_once()
        assert store.is_member("spenders", bad)

        # From now on evaluating `bad` raises. Their next change would make them leave (a refund)...
        monkeypatch.setattr(follower_module, "compile_rule", failing_for(bad, compile_rule))
        ingest(profiles, track("bad", "buy", stamp(now), {"amount": -1000}))
        # ... and the changes behind theirs are applied all the same, in every segment.
        good = ingest(profiles, track("good", "buy", stamp(now), {"amount": 500}),
                      track("good", "ping", stamp(now)))["good"]
        deadline = time.monotonic() + 30
        while not store.is_member("pinged", good) and time.monotonic() < deadline:
            follower.follow_once()  # raised on the old code, and again on every round: real time stopped
        assert (store.is_member("spenders", good), store.is_member("pinged", good)) == (True, True)
        assert store.is_member("spenders", bad), "left as it was"
        logged = [r for r in caplog.records if getattr(r, "person", None) == bad]
        assert logged and {getattr(r, "segment", None) for r in logged} == {"spenders"}

        # A recompute leaves them as they were too, finishes, and says how many it skipped. (With no settle
        # time, the changes above are older than its scan: it decides every person itself, none is left to
        # real time's reconciliation.)
        monkeypatch.setattr(changefeed, "SETTLE_SECONDS", 0.0)
        time.sleep(0.01)
        monkeypatch.setattr(recompute_module, "compile_rule", failing_for(bad, compile_rule))
        recomputer = Recomputer(catalog, store, source, reconciler=memberships)
        try:
            operation = operation_done(store, recomputer.start("spenders").operation_id)
        finally:
            recomputer.stop()
        assert operation is not None and operation.done and operation.error_code is None, operation
        assert (operation.member_count, operation.exited_count, operation.profiles_skipped) == (2, 0, 1)
        assert sorted(store.member_ids("spenders")) == sorted([bad, good])


def test_an_estimate_leaves_a_person_whose_evaluation_fails_out_of_its_sample(
        profile_service: RunningService, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    now = datetime.now(UTC)
    with grpc.insecure_channel(f"127.0.0.1:{profile_service.port}") as channel:
        profiles = profile_grpc.ProfileServiceStub(channel)
        ids = ingest(profiles, track("bad", "buy", stamp(now), {"amount": 500}),
                     track("good", "buy", stamp(now), {"amount": 500}))
        monkeypatch.setattr(estimate_module, "compile_rule", failing_for(ids["bad"], compile_rule))
        estimate = estimate_size(parse(SPENDERS), {}, GrpcProfileSource(profiles), 100, segment_id="spenders")
    assert (estimate.sample_size, estimate.sample_matches) == (1, 1)  # raised on the old code
    assert [getattr(r, "segment", None) for r in caplog.records if getattr(r, "person", None) == ids["bad"]] == [
        "spenders"]
