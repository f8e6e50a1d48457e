"""Erasing the person of a shared identifier recomputes its many neighbours each on its own, and never fails
the erasure it has committed."""

from __future__ import annotations

import time
import uuid

import grpc
import pytest
from onecdp.common.v1 import common_pb2
from onecdp.identity.v1 import identity_service_pb2 as pb
from onecdp.identity.v1 import identity_service_pb2_grpc as pb_grpc

from services.identity import graph as graph_module
from services.identity.graph import Evidence, IdentityGraph, RawObservation
from services.identity.partition import IdKey
from shared.errors import ResourceExhausted
from tests.services.identity.conftest import link, observation

pytestmark = pytest.mark.integration

ACCOUNTS = 12


def _shared_device(graph: IdentityGraph, device: str) -> str:
    graph.link([RawObservation([("device_id", device), ("account_id", f"{device}-acct-{i}")], Evidence(f"{device}-{i}"))
                for i in range(ACCOUNTS)])
    key = IdKey("device_id", device.upper())
    person_id = graph.persons_of([key])[key]
    assert person_id and graph.person_members(person_id) == [key]  # shared: a person of its own
    return person_id


def test_erasing_a_device_shared_by_more_accounts_than_a_component_may_hold_succeeds(
        graph: IdentityGraph, monkeypatch: pytest.MonkeyPatch) -> None:
    person_id = _shared_device(graph, "dev-many")
    # Fewer than the accounts the device was seen with: each account is a component of its own, all of them
    # together are not.
    monkeypatch.setattr(graph_module, "MAX_COMPONENT_IDENTIFIERS", ACCOUNTS - 2)
    erasure = graph.erase(person_id, allow_relink=False, reason="privacy request")
    assert erasure.person_id == person_id and erasure.link_count == ACCOUNTS
    accounts = [IdKey("account_id", f"dev-many-acct-{i}") for i in range(ACCOUNTS)]
    holders = graph.persons_of(accounts)
    assert all(holders.values()) and len(set(holders.values())) == ACCOUNTS


@pytest.mark.parametrize("error", [ResourceExhausted("the component is too large", reason="COMPONENT_TOO_LARGE"),
                                   RuntimeError("a bug")], ids=["too-large", "bug"])
def test_a_neighbour_that_cannot_be_recomputed_does_not_fail_the_committed_erasure(
        graph: IdentityGraph, monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    device = f"dev-fails-{type(error).__name__.lower()}"
    person_id = _shared_device(graph, device)

    def failing(*args: object, **kwargs: object) -> None:
        raise error
    monkeypatch.setattr(graph, "reconcile_many", failing)
    erasure = graph.erase(person_id, allow_relink=False, reason="privacy request")
    assert erasure.person_id == person_id and erasure.change.source_person_ids == [person_id]
    key = IdKey("device_id", device.upper())
    assert graph.persons_of([key]) == {key: None}


def test_a_retry_after_the_neighbour_recheck_used_up_the_deadline_answers_the_erasure(
        identity: pb_grpc.IdentityServiceStub, monkeypatch: pytest.MonkeyPatch) -> None:
    """The request_id is remembered once the erasure is committed, before the tidy-up: a call whose deadline
    passes while the neighbours are recomputed is retried with its request_id and learns of the erasure (it used
    to answer NOT_FOUND: the person was gone and the request_id never remembered)."""
    (linked,) = link(identity, observation("device_id:dev-slow", "account_id:slow-acct"))
    original = IdentityGraph._reconcile_neighbours

    def slow(self: IdentityGraph, outside: set[IdKey], reason: str) -> None:
        time.sleep(1.5)  # past the call's deadline
        original(self, outside, reason)
    monkeypatch.setattr(IdentityGraph, "_reconcile_neighbours", slow)
    request = pb.ErasePersonRequest(person=common_pb2.PersonSelector(person_id=linked.person_id),
                                    request_id=str(uuid.uuid4()), reason="privacy request")
    with pytest.raises(grpc.RpcError) as late:
        identity.ErasePerson(request, timeout=1.0)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    time.sleep(1.0)  # the first call's handler finishes
    retried = identity.ErasePerson(request, timeout=10)
    assert retried.person_id == linked.person_id and retried.erased_identifier_count == 2
