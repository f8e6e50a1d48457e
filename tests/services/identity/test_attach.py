"""The attach path (IdentityGraph._attaches_to): evidence that only adds new identifiers to one person, or
links identifiers of one person again, is applied without loading the whole component. It must leave
exactly what a full recomputation would: the stored persons are compared with the pure partition of all
the evidence, and with the persons before a replay under new message ids (which takes that path)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pytest

from services.identity.graph import Evidence, IdentityGraph, RawObservation
from services.identity.identifiers import DEFAULT_BLOCKED_VALUES, GuardPolicy
from services.identity.partition import IdKey, fingerprint, partition
from shared.cassandra import CassandraSession
from tests.services.identity.world import build_world

pytestmark = pytest.mark.integration


def _observations(pairs: Iterable[tuple[str, list[str]]], prefix: str = "") -> list[RawObservation]:
    return [RawObservation([tuple(i.split(":", 1)) for i in ids], Evidence(prefix + message_id, "test"))  # type: ignore[misc]
            for message_id, ids in pairs]


def _stored_persons(session: CassandraSession) -> dict[IdKey, str]:
    return {IdKey(r.id_type, r.id_value): r.person_id
            for r in session.execute("SELECT person_id, id_type, id_value FROM person_identifiers")
            if r.id_type is not None}  # not a partition holding only a person's static columns


def _groups(persons: dict[IdKey, str]) -> list[list[IdKey]]:
    groups: dict[str, list[IdKey]] = {}
    for key, person_id in persons.items():
        groups.setdefault(person_id, []).append(key)
    return list(groups.values())


def _count_attachments(graph: IdentityGraph) -> list[int]:
    """How many components took the attach path since (a spy on our own code, not on the database)."""
    count = [0]
    plan: Callable[..., Any] = graph._plan_attachment

    def counting(*args: Any) -> Any:
        count[0] += 1
        return plan(*args)
    graph._plan_attachment = counting  # type: ignore[method-assign,assignment]
    return count


def _link(graph: IdentityGraph, observations: Sequence[RawObservation], call_size: int = 20) -> None:
    for start in range(0, len(observations), call_size):
        graph.link(observations[start:start + call_size])


def test_attachments_leave_the_partition_a_full_recomputation_would(graph: IdentityGraph,
                                                                      identity_session: CassandraSession) -> None:
    world = build_world(40, seed=5)
    shuffled = list(world.observations)
    random.Random(3).shuffle(shuffled)
    attachments = _count_attachments(graph)
    _link(graph, _observations(shuffled))
    linked = attachments[0]

    keys = {IdKey(*i.split(":", 1)) for _, ids in world.observations for i in ids}
    links = [(IdKey(*a.split(":", 1)), IdKey(*b.split(":", 1)))
             for _, ids in world.observations for a in ids for b in ids if a < b]
    expected = partition(keys, links, graph.registry, graph.policy)
    persons = _stored_persons(identity_session)
    assert fingerprint(_groups(persons)) == fingerprint(expected.groups)
    # New identifiers joining a person one at a time are common in any order of this world.
    assert linked >= len(shuffled) // 10, linked

    # The same links again under new message ids: all of them within one person take the attach path,
    # and nothing changes, person ids included.
    random.Random(4).shuffle(shuffled)
    _link(graph, _observations(shuffled, prefix="again-"))
    assert attachments[0] - linked >= len(shuffled) // 2, attachments[0] - linked
    assert _stored_persons(identity_session) == persons


def test_a_replaced_policy_turns_the_attach_path_off_so_that_old_merges_are_judged_again(
        graph: IdentityGraph, identity_session: CassandraSession) -> None:
    _link(graph, _observations([("m1", ["device_id:DEV-1", "cookie:kiosk-7"]),
                                ("m2", ["device_id:DEV-1", "email:a@x.io"])]))
    before = graph.persons_of([IdKey("cookie", "kiosk-7"), IdKey("email", "a@x.io")])
    assert before[IdKey("cookie", "kiosk-7")] == before[IdKey("email", "a@x.io")] is not None

    attachments = _count_attachments(graph)
    # As IdentitySettings installs a stored policy: a new object.
    graph.policy = GuardPolicy(blocked_values=DEFAULT_BLOCKED_VALUES | {"kiosk-7"})
    # A link the person already has (it would attach under the first policy) ...
    _link(graph, _observations([("m3", ["device_id:DEV-1", "email:a@x.io"])]))
    # ... is judged by a full recomputation under the new one: the now blocked cookie leaves the person.
    assert attachments[0] == 0
    after = graph.persons_of([IdKey("cookie", "kiosk-7"), IdKey("email", "a@x.io")])
    assert after[IdKey("cookie", "kiosk-7")] is None
    assert after[IdKey("email", "a@x.io")] == before[IdKey("email", "a@x.io")]
