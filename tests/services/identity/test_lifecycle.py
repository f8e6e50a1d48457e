"""Explain, list, unlink, erase and the change feed, over real gRPC against the real Cassandra."""

from __future__ import annotations

import time
import uuid

import grpc
import pytest
from onecdp.common.v1 import common_pb2
from onecdp.identity.v1 import identity_service_pb2 as pb
from onecdp.identity.v1 import identity_service_pb2_grpc as pb_grpc

from services.identity.feed import SETTLE_SECONDS
from tests.services.identity.conftest import failure, ids, link, members, observation, person_of

pytestmark = pytest.mark.integration

Stub = pb_grpc.IdentityServiceStub


def _explain(stub: Stub, a: str, b: str) -> pb.ExplainLinkResponse:
    (ia,), (ib,) = ids(a), ids(b)
    response: pb.ExplainLinkResponse = stub.ExplainLink(pb.ExplainLinkRequest(a=ia, b=ib), timeout=10)
    return response


def _all_changes(stub: Stub) -> list[pb.IdentityChange]:
    time.sleep(SETTLE_SECONDS + 0.2)  # changes become readable once they have settled
    changes, token = [], ""
    while True:
        page = stub.ListIdentityChanges(pb.ListIdentityChangesRequest(page_size=2, page_token=token), timeout=10)
        changes.extend(page.changes)
        assert page.next_page_token
        if not page.changes:
            return changes
        token = page.next_page_token


def test_explain_shows_the_chain_with_provenance(identity: Stub) -> None:
    link(identity, observation("cookie:c-1", "device_id:dev-1", message_id="web-1", source="web"))
    link(identity, observation("device_id:dev-1", "account_id:dana", message_id="app-7", source="app"))
    result = _explain(identity, "cookie:c-1", "account_id:dana")
    assert result.same_person and result.person_id_a == result.person_id_b
    assert [(getattr(s, "from").value, s.to.value) for s in result.path] == [("c-1", "DEV-1"), ("DEV-1", "dana")]
    assert [e.message_id for s in result.path for e in s.evidence] == ["web-1", "app-7"]
    assert "same person" in result.summary


def test_explain_names_the_guard_that_kept_two_people_apart(identity: Stub) -> None:
    for i in range(4):
        link(identity, observation("device_id:kiosk-1", f"account_id:shopper{i}"))
    result = _explain(identity, "account_id:shopper0", "account_id:shopper1")
    assert not result.same_person and len(result.path) == 2
    assert [g.guard for g in result.blocking_guards] == [pb.GUARD_KIND_SHARED_IDENTIFIER]
    unrelated = _explain(identity, "account_id:shopper0", "cookie:nobody")
    assert not unrelated.same_person and not unrelated.path and "no observed evidence" in unrelated.summary


def test_list_person_identifiers_counts_observations(identity: Stub) -> None:
    link(identity, observation("email:e@x.io", "cookie:k1"), observation("email:e@x.io", "cookie:k2"))
    person = person_of(identity, "cookie:k1")
    listed = identity.ListPersonIdentifiers(pb.ListPersonIdentifiersRequest(person_id=person.person_id, page_size=2))
    rest = identity.ListPersonIdentifiers(pb.ListPersonIdentifiersRequest(
        person_id=person.person_id, page_token=listed.next_page_token))
    by_value = {i.identifier.value: i for i in [*listed.identifiers, *rest.identifiers]}
    assert set(by_value) == {"e@x.io", "k1", "k2"} and not rest.next_page_token
    assert by_value["e@x.io"].observation_count == 2 and by_value["k1"].observation_count == 1
    assert by_value["e@x.io"].first_seen_time.ToDatetime() <= by_value["e@x.io"].last_seen_time.ToDatetime()


def test_a_person_identifiers_page_token_pages_its_own_request_only(identity: Stub) -> None:
    link(identity, observation("email:tok-a@x.io", "cookie:tok-a1", "cookie:tok-a2"))
    link(identity, observation("email:tok-b@x.io", "cookie:tok-b1", "cookie:tok-b2"))
    mine, other = person_of(identity, "cookie:tok-a1").person_id, person_of(identity, "cookie:tok-b1").person_id

    def listing(person_id: str, token: str) -> pb.ListPersonIdentifiersResponse:
        response: pb.ListPersonIdentifiersResponse = identity.ListPersonIdentifiers(
            pb.ListPersonIdentifiersRequest(person_id=person_id, page_size=1, page_token=token), timeout=10)
        return response

    pages: list[list[str]] = []
    token = ""
    while not pages or token:
        page = listing(mine, token)
        pages.append([f"{i.identifier.type}:{i.identifier.value}" for i in page.identifiers])
        token = page.next_page_token
    assert pages == [["cookie:tok-a1"], ["cookie:tok-a2"], ["email:tok-a@x.io"]]
    first = listing(mine, "").next_page_token
    # Another person's request, a bare offset, a changed token or no token at all: refused, naming the field.
    for token in (first, "1", "0", first[:-2] + ("AA" if first[-2:] != "AA" else "BB"), "not a token"):
        person = other if token == first else mine
        assert failure(lambda: listing(person, token)) == (  # noqa: B023 (called at once)
            grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN", ["page_token"]), token
    # Identifier types page with tokens of their own list only.
    types = identity.ListIdentifierTypes(pb.ListIdentifierTypesRequest(page_size=2), timeout=10)
    assert failure(lambda: identity.ListIdentifierTypes(pb.ListIdentifierTypesRequest(page_token="2"), timeout=10)
                   ) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN", ["page_token"])
    assert failure(lambda: listing(mine, types.next_page_token)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN", ["page_token"])

def test_unlink_a_pair_splits_the_person_and_is_recorded(identity: Stub) -> None:
    link(identity, observation("account_id:erin", "device_id:dev-9"))
    before = link(identity, observation("device_id:dev-9", "cookie:ck-9"))[0].person_id
    (a,), (b,) = ids("account_id:erin"), ids("device_id:dev-9")
    request_id = str(uuid.uuid4())
    response = identity.UnlinkIdentifiers(pb.UnlinkIdentifiersRequest(
        link=pb.IdentifierPair(a=a, b=b), reason="support ticket 17", request_id=request_id))
    assert len(response.person_ids) == 2 and before in response.person_ids
    assert response.change.type == pb.IDENTITY_CHANGE_TYPE_SPLIT and response.change.reason == "support ticket 17"
    assert person_of(identity, "account_id:erin").person_id != person_of(identity, "cookie:ck-9").person_id
    retried = identity.UnlinkIdentifiers(pb.UnlinkIdentifiersRequest(
        link=pb.IdentifierPair(a=a, b=b), reason="support ticket 17", request_id=request_id))
    assert retried == response
    with pytest.raises(grpc.RpcError) as error:
        identity.UnlinkIdentifiers(pb.UnlinkIdentifiersRequest(link=pb.IdentifierPair(a=a, b=b)))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_unlink_by_message_retracts_it_and_a_replay_stays_retracted(identity: Stub) -> None:
    link(identity, observation("cookie:z1", "email:z@z.io", message_id="bad-import"))
    identity.UnlinkIdentifiers(pb.UnlinkIdentifiersRequest(message_id="bad-import"))
    assert person_of(identity, "cookie:z1").person_id != person_of(identity, "email:z@z.io").person_id
    replay = link(identity, observation("cookie:z1", "email:z@z.io", message_id="bad-import"))[0]
    assert replay.duplicate
    assert person_of(identity, "cookie:z1").person_id != person_of(identity, "email:z@z.io").person_id


def test_unlink_an_identifier_detaches_it(identity: Stub) -> None:
    link(identity, observation("phone:+1 212 555 0199", "email:f@f.io", "cookie:f1"))
    (phone,) = ids("phone:+12125550199")
    identity.UnlinkIdentifiers(pb.UnlinkIdentifiersRequest(identifier=phone))
    assert members(person_of(identity, "phone:+12125550199")) == {"phone:+12125550199"}
    assert members(person_of(identity, "email:f@f.io")) == {"email:f@f.io", "cookie:f1"}


def test_erase_removes_everything_and_a_tombstone_stops_late_events(identity: Stub) -> None:
    link(identity, observation("email:gone@x.io", "cookie:g1"), observation("cookie:g1", "device_id:dev-g"))
    person = person_of(identity, "email:gone@x.io").person_id
    erased = identity.ErasePerson(pb.ErasePersonRequest(
        person=common_pb2.PersonSelector(person_id=person), reason="GDPR art. 17"))
    assert erased.person_id == person and erased.erased_identifier_count == 3
    assert erased.change.type == pb.IDENTITY_CHANGE_TYPE_ERASE
    for pair in ("email:gone@x.io", "cookie:g1", "device_id:dev-g"):
        with pytest.raises(grpc.RpcError) as error:
            person_of(identity, pair)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as error:
        identity.LookupPerson(pb.LookupPersonRequest(person=common_pb2.PersonSelector(person_id=person)))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    late = link(identity, observation("email:gone@x.io", "cookie:new"))[0]
    assert [d.guard for d in late.guard_decisions] == [pb.GUARD_KIND_ERASED]
    assert members(person_of(identity, "cookie:new")) == {"cookie:new"}
    (email,) = ids("email:gone@x.io")
    identity.DeleteErasureTombstone(pb.DeleteErasureTombstoneRequest(identifier=email))
    link(identity, observation("email:gone@x.io", "cookie:new"))
    assert members(person_of(identity, "cookie:new")) == {"cookie:new", "email:gone@x.io"}


def test_change_feed_lists_merges_splits_and_erasures_in_order(identity: Stub) -> None:
    link(identity, observation("cookie:h1", "device_id:dev-h1"))
    link(identity, observation("cookie:h2", "device_id:dev-h2"))
    merged = link(identity, observation("device_id:dev-h1", "device_id:dev-h2"))[0]
    (a,), (b,) = ids("device_id:dev-h1"), ids("device_id:dev-h2")
    identity.UnlinkIdentifiers(pb.UnlinkIdentifiersRequest(link=pb.IdentifierPair(a=a, b=b)))
    identity.ErasePerson(pb.ErasePersonRequest(person=common_pb2.PersonSelector(person_id=merged.person_id)))
    changes = _all_changes(identity)
    assert [c.type for c in changes] == [pb.IDENTITY_CHANGE_TYPE_MERGE, pb.IDENTITY_CHANGE_TYPE_SPLIT,
                                         pb.IDENTITY_CHANGE_TYPE_ERASE]
    assert changes[0].result_person_ids == [merged.person_id]
    cursors = [c.cursor for c in changes]
    resumed = identity.ListIdentityChanges(pb.ListIdentityChangesRequest(page_token=cursors[0]))
    assert [c.cursor for c in resumed.changes] == cursors[1:]
    watch = identity.WatchIdentityChanges(pb.WatchIdentityChangesRequest(cursor=cursors[0]), timeout=5)
    assert [next(watch).cursor, next(watch).cursor] == cursors[1:]
    watch.cancel()
    with pytest.raises(grpc.RpcError) as error:
        identity.ListIdentityChanges(pb.ListIdentityChangesRequest(page_token="not-a-cursor"))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_cursor_later_than_now_is_refused_and_a_fresh_one_is_taken(identity: Stub) -> None:
    # A cursor is a position the feed handed out, so never later than now: a follower that stored one far
    # ahead would skip every change until then. The cursor of a change just recorded is taken at once.
    far = "ffffffff-ffff-1fff-8000-02fc00000001"
    for token in (far, far + "+unsettled"):
        assert failure(lambda token=token: identity.ListIdentityChanges(  # type: ignore[misc]
            pb.ListIdentityChangesRequest(page_token=token), timeout=10)) == (
            grpc.StatusCode.INVALID_ARGUMENT, "INVALID_CURSOR", ["page_token"]), token
    watch = identity.WatchIdentityChanges(pb.WatchIdentityChangesRequest(cursor=far), timeout=10)
    assert failure(lambda: next(watch)) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_CURSOR", ["cursor"])
    link(identity, observation("cookie:cur-1"), observation("cookie:cur-2"))
    merged = link(identity, observation("cookie:cur-1", "cookie:cur-2"))[0]
    fresh = identity.ListIdentityChanges(pb.ListIdentityChangesRequest(page_token=merged.changes[0].cursor),
                                         timeout=10)
    assert fresh.next_page_token == merged.changes[0].cursor
