"""The gRPC adapter of the segmentation service: onecdp.segmentation.v1 messages in, domain calls, messages out.

Methods not overridden here are inherited from the generated servicer, which answers UNIMPLEMENTED;
the shared interceptor names the method in that message, so nothing pretends to work.
"""

from __future__ import annotations

from functools import partial

import grpc
from onecdp.segmentation.v1 import segmentation_service_pb2 as pb
from onecdp.segmentation.v1 import segmentation_service_pb2_grpc as pb_grpc

from services.segmentation.catalog import RuleInput, Segment, SegmentCatalog, segment_id_of
from services.segmentation.messages import rule_from_message, rule_to_message
from services.segmentation.store import SegmentStore
from services.segmentation.text import RuleSyntaxError, format_rule, parse
from shared.errors import InvalidArgument, Violations
from shared.runner import ServiceContext, ServiceDefinition
from shared.server import ServiceRegistration

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SegmentationService"].full_name


def rule_input_of(rule: pb.Rule | None, rule_text: str, violations: Violations, *, rule_field: str,
                  text_field: str) -> RuleInput | None:
    """The rule a request gives as a tree or as text (structural and syntax errors added to `violations`)."""
    if rule is not None and rule_text:
        violations.add(rule_field, f"give the rule as `{rule_field.rpartition('.')[2]}` or "
                                   f"`{text_field.rpartition('.')[2]}`, not both")
        return None
    if rule_text:
        try:
            return RuleInput(parse(rule_text), text_field, True)
        except RuleSyntaxError as error:
            violations.add(text_field, str(error))
            return None
    if rule is not None:
        parsed = rule_from_message(rule, rule_field, violations)
        return RuleInput(parsed, rule_field, False) if parsed is not None else None
    return None


def segment_message(segment: Segment) -> pb.Segment:
    message = pb.Segment(name=segment.name, display_name=segment.display_name, description=segment.description,
                         rule=rule_to_message(segment.rule), rule_text=segment.rule_text, revision=segment.revision,
                         member_count=segment.member_count, state=pb.SegmentState.ValueType(segment.state),
                         etag=segment.etag)
    message.create_time.FromDatetime(segment.create_time)
    message.update_time.FromDatetime(segment.update_time)
    if segment.last_recompute_time is not None:
        message.last_recompute_time.FromDatetime(segment.last_recompute_time)
    return message


class SegmentationServicer(pb_grpc.SegmentationServiceServicer):
    def __init__(self, catalog: SegmentCatalog) -> None:
        self._catalog = catalog

    def CreateSegment(self, request: pb.CreateSegmentRequest, context: grpc.ServicerContext) -> pb.Segment:
        violations = Violations()
        segment = request.segment
        rule_input = rule_input_of(segment.rule if segment.HasField("rule") else None, segment.rule_text, violations,
                                   rule_field="segment.rule", text_field="segment.rule_text")
        violations.raise_if_any("the segment's rule is invalid", reason="INVALID_RULE")
        return segment_message(self._catalog.create(request.segment_id, segment.display_name, segment.description,
                                                    rule_input))

    def GetSegment(self, request: pb.GetSegmentRequest, context: grpc.ServicerContext) -> pb.Segment:
        return segment_message(self._catalog.get(segment_id_of(request.name, "name")))

    def ListSegments(self, request: pb.ListSegmentsRequest, context: grpc.ServicerContext) -> pb.ListSegmentsResponse:
        segments, token = self._catalog.list(request.page_size, request.page_token)
        return pb.ListSegmentsResponse(segments=[segment_message(s) for s in segments], next_page_token=token)

    def UpdateSegment(self, request: pb.UpdateSegmentRequest, context: grpc.ServicerContext) -> pb.Segment:
        segment_id = segment_id_of(request.segment.name, "segment.name")
        paths = list(request.update_mask.paths)
        segment = request.segment
        violations = Violations()
        rule_input = None
        if "rule" in paths or "rule_text" in paths:
            rule = segment.rule if "rule" in paths and segment.HasField("rule") else None
            text = segment.rule_text if "rule_text" in paths else ""
            rule_input = rule_input_of(rule, text, violations, rule_field="segment.rule",
                                       text_field="segment.rule_text")
        violations.raise_if_any("the segment's rule is invalid", reason="INVALID_RULE")
        return segment_message(self._catalog.update(segment_id, paths, display_name=segment.display_name,
                                                    description=segment.description, rule_input=rule_input,
                                                    etag=segment.etag))

    def DeleteSegment(self, request: pb.DeleteSegmentRequest,
                      context: grpc.ServicerContext) -> pb.DeleteSegmentResponse:
        self._catalog.delete(segment_id_of(request.name, "name"), request.etag)
        return pb.DeleteSegmentResponse()

    def ParseSegmentRule(self, request: pb.ParseSegmentRuleRequest,
                         context: grpc.ServicerContext) -> pb.ParseSegmentRuleResponse:
        if not request.rule_text:
            raise InvalidArgument.for_field("rule_text", "a rule in text form is required")
        violations = Violations()
        rule_input = rule_input_of(None, request.rule_text, violations, rule_field="rule", text_field="rule_text")
        if rule_input is not None:
            self._catalog.check_rule(rule_input, None, violations)
        violations.raise_if_any("the rule is invalid", reason="INVALID_RULE")
        assert rule_input is not None
        return pb.ParseSegmentRuleResponse(rule=rule_to_message(rule_input.rule),
                                           canonical_rule_text=format_rule(rule_input.rule))


def build(context: ServiceContext) -> list[ServiceRegistration]:
    catalog = SegmentCatalog(SegmentStore(context.session))
    # Methods not built yet stay abstract in the typed stubs; at run time they answer UNIMPLEMENTED.
    servicer = SegmentationServicer(catalog)  # type: ignore[abstract]
    return [ServiceRegistration(SERVICE_NAME, partial(pb_grpc.add_SegmentationServiceServicer_to_server, servicer))]


DEFINITION = ServiceDefinition(name="segmentation", build=build)
