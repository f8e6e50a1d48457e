"""The gRPC adapter of the identity service: onecdp.identity.v1 messages in, IdentityGraph and
IdentitySettings calls, messages out."""

from __future__ import annotations

import bisect
import hashlib
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import partial

import grpc
from google.protobuf import empty_pb2
from google.protobuf.message import Message
from onecdp.common.v1 import common_pb2
from onecdp.identity.v1 import identity_service_pb2 as pb
from onecdp.identity.v1 import identity_service_pb2_grpc as pb_grpc

from services.identity import feed
from services.identity.explain import explain
from services.identity.feed import Change
from services.identity.graph import (
    Erasure,
    Evidence,
    GuardDecision,
    IdentifierDetails,
    IdentityGraph,
    LinkOutcome,
    Provenance,
    RawObservation,
    check_message_id,
    check_person_id,
)
from services.identity.identifiers import GuardPolicy, IdentifierType, Normalization
from services.identity.partition import IdKey
from services.identity.person import Person
from services.identity.recent import MAX_STALENESS_SECONDS
from services.identity.settings import (
    POLICY_NAME,
    IdentitySettings,
    PolicyDraft,
    SharedRule,
    TypeDraft,
    policy_etag,
    type_etag,
    type_name_of,
)
from shared.cassandra import CassandraSession
from shared.errors import InvalidArgument, ResourceExhausted, Violations
from shared.page_tokens import decode_page_token, encode_page_token
from shared.runner import ServiceContext, ServiceDefinition
from shared.server import ServiceRegistration

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["IdentityService"].full_name
MAX_LOOKUPS = 1000
MAX_REASON_LENGTH = 512
WATCH_POLL_SECONDS = 0.2
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100
_UUID = re.compile(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")


def _identifier(key: IdKey) -> common_pb2.Identifier:
    return common_pb2.Identifier(type=key.type, value=key.value)


def _observation(message: pb.Observation) -> RawObservation:
    provenance = message.provenance
    event_time, problem = _event_time(provenance)
    return RawObservation(
        identifiers=[(i.type, i.value) for i in message.identifiers],
        evidence=Evidence(message_id=provenance.message_id, source=provenance.source,
                          source_kind=provenance.source_kind, event_time=event_time, event_time_problem=problem))


def _event_time(provenance: pb.Provenance) -> tuple[datetime | None, str]:
    """The provenance's event time (None: absent), or None and why it is no time at all: a Timestamp beyond
    years 1-9999 or with nanos outside 0-999999999 has no datetime, and is answered in the words of the
    bounds it is outside (graph._check_evidence, shared.event_times)."""
    if not provenance.HasField("event_time"):
        return None, ""
    stamp = provenance.event_time
    try:
        return stamp.ToDatetime(tzinfo=UTC), ""
    except ValueError:
        if not 0 <= stamp.nanos < 1_000_000_000:
            return None, f"nanos must be 0-999999999, got {stamp.nanos}"
        bound = "more than 1 day in the future" if stamp.seconds > 0 else "before 1990-01-01"
        return None, (f"{stamp.seconds} seconds from 1970-01-01 is {bound}; send the time the event happened, "
                      "in UTC")


def _guard(decision: GuardDecision) -> pb.GuardDecision:
    return pb.GuardDecision(identifier=_identifier(decision.identifier), guard=pb.GuardKind.ValueType(decision.guard),
                            explanation=decision.explanation)


def _link_result(outcome: LinkOutcome) -> pb.LinkResult:
    return pb.LinkResult(
        person_id=outcome.person_id, person_ids=outcome.person_ids, merged_person_ids=outcome.merged_person_ids,
        normalized_identifiers=[_identifier(k) for k in outcome.normalized],
        guard_decisions=[_guard(d) for d in outcome.guard_decisions], duplicate=outcome.duplicate,
        other_identifiers=outcome.other_identifiers, changes=[_change(c) for c in outcome.changes])


def _person(person: Person, identifier_limit: int = 100, *, with_read_time: bool = False) -> pb.Person:
    message = pb.Person(name=f"persons/{person.person_id}", person_id=person.person_id,
                        identifiers=[_identifier(k) for k in sorted(person.identifiers)[:identifier_limit]],
                        merged_person_ids=person.merged_person_ids, redirected_from=person.redirected_from)
    if person.create_time:
        message.create_time.FromDatetime(person.create_time)
    if person.update_time:
        message.update_time.FromDatetime(person.update_time)
    if with_read_time and person.read_time:
        message.read_time.FromDatetime(person.read_time)
    return message


def _max_staleness(request: pb.LookupPersonRequest | pb.BatchLookupPersonsRequest) -> float:
    """The request's max_staleness in seconds (0: an exact lookup); INVALID_ARGUMENT outside 0-60 s."""
    if not request.HasField("max_staleness"):
        return 0.0
    duration = request.max_staleness
    if duration.seconds < 0 or duration.nanos < 0 or duration.nanos > 999_999_999:
        raise InvalidArgument.for_field("max_staleness", f"{duration.seconds}s {duration.nanos}ns is not a duration "
                                        "of 0 or more; leave it unset (or 0) for an answer read during the call",
                                        reason="INVALID_MAX_STALENESS")
    seconds = duration.seconds + duration.nanos / 1e9
    if seconds > MAX_STALENESS_SECONDS:
        raise InvalidArgument.for_field("max_staleness", f"{seconds:g}s is more than the {MAX_STALENESS_SECONDS:g}s "
                                        "an answer may be old; ask for 60s or less",
                                        reason="INVALID_MAX_STALENESS")
    return seconds


def _provenance(provenance: Provenance) -> pb.Provenance:
    message = pb.Provenance(message_id=provenance.message_id, source=provenance.source,
                            source_kind=common_pb2.SourceKind.ValueType(provenance.source_kind))
    if provenance.event_time:
        message.event_time.FromDatetime(provenance.event_time)
    return message


def _person_identifier(details: IdentifierDetails) -> pb.PersonIdentifier:
    message = pb.PersonIdentifier(identifier=_identifier(details.identifier),
                                  observation_count=details.observation_count,
                                  guard=pb.GuardKind.ValueType(details.guard or 0))
    if details.first_seen:
        message.first_seen_time.FromDatetime(details.first_seen)
    if details.last_seen:
        message.last_seen_time.FromDatetime(details.last_seen)
    return message


def _change(change: Change) -> pb.IdentityChange:
    message = pb.IdentityChange(cursor=change.cursor, type=pb.IdentityChangeType.ValueType(change.change_type),
                                source_person_ids=change.source_person_ids,
                                result_person_ids=change.result_person_ids, reason=change.reason)
    message.change_time.FromDatetime(change.change_time)
    return message


def _check_reason(reason: str) -> None:
    if len(reason) > MAX_REASON_LENGTH:
        raise InvalidArgument.for_field("reason", f"at most {MAX_REASON_LENGTH} characters", reason="REASON_TOO_LONG")


def _check_request_id(request_id: str) -> None:
    """A request_id is empty (no retry protection) or, as the proto documents, a UUID in its 36-character form
    (any case); it is kept as sent, so a retry must send it unchanged."""
    if request_id and not _UUID.fullmatch(request_id):
        raise InvalidArgument.for_field("request_id", f"{request_id[:80]!r} is not a UUID: expected 36 characters "
                                        "like 123e4567-e89b-12d3-a456-426614174000, or leave it empty",
                                        reason="INVALID_REQUEST_ID")


def _fingerprint(method: str, request: pb.UnlinkIdentifiersRequest | pb.ErasePersonRequest) -> str:
    """What a request_id is remembered with: the method and the request without its request_id (serialized
    deterministically), so that reusing the id for another request is told from a retry (AIP-155)."""
    body = type(request).FromString(request.SerializeToString())
    body.ClearField("request_id")
    return hashlib.sha256(method.encode() + b"\x00" + body.SerializeToString(deterministic=True)).hexdigest()


# Normalization.TRIM is the proto's NORMALIZATION_UNSPECIFIED ("trimmed of surrounding white space only").
_NORMALIZATION_OF_PROTO = {pb.NORMALIZATION_UNSPECIFIED: Normalization.TRIM, **{
    pb.Normalization.Value(f"NORMALIZATION_{n.name}"): n for n in Normalization if n is not Normalization.TRIM}}
_PROTO_OF_NORMALIZATION = {n: value for value, n in _NORMALIZATION_OF_PROTO.items()}


def _identifier_type(identifier_type: IdentifierType) -> pb.IdentifierType:
    return pb.IdentifierType(
        name=f"identifierTypes/{identifier_type.type}", type=identifier_type.type,
        display_name=identifier_type.display_name,
        normalization=_PROTO_OF_NORMALIZATION[identifier_type.normalization],
        priority=identifier_type.priority, max_per_person=identifier_type.max_per_person,
        blocked_values=sorted(identifier_type.blocked_values), blocked_patterns=identifier_type.blocked_patterns,
        hash_values=identifier_type.hash_values, built_in=identifier_type.built_in,
        etag=type_etag(identifier_type))


def _type_draft(message: pb.IdentifierType) -> TypeDraft:
    return TypeDraft(type=message.type, normalization=_NORMALIZATION_OF_PROTO.get(message.normalization),
                     display_name=message.display_name, priority=message.priority,
                     max_per_person=message.max_per_person, blocked_values=tuple(message.blocked_values),
                     blocked_patterns=tuple(message.blocked_patterns), hash_values=message.hash_values)


def _guard_policy(policy: GuardPolicy) -> pb.GuardPolicy:
    return pb.GuardPolicy(
        name=POLICY_NAME, blocked_values=sorted(policy.blocked_values), blocked_patterns=policy.blocked_patterns,
        shared_identifier_rules=[
            pb.SharedIdentifierRule(identifier_type=shared, distinct_type=counted, max_distinct=limit)
            for (shared, counted), limit in sorted(policy.shared_identifier_limits.items())],
        etag=policy_etag(policy))


def _policy_draft(message: pb.GuardPolicy) -> PolicyDraft:
    return PolicyDraft(blocked_values=tuple(message.blocked_values), blocked_patterns=tuple(message.blocked_patterns),
                       shared_identifier_rules=tuple(SharedRule(r.identifier_type, r.distinct_type, r.max_distinct)
                                                     for r in message.shared_identifier_rules))


class IdentityServicer(pb_grpc.IdentityServiceServicer):
    def __init__(self, graph: IdentityGraph, session: CassandraSession,
                 settings: IdentitySettings) -> None:
        self._graph = graph
        self._session = session
        self._settings = settings

    def LinkIdentifiers(self, request: pb.LinkIdentifiersRequest,
                        context: grpc.ServicerContext) -> pb.LinkIdentifiersResponse:
        outcomes = self._graph.link([_observation(o) for o in request.observations])
        return pb.LinkIdentifiersResponse(results=[_link_result(o) for o in outcomes])

    def LookupPerson(self, request: pb.LookupPersonRequest, context: grpc.ServicerContext) -> pb.Person:
        selected = self._selected(request.person, "person")
        max_staleness = _max_staleness(request)
        return _person(self._graph.get_person(selected, max_staleness) if isinstance(selected, str)
                       else self._graph.person_of_identifier(selected, max_staleness),
                       with_read_time=request.HasField("max_staleness"))

    def BatchLookupPersons(self, request: pb.BatchLookupPersonsRequest,
                           context: grpc.ServicerContext) -> pb.BatchLookupPersonsResponse:
        if not request.persons:
            raise InvalidArgument.for_field("persons", f"required: 1 to {MAX_LOOKUPS} selectors",
                                            reason="PERSONS_REQUIRED")
        if len(request.persons) > MAX_LOOKUPS:
            raise ResourceExhausted(f"{len(request.persons)} lookups in one call; at most {MAX_LOOKUPS} are allowed",
                                    reason="BATCH_TOO_LARGE")
        # All selectors are checked first (every invalid one is named); then the batch costs at most two rounds
        # of IN reads, whatever its size: identifiers to person ids (not for identifiers whose holder hint holds,
        # see RecentLookups), while persons named by id are read with their members.
        violations = Violations()
        person_ids: list[str | None] = []
        keys: dict[int, IdKey] = {}
        for index, selector in enumerate(request.persons):
            try:
                selected = self._selected(selector, f"persons[{index}]")
            except InvalidArgument as error:
                violations.items.extend(error.field_violations)
                selected = ""
            if isinstance(selected, IdKey):
                keys[index] = selected
            person_ids.append(selected if isinstance(selected, str) else None)
        violations.raise_if_any("some selectors are invalid; nothing was looked up", reason="INVALID_SELECTORS")
        max_staleness = _max_staleness(request)
        held, named = self._graph.lookup(keys.values(), (p for p in person_ids if p), max_staleness)
        results = [named.get(p) if p else held.get(keys[index]) if index in keys else None
                   for index, p in enumerate(person_ids)]
        return pb.BatchLookupPersonsResponse(results=[
            pb.PersonLookupResult(found=True, person=_person(person, with_read_time=request.HasField("max_staleness")))
            if person is not None
            else pb.PersonLookupResult(found=False) for person in results])

    def ListPersonIdentifiers(self, request: pb.ListPersonIdentifiersRequest,
                              context: grpc.ServicerContext) -> pb.ListPersonIdentifiersResponse:
        person_id = check_person_id(request.person_id, "person_id")
        page_size = _page_size(request.page_size)
        # Bound to the person asked for (as asked: a merge between pages redirects it the same way).
        binding = f"ListPersonIdentifiers persons/{person_id}"
        after = decode_page_token(request.page_token, binding, fields=2)
        members = sorted(self._graph.get_person(person_id).identifiers)
        # The page starts after the last identifier of the previous one, not at an offset: identifiers
        # gained or lost between pages neither repeat nor skip the others.
        start = bisect.bisect_right(members, IdKey(*after)) if after is not None else 0
        page = members[start:start + page_size]
        next_token = encode_page_token(binding, page[-1]) if start + page_size < len(members) else ""
        return pb.ListPersonIdentifiersResponse(
            identifiers=[_person_identifier(d) for d in self._graph.identifier_details(page)],
            next_page_token=next_token)

    def ExplainLink(self, request: pb.ExplainLinkRequest, context: grpc.ServicerContext) -> pb.ExplainLinkResponse:
        a, b = self._required_keys(request, ("a", "a"), ("b", "b"))
        result = explain(self._graph, a, b)
        return pb.ExplainLinkResponse(
            same_person=result.same_person, person_id_a=result.person_a, person_id_b=result.person_b,
            path=[pb.LinkStep(**{"from": _identifier(step.source)}, to=_identifier(step.target),
                              evidence=[_provenance(p) for p in step.evidence]) for step in result.path],
            blocking_guards=[_guard(d) for d in result.blocking_guards], summary=result.summary)

    def UnlinkIdentifiers(self, request: pb.UnlinkIdentifiersRequest,
                          context: grpc.ServicerContext) -> pb.UnlinkIdentifiersResponse:
        _check_reason(request.reason)
        _check_request_id(request.request_id)
        fingerprint = _fingerprint("UnlinkIdentifiers", request)
        if (stored := self._graph.recall_request(request.request_id, fingerprint)) is not None:
            return pb.UnlinkIdentifiersResponse.FromString(bytes.fromhex(stored))
        target = request.WhichOneof("target")
        if target == "link":
            a, b = self._required_keys(request.link, ("a", "link.a"), ("b", "link.b"))
            retraction = self._graph.unlink_pair(a, b, request.reason)
        elif target == "message_id":
            retraction = self._graph.unlink_message(check_message_id(request.message_id, "message_id"),
                                                    request.reason)
        elif target == "identifier":
            retraction = self._graph.unlink_identifier(self._required_key(request, "identifier", "identifier"),
                                                       request.reason)
        else:
            raise InvalidArgument.for_field("target", "set exactly one of link, message_id or identifier",
                                            reason="UNLINK_TARGET_REQUIRED")
        response = pb.UnlinkIdentifiersResponse(person_ids=retraction.person_ids,
                                                changes=[_change(c) for c in retraction.changes])
        if retraction.change is not None:
            response.change.CopyFrom(_change(retraction.change))
        self._graph.remember_request(request.request_id, fingerprint, response.SerializeToString().hex())
        return response

    def ErasePerson(self, request: pb.ErasePersonRequest, context: grpc.ServicerContext) -> pb.ErasePersonResponse:
        _check_reason(request.reason)
        _check_request_id(request.request_id)
        fingerprint = _fingerprint("ErasePerson", request)
        if (stored := self._graph.recall_request(request.request_id, fingerprint)) is not None:
            return pb.ErasePersonResponse.FromString(bytes.fromhex(stored))
        response = pb.ErasePersonResponse()

        def remember(erasure: Erasure) -> None:
            # As soon as the erasure is committed, before its neighbours are recomputed (which may use up the
            # call's deadline): a retry with this request_id then answers the erasure, not NOT_FOUND.
            response.MergeFrom(pb.ErasePersonResponse(
                person_id=erasure.person_id, erased_identifier_count=erasure.identifier_count,
                erased_link_count=erasure.link_count, change=_change(erasure.change)))
            self._graph.remember_request(request.request_id, fingerprint, response.SerializeToString().hex())

        self._graph.erase(self._person_id(request.person, "person"), allow_relink=request.allow_relink,
                          reason=request.reason, committed=remember)
        return response

    def DeleteErasureTombstone(self, request: pb.DeleteErasureTombstoneRequest,
                               context: grpc.ServicerContext) -> empty_pb2.Empty:
        self._graph.delete_tombstone(self._required_key(request, "identifier", "identifier"))
        return empty_pb2.Empty()

    def ListIdentityChanges(self, request: pb.ListIdentityChangesRequest,
                            context: grpc.ServicerContext) -> pb.ListIdentityChangesResponse:
        changes, cursor = feed.read(self._session, feed.parse_cursor(request.page_token),
                                    _page_size(request.page_size))
        return pb.ListIdentityChangesResponse(changes=[_change(c) for c in changes], next_page_token=str(cursor))

    def WatchIdentityChanges(self, request: pb.WatchIdentityChangesRequest,
                             context: grpc.ServicerContext) -> Iterator[pb.IdentityChange]:
        cursor = feed.parse_cursor(request.cursor, "cursor")
        while context.is_active():
            changes, cursor = feed.read(self._session, cursor, MAX_PAGE_SIZE)
            for change in changes:
                yield _change(change)
            if len(changes) < MAX_PAGE_SIZE:
                time.sleep(WATCH_POLL_SECONDS)

    def ListIdentifierTypes(self, request: pb.ListIdentifierTypesRequest,
                            context: grpc.ServicerContext) -> pb.ListIdentifierTypesResponse:
        page_size = _page_size(request.page_size)
        self._settings.refresh()  # read through to storage: a change made via another process shows at once
        types = self._settings.registry.all()  # by type name
        after = decode_page_token(request.page_token, "ListIdentifierTypes")
        start = bisect.bisect_right([t.type for t in types], after[0]) if after is not None else 0
        page = types[start:start + page_size]
        next_token = (encode_page_token("ListIdentifierTypes", (page[-1].type,))
                      if start + page_size < len(types) else "")
        return pb.ListIdentifierTypesResponse(identifier_types=[_identifier_type(t) for t in page],
                                              next_page_token=next_token)

    def GetIdentifierType(self, request: pb.GetIdentifierTypeRequest,
                          context: grpc.ServicerContext) -> pb.IdentifierType:
        type_name = type_name_of(request.name, "name")
        self._settings.refresh()
        return _identifier_type(self._settings.identifier_type(type_name))

    def CreateIdentifierType(self, request: pb.CreateIdentifierTypeRequest,
                             context: grpc.ServicerContext) -> pb.IdentifierType:
        if not request.HasField("identifier_type"):
            raise InvalidArgument.for_field("identifier_type", "required", reason="IDENTIFIER_TYPE_REQUIRED")
        created = self._settings.create_type(_type_draft(request.identifier_type),
                                             validate_only=request.validate_only)
        return _identifier_type(created)

    def UpdateIdentifierType(self, request: pb.UpdateIdentifierTypeRequest,
                             context: grpc.ServicerContext) -> pb.IdentifierType:
        message = request.identifier_type
        updated = self._settings.update_type(message.name, _type_draft(message), list(request.update_mask.paths),
                                             message.etag)
        return _identifier_type(updated)

    def GetGuardPolicy(self, request: pb.GetGuardPolicyRequest, context: grpc.ServicerContext) -> pb.GuardPolicy:
        _check_policy_name(request.name, "name")
        self._settings.refresh()
        return _guard_policy(self._settings.policy)

    def UpdateGuardPolicy(self, request: pb.UpdateGuardPolicyRequest,
                          context: grpc.ServicerContext) -> pb.GuardPolicy:
        message = request.guard_policy
        _check_policy_name(message.name, "guard_policy.name")
        updated = self._settings.update_policy(_policy_draft(message), list(request.update_mask.paths), message.etag)
        return _guard_policy(updated)

    def _person_id(self, selector: common_pb2.PersonSelector, field_path: str) -> str:
        selected = self._selected(selector, field_path)
        return selected if isinstance(selected, str) else self._graph.person_holding(selected)

    def _required_key(self, holder: Message, field: str, field_path: str) -> IdKey:
        """The identifier in `holder.field`, normalized; INVALID_ARGUMENT naming `field_path` when it is
        missing (rather than an "unknown identifier type ''") or invalid."""
        if not holder.HasField(field):
            raise InvalidArgument.for_field(field_path, "required: an identifier with its type and value",
                                            reason="IDENTIFIER_REQUIRED")
        identifier: common_pb2.Identifier = getattr(holder, field)
        return self._graph.normalize_one(identifier.type, identifier.value, field_path)

    def _required_keys(self, holder: Message, *fields: tuple[str, str]) -> list[IdKey]:
        """The identifiers in `holder`'s fields, each given as (field, field path), normalized; one
        INVALID_ARGUMENT naming every missing or invalid one otherwise."""
        keys: list[IdKey] = []
        errors: list[InvalidArgument] = []
        for field, field_path in fields:
            try:
                keys.append(self._required_key(holder, field, field_path))
            except InvalidArgument as error:
                errors.append(error)
        if len(errors) == 1:
            raise errors[0]
        if errors:
            violations = Violations([v for error in errors for v in error.field_violations])
            violations.raise_if_any("some identifiers are missing or invalid", reason=errors[0].reason)
        return keys

    def _selected(self, selector: common_pb2.PersonSelector, field_path: str) -> str | IdKey:
        """The person id a selector names, or its identifier normalized; INVALID_ARGUMENT naming the field."""
        which = selector.WhichOneof("selector")
        if which == "person_id":
            return check_person_id(selector.person_id, f"{field_path}.person_id")
        if which == "identifier":
            return self._graph.normalize_one(selector.identifier.type, selector.identifier.value,
                                             f"{field_path}.identifier")
        raise InvalidArgument.for_field(field_path, "set exactly one of person_id or identifier",
                                        reason="PERSON_SELECTOR_EMPTY")


def _check_policy_name(name: str, field_path: str) -> None:
    if name not in ("", POLICY_NAME):
        raise InvalidArgument.for_field(field_path, f"the guard policy's name is {POLICY_NAME} (or empty), "
                                        f"not {name!r}", reason="INVALID_GUARD_POLICY_NAME")


def _page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument.for_field("page_size", "must not be negative")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def build(context: ServiceContext) -> list[ServiceRegistration]:
    graph = IdentityGraph(context.session)
    # The stored identifier types and guard policy are in force before the first call, and followed after.
    settings = IdentitySettings(context.session, graph)
    settings.refresh()
    settings.follow()
    context.on_stop(settings.stop)
    servicer = IdentityServicer(graph, context.session, settings)
    return [ServiceRegistration(SERVICE_NAME, partial(pb_grpc.add_IdentityServiceServicer_to_server, servicer))]


DEFINITION = ServiceDefinition(name="identity", build=build)
