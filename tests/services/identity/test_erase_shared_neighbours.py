"""Erasing the person of a shared identifier recomputes its many neighbours each on its own, and never fails
the erasure it has committed."""

from __future__ import annotations

import pytest

from services.identity import graph as graph_module
from services.identity.graph import Evidence, IdentityGraph, RawObservation
from services.identity.partition import IdKey
from shared.errors import ResourceExhausted

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
