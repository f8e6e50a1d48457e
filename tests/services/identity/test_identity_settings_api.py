"""Identifier types and the guard policy over real gRPC: create, update with masks and etags, every
error code, the effect on LinkIdentifiers, and a second identity process following the changes."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from google.protobuf import field_mask_pb2
from onecdp.identity.v1 import identity_service_pb2 as pb
from onecdp.identity.v1 import identity_service_pb2_grpc as pb_grpc

from bench.common import free_port, service_env, start_service_process
from services.identity.identifiers import BUILT_IN_TYPES
from services.identity.settings import RELOAD_INTERVAL_SECONDS
from shared.config import CassandraSettings
from tests.services.identity.conftest import failure, link, members, observation, person_of

pytestmark = pytest.mark.integration

Stub = pb_grpc.IdentityServiceStub


def _mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


def _create(stub: Stub, **fields: object) -> pb.IdentifierType:
    created: pb.IdentifierType = stub.CreateIdentifierType(
        pb.CreateIdentifierTypeRequest(identifier_type=pb.IdentifierType(**fields)), timeout=30)  # type: ignore[arg-type]
    return created


def _get_type(stub: Stub, type_name: str) -> pb.IdentifierType:
    found: pb.IdentifierType = stub.GetIdentifierType(
        pb.GetIdentifierTypeRequest(name=f"identifierTypes/{type_name}"), timeout=10)
    return found


def _policy(stub: Stub) -> pb.GuardPolicy:
    policy: pb.GuardPolicy = stub.GetGuardPolicy(pb.GetGuardPolicyRequest(), timeout=10)
    return policy


def _update_policy(stub: Stub, policy: pb.GuardPolicy, *paths: str) -> pb.GuardPolicy:
    updated: pb.GuardPolicy = stub.UpdateGuardPolicy(
        pb.UpdateGuardPolicyRequest(guard_policy=policy, update_mask=_mask(*paths)), timeout=30)
    return updated


def _block(stub: Stub, *values: str) -> pb.GuardPolicy:
    policy = _policy(stub)
    policy.blocked_values.extend(values)
    return _update_policy(stub, policy, "blocked_values")


def _apart(stub: Stub, a: str, b: str) -> bool:
    return person_of(stub, a).person_id != person_of(stub, b).person_id


# ---- identifier types ------------------------------------------------------------------------------

def test_list_and_get_show_the_built_in_types_with_etags(identity: Stub) -> None:
    listed = identity.ListIdentifierTypes(pb.ListIdentifierTypesRequest(), timeout=10).identifier_types
    assert {t.type for t in listed} == set(BUILT_IN_TYPES)
    assert all(t.built_in and t.etag.startswith('"') and t.name == f"identifierTypes/{t.type}" for t in listed)
    email = _get_type(identity, "email")
    assert (email.normalization, email.built_in) == (pb.NORMALIZATION_EMAIL, True)
    assert email.etag == next(t.etag for t in listed if t.type == "email")
    assert failure(lambda: _get_type(identity, "loyalty_card"))[:2] == (
        grpc.StatusCode.NOT_FOUND, "IDENTIFIER_TYPE_NOT_FOUND")
    assert failure(lambda: identity.GetIdentifierType(pb.GetIdentifierTypeRequest(name="email"), timeout=10)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_IDENTIFIER_TYPE_NAME", ["name"])


def test_a_created_type_is_listed_and_links_with_its_normalization_and_limit(identity: Stub) -> None:
    code, _, fields = failure(lambda: link(identity, observation("email:ann@example.com", "loyalty_card:LC-1")))
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["observations[0].identifiers[1].type"])

    checked = identity.CreateIdentifierType(pb.CreateIdentifierTypeRequest(
        identifier_type=pb.IdentifierType(type="loyalty_card"), validate_only=True), timeout=30)
    assert checked.type == "loyalty_card"
    assert failure(lambda: _get_type(identity, "loyalty_card"))[0] == grpc.StatusCode.NOT_FOUND  # nothing stored

    created = _create(identity, type="loyalty_card", display_name="Loyalty card",
                      normalization=pb.NORMALIZATION_LOWERCASE, priority=140, max_per_person=1,
                      blocked_values=["LC-0000"], blocked_patterns=["^test-"])
    assert (created.name, created.built_in, created.priority) == ("identifierTypes/loyalty_card", False, 140)
    assert list(created.blocked_values) == ["lc-0000"]  # blocked values are normalized like values
    assert _get_type(identity, "loyalty_card") == created
    listed = identity.ListIdentifierTypes(pb.ListIdentifierTypesRequest(page_size=5), timeout=10)
    rest = identity.ListIdentifierTypes(pb.ListIdentifierTypesRequest(page_token=listed.next_page_token), timeout=10)
    assert "loyalty_card" in {t.type for t in [*listed.identifier_types, *rest.identifier_types]}

    first = link(identity, observation("email:ann@example.com", "loyalty_card: LC-1 "))[0]
    assert [i.value for i in first.normalized_identifiers if i.type == "loyalty_card"] == ["lc-1"]
    assert link(identity, observation("loyalty_card:lc-1", "cookie:ann-web"))[0].person_id == first.person_id
    # max_per_person=1: a second card seen with Ann's email does not join her.
    second = link(identity, observation("email:ann@example.com", "loyalty_card:LC-2"))[0]
    assert pb.GUARD_KIND_TYPE_LIMIT in {d.guard for d in second.guard_decisions}
    assert person_of(identity, "loyalty_card:lc-2").person_id != first.person_id
    # Its own blocked value and pattern are junk.
    junk = link(identity, observation("email:bob@example.com", "loyalty_card:lc-0000"),
                observation("email:cy@example.com", "loyalty_card:TEST-9"))
    assert [[d.guard for d in r.guard_decisions] for r in junk] == [[pb.GUARD_KIND_BLOCKED_VALUE]] * 2


def test_create_refuses_taken_and_built_in_names(identity: Stub) -> None:
    _create(identity, type="member_no")
    assert failure(lambda: _create(identity, type="member_no", priority=5)) == (
        grpc.StatusCode.ALREADY_EXISTS, "IDENTIFIER_TYPE_EXISTS", [])
    assert failure(lambda: _create(identity, type="email")) == (
        grpc.StatusCode.ALREADY_EXISTS, "IDENTIFIER_TYPE_BUILT_IN", [])


def test_create_names_every_invalid_field(identity: Stub) -> None:
    code, reason, fields = failure(lambda: _create(
        identity, type="Loyalty Card", normalization=42, priority=5000, max_per_person=-1, hash_values=True,
        blocked_patterns=["^ok$", "(unclosed", "x*"]))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_IDENTIFIER_TYPE")
    assert fields == ["identifier_type.type", "identifier_type.normalization", "identifier_type.priority",
                      "identifier_type.max_per_person", "identifier_type.hash_values",
                      "identifier_type.blocked_patterns[1]", "identifier_type.blocked_patterns[2]"]
    # A blocked value that is not a value of the type could never match: refused, named.
    assert failure(lambda: _create(identity, type="work_email", normalization=pb.NORMALIZATION_EMAIL,
                                    blocked_values=["nobody@example.com", "not an email"]))[2] == [
        "identifier_type.blocked_values[1]"]
    assert failure(lambda: identity.CreateIdentifierType(pb.CreateIdentifierTypeRequest(), timeout=10)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "IDENTIFIER_TYPE_REQUIRED", ["identifier_type"])


def test_update_changes_only_masked_fields_and_refuses_a_stale_etag(identity: Stub) -> None:
    created = _create(identity, type="member_no", display_name="Member", priority=130)
    change = pb.IdentifierType(name="identifierTypes/member_no", display_name="Member number", max_per_person=1,
                               priority=999, etag=created.etag)
    updated = identity.UpdateIdentifierType(pb.UpdateIdentifierTypeRequest(
        identifier_type=change, update_mask=_mask("display_name", "max_per_person")), timeout=30)
    assert (updated.display_name, updated.max_per_person, updated.priority) == ("Member number", 1, 130)
    assert updated.etag != created.etag
    assert _get_type(identity, "member_no") == updated

    def update(message: pb.IdentifierType, *paths: str) -> object:
        return identity.UpdateIdentifierType(pb.UpdateIdentifierTypeRequest(
            identifier_type=message, update_mask=_mask(*paths)), timeout=30)

    assert failure(lambda: update(change, "display_name")) == (grpc.StatusCode.ABORTED, "ETAG_MISMATCH", [])
    fresh = pb.IdentifierType(name="identifierTypes/member_no", etag=updated.etag)
    assert failure(lambda: update(fresh, "normalization", "built_in", "colour")) == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_UPDATE_MASK",
        ["update_mask.paths[0]", "update_mask.paths[1]", "update_mask.paths[2]"])
    assert failure(lambda: update(fresh)) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_UPDATE_MASK",
                                               ["update_mask"])
    bad_pattern = pb.IdentifierType(name="identifierTypes/member_no", blocked_patterns=["[z-a]"])
    assert failure(lambda: update(bad_pattern, "blocked_patterns")) == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_IDENTIFIER_TYPE", ["identifier_type.blocked_patterns[0]"])
    assert failure(lambda: update(pb.IdentifierType(name="identifierTypes/nothing_here"), "priority"))[:2] == (
        grpc.StatusCode.NOT_FOUND, "IDENTIFIER_TYPE_NOT_FOUND")
    assert _get_type(identity, "member_no") == updated  # no failed update changed anything

    # Built-in types can be tuned too (without an etag the update is unconditional), and stay built in.
    cookie = update(pb.IdentifierType(name="identifierTypes/cookie", blocked_values=["ajs-anon-default"]),
                    "blocked_values")
    assert isinstance(cookie, pb.IdentifierType)
    assert (list(cookie.blocked_values), cookie.built_in) == (["ajs-anon-default"], True)
    blocked = link(identity, observation("cookie:ajs-anon-default", "email:dee@example.com"))[0]
    assert [d.guard for d in blocked.guard_decisions] == [pb.GUARD_KIND_BLOCKED_VALUE]


def test_concurrent_updates_with_one_etag_let_exactly_one_win(identity: Stub) -> None:
    etag = _get_type(identity, "crm_id").etag

    def rename(index: int) -> str:
        try:
            identity.UpdateIdentifierType(pb.UpdateIdentifierTypeRequest(
                identifier_type=pb.IdentifierType(name="identifierTypes/crm_id", display_name=f"CRM {index}",
                                                  etag=etag), update_mask=_mask("display_name")), timeout=60)
            return "ok"
        except grpc.RpcError as error:
            code: grpc.StatusCode = error.code()
            return str(code.name)

    with ThreadPoolExecutor(max_workers=6) as pool:
        outcomes = list(pool.map(rename, range(6)))
    assert sorted(outcomes) == ["ABORTED"] * 5 + ["ok"]


# ---- the guard policy ------------------------------------------------------------------------------

def test_guard_policy_reads_and_updates_with_an_etag(identity: Stub) -> None:
    policy = _policy(identity)
    assert policy.name == "guardPolicy"
    assert {"unknown", "null", "undefined", "anonymous", "-1"} <= set(policy.blocked_values)
    assert pb.SharedIdentifierRule(identifier_type="device_id", distinct_type="account_id",
                                   max_distinct=3) in policy.shared_identifier_rules
    stale = pb.GuardPolicy()
    stale.CopyFrom(policy)
    policy.blocked_values.append("Walk-In")
    updated = _update_policy(identity, policy, "blocked_values")
    assert "walk-in" in updated.blocked_values  # compared case-insensitively, so stored lower-cased
    assert updated.blocked_patterns == policy.blocked_patterns
    assert updated.etag != policy.etag and _policy(identity) == updated
    assert failure(lambda: _update_policy(identity, stale, "blocked_values")) == (
        grpc.StatusCode.ABORTED, "ETAG_MISMATCH", [])

    bad = pb.GuardPolicy(etag=updated.etag, blocked_patterns=["^ok$", "*oops"], shared_identifier_rules=[
        pb.SharedIdentifierRule(identifier_type="device_id", distinct_type="shoe_size", max_distinct=2),
        pb.SharedIdentifierRule(identifier_type="cookie", distinct_type="account_id", max_distinct=0)])
    assert failure(lambda: _update_policy(identity, bad, "blocked_patterns", "shared_identifier_rules")) == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_GUARD_POLICY",
        ["guard_policy.blocked_patterns[1]", "guard_policy.shared_identifier_rules[0].distinct_type",
         "guard_policy.shared_identifier_rules[1].max_distinct"])
    assert failure(lambda: _update_policy(identity, updated, "etag"))[2] == ["update_mask.paths[0]"]
    assert failure(lambda: identity.GetGuardPolicy(pb.GetGuardPolicyRequest(name="policies/x"), timeout=10)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_GUARD_POLICY_NAME", ["name"])
    assert _policy(identity) == updated


def test_a_newly_blocked_value_is_not_merged_through_and_old_merges_are_rejudged_on_new_evidence(
        identity: Stub) -> None:
    # Before: a front-desk tablet's cookie merges the guests who used it.
    link(identity, observation("cookie:front-desk-1", "email:amy@example.com"),
         observation("cookie:front-desk-1", "email:ben@example.com"))
    assert person_of(identity, "email:amy@example.com") == person_of(identity, "email:ben@example.com")

    _block(identity, "front-desk-2", "Front-Desk-1")
    results = link(identity, observation("cookie:front-desk-2", "email:cat@example.com"),
                   observation("cookie:front-desk-2", "email:dan@example.com"))
    assert [[d.guard for d in r.guard_decisions] for r in results] == [[pb.GUARD_KIND_BLOCKED_VALUE]] * 2
    assert _apart(identity, "email:cat@example.com", "email:dan@example.com")

    # Persons merged before the change stay merged until new evidence touches their component ...
    amy = person_of(identity, "email:amy@example.com")
    assert {"email:amy@example.com", "email:ben@example.com"} <= members(amy)
    # ... then the component is recomputed under the new policy and the junk value merges nothing.
    link(identity, observation("cookie:front-desk-1", "email:eve@example.com"))
    assert _apart(identity, "email:amy@example.com", "email:ben@example.com")


def test_a_lower_shared_threshold_keeps_accounts_apart(identity: Stub) -> None:
    policy = _policy(identity)
    del policy.shared_identifier_rules[:]
    policy.shared_identifier_rules.add(identifier_type="device_id", distinct_type="account_id", max_distinct=1)
    updated = _update_policy(identity, policy, "shared_identifier_rules")
    assert [(r.identifier_type, r.max_distinct) for r in updated.shared_identifier_rules] == [("device_id", 1)]
    tablet = "device_id:6d92078a-8246-4ba4-ae5b-76104861e7dc"
    link(identity, observation(tablet, "account_id:mum"), observation(tablet, "account_id:dad"))
    assert _apart(identity, "account_id:mum", "account_id:dad")


# ---- a second identity process ----------------------------------------------------------------------

@pytest.fixture
def second_identity(cassandra_settings: CassandraSettings, identity: Stub) -> Iterator[Stub]:
    """Another identity process on the same keyspace (started after the in-process one migrated it)."""
    port = free_port()
    process = start_service_process("identity", port, service_env(cassandra_settings, {"identity": port}))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield pb_grpc.IdentityServiceStub(channel)
    finally:
        process.terminate()
        process.wait(timeout=30)


def _seconds_until(condition: Callable[[], bool], limit: float) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < limit, f"not in force after {limit} s"
        time.sleep(0.1)
    return time.monotonic() - started


def test_another_process_follows_changes_within_the_reload_interval(identity: Stub, second_identity: Stub) -> None:
    bound = RELOAD_INTERVAL_SECONDS + 2.0  # the interval, plus a read and a call on a loaded machine
    _create(identity, type="member_no", normalization=pb.NORMALIZATION_LOWERCASE)

    def links_member_numbers() -> bool:
        try:
            link(second_identity, observation("member_no:M-1", "email:fay@example.com"))
            return True
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.INVALID_ARGUMENT:  # an unknown type, until it reloads
                raise
            return False

    assert _seconds_until(links_member_numbers, bound) < bound
    assert person_of(second_identity, "member_no:m-1") == person_of(identity, "member_no:m-1")

    _block(identity, "lobby-kiosk")
    guest = iter(range(1000))

    def blocks_the_kiosk() -> bool:
        result = link(second_identity, observation("cookie:lobby-kiosk", f"email:guest{next(guest)}@example.com"))
        return [d.guard for d in result[0].guard_decisions] == [pb.GUARD_KIND_BLOCKED_VALUE]

    assert _seconds_until(blocks_the_kiosk, bound) < bound
    # Reads go through to storage, so the second process answers with the change at once.
    assert _policy(second_identity) == _policy(identity)


def test_concurrent_creates_in_two_processes_all_survive(identity: Stub, second_identity: Stub) -> None:
    stubs = [identity, second_identity]
    barrier = threading.Barrier(8)

    def create(index: int) -> str:
        barrier.wait()
        return _create(stubs[index % 2], type=f"partner_{index}_id").type

    with ThreadPoolExecutor(max_workers=8) as pool:
        created = set(pool.map(create, range(8)))
    expected = {f"partner_{i}_id" for i in range(8)}
    assert created == expected
    for stub in stubs:
        listed = stub.ListIdentifierTypes(pb.ListIdentifierTypesRequest(), timeout=10).identifier_types
        assert expected <= {t.type for t in listed}
