"""A link whose component another writer holds waits for it, and gives up within the caller's deadline."""

from __future__ import annotations

import threading
import time

import pytest

from services.identity.graph import Evidence, IdentityGraph, RawObservation
from services.identity.leases import Leases
from services.identity.partition import IdKey
from shared import deadline
from shared.cassandra import CassandraSession
from shared.errors import Unavailable

pytestmark = pytest.mark.integration



def _linked_and_held(graph: IdentityGraph, session: CassandraSession,
                     name: str) -> tuple[str, tuple[Leases, set[str]]]:
    """A person of `name`@x.io and cookie c-`name`, whose lease another writer then holds."""
    graph.link([RawObservation([("email", f"{name}@x.io"), ("cookie", f"c-{name}")], Evidence("m1"))])
    person = graph.persons_of([IdKey("email", f"{name}@x.io")])[IdKey("email", f"{name}@x.io")]
    assert person
    return person, _held_by_another_writer(session, person)


def _held_by_another_writer(session: CassandraSession, person_id: str) -> tuple[Leases, set[str]]:
    # Another process's leases: a Leases of its own, so this process does not know they are held.
    other = Leases(session)
    keys = {f"p:{person_id}"}
    assert other.acquire_all(keys, "another-writer")
    return other, keys


def test_a_held_component_makes_the_link_wait_until_its_lease_comes_back(
        graph: IdentityGraph, identity_session: CassandraSession) -> None:
    person, (other, keys) = _linked_and_held(graph, identity_session, "held")
    threading.Timer(1.0, lambda: other.release(keys, "another-writer")).start()
    started = time.monotonic()
    outcome = graph.link([RawObservation([("email", "held@x.io"), ("cookie", "c-new")], Evidence("m2"))])[0]
    assert time.monotonic() - started >= 0.9, "the link did not wait for the other writer"
    assert outcome.person_id == person
    assert graph.persons_of([IdKey("cookie", "c-new")])[IdKey("cookie", "c-new")] == person


def test_a_component_held_past_the_deadline_is_unavailable_and_says_why(
        graph: IdentityGraph, identity_session: CassandraSession) -> None:
    person, (other, keys) = _linked_and_held(graph, identity_session, "busy")
    try:
        with deadline.deadline_after(1.5), pytest.raises(Unavailable) as raised:
            graph.link([RawObservation([("email", "busy@x.io"), ("cookie", "c-late")], Evidence("m2"))])
        assert raised.value.reason == "COMPONENT_CONTENDED"
    finally:
        other.release(keys, "another-writer")
    # The evidence was appended before the wait: the retried call links it, and counts it once.
    outcome = graph.link([RawObservation([("email", "busy@x.io"), ("cookie", "c-late")], Evidence("m2"))])[0]
    assert outcome.person_id == person or outcome.duplicate
    assert graph.persons_of([IdKey("cookie", "c-late")])[IdKey("cookie", "c-late")] == person
