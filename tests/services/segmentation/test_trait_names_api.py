"""Names profile accepts that are not plain identifiers (会员等级, `Plan Name`, a property named `in`), used in
segments through the real stack (identity + profile + segmentation, real gRPC and Cassandra): created in text
form and tree form, computed at creation, recomputed, evaluated per person, and followed in real time."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.longrunning import operations_pb2
from google.protobuf import struct_pb2
from onecdp.common.v1 import common_pb2
from onecdp.prediction.v1 import prediction_service_pb2 as prediction_pb
from onecdp.prediction.v1 import prediction_service_pb2_grpc as prediction_pb_grpc
from onecdp.profile.v1 import profile_service_pb2_grpc as profile_grpc
from onecdp.segmentation.v1 import segmentation_service_pb2 as pb
from onecdp.segmentation.v1 import segmentation_service_pb2_grpc as pb_grpc

from shared.runner import RunningService
from tests.services.segmentation.conftest import eventually, identify, ingest, track
from tests.services.segmentation.test_segments import failure

pytestmark = pytest.mark.integration
NOW = datetime.now(UTC).replace(microsecond=0)
Stub = pb_grpc.SegmentationServiceStub


def days_ago(days: float) -> str:
    return (NOW - timedelta(days=days)).isoformat().replace("+00:00", "")


def equal(value: str | float) -> dict[str, object]:
    """The operator and value fields of a condition comparing with `value`."""
    as_value = struct_pb2.Value(string_value=value) if isinstance(value, str) else struct_pb2.Value(number_value=value)
    return {"operator": pb.OPERATOR_EQUAL, "value": as_value}


def trait_rule(field: str, value: str) -> pb.Rule:
    return pb.Rule(trait=pb.TraitCondition(field=field, **equal(value)))  # type: ignore[arg-type]


# The same conditions in both forms; the canonical text quotes the names that are not plain.
TEXTS = {
    "gold": 'traits."会员等级" = "金卡"',
    "pro": 'traits."Plan Name" = "pro"',
    "book-spender": 'event("purchase", "商品 类别" = "书", "in" = 1).sum("单价", last 30d) >= 30',
}
TREES = {
    "gold": trait_rule("traits.会员等级", "金卡"),
    "pro": trait_rule("traits.Plan Name", "pro"),
    "book-spender": pb.Rule(event_aggregate=pb.EventAggregateCondition(
        event_name="purchase", property="单价", aggregation=pb.AGGREGATION_SUM,
        filters=[pb.PropertyFilter(property="商品 类别", **equal("书")),  # type: ignore[arg-type]
                 pb.PropertyFilter(property="in", **equal(1))],  # type: ignore[arg-type]
        window=pb.TimeWindow(last_days=30), operator=pb.OPERATOR_GREATER_OR_EQUAL, value=30)),
}


def wait_ready(stub: Stub, name: str, timeout: float = 60) -> pb.Segment:
    end = time.monotonic() + timeout
    while True:
        segment: pb.Segment = stub.GetSegment(pb.GetSegmentRequest(name=name), timeout=10)
        if segment.state == pb.SEGMENT_STATE_READY or time.monotonic() > end:
            return segment
        time.sleep(0.3)


def members_of(stub: Stub, name: str) -> list[str]:
    page = stub.ListSegmentMembers(pb.ListSegmentMembersRequest(parent=name, page_size=100), timeout=10)
    assert not page.next_page_token
    return [m.person_id for m in page.members]


def finished(stub: Stub, operation: operations_pb2.Operation, timeout: float = 60) -> operations_pb2.Operation:
    end = time.monotonic() + timeout
    while not operation.done and time.monotonic() < end:
        time.sleep(0.3)
        operation = stub.GetOperation(operations_pb2.GetOperationRequest(name=operation.name), timeout=10)
    return operation


def test_segments_on_names_that_are_not_plain_find_their_members(stack: Stub,
                                                                  profiles: profile_grpc.ProfileServiceStub) -> None:
    persons = ingest(profiles,
                     identify("alice", days_ago(10), {"会员等级": "金卡", "Plan Name": "pro"}),
                     identify("bob", days_ago(10), {"会员等级": "银卡", "Plan Name": "free"}),
                     track("alice", "purchase", days_ago(2), {"商品 类别": "书", "in": 1, "单价": 30}),
                     track("bob", "purchase", days_ago(2), {"商品 类别": "书", "in": 2, "单价": 99}))
    alice, bob = persons["alice"], persons["bob"]

    created: dict[str, pb.Segment] = {}
    for kind, rule in TEXTS.items():
        created[f"{kind}-text"] = stack.CreateSegment(pb.CreateSegmentRequest(
            segment_id=f"{kind}-text", segment=pb.Segment(rule_text=rule)), timeout=10)
    for kind, tree in TREES.items():
        created[f"{kind}-tree"] = stack.CreateSegment(pb.CreateSegmentRequest(
            segment_id=f"{kind}-tree", segment=pb.Segment(rule=tree)), timeout=10)
    # Either form gives the other: the tree names the trait as stored, the text quotes it.
    for kind, text in TEXTS.items():
        for form in ("text", "tree"):
            segment = created[f"{kind}-{form}"]
            assert (segment.rule_text, segment.rule) == (text, TREES[kind]), (kind, form)

    names = [f"segments/{segment_id}" for segment_id in created]
    for name in names:  # computed at creation
        segment = wait_ready(stack, name)
        assert segment.state == pb.SEGMENT_STATE_READY, name
        assert members_of(stack, name) == [alice], name

    operation = finished(stack, stack.RecomputeSegment(pb.RecomputeSegmentRequest(name="segments/gold-text"),
                                                       timeout=10))
    assert operation.done and not operation.HasField("error")
    response = pb.RecomputeSegmentResponse()
    operation.response.Unpack(response)
    assert (response.member_count, response.entered_count, response.exited_count) == (1, 0, 0)

    explained = stack.EvaluatePersonSegments(pb.EvaluatePersonSegmentsRequest(
        person=common_pb2.PersonSelector(person_id=alice)), timeout=10)
    assert {e.segment: (e.matched, e.stored_member) for e in explained.evaluations} == dict.fromkeys(
        names, (True, True))
    by_segment = {e.segment: e for e in explained.evaluations}
    [gold] = by_segment["segments/gold-tree"].conditions
    assert (gold.condition_text, gold.observed_value.string_value) == ('traits."会员等级" = "金卡"', "金卡")
    assert not any(e.matched for e in stack.EvaluatePersonSegments(pb.EvaluatePersonSegmentsRequest(
        person=common_pb2.PersonSelector(person_id=bob)), timeout=10).evaluations)

    # Real time follows a change of the trait by its name as profile reports it.
    ingest(profiles, identify("bob", days_ago(1), {"会员等级": "金卡"}))
    both = sorted([alice, bob])
    assert eventually(lambda: members_of(stack, "segments/gold-tree"), both) == both
    assert eventually(lambda: members_of(stack, "segments/gold-text"), both) == both
    assert members_of(stack, "segments/pro-text") == [alice]


def test_names_profile_would_refuse_are_refused_naming_the_field(segmentation: Stub) -> None:
    def refusal(segment: pb.Segment) -> tuple[grpc.StatusCode, dict[str, str]]:
        code, _, fields = failure(segmentation.CreateSegment,
                                  pb.CreateSegmentRequest(segment_id="refused", segment=segment))
        return code, fields

    code, fields = refusal(pb.Segment(rule=trait_rule("traits." + "等" * 129, "x")))
    assert (code, list(fields)) == (grpc.StatusCode.INVALID_ARGUMENT, ["segment.rule.trait.field"])
    assert fields["segment.rule.trait.field"].startswith(
        "the trait name has 129 characters: a trait name is 1-128 characters of any kind, as the profile service "
        "accepts them")
    code, fields = refusal(pb.Segment(rule_text='traits."" = "x"'))
    assert (code, list(fields)) == (grpc.StatusCode.INVALID_ARGUMENT, ["segment.rule_text"])
    assert fields["segment.rule_text"].startswith("at character 1: 'traits.' names no trait")
    # Unquoted, such a name is a syntax error that shows the quoted spelling.
    code, fields = refusal(pb.Segment(rule_text='traits.会员等级 = "金卡"'))
    assert (code, list(fields)) == (grpc.StatusCode.INVALID_ARGUMENT, ["segment.rule_text"])
    assert fields["segment.rule_text"].startswith(
        "at character 8: unexpected character '会': a name with characters other than ASCII letters, digits, _ "
        'and - is written quoted, e.g. traits."会员等级"')
    # The longest name profile accepts is accepted.
    longest = "等" * 128
    segment = segmentation.CreateSegment(pb.CreateSegmentRequest(
        segment_id="longest", segment=pb.Segment(rule=trait_rule(f"traits.{longest}", "x"))), timeout=10)
    assert segment.rule_text == f'traits."{longest}" = "x"'


def test_a_segment_id_is_matched_whole(segmentation: Stub) -> None:
    # `$` matched before a trailing newline: "vip\n" was stored as a segment id.
    code, _, fields = failure(segmentation.CreateSegment, pb.CreateSegmentRequest(
        segment_id="vip\n", segment=pb.Segment(rule_text="traits.a = 1")))
    assert (code, list(fields)) == (grpc.StatusCode.INVALID_ARGUMENT, ["segment_id"])
    code, _, fields = failure(segmentation.GetSegment, pb.GetSegmentRequest(name="segments/vip\n"))
    assert (code, list(fields)) == (grpc.StatusCode.INVALID_ARGUMENT, ["name"])


def test_a_score_condition_takes_a_bare_model_id_in_both_forms(segmentation: Stub) -> None:
    # No prediction service behind this segmentation: the model is checked by shape only.
    by_text = segmentation.CreateSegment(pb.CreateSegmentRequest(
        segment_id="risky-text", segment=pb.Segment(rule_text='score("h53-churn") >= 0.7')), timeout=10)
    by_tree = segmentation.CreateSegment(pb.CreateSegmentRequest(segment_id="risky-tree", segment=pb.Segment(
        rule=pb.Rule(score=pb.ScoreCondition(model="h53-churn", operator=pb.OPERATOR_GREATER_OR_EQUAL,
                                             value=0.7)))), timeout=10)
    for segment in (by_text, by_tree):
        assert segment.rule_text == 'score("models/h53-churn") >= 0.7'
        assert segment.rule.score.model == "models/h53-churn"
    code, _, fields = failure(segmentation.CreateSegment, pb.CreateSegmentRequest(
        segment_id="bad-model", segment=pb.Segment(rule_text='score("H53") >= 0.7')))
    assert (code, list(fields)) == (grpc.StatusCode.INVALID_ARGUMENT, ["segment.rule_text"])
    assert fields["segment.rule_text"].startswith(
        "at character 7: 'models/H53' is not a model name like models/churn-90d or id like churn-90d")


def test_a_bare_model_id_is_checked_with_the_prediction_service(
        segmentation_with_prediction: tuple[RunningService, RunningService]) -> None:
    segmentation_service, prediction_service = segmentation_with_prediction
    with grpc.insecure_channel(f"127.0.0.1:{segmentation_service.port}") as channel, \
            grpc.insecure_channel(f"127.0.0.1:{prediction_service.port}") as prediction_channel:
        segmentation = Stub(channel)
        prediction_pb_grpc.PredictionServiceStub(prediction_channel).CreateModel(prediction_pb.CreateModelRequest(
            model_id="churn", model=prediction_pb.Model(spec=prediction_pb.ModelSpec(
                kind=prediction_pb.PREDICTION_KIND_CHURN, horizon_days=30))), timeout=10)
        known = segmentation.CreateSegment(pb.CreateSegmentRequest(
            segment_id="at-risk", segment=pb.Segment(rule_text='score("churn").percentile >= 90')), timeout=10)
        assert (known.rule_text, known.rule.score.model) == ('score("models/churn").percentile >= 90', "models/churn")
        code, _, fields = failure(segmentation.CreateSegment, pb.CreateSegmentRequest(
            segment_id="unknown-model", segment=pb.Segment(rule=pb.Rule(score=pb.ScoreCondition(
                model="nope", operator=pb.OPERATOR_GREATER, value=0.5)))))
        assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, {
            "segment.rule.score.model": "models/nope does not exist in the prediction service"})
