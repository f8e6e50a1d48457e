"""Errors are API: what a caller with grpcurl or the stubs gets back for input that cannot work."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from onecdp.common.v1 import common_pb2
from onecdp.identity.v1 import identity_service_pb2 as pb
from onecdp.identity.v1 import identity_service_pb2_grpc as pb_grpc

from services.identity.graph import new_person_id
from tests.services.identity.conftest import failure, ids, link, observation, person_of

pytestmark = pytest.mark.integration

Stub = pb_grpc.IdentityServiceStub
MALFORMED = "garbage id with spaces"


def _by_id(person_id: str) -> common_pb2.PersonSelector:
    return common_pb2.PersonSelector(person_id=person_id)


def _details(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), caught.value.details() or ""


def test_a_malformed_person_id_is_invalid_argument_naming_the_field(identity: Stub) -> None:
    invalid = (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PERSON_ID")
    assert failure(lambda: identity.ErasePerson(pb.ErasePersonRequest(person=_by_id(MALFORMED), reason="test"),
                                                timeout=10)) == (*invalid, ["person.person_id"])
    assert failure(lambda: identity.LookupPerson(pb.LookupPersonRequest(person=_by_id(MALFORMED)),
                                                 timeout=10)) == (*invalid, ["person.person_id"])
    assert failure(lambda: identity.ListPersonIdentifiers(pb.ListPersonIdentifiersRequest(person_id="P_ABC"),
                                                          timeout=10)) == (*invalid, ["person_id"])
    code, details = _details(lambda: identity.LookupPerson(pb.LookupPersonRequest(person=_by_id(MALFORMED)),
                                                           timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "'p_' followed by lowercase letters and digits" in details
    # A batch names every malformed id (and every bad identifier) at once, and looks nothing up.
    (bad_email,) = ids("email:not-an-email")
    assert failure(lambda: identity.BatchLookupPersons(pb.BatchLookupPersonsRequest(persons=[
        _by_id(new_person_id()), _by_id(MALFORMED), common_pb2.PersonSelector(identifier=bad_email), _by_id("")]),
        timeout=10)) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SELECTORS",
                         ["persons[1].person_id", "persons[2].identifier.value", "persons[3].person_id"])


def _assert_not_found(identity: Stub, person_id: str) -> None:
    code, details = _details(lambda: identity.LookupPerson(pb.LookupPersonRequest(person=_by_id(person_id)),
                                                           timeout=10))
    assert (code, details) == (grpc.StatusCode.NOT_FOUND, f"no person {person_id!r} (never issued, or erased)")
    assert failure(lambda: identity.ErasePerson(pb.ErasePersonRequest(person=_by_id(person_id), reason="test"),
                                                timeout=10))[0] == grpc.StatusCode.NOT_FOUND
    assert failure(lambda: identity.ListPersonIdentifiers(pb.ListPersonIdentifiersRequest(person_id=person_id),
                                                          timeout=10))[0] == grpc.StatusCode.NOT_FOUND


def test_a_well_formed_person_id_nobody_holds_stays_not_found(identity: Stub) -> None:
    held = link(identity, observation("crm_id:err-held", "cookie:err-held"))[0].person_id
    for unknown in (new_person_id(), "p_nobody"):
        _assert_not_found(identity, unknown)
    results = identity.BatchLookupPersons(pb.BatchLookupPersonsRequest(persons=[
        _by_id("p_nobody"), _by_id(held), _by_id(new_person_id())]), timeout=10).results
    assert [r.found for r in results] == [False, True, False] and results[1].person.person_id == held


def _observation_at(event_time: datetime | None, source_kind: int, *pairs: str) -> pb.Observation:
    message = observation(*pairs)
    message.provenance.source_kind = source_kind  # type: ignore[assignment]
    if event_time is not None:
        message.provenance.event_time.FromDatetime(event_time)
    return message


def test_link_names_every_bad_event_time_and_source_kind_with_the_identifiers(identity: Stub) -> None:
    now = datetime.now(UTC)
    observations = [
        _observation_at(now, common_pb2.SOURCE_KIND_WEB, "crm_id:err-ok-1", "cookie:err-ok-1"),
        _observation_at(datetime(3000, 1, 1, tzinfo=UTC), common_pb2.SOURCE_KIND_APP, "crm_id:err-future"),
        _observation_at(datetime(1989, 12, 31, tzinfo=UTC), 42, "crm_id:err-past"),
        _observation_at(None, 42, "email:not-an-email", "crm_id:err-kind"),
    ]
    code, reason, fields = failure(lambda: link(identity, *observations))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_OBSERVATION")
    assert fields == ["observations[1].provenance.event_time", "observations[2].provenance.event_time",
                      "observations[2].provenance.source_kind", "observations[3].provenance.source_kind",
                      "observations[3].identifiers[0].value"]
    _, details = _details(lambda: link(identity, *observations))
    assert "more than 1 day in the future" in details and "before 1990-01-01" in details
    # Nothing was linked, not even the valid observation.
    assert failure(lambda: person_of(identity, "crm_id:err-ok-1"))[0] == grpc.StatusCode.NOT_FOUND
    # The bounds themselves are accepted, and so is every defined source kind.
    accepted = link(identity,
                    _observation_at(now + timedelta(hours=23), common_pb2.SOURCE_KIND_ONECDP, "crm_id:err-edge-1"),
                    _observation_at(datetime(1990, 1, 1, tzinfo=UTC), common_pb2.SOURCE_KIND_UNSPECIFIED,
                                    "crm_id:err-edge-2"),
                    *[_observation_at(now, kind, f"crm_id:err-kind-{kind}") for kind in common_pb2.SourceKind.values()])
    assert all(r.person_id for r in accepted)


def test_an_event_time_no_date_can_hold_is_named_not_internal(identity: Stub) -> None:
    # Seconds beyond years 1-9999 or nanos outside 0-999999999 (only a binary client can send them) are no
    # datetime at all: the observation is refused with the others' violations, not an INTERNAL.
    observations = [observation("crm_id:err-far-1"), observation("crm_id:err-far-2"),
                    observation("crm_id:err-far-3"), observation("email:not-an-email")]
    observations[0].provenance.event_time.seconds = 2 ** 62
    observations[1].provenance.event_time.seconds = -2 ** 62
    observations[2].provenance.event_time.nanos = -1
    code, reason, fields = failure(lambda: link(identity, *observations))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_OBSERVATION")
    assert fields == [f"observations[{i}].provenance.event_time" for i in range(3)] + [
        "observations[3].identifiers[0].value"]
    _, details = _details(lambda: link(identity, *observations))
    assert "more than 1 day in the future" in details and "before 1990-01-01" in details
    assert "nanos must be 0-999999999, got -1" in details
    assert failure(lambda: person_of(identity, "crm_id:err-far-1"))[0] == grpc.StatusCode.NOT_FOUND


def test_a_long_source_and_control_characters_in_values_are_named(identity: Stub) -> None:
    observations = [observation("crm_id:err-src-1", source="s" * 129),
                    observation("cookie:err\x00nul", "crm_id:err-src-2", "email:bel\x07@x.io"),
                    observation("crm_id:err-src-3\x1b[2J")]
    code, reason, fields = failure(lambda: link(identity, *observations))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_OBSERVATION")
    assert fields == ["observations[0].provenance.source", "observations[1].identifiers[0].value",
                      "observations[1].identifiers[2].value", "observations[2].identifiers[0].value"]
    _, details = _details(lambda: link(identity, *observations))
    assert "at most 128 characters, got 129" in details and "control character U+0000" in details
    assert failure(lambda: person_of(identity, "crm_id:err-src-2"))[0] == grpc.StatusCode.NOT_FOUND
    # A lookup names the selector's value.
    (nul,) = ids("cookie:err\x00nul")
    assert failure(lambda: identity.LookupPerson(pb.LookupPersonRequest(
        person=common_pb2.PersonSelector(identifier=nul)), timeout=10)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_IDENTIFIER", ["person.identifier.value"])
    # Surrounding white space (tabs and line breaks too) is still trimmed, as before.
    accepted = link(identity, observation("crm_id:err-src-4", "cookie:\terr-src-4\r\n", source="s" * 128))[0]
    assert accepted.person_id and ids("cookie:err-src-4")[0] in accepted.normalized_identifiers


def test_a_request_id_that_is_no_uuid_is_named(identity: Stub) -> None:
    person = link(identity, observation("crm_id:err-rid", "cookie:err-rid"))[0].person_id
    (a,), (b,) = ids("crm_id:err-rid"), ids("cookie:err-rid")
    invalid = (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST_ID", ["request_id"])
    for request_id in ("not-a-uuid", f"{{{uuid.uuid4()}}}", uuid.uuid4().hex, f"{uuid.uuid4()} "):
        assert failure(lambda request_id=request_id: identity.UnlinkIdentifiers(  # type: ignore[misc]
            pb.UnlinkIdentifiersRequest(link=pb.IdentifierPair(a=a, b=b), request_id=request_id),
            timeout=10)) == invalid, request_id
        assert failure(lambda request_id=request_id: identity.ErasePerson(  # type: ignore[misc]
            pb.ErasePersonRequest(person=_by_id(person), request_id=request_id), timeout=10)) == invalid, request_id
    assert person_of(identity, "cookie:err-rid").person_id == person  # neither unlinked nor erased
    erased = identity.ErasePerson(pb.ErasePersonRequest(person=_by_id(person), request_id=str(uuid.uuid4()).upper()),
                                  timeout=10)
    assert erased.person_id == person


def test_a_phone_written_with_the_00_international_prefix_is_its_plus_form(identity: Stub) -> None:
    # 00 is the international call prefix in China and most of Europe; it was refused as "country code missing".
    result = link(identity, observation("phone:0086 138 0013 8001", "crm_id:err-00"))[0]
    assert ids("phone:+8613800138001")[0] in result.normalized_identifiers
    assert person_of(identity, "phone:+8613800138001").person_id == result.person_id
    assert person_of(identity, "phone:008613800138001").person_id == result.person_id

def test_a_blocked_junk_value_is_not_found_and_says_it_is_blocked(identity: Stub) -> None:
    link(identity, observation("cookie:unknown", "crm_id:err-junk"))
    code, details = _details(lambda: person_of(identity, "cookie:unknown"))
    assert code == grpc.StatusCode.NOT_FOUND
    assert details.startswith("no person holds cookie 'unknown': the value is blocked by the guard policy as junk")
    code, details = _details(lambda: person_of(identity, "cookie:err-never-seen"))
    assert (code, details) == (grpc.StatusCode.NOT_FOUND, "no person holds cookie 'err-never-seen'")
