"""The gRPC adapter of the segmentation service: onecdp.segmentation.v1 messages in, domain calls, messages out.

Every method of onecdp.segmentation.v1 is built. The real-time follower (profile change feed and
time-window expiry) starts with the service and stops with it.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import grpc
from google.longrunning import operations_pb2
from google.protobuf import json_format, struct_pb2, timestamp_pb2
from onecdp.segmentation.v1 import segmentation_service_pb2 as pb
from onecdp.segmentation.v1 import segmentation_service_pb2_grpc as pb_grpc

from services.segmentation.catalog import (
    RuleInput,
    Segment,
    SegmentCatalog,
    page_size_of,
    rule_text_length_problem,
    segment_id_of,
)
from services.segmentation.estimate import estimate_size, sample_size_of
from services.segmentation.evaluation import evaluate, evaluation_failed
from services.segmentation.follower import FeedFollower, Memberships
from services.segmentation.messages import rule_from_message, rule_to_message
from services.segmentation.model_directory import GrpcModelDirectory
from services.segmentation.profile_source import GrpcProfileSource
from services.segmentation.realtime import events_read, profile_reads
from services.segmentation.recompute import Recomputer
from services.segmentation.store import LAST_CHANGE_TICKS, OperationRecord, SegmentStore, cursor_before
from services.segmentation.text import RuleSyntaxError, format_rule, parse
from shared.changefeed import FEED_START, SETTLE_SECONDS, time_of, uuid_ticks
from shared.clients import prediction_stub, profile_stub
from shared.errors import FailedPrecondition, InvalidArgument, Violations, error_domain
from shared.longrunning import Instead, operation_error, operation_id_of, operations_registration
from shared.page_tokens import decode_page_token, encode_page_token, invalid_page_token
from shared.pages import MAX_PAGE_BYTES, fitting
from shared.runner import ServiceContext, ServiceDefinition
from shared.server import ServiceRegistration

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SegmentationService"].full_name
# The service's name (its DEFINITION), and the ErrorInfo domain its operation errors share with its statuses.
NAME = "segmentation"
ERROR_DOMAIN = error_domain(NAME)
OPERATIONS = "operations/"
DEFAULT_MEMBERS_PAGE = 100
MAX_MEMBERS_PAGE = 10_000
EXPORT_CHUNK = 1000


def rule_input_of(rule: pb.Rule | None, rule_text: str, violations: Violations, *, rule_field: str,
                  text_field: str) -> RuleInput | None:
    """The rule a request gives as a tree or as text (structural and syntax errors added to `violations`)."""
    if rule is not None and rule_text:
        violations.add(rule_field, f"give the rule as `{rule_field.rpartition('.')[2]}` or "
                                   f"`{text_field.rpartition('.')[2]}`, not both")
        return None
    if rule_text:
        too_long = rule_text_length_problem(rule_text)
        if too_long is not None:
            violations.add(text_field, too_long)
            return None
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
                         rule=rule_to_message(segment.rule) if segment.rule is not None else None,
                         rule_text=segment.rule_text, revision=segment.revision,
                         member_count=segment.member_count, state=pb.SegmentState.ValueType(segment.state),
                         etag=segment.etag,
                         operation=f"{OPERATIONS}{segment.operation_id}" if segment.operation_id else "")
    message.create_time.FromDatetime(segment.create_time)
    message.update_time.FromDatetime(segment.update_time)
    if segment.last_recompute_time is not None:
        message.last_recompute_time.FromDatetime(segment.last_recompute_time)
    return message


def operation_message(operation: OperationRecord) -> operations_pb2.Operation:
    """The google.longrunning.Operation of a recompute: progress metadata, then the error or the response."""
    message = operations_pb2.Operation(name=f"{OPERATIONS}{operation.operation_id}", done=operation.done)
    metadata = pb.RecomputeSegmentMetadata(segment=f"segments/{operation.segment_id}",
                                           shards_done=operation.shards_done, shards_total=operation.shards_total,
                                           profiles_scanned=operation.profiles_scanned, attempt=operation.attempt)
    metadata.start_time.FromDatetime(operation.start_time)
    message.metadata.Pack(metadata)
    if operation.done and operation.error_code:
        message.error.CopyFrom(operation_error(operation.error_code, operation.error_message or "", domain=ERROR_DOMAIN,
                                               reason=operation.error_reason, metadata=operation.error_metadata))
    elif operation.done:
        message.response.Pack(pb.RecomputeSegmentResponse(
            segment=f"segments/{operation.segment_id}", profiles_scanned=operation.profiles_scanned,
            member_count=operation.member_count, entered_count=operation.entered_count,
            exited_count=operation.exited_count, elapsed_seconds=operation.elapsed_seconds,
            profiles_skipped=operation.profiles_skipped))
    return message


# google.protobuf.Timestamp's range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z.
_TIMESTAMP_SECONDS = range(-62_135_596_800, 253_402_300_800)


def _change_position(position: str) -> uuid.UUID:
    """The change id a ListSegmentMembershipChanges token continues after."""
    try:
        return uuid.UUID(position)
    except ValueError:
        raise invalid_page_token() from None


def cursor_from(start: timestamp_pb2.Timestamp, field_path: str) -> uuid.UUID:
    """The change cursor that the changes at or after `start` follow (to the 100 ns of a change id). A start
    before the first time a change id can name (1582-10-15) starts from the first change ("everything since
    0001-01-01" is everything); one after the last (5236-03-31), or not a valid Timestamp, is INVALID_ARGUMENT
    on `field_path`."""
    if start.seconds not in _TIMESTAMP_SECONDS or not 0 <= start.nanos < 1_000_000_000:
        raise InvalidArgument.for_field(field_path, f"not a valid Timestamp (seconds {start.seconds}, nanos "
                                                    f"{start.nanos}): 0001-01-01 to 9999-12-31, nanos 0-999999999")
    # A datetime holds microseconds; the 100 ns below them are added.
    ticks = uuid_ticks(start.ToDatetime(tzinfo=UTC)) + start.nanos % 1000 // 100
    if ticks >= LAST_CHANGE_TICKS:
        raise InvalidArgument.for_field(field_path, "must be before 5236-03-31, the last time a change can have")
    return cursor_before(ticks)


def _member(person_id: str, enter_time: datetime) -> pb.SegmentMember:
    member = pb.SegmentMember(person_id=person_id)
    member.enter_time.FromDatetime(enter_time)
    return member


def _observed(value: Any) -> struct_pb2.Value | None:
    if value is None:
        # Unset, not an empty Value: a Value without a kind is not valid JSON for protojson (grpcurl, gateways).
        return None
    if isinstance(value, datetime):
        value = value.isoformat()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        # A Value's number is a double, and protojson (grpcurl, gateways) cannot write a non-finite one: an
        # int beyond a double, +/-inf (an aggregate that overflowed) and NaN are given as text.
        try:
            number = float(value)
        except OverflowError:
            return struct_pb2.Value(string_value=str(value))
        if not math.isfinite(number):
            text = "NaN" if math.isnan(number) else "Infinity" if number > 0 else "-Infinity"
            return struct_pb2.Value(string_value=text)
    message = struct_pb2.Value()
    json_format.ParseDict(value, message)
    return message


class SegmentationServicer(pb_grpc.SegmentationServiceServicer):
    def __init__(self, catalog: SegmentCatalog, recomputer: Recomputer, source: GrpcProfileSource) -> None:
        self._catalog = catalog
        self._store = catalog.store
        self._recomputer = recomputer
        self._source = source

    def RecomputeSegment(self, request: pb.RecomputeSegmentRequest,
                         context: grpc.ServicerContext) -> operations_pb2.Operation:
        segment_id = segment_id_of(request.name, "name")
        return operation_message(self._recomputer.start(segment_id, request.parallelism))

    def GetOperation(self, request: operations_pb2.GetOperationRequest,
                     context: grpc.ServicerContext) -> operations_pb2.Operation:
        return operation_message(self._recomputer.operation(operation_id_of(request.name)))

    def ListSegmentMembers(self, request: pb.ListSegmentMembersRequest,
                           context: grpc.ServicerContext) -> pb.ListSegmentMembersResponse:
        segment_id = segment_id_of(request.parent, "parent")
        size = page_size_of(request.page_size, DEFAULT_MEMBERS_PAGE, MAX_MEMBERS_PAGE)
        kind = f"members/{segment_id}"
        after = (decode_page_token(request.page_token, kind) or ("",))[0]
        self._catalog.record(segment_id)
        rows = self._store.members_page(segment_id, after, size + 1)
        token = encode_page_token(kind, (rows[size - 1][0],)) if len(rows) > size else ""
        return pb.ListSegmentMembersResponse(members=[_member(p, t) for p, t in rows[:size]], next_page_token=token)

    def ExportSegmentMembers(self, request: pb.ExportSegmentMembersRequest,
                             context: grpc.ServicerContext) -> Iterator[pb.ExportSegmentMembersResponse]:
        segment_id = segment_id_of(request.parent, "parent")
        self._catalog.record(segment_id)
        after = ""
        while True:
            rows = self._store.members_page(segment_id, after, EXPORT_CHUNK)
            if not rows:
                return
            yield pb.ExportSegmentMembersResponse(members=[_member(p, t) for p, t in rows])
            after = rows[-1][0]

    def ListSegmentMembershipChanges(self, request: pb.ListSegmentMembershipChangesRequest,
                                     context: grpc.ServicerContext) -> pb.ListSegmentMembershipChangesResponse:
        segment_id = segment_id_of(request.parent, "parent")
        size = page_size_of(request.page_size, DEFAULT_MEMBERS_PAGE, MAX_MEMBERS_PAGE)
        kind = f"changes/{segment_id}"
        position = decode_page_token(request.page_token, kind)
        if position is not None:
            # A position this list handed out (its checksum says so), not a feed cursor a client holds: it may
            # be later than now (a start_time in the future, with no change after it yet).
            after = _change_position(position[0])
        elif request.HasField("start_time"):
            after = cursor_from(request.start_time, "start_time")
        else:
            after = None
        self._catalog.record(segment_id)
        # The change log is written concurrently, so a change can land up to SETTLE_SECONDS after a
        # later-stamped one. A page stops that far short of now, so its cursor never passes a change not
        # written yet; with include_unsettled it also returns the newer changes, but its cursor still stops
        # at the horizon, so the next page returns them again (with any that landed late).
        after = uuid.UUID(int=(after or FEED_START).int)  # an unsettled-mode cursor as a plain one
        horizon = cursor_before(uuid_ticks(datetime.now(UTC) - timedelta(seconds=SETTLE_SECONDS)))
        if request.include_unsettled:
            changes = self._store.changes_page(segment_id, after, size)
            settled = [c for c in changes if c.change_id.time <= horizon.time]
            last = settled[-1].change_id if settled else after
        else:
            changes = self._store.changes_page(segment_id, after, size, through=horizon)
            last = changes[-1].change_id if changes else after
        response = pb.ListSegmentMembershipChangesResponse(next_page_token=encode_page_token(kind, (str(last),)))
        for change in changes:
            message = response.changes.add(
                person_id=change.person_id, cause=change.cause,
                type=pb.MEMBERSHIP_CHANGE_TYPE_ENTER if change.entered else pb.MEMBERSHIP_CHANGE_TYPE_EXIT)
            message.change_time.FromDatetime(time_of(change.change_id))
        return response

    def EvaluatePersonSegments(self, request: pb.EvaluatePersonSegmentsRequest,
                               context: grpc.ServicerContext) -> pb.EvaluatePersonSegmentsResponse:
        selector = request.person
        if not selector.person_id and not (selector.identifier.type and selector.identifier.value):
            raise InvalidArgument.for_field("person", "set person_id or an identifier (type and value)")
        segment_ids = [segment_id_of(name, f"segments[{i}]") for i, name in enumerate(request.segments)]
        rules = self._catalog.rules_for(segment_ids)  # NOT_FOUND, or FAILED_PRECONDITION for an unreadable rule
        as_of = datetime.now(UTC)
        evaluated = [rules[segment_id] for segment_id in segment_ids or sorted(rules)]
        facts = self._source.person(selector, as_of, events_read(evaluated, rules, as_of),
                                    profile_reads(evaluated, rules, as_of))
        response = pb.EvaluatePersonSegmentsResponse(person_id=facts.person_id)
        for segment_id in segment_ids or sorted(rules):
            try:
                evaluation = evaluate(rules[segment_id], facts, as_of, rules.get)
            except Exception as error:  # a defect or unforeseen data: said precisely, logged
                evaluation_failed(segment_id, facts.person_id, error)
                raise FailedPrecondition(
                    f"the profile of {facts.person_id} could not be evaluated against segments/{segment_id} "
                    f"({type(error).__name__}); its membership is left as it was. Report it with the person and "
                    "segment (the service logged the error)", reason="PERSON_NOT_EVALUABLE",
                    metadata={"segment": f"segments/{segment_id}", "person_id": facts.person_id}) from error
            response.evaluations.add(
                segment=f"segments/{segment_id}", matched=evaluation.matched,
                stored_member=self._store.is_member(segment_id, facts.person_id),
                conditions=[pb.ConditionResult(condition_text=c.text, matched=c.matched,
                                               observed_value=_observed(c.observed), negated=c.negated)
                            for c in evaluation.conditions])
        return response

    def EstimateSegmentSize(self, request: pb.EstimateSegmentSizeRequest,
                            context: grpc.ServicerContext) -> pb.EstimateSegmentSizeResponse:
        sample_size = sample_size_of(request.sample_size)
        which = request.WhichOneof("target")
        segment_id = ""
        if which == "segment":
            segment_id = segment_id_of(request.segment, "segment")
            rules = self._catalog.rules_for([segment_id])  # NOT_FOUND, or FAILED_PRECONDITION: unreadable
            rule = rules[segment_id]
        else:
            violations = Violations()
            rule_input = rule_input_of(request.rule if which == "rule" else None, request.rule_text, violations,
                                       rule_field="rule", text_field="rule_text")
            if rule_input is None and not violations:
                violations.add(which or "segment", "give a segment name, a rule or a rule_text")
            if rule_input is not None:
                self._catalog.check_rule(rule_input, None, violations)
            violations.raise_if_any("the rule is invalid", reason="INVALID_RULE")
            assert rule_input is not None
            rule = rule_input.rule
            rules = self._catalog.rules()
        estimate = estimate_size(rule, rules, self._source, sample_size, segment_id=segment_id)
        return pb.EstimateSegmentSizeResponse(
            estimated_count=estimate.estimated_count, sample_size=estimate.sample_size,
            sample_matches=estimate.sample_matches, estimated_total_profiles=estimate.estimated_total_profiles,
            margin_of_error=estimate.margin_of_error)

    def CreateSegment(self, request: pb.CreateSegmentRequest, context: grpc.ServicerContext) -> pb.Segment:
        violations = Violations()
        segment = request.segment
        rule_input = rule_input_of(segment.rule if segment.HasField("rule") else None, segment.rule_text, violations,
                                   rule_field="segment.rule", text_field="segment.rule_text")
        # A rule that cannot be read is answered with the request's other problems (the catalog checks them all).
        return segment_message(self._catalog.create(request.segment_id, segment.display_name, segment.description,
                                                    rule_input, rule_problems=violations.items))

    def GetSegment(self, request: pb.GetSegmentRequest, context: grpc.ServicerContext) -> pb.Segment:
        return segment_message(self._catalog.get(segment_id_of(request.name, "name")))

    def ListSegments(self, request: pb.ListSegmentsRequest, context: grpc.ServicerContext) -> pb.ListSegmentsResponse:
        segments, token = self._catalog.list(request.page_size, request.page_token)
        # 50 segments (the default page) of rules of 32,768 characters, in text and as trees, pass 4 MiB.
        messages = fitting((segment_message(s) for s in segments), MAX_PAGE_BYTES)
        if len(messages) < len(segments):
            token = self._catalog.page_token_after(segments[len(messages) - 1].segment_id)
        return pb.ListSegmentsResponse(segments=messages, next_page_token=token)

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
        return segment_message(self._catalog.update(segment_id, paths, display_name=segment.display_name,
                                                    description=segment.description, rule_input=rule_input,
                                                    etag=segment.etag, rule_problems=violations.items))

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
    store = SegmentStore(context.session)
    models = GrpcModelDirectory(prediction_stub(context.grpc_settings, context.on_stop))
    catalog = SegmentCatalog(store, model_exists=models.model_exists)
    source = GrpcProfileSource(profile_stub(context.grpc_settings, context.on_stop))
    memberships = Memberships(catalog, store, source)
    recomputer = Recomputer(catalog, store, source, reconciler=memberships)

    def compute_at_once(segment_id: str) -> None:
        # A new segment or rule is computed at once (state COMPUTING until it finishes).
        recomputer.start(segment_id)

    catalog.on_rule_changed = compute_at_once
    recomputer.start_supervisor()
    follower = FeedFollower(memberships, store, source)
    follower.start()
    # Stopped in order: the follower first (it may be mid-page), then the recomputes.
    context.on_stop(follower.stop)
    context.on_stop(recomputer.stop)
    servicer = SegmentationServicer(catalog, recomputer, source)
    return [ServiceRegistration(SERVICE_NAME, partial(pb_grpc.add_SegmentationServiceServicer_to_server, servicer)),
            operations_registration(SERVICE_NAME, servicer.GetOperation, Instead(
                list_operations="operations are stored by id only, so there is nothing to list them by; "
                                "Segment.operation (GetSegment, ListSegments) names a segment's latest recompute: "
                                "poll it with GetOperation or WaitOperation",
                cancel_operation="a recompute runs to its end once started (done, or failed after its retries); "
                                 "wait for it with WaitOperation",
                delete_operation="recompute operations are kept as the record of each segment's recomputes"))]


DEFINITION = ServiceDefinition(name=NAME, build=build)
