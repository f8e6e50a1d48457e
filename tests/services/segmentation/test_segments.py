"""Segments over real gRPC and Cassandra: create/get/list/update/delete, validation errors that name the field,
etags, references, and the rule parser endpoint."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.longrunning import operations_pb2
from google.protobuf import field_mask_pb2, struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from onecdp.prediction.v1 import prediction_service_pb2 as prediction_pb
from onecdp.prediction.v1 import prediction_service_pb2_grpc as prediction_pb_grpc
from onecdp.segmentation.v1 import segmentation_service_pb2 as pb
from onecdp.segmentation.v1 import segmentation_service_pb2_grpc as pb_grpc

from services.segmentation import server as server_module
from shared.runner import RunningService

pytestmark = pytest.mark.integration
Stub = pb_grpc.SegmentationServiceStub


def failure(call: Callable[..., Any], request: Any) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    """(code, reason, description by violated field) of a failing call."""
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=10)
    error: Any = caught.value
    status = rpc_status.from_call(error)
    assert status is not None
    reason, fields = "", {}
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
            assert info.domain == "onecdp.segmentation"
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields = {v.field: v.description for v in bad.field_violations}
    return error.code(), reason, fields


def create(stub: Stub, segment_id: str, rule_text: str, **fields: Any) -> pb.Segment:
    segment: pb.Segment = stub.CreateSegment(pb.CreateSegmentRequest(
        segment_id=segment_id, segment=pb.Segment(rule_text=rule_text, **fields)), timeout=10)
    return segment


def test_create_get_list_update_delete(segmentation: Stub) -> None:
    vip = create(segmentation, "vip", "computed.monetary >= 500", display_name="VIP")
    assert vip.name == "segments/vip" and vip.revision == 1 and vip.etag
    assert vip.rule == pb.Rule(trait=pb.TraitCondition(field="computed.monetary", operator=pb.OPERATOR_GREATER_OR_EQUAL,
                                                       value=struct_pb2.Value(number_value=500)))
    text = 'event("order").count(last 90d) >= 1 and not segment("vip")'
    active = create(segmentation, "active-not-vip", text)
    assert active.rule_text == 'event("order").count(last 90d) >= 1 AND NOT segment("vip")'
    assert active.rule.all.rules[1].negate.segment.segment == "segments/vip"
    # The tree form gives the same segment as the text form.
    tree = segmentation.CreateSegment(pb.CreateSegmentRequest(segment_id="tree", segment=pb.Segment(
        rule=active.rule)), timeout=10)
    assert tree.rule_text == active.rule_text and tree.rule == active.rule
    fetched = segmentation.GetSegment(pb.GetSegmentRequest(name="segments/active-not-vip"), timeout=10)
    assert (fetched.rule_text, fetched.etag, fetched.revision) == (active.rule_text, active.etag, 1)
    assert fetched.member_count == 0

    first = segmentation.ListSegments(pb.ListSegmentsRequest(page_size=2), timeout=10)
    assert [s.name for s in first.segments] == ["segments/active-not-vip", "segments/tree"]
    second = segmentation.ListSegments(pb.ListSegmentsRequest(page_size=2, page_token=first.next_page_token),
                                       timeout=10)
    assert [s.name for s in second.segments] == ["segments/vip"] and second.next_page_token == ""
    assert failure(segmentation.ListSegments, pb.ListSegmentsRequest(page_token="garbage"))[:2] == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")

    renamed = segmentation.UpdateSegment(pb.UpdateSegmentRequest(
        segment=pb.Segment(name="segments/vip", display_name="Big spenders", etag=vip.etag),
        update_mask=field_mask_pb2.FieldMask(paths=["display_name"])), timeout=10)
    assert renamed.display_name == "Big spenders" and renamed.revision == 1 and renamed.etag != vip.etag
    assert renamed.rule_text == vip.rule_text
    code, reason, _ = failure(segmentation.UpdateSegment, pb.UpdateSegmentRequest(
        segment=pb.Segment(name="segments/vip", display_name="stale", etag=vip.etag),
        update_mask=field_mask_pb2.FieldMask(paths=["display_name"])))
    assert (code, reason) == (grpc.StatusCode.ABORTED, "ETAG_MISMATCH")
    changed = segmentation.UpdateSegment(pb.UpdateSegmentRequest(
        segment=pb.Segment(name="segments/vip", rule_text="computed.monetary >= 1000"),
        update_mask=field_mask_pb2.FieldMask(paths=["rule_text"])), timeout=10)
    assert changed.revision == 2 and changed.rule_text == "computed.monetary >= 1000"
    assert changed.display_name == "Big spenders"

    # vip is used by two segments: it cannot go before they do.
    code, reason, _ = failure(segmentation.DeleteSegment, pb.DeleteSegmentRequest(name="segments/vip"))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "SEGMENT_IN_USE")
    for name in ("segments/active-not-vip", "segments/tree", "segments/vip"):
        segmentation.DeleteSegment(pb.DeleteSegmentRequest(name=name), timeout=10)
    assert failure(segmentation.GetSegment, pb.GetSegmentRequest(name="segments/vip"))[:2] == (
        grpc.StatusCode.NOT_FOUND, "SEGMENT_NOT_FOUND")
    assert failure(segmentation.DeleteSegment, pb.DeleteSegmentRequest(name="segments/vip"))[0] == \
        grpc.StatusCode.NOT_FOUND
    assert not segmentation.ListSegments(pb.ListSegmentsRequest(), timeout=10).segments



def test_etags_are_quoted_and_update_and_delete_take_what_get_returns(segmentation: Stub) -> None:
    created = create(segmentation, "quoted", "computed.monetary >= 500")
    fetched = segmentation.GetSegment(pb.GetSegmentRequest(name="segments/quoted"), timeout=10)
    # A quoted strong etag (AIP-154), as identity shows its etags.
    assert fetched.etag == created.etag and re.fullmatch(r'"[0-9a-f]{16}"', fetched.etag)
    mask = field_mask_pb2.FieldMask(paths=["display_name"])
    for malformed in ('W/' + fetched.etag, '""', fetched.etag[:-2] + '"', "garbage"):
        code, reason, _ = failure(segmentation.UpdateSegment, pb.UpdateSegmentRequest(
            segment=pb.Segment(name="segments/quoted", display_name="x", etag=malformed), update_mask=mask))
        assert (code, reason) == (grpc.StatusCode.ABORTED, "ETAG_MISMATCH"), malformed
        code, reason, _ = failure(segmentation.DeleteSegment,
                                  pb.DeleteSegmentRequest(name="segments/quoted", etag=malformed))
        assert (code, reason) == (grpc.StatusCode.ABORTED, "ETAG_MISMATCH"), malformed
    renamed = segmentation.UpdateSegment(pb.UpdateSegmentRequest(
        segment=pb.Segment(name="segments/quoted", display_name="renamed", etag=fetched.etag), update_mask=mask),
        timeout=10)
    assert renamed.display_name == "renamed" and re.fullmatch(r'"[0-9a-f]{16}"', renamed.etag)
    assert renamed.etag != fetched.etag
    # The etag an update returned is the one Get returns, and Delete takes it.
    again = segmentation.GetSegment(pb.GetSegmentRequest(name="segments/quoted"), timeout=10)
    assert again.etag == renamed.etag
    code, reason, _ = failure(segmentation.DeleteSegment,
                              pb.DeleteSegmentRequest(name="segments/quoted", etag=fetched.etag))
    assert (code, reason) == (grpc.StatusCode.ABORTED, "ETAG_MISMATCH")
    segmentation.DeleteSegment(pb.DeleteSegmentRequest(name="segments/quoted", etag=again.etag), timeout=10)
    assert failure(segmentation.GetSegment, pb.GetSegmentRequest(name="segments/quoted"))[0] == \
        grpc.StatusCode.NOT_FOUND


def test_a_page_token_pages_only_the_list_that_issued_it(segmentation: Stub) -> None:
    for segment_id in ("alpha", "beta", "gamma"):
        create(segmentation, segment_id, "computed.monetary >= 500")
    first = segmentation.ListSegments(pb.ListSegmentsRequest(page_size=1), timeout=10)
    assert [s.name for s in first.segments] == ["segments/alpha"]
    assert "alpha" not in first.next_page_token  # opaque
    second = segmentation.ListSegments(pb.ListSegmentsRequest(page_size=1, page_token=first.next_page_token),
                                       timeout=10)
    assert [s.name for s in second.segments] == ["segments/beta"]
    alpha_changes = segmentation.ListSegmentMembershipChanges(pb.ListSegmentMembershipChangesRequest(
        parent="segments/alpha"), timeout=10).next_page_token
    assert alpha_changes  # a resume cursor even with no changes
    assert not segmentation.ListSegmentMembershipChanges(pb.ListSegmentMembershipChangesRequest(
        parent="segments/alpha", page_token=alpha_changes), timeout=10).changes
    token = first.next_page_token
    tampered = token[:3] + ("B" if token[3] != "B" else "C") + token[4:]
    for call, request in [
        (segmentation.ListSegments, pb.ListSegmentsRequest(page_token=tampered)),
        (segmentation.ListSegments, pb.ListSegmentsRequest(page_token=alpha_changes)),
        (segmentation.ListSegmentMembers, pb.ListSegmentMembersRequest(parent="segments/alpha", page_token=token)),
        (segmentation.ListSegmentMembers, pb.ListSegmentMembersRequest(parent="segments/alpha",
                                                                       page_token=alpha_changes)),
        (segmentation.ListSegmentMembershipChanges, pb.ListSegmentMembershipChangesRequest(
            parent="segments/beta", page_token=alpha_changes)),
        (segmentation.ListSegmentMembershipChanges, pb.ListSegmentMembershipChangesRequest(
            parent="segments/alpha", page_token=alpha_changes[:-2])),
    ]:
        code, reason, fields = failure(call, request)
        assert (code, reason, list(fields)) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN",
                                                ["page_token"]), request

def test_a_segment_reference_is_its_name_or_its_id_in_both_forms(segmentation: Stub) -> None:
    create(segmentation, "vip", "computed.monetary >= 500")
    both = [segmentation.CreateSegment(pb.CreateSegmentRequest(segment_id=f"ref-{form}", segment=segment),
                                       timeout=10)
            for form, segment in (("text", pb.Segment(rule_text='NOT segment("segments/vip")')),
                                  ("tree", pb.Segment(rule=pb.Rule(negate=pb.Rule(
                                      segment=pb.SegmentMembershipCondition(segment="vip"))))))]
    # The canonical forms are unchanged: the id in the text, the name in the tree.
    assert [s.rule_text for s in both] == ['NOT segment("vip")'] * 2
    assert [s.rule.negate.segment.segment for s in both] == ["segments/vip"] * 2
    # Each names the operation computing it (started on create), and GetSegment shows the same.
    assert all(s.operation.startswith("operations/") for s in both)
    fetched = segmentation.GetSegment(pb.GetSegmentRequest(name="segments/ref-text"), timeout=10)
    assert fetched.operation == both[0].operation
    assert segmentation.GetOperation(operations_pb2.GetOperationRequest(name=fetched.operation),
                                     timeout=10).name == fetched.operation
    code, _, fields = failure(segmentation.CreateSegment, pb.CreateSegmentRequest(
        segment_id="ghost-ref", segment=pb.Segment(rule=pb.Rule(segment=pb.SegmentMembershipCondition(
            segment="ghost")))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert fields == {"segment.rule.segment.segment": "segments/ghost does not exist"}


def test_bad_segments_are_refused_naming_the_offending_part(segmentation: Stub) -> None:
    create(segmentation, "base", "traits.plan = \"pro\"")
    code, reason, _ = failure(segmentation.CreateSegment, pb.CreateSegmentRequest(
        segment_id="base", segment=pb.Segment(rule_text="traits.plan EXISTS")))
    assert (code, reason) == (grpc.StatusCode.ALREADY_EXISTS, "SEGMENT_EXISTS")

    code, _, fields = failure(segmentation.CreateSegment, pb.CreateSegmentRequest(
        segment_id="Bad_Id", segment=pb.Segment(rule_text="traits.a = ")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert fields["segment.rule_text"].startswith("at character 12: expected a value")

    code, _, fields = failure(segmentation.CreateSegment, pb.CreateSegmentRequest(
        segment_id="Bad_Id", segment=pb.Segment(rule_text="traits.a = 1")))
    assert list(fields) == ["segment_id"]

    # A tree with an unknown computed trait and an impossible window: both named by their proto paths.
    rule = pb.Rule(all=pb.RuleGroup(rules=[
        pb.Rule(trait=pb.TraitCondition(field="computed.shoe_size", operator=pb.OPERATOR_EXISTS)),
        pb.Rule(event_count=pb.EventCountCondition(event_name="order", window=pb.TimeWindow(last_days=0),
                                                   operator=pb.OPERATOR_GREATER, count=1)),
        pb.Rule(trait=pb.TraitCondition(field="traits.plan", operator=pb.OPERATOR_EQUAL)),
    ]))
    code, _, fields = failure(segmentation.CreateSegment, pb.CreateSegmentRequest(
        segment_id="broken", segment=pb.Segment(rule=rule)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(fields) == {"segment.rule.all.rules[2].trait.value"}  # structure first: the missing operand
    rule.all.rules[2].trait.value.string_value = "pro"
    code, _, fields = failure(segmentation.CreateSegment, pb.CreateSegmentRequest(
        segment_id="broken", segment=pb.Segment(rule=rule)))
    assert set(fields) == {"segment.rule.all.rules[0].trait.field", "segment.rule.all.rules[1].event_count.window"
                                                                    ".last_days"}

    # A wrong type in text form points at the offending part: the value, at character 46 (1-based).
    text = 'traits.plan = "pro" AND computed.frequency > "many"'
    code, _, fields = failure(segmentation.CreateSegment, pb.CreateSegmentRequest(
        segment_id="typed", segment=pb.Segment(rule_text=text)))
    assert text[45:] == '"many"'
    assert fields["segment.rule_text"].startswith("at character 46: computed.frequency is a number")

    # A cycle: base -> uses-base, then base changed to use uses-base.
    create(segmentation, "uses-base", 'segment("base") AND traits.plan EXISTS')
    code, _, fields = failure(segmentation.UpdateSegment, pb.UpdateSegmentRequest(
        segment=pb.Segment(name="segments/base", rule_text='segment("uses-base")'),
        update_mask=field_mask_pb2.FieldMask(paths=["rule_text"])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "cycle of segment references: segments/base -> segments/uses-base -> segments/base" in \
        fields["segment.rule_text"]
    code, _, fields = failure(segmentation.UpdateSegment, pb.UpdateSegmentRequest(
        segment=pb.Segment(name="segments/base", display_name="x"),
        update_mask=field_mask_pb2.FieldMask(paths=["display_name", "revision"])))
    assert list(fields) == ["update_mask.paths[1]"]
    assert failure(segmentation.GetSegment, pb.GetSegmentRequest(name="base"))[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_a_bad_rule_has_one_reason_in_every_call_that_takes_a_rule(segmentation: Stub) -> None:
    """INVALID_RULE whether the rule cannot be parsed or is parsed and invalid, in a create, an update, a parse or an
    estimate; a create or an update whose other fields are at fault too names the request (it was INVALID_RULE for a
    syntax error and INVALID_SEGMENT / INVALID_UPDATE for an unknown field, depending on the call)."""
    create(segmentation, "base", 'traits.plan = "pro"')
    for text in ("traits.a = ", "computed.shoe_size EXISTS", 'event("x").count(last 0d) >= 1'):
        calls = {
            "create": (segmentation.CreateSegment, pb.CreateSegmentRequest(
                segment_id="new-one", segment=pb.Segment(rule_text=text))),
            "update": (segmentation.UpdateSegment, pb.UpdateSegmentRequest(
                segment=pb.Segment(name="segments/base", rule_text=text),
                update_mask=field_mask_pb2.FieldMask(paths=["rule_text"]))),
            "parse": (segmentation.ParseSegmentRule, pb.ParseSegmentRuleRequest(rule_text=text)),
            "estimate": (segmentation.EstimateSegmentSize, pb.EstimateSegmentSizeRequest(rule_text=text)),
        }
        reasons = {name: failure(call, request)[:2] for name, (call, request) in calls.items()}
        assert set(reasons.values()) == {(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_RULE")}, (text, reasons)
    for text in ("computed.shoe_size EXISTS", "traits.a = "):  # invalid, and unreadable: named with the rest
        code, reason, fields = failure(segmentation.CreateSegment, pb.CreateSegmentRequest(
            segment_id="Bad_Id", segment=pb.Segment(rule_text=text)))
        assert (code, reason, set(fields)) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SEGMENT",
                                               {"segment_id", "segment.rule_text"}), text
        code, reason, fields = failure(segmentation.UpdateSegment, pb.UpdateSegmentRequest(
            segment=pb.Segment(name="segments/base", rule_text=text),
            update_mask=field_mask_pb2.FieldMask(paths=["rule_text", "revision"])))
        assert (code, reason, set(fields)) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_UPDATE",
                                               {"update_mask.paths[1]", "segment.rule_text"}), text


def test_display_names_and_descriptions_are_bounded(segmentation: Stub) -> None:
    """A 5 MB description was stored, and then every ListSegments page holding it (and GetSegment of it) passed a
    client's default 4 MiB message limit: no one could list segments any more."""
    code, reason, fields = failure(segmentation.CreateSegment, pb.CreateSegmentRequest(
        segment_id="huge", segment=pb.Segment(rule_text="traits.plan EXISTS", description="d" * 200_000,
                                              display_name="Two\nlines")))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SEGMENT")
    assert fields["segment.description"] == "at most 4,096 characters, got 200,000"
    assert "control character U+000A" in fields["segment.display_name"]
    created = create(segmentation, "bounded", "traits.plan EXISTS")
    code, reason, fields = failure(segmentation.UpdateSegment, pb.UpdateSegmentRequest(
        segment=pb.Segment(name=created.name, display_name="x" * 300),
        update_mask=field_mask_pb2.FieldMask(paths=["display_name"])))
    assert (code, reason, fields) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_UPDATE",
                                      {"segment.display_name": "at most 256 characters, got 300"})
    # Within the bounds (lines and tabs in a description): stored as given.
    updated = segmentation.UpdateSegment(pb.UpdateSegmentRequest(
        segment=pb.Segment(name=created.name, display_name="x" * 256, description="Why:\n\t" + "d" * 4000),
        update_mask=field_mask_pb2.FieldMask(paths=["display_name", "description"])), timeout=10)
    assert (len(updated.display_name), updated.description[:6]) == (256, "Why:\n\t")
    assert [s.name for s in segmentation.ListSegments(pb.ListSegmentsRequest(), timeout=10).segments] == [created.name]


def test_a_page_of_segments_stays_under_its_byte_bound(segmentation: Stub, monkeypatch: pytest.MonkeyPatch) -> None:
    """50 segments (the default page) of rules of 32,768 characters passed a client's 4 MiB default message limit
    (a review): a page stops before MAX_PAGE_BYTES (here lowered, the service runs in this process), and the next
    one goes on from there, none skipped or repeated."""
    monkeypatch.setattr(server_module, "MAX_PAGE_BYTES", 6000)
    names = [create(segmentation, f"big-{i}", f'traits.a = "{"x" * 1200}" OR traits.b = {i}').name for i in range(5)]
    pages, token = [], ""
    while True:
        page = segmentation.ListSegments(pb.ListSegmentsRequest(page_size=50, page_token=token), timeout=10)
        pages.append([s.name for s in page.segments])
        assert len(page.segments) == 1 or page.ByteSize() <= 6000
        token = page.next_page_token
        if not token:
            break
    assert [name for page_names in pages for name in page_names] == names
    assert 2 <= len(pages) < 5  # cut by bytes (two a page), not one each nor all at once


def test_a_score_condition_names_a_model_the_prediction_service_has(
        segmentation_with_prediction: tuple[RunningService, RunningService]) -> None:
    segmentation_service, prediction_service = segmentation_with_prediction
    with grpc.insecure_channel(f"127.0.0.1:{segmentation_service.port}") as channel, \
            grpc.insecure_channel(f"127.0.0.1:{prediction_service.port}") as prediction_channel:
        segmentation = Stub(channel)
        prediction_pb_grpc.PredictionServiceStub(prediction_channel).CreateModel(prediction_pb.CreateModelRequest(
            model_id="churn", model=prediction_pb.Model(spec=prediction_pb.ModelSpec(
                kind=prediction_pb.PREDICTION_KIND_CHURN, horizon_days=30))), timeout=10)
        known = create(segmentation, "at-risk", 'score("models/churn") >= 0.7')
        assert known.rule.score.model == "models/churn"
        code, reason, fields = failure(segmentation.CreateSegment, pb.CreateSegmentRequest(
            segment_id="unknown-model", segment=pb.Segment(rule_text='traits.a = 1 AND score("models/nope") >= 0.7')))
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_RULE")
        assert "models/nope does not exist in the prediction service (rule.all.rules[1].score.model)" in \
            fields["segment.rule_text"]


def test_a_score_condition_is_checked_by_shape_when_prediction_is_unreachable(segmentation: Stub) -> None:
    # The `segmentation` fixture's prediction target has nothing listening.
    assert create(segmentation, "maybe", 'score("models/nope") >= 0.7').rule_text == 'score("models/nope") >= 0.7'
    code, _, fields = failure(segmentation.CreateSegment, pb.CreateSegmentRequest(
        segment_id="bad-model", segment=pb.Segment(rule_text='score("Nope") >= 0.7')))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "is not a model name" in fields["segment.rule_text"]


def test_parse_segment_rule(segmentation: Stub) -> None:
    parsed = segmentation.ParseSegmentRule(pb.ParseSegmentRuleRequest(
        rule_text='score("models/churn-90d") >= 0.70 or computed.lifecycle_stage = "silent"'), timeout=10)
    assert parsed.canonical_rule_text == 'score("models/churn-90d") >= 0.7 OR computed.lifecycle_stage = "silent"'
    assert parsed.rule.any.rules[0].score.value == pytest.approx(0.7)
    code, _, fields = failure(segmentation.ParseSegmentRule, pb.ParseSegmentRuleRequest(rule_text='segment("ghost")'))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "segments/ghost does not exist" in fields["rule_text"]
