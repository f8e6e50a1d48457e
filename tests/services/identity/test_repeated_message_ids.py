"""A message id repeated within the observations applied together is applied once, the later ones answered
as replays of the first, as a replay in a later call is."""

from __future__ import annotations

import grpc
import pytest
from onecdp.common.v1 import common_pb2
from onecdp.identity.v1 import identity_service_pb2 as pb
from onecdp.identity.v1 import identity_service_pb2_grpc as pb_grpc

from services.identity.graph import Evidence, IdentityGraph, RawObservation
from services.identity.partition import IdKey
from tests.services.identity.conftest import ids, link, members, observation, person_of

pytestmark = pytest.mark.integration

Stub = pb_grpc.IdentityServiceStub


def _linked(identity: Stub, a: str, b: str) -> bool:
    (first,), (second,) = ids(a), ids(b)
    return bool(identity.ExplainLink(pb.ExplainLinkRequest(a=first, b=second), timeout=10).same_person)


def test_a_message_id_repeated_in_one_call_is_applied_once(identity: Stub) -> None:
    first, repeated = link(identity, observation("cookie:rm-i", "account_id:rm-ia", message_id="rm-M"),
                           observation("cookie:rm-j", "account_id:rm-ja", message_id="rm-M"))
    assert not first.duplicate and repeated.duplicate
    assert not first.other_identifiers and repeated.other_identifiers  # the id was reused for another message
    assert [f"{i.type}:{i.value}" for i in repeated.normalized_identifiers] == [
        f"{i.type}:{i.value}" for i in first.normalized_identifiers]
    assert repeated.person_id == first.person_id and not repeated.changes
    assert members(person_of(identity, "cookie:rm-i")) == {"cookie:rm-i", "account_id:rm-ia"}
    assert not _linked(identity, "cookie:rm-j", "account_id:rm-ja")
    with pytest.raises(grpc.RpcError) as caught:
        person_of(identity, "cookie:rm-j")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    # A replay in a later call answers the same.
    (later,) = link(identity, observation("cookie:rm-j", "account_id:rm-ja", message_id="rm-M"))
    assert later.duplicate and later.normalized_identifiers == first.normalized_identifiers and later.other_identifiers
    (same,) = link(identity, observation("account_id:rm-ia", "cookie:rm-i", message_id="rm-M"))
    assert same.duplicate and not same.other_identifiers  # a true replay, whatever the order
    # Unlinking by the message id retracts everything it linked.
    identity.UnlinkIdentifiers(pb.UnlinkIdentifiersRequest(message_id="rm-M"), timeout=30)
    assert not _linked(identity, "cookie:rm-i", "account_id:rm-ia")


def test_a_message_id_repeated_across_combined_calls_is_applied_once(graph: IdentityGraph) -> None:
    calls = [([RawObservation([("cookie", f"rc-{x}"), ("account_id", f"rc-{x}a")], Evidence("rc-M"))], )
             for x in ("i", "j")]
    normalized = [graph.normalize_observations(observations) for (observations,) in calls]
    # What the combiner does with two calls arriving together: one batch of both.
    (first,), (repeated,) = graph._link_calls([(c[0], n) for c, n in zip(calls, normalized, strict=True)])
    assert not first.duplicate and repeated.duplicate and repeated.normalized == first.normalized
    cookie_j = IdKey("cookie", "rc-j")
    assert graph.persons_of([cookie_j])[cookie_j] is None and graph.neighbours_of(cookie_j) == set()


def test_a_repeat_of_an_observation_dropped_for_an_erasure_is_applied_as_its_own(identity: Stub) -> None:
    """The first observation of message id M names an erased identifier: it links nothing and M is not applied.
    A repeat of M in the same call, of other identifiers, is then the first of M to be applied (it used to be
    answered with the first's identifiers and its erased guard, linking nothing)."""
    (gone,) = link(identity, observation("cookie:rd-gone", "email:rd-gone@x.io"))
    identity.ErasePerson(pb.ErasePersonRequest(person=common_pb2.PersonSelector(person_id=gone.person_id),
                                               reason="test"), timeout=30)
    dropped, repeat = link(identity, observation("cookie:rd-gone", "cookie:rd-new", message_id="rd-M"),
                           observation("cookie:rd-y1", "account_id:rd-y2", message_id="rd-M"))
    assert [d.guard for d in dropped.guard_decisions] == [pb.GUARD_KIND_ERASED] and not dropped.duplicate
    assert not repeat.duplicate and not repeat.other_identifiers and not repeat.guard_decisions
    assert {f"{i.type}:{i.value}" for i in repeat.normalized_identifiers} == {"cookie:rd-y1", "account_id:rd-y2"}
    assert members(person_of(identity, "cookie:rd-y1")) == {"cookie:rd-y1", "account_id:rd-y2"}
    (replayed,) = link(identity, observation("cookie:rd-y1", "account_id:rd-y2", message_id="rd-M"))
    assert replayed.duplicate and not replayed.other_identifiers
