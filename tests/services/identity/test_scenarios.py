"""The product brief's identity scenarios, over real gRPC against the real Cassandra."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from onecdp.common.v1 import common_pb2
from onecdp.identity.v1 import identity_service_pb2 as pb
from onecdp.identity.v1 import identity_service_pb2_grpc as pb_grpc

from tests.services.identity.conftest import link, members, observation, person_of

pytestmark = pytest.mark.integration

Stub = pb_grpc.IdentityServiceStub


def test_multi_device_one_account_is_one_person(identity: Stub) -> None:
    link(identity, observation("device_id:idfa-phone", "cookie:c-web"))
    link(identity, observation("device_id:idfa-phone", "account_id:alice"))
    link(identity, observation("device_id:oaid-tablet", "account_id:alice"))
    person = person_of(identity, "cookie:c-web")
    assert members(person) == {"device_id:IDFA-PHONE", "cookie:c-web", "account_id:alice", "device_id:OAID-TABLET"}
    assert person_of(identity, "device_id:oaid-tablet").person_id == person.person_id


def test_one_device_many_accounts_is_shared_and_merges_no_accounts(identity: Stub) -> None:
    accounts = [f"account_id:user{i}" for i in range(5)]
    for account in accounts:
        link(identity, observation(account, f"email:{account.split(':')[1]}@example.com"))
        result = link(identity, observation("device_id:family-tablet", account))[0]
    persons = {person_of(identity, account).person_id for account in accounts}
    assert len(persons) == 5
    # After the 4th distinct account the tablet is shared: it belongs to none of them, and says why.
    shared = [d for d in result.guard_decisions if d.guard == pb.GUARD_KIND_SHARED_IDENTIFIER]
    assert shared and shared[0].identifier.value == "FAMILY-TABLET"
    for account in accounts:
        assert "device_id:FAMILY-TABLET" not in members(person_of(identity, account))


def test_many_accounts_of_one_person_join_through_phone_and_email(identity: Stub) -> None:
    link(identity, observation("account_id:app-42", "phone:+86 138 0013 8000"))
    link(identity, observation("crm_id:CRM-9", "phone:+8613800138000"))
    link(identity, observation("wechat_unionid:o6_bmasdasdsad6_2sgVt7hMZOPfL", "email:Li.Wei@Example.COM"))
    link(identity, observation("email:li.wei@example.com", "phone:+86 13800138000"))
    person = person_of(identity, "crm_id:CRM-9")
    assert members(person) == {"account_id:app-42", "crm_id:CRM-9", "phone:+8613800138000",
                               "wechat_unionid:o6_bmasdasdsad6_2sgVt7hMZOPfL", "email:li.wei@example.com"}


def test_login_logout_on_a_shared_device_keeps_accounts_apart(identity: Stub) -> None:
    # Alice logs in on the family laptop, logs out; Bob logs in on the same laptop.
    link(identity, observation("device_id:laptop-1", "cookie:session-a"))
    link(identity, observation("cookie:session-a", "account_id:alice"))
    link(identity, observation("device_id:laptop-1", "cookie:session-b"))
    result = link(identity, observation("cookie:session-b", "account_id:bob"))[0]
    alice, bob = person_of(identity, "account_id:alice"), person_of(identity, "account_id:bob")
    assert alice.person_id != bob.person_id
    assert "cookie:session-a" in members(alice) and "cookie:session-b" in members(bob)
    # The laptop goes to at most one of them; the link that would join two accounts is refused and said so.
    assert not ("device_id:LAPTOP-1" in members(alice) and "device_id:LAPTOP-1" in members(bob))
    assert any(d.guard == pb.GUARD_KIND_TYPE_LIMIT for d in result.guard_decisions) or \
        "device_id:LAPTOP-1" in members(alice)


def test_junk_values_link_nothing(identity: Stub) -> None:
    result = link(identity, observation("device_id:00000000-0000-0000-0000-000000000000", "account_id:a1"),
                  observation("device_id:00000000-0000-0000-0000-000000000000", "account_id:a2"),
                  observation("cookie:undefined", "account_id:a3"))
    assert {d.guard for r in result for d in r.guard_decisions} == {pb.GUARD_KIND_BLOCKED_VALUE}
    persons = {person_of(identity, f"account_id:a{i}").person_id for i in (1, 2, 3)}
    assert len(persons) == 3
    with pytest.raises(grpc.RpcError) as error:
        person_of(identity, "cookie:undefined")
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_merge_moves_to_the_oldest_person_and_the_merged_id_redirects(identity: Stub) -> None:
    first = link(identity, observation("cookie:c1", "device_id:dev-1"))[0].person_id
    second = link(identity, observation("cookie:c2", "device_id:dev-2"))[0].person_id
    assert first != second
    link(identity, observation("device_id:dev-1", "account_id:carol"))
    merged = link(identity, observation("device_id:dev-2", "account_id:carol"))[0]
    assert merged.person_id == first and list(merged.merged_person_ids) == [second]
    looked_up = identity.LookupPerson(pb.LookupPersonRequest(person=common_pb2.PersonSelector(person_id=second)))
    assert looked_up.person_id == first and looked_up.redirected_from == second
    assert second in looked_up.merged_person_ids


def test_a_replayed_observation_is_a_duplicate_and_changes_nothing(identity: Stub) -> None:
    original = link(identity, observation("cookie:r1", "email:r@example.com", message_id="replay-1"))[0]
    replay = link(identity, observation("cookie:r1", "email:r@example.com", message_id="replay-1"))[0]
    assert replay.duplicate and not original.duplicate
    assert replay.person_id == original.person_id


def test_a_replay_with_a_different_payload_answers_what_was_applied(identity: Stub) -> None:
    original = link(identity, observation("cookie:r2", "email:R2@Example.com", message_id="replay-2"))[0]
    replay = link(identity, observation("cookie:r2-other", "crm_id:r2-other", message_id="replay-2"))[0]
    assert replay.duplicate and replay.person_id == original.person_id
    assert [(i.type, i.value) for i in replay.normalized_identifiers] == [
        ("cookie", "r2"), ("email", "r2@example.com")]
    # The replay's own identifiers were not linked.
    with pytest.raises(grpc.RpcError) as missing:
        person_of(identity, "crm_id:r2-other")
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


def test_invalid_identifiers_name_the_field_and_link_nothing(identity: Stub) -> None:
    with pytest.raises(grpc.RpcError) as error:
        link(identity, observation("cookie:fine", "email:not-an-email"), observation("shoe_size:42", "cookie:x"))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(error.value)
    assert status is not None
    violations = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            violations = {v.field: v.description for v in bad_request.field_violations}
    assert set(violations) == {"observations[0].identifiers[1].value", "observations[1].identifiers[0].type"}
    with pytest.raises(grpc.RpcError) as missing:
        person_of(identity, "cookie:fine")
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
