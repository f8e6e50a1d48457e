"""How the profile service asks the identity service who an event belongs to.

`IdentityResolver` is the seam the domain code sees; `GrpcIdentityResolver` implements it over the
identity service's gRPC API, batched: events with one identifier are looked up (cheap reads, nothing
to link), the rest are linked in one LinkIdentifiers call. Invalid identifiers come back as
INVALID_ARGUMENT with a field violation per bad observation; those events are rejected one by one
and the rest of the batch is sent again, so one bad event never sinks its batch.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from onecdp.common.v1 import common_pb2
from onecdp.identity.v1 import identity_service_pb2 as identity_pb
from onecdp.identity.v1 import identity_service_pb2_grpc as identity_grpc

from shared import deadline
from shared.errors import (
    DeadlineExceeded,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)

_ERASED_GUARD = identity_pb.GUARD_KIND_ERASED
_OBSERVATION_INDEX = re.compile(r"^(?:observations|persons)\[(\d+)\]")
# How many times a batch is re-sent after dropping the observations identity named as invalid.
_MAX_INVALID_ROUNDS = 3
MAX_LOOKUPS_PER_CALL = 1000


@dataclass(frozen=True)
class Observation:
    message_id: str
    identifiers: tuple[tuple[str, str], ...]
    source: str = ""
    source_kind: int = 0
    event_time: datetime | None = None


@dataclass(frozen=True)
class Resolution:
    """Who an observation belongs to: `person_id` is empty when no identifier was usable."""

    person_id: str = ""
    merged_person_ids: list[str] = field(default_factory=list)
    erased: bool = False
    invalid: str = ""
    # Identity holds an observation under the event's message_id with other identifiers (a LinkIdentifiers
    # call that used the same id): the returned person is theirs, not this event's.
    message_id_taken: bool = False


@dataclass(frozen=True)
class PersonView:
    person_id: str
    identifiers: list[tuple[str, str]]
    merged_person_ids: list[str]


@dataclass(frozen=True)
class IdentityChange:
    cursor: str
    change_type: int  # onecdp.identity.v1.IdentityChangeType
    source_person_ids: list[str]
    result_person_ids: list[str]


class IdentityResolver(Protocol):
    def resolve(self, observations: Sequence[Observation]) -> list[Resolution]: ...

    def person(self, person_id: str = "", identifier: tuple[str, str] | None = None) -> PersonView: ...

    def lookup(self, selectors: Sequence[tuple[str, tuple[str, str] | None]],
               field_paths: Sequence[str] | None = None) -> list[PersonView | None]: ...

    def persons(self, person_ids: Sequence[str]) -> dict[str, PersonView]: ...

    def changes(self, cursor: str, limit: int) -> tuple[list[IdentityChange], str]: ...


class GrpcIdentityResolver:
    def __init__(self, stub: identity_grpc.IdentityServiceStub) -> None:
        self._stub = stub

    def resolve(self, observations: Sequence[Observation]) -> list[Resolution]:
        results: list[Resolution | None] = [None] * len(observations)
        singles = [i for i, o in enumerate(observations) if len(set(o.identifiers)) == 1]
        found = self._lookup_singles([observations[i] for i in singles])
        for index, resolution in zip(singles, found, strict=True):
            results[index] = resolution
        pending = [i for i, r in enumerate(results) if r is None]
        for index, resolution in zip(pending, self._link([observations[i] for i in pending]), strict=True):
            results[index] = resolution
        return [r or Resolution() for r in results]

    def _lookup_singles(self, observations: Sequence[Observation]) -> list[Resolution | None]:
        """Persons of single-identifier observations; None where nobody holds the identifier yet."""
        # A batch often repeats an identifier (a customer's orders): each distinct one is looked up once.
        position = {identifier: i for i, identifier in enumerate(dict.fromkeys(o.identifiers[0] for o in observations))}
        found = self._lookup_identifiers(list(position))
        return [found[position[o.identifiers[0]]] for o in observations]

    def _lookup_identifiers(self, identifiers: Sequence[tuple[str, str]]) -> list[Resolution | None]:
        results: list[Resolution | None] = [None] * len(identifiers)
        selectors = {i: common_pb2.PersonSelector(identifier=common_pb2.Identifier(type=t, value=v))
                     for i, (t, v) in enumerate(identifiers)}
        for _ in range(_MAX_INVALID_ROUNDS):
            if not selectors:
                break
            order = sorted(selectors)
            try:
                request = identity_pb.BatchLookupPersonsRequest(persons=[selectors[i] for i in order])
                response: identity_pb.BatchLookupPersonsResponse = self._call(self._stub.BatchLookupPersons, request)
            except _InvalidObservations as error:
                for position, [(path, description), *_] in error.violations.items():
                    # Named as the event's field (its one identifier), not as the lookup's `identifier.value`.
                    _, dot, inner = path.partition(".")  # identifier.value -> value
                    field = f"identifiers[0]{dot}{inner}"
                    results[order[position]] = Resolution(invalid=f"{field}: {description}")
                    selectors.pop(order[position])
                continue
            for position, result in enumerate(response.results):
                if result.found:
                    results[order[position]] = Resolution(person_id=result.person.person_id)
            break
        return results

    def _link(self, observations: Sequence[Observation]) -> list[Resolution]:
        results = [Resolution() for _ in observations]
        remaining = dict(enumerate(observations))
        for _ in range(_MAX_INVALID_ROUNDS):
            if not remaining:
                break
            order = sorted(remaining)
            request = identity_pb.LinkIdentifiersRequest(observations=[_observation(remaining[i]) for i in order])
            try:
                response: identity_pb.LinkIdentifiersResponse = self._call(self._stub.LinkIdentifiers, request)
            except _InvalidObservations as error:
                for position, message in error.messages.items():
                    results[order[position]] = Resolution(invalid=message)
                    remaining.pop(order[position])
                continue
            for position, result in enumerate(response.results):
                results[order[position]] = Resolution(
                    person_id=result.person_id, merged_person_ids=list(result.merged_person_ids),
                    erased=any(d.guard == _ERASED_GUARD for d in result.guard_decisions),
                    message_id_taken=result.duplicate and result.other_identifiers)
            break
        return results

    def person(self, person_id: str = "", identifier: tuple[str, str] | None = None) -> PersonView:
        request = identity_pb.LookupPersonRequest(person=_selector(person_id, identifier))
        return _person_view(self._call(self._stub.LookupPerson, request))

    def lookup(self, selectors: Sequence[tuple[str, tuple[str, str] | None]],
               field_paths: Sequence[str] | None = None) -> list[PersonView | None]:
        """Persons by (person id, or identifier) in one call per 1,000; None where nobody matches.

        An invalid identifier is INVALID_ARGUMENT naming `field_paths[i]` (default `persons[i]`).
        """
        found: list[PersonView | None] = []
        for start in range(0, len(selectors), MAX_LOOKUPS_PER_CALL):
            chunk = selectors[start:start + MAX_LOOKUPS_PER_CALL]
            request = identity_pb.BatchLookupPersonsRequest(persons=[_selector(p, i) for p, i in chunk])
            try:
                response: identity_pb.BatchLookupPersonsResponse = self._call(self._stub.BatchLookupPersons,
                                                                              request)
            except _InvalidObservations as error:
                raise InvalidArgument(
                    "some selectors are invalid; nothing was read",
                    reason="INVALID_IDENTIFIER",
                    field_violations=[
                        FieldViolation(_join_path(field_paths[start + i] if field_paths else f"persons[{start + i}]",
                                                  path), description)
                        for i, found_violations in sorted(error.violations.items())
                        for path, description in found_violations]) from error
            found += [_person_view(r.person) if r.found else None for r in response.results]
        return found

    def persons(self, person_ids: Sequence[str]) -> dict[str, PersonView]:
        if not person_ids:
            return {}
        request = identity_pb.BatchLookupPersonsRequest(
            persons=[common_pb2.PersonSelector(person_id=p) for p in person_ids])
        try:
            response: identity_pb.BatchLookupPersonsResponse = self._call(self._stub.BatchLookupPersons, request)
        except _InvalidObservations as error:
            # An id identity calls malformed names nobody: absent here, like an unknown one, so the caller
            # names its own field for it. The rest are looked up again.
            return self.persons([p for index, p in enumerate(person_ids) if index not in error.violations])
        return {p: _person_view(r.person) for p, r in zip(person_ids, response.results, strict=True) if r.found}

    def changes(self, cursor: str, limit: int) -> tuple[list[IdentityChange], str]:
        response: identity_pb.ListIdentityChangesResponse = self._call(self._stub.ListIdentityChanges,
                              identity_pb.ListIdentityChangesRequest(page_size=limit, page_token=cursor))
        return ([IdentityChange(c.cursor, c.type, list(c.source_person_ids), list(c.result_person_ids))
                 for c in response.changes], response.next_page_token)

    def _call(self, method: Callable[..., Any], request: Any) -> Any:
        left = deadline.remaining()
        try:
            return method(request, timeout=left if left is not None and left > 0 else None)
        except grpc.RpcError as error:
            raise _translate(error) from error


class _InvalidObservations(Exception):
    """INVALID_ARGUMENT from identity naming observations: their index in the request -> why.

    `violations` keeps identity's own (path inside the observation, description) pairs, so a caller can
    name the field under its own path; `messages` says the first of them in one line (for event results).
    """

    def __init__(self, violations: dict[int, list[tuple[str, str]]]) -> None:
        super().__init__(f"{len(violations)} invalid observations")
        self.violations = violations
        self.messages = {index: f"{path}: {description}" if path else description
                         for index, [(path, description), *_] in violations.items()}


def _join_path(prefix: str, path: str) -> str:
    """`prefix` (a selector's path in our request) followed by `path` (identity's path inside it), e.g.
    `persons[2]` and `identifier.value` give `persons[2].identifier.value`."""
    return f"{prefix}.{path}" if path else prefix


def _translate(error: grpc.RpcError) -> Exception:
    code = error.code()
    details = error.details() or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        violations = _field_violations(error)
        by_index: dict[int, list[tuple[str, str]]] = {}
        for violation in violations:
            match = _OBSERVATION_INDEX.match(violation.field)
            if match:
                by_index.setdefault(int(match.group(1)), []).append(
                    (violation.field[match.end():].lstrip("."), violation.description))
        if by_index:
            return _InvalidObservations(by_index)
        return InvalidArgument(details, reason="INVALID_IDENTIFIER", field_violations=violations)
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(details, reason="PERSON_NOT_FOUND")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded("the identity service did not answer within the caller's deadline; retry with a "
                                "longer deadline", reason="IDENTITY_DEADLINE")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhausted(f"the identity service refused the batch: {details}", reason="IDENTITY_EXHAUSTED")
    return Unavailable(f"the identity service could not resolve identifiers ({code.name}: {details}); retry with "
                       "backoff", reason="IDENTITY_UNAVAILABLE")


def _field_violations(error: grpc.RpcError) -> list[FieldViolation]:
    """The BadRequest field violations of an INVALID_ARGUMENT from identity (field paths as identity named them)."""
    status = rpc_status.from_call(error)
    violations: list[FieldViolation] = []
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            violations += [FieldViolation(v.field, v.description) for v in bad_request.field_violations]
    return violations


def _observation(observation: Observation) -> identity_pb.Observation:
    message = identity_pb.Observation(
        identifiers=[common_pb2.Identifier(type=t, value=v) for t, v in observation.identifiers],
        provenance=identity_pb.Provenance(message_id=observation.message_id, source=observation.source,
                                          source_kind=common_pb2.SourceKind.ValueType(observation.source_kind)))
    if observation.event_time is not None:
        message.provenance.event_time.FromDatetime(observation.event_time)
    return message


def _selector(person_id: str, identifier: tuple[str, str] | None) -> common_pb2.PersonSelector:
    if identifier is not None:
        return common_pb2.PersonSelector(identifier=common_pb2.Identifier(type=identifier[0], value=identifier[1]))
    return common_pb2.PersonSelector(person_id=person_id)


def _person_view(person: identity_pb.Person) -> PersonView:
    return PersonView(person.person_id, [(i.type, i.value) for i in person.identifiers],
                      list(person.merged_person_ids))
