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



def _held_by_another_writer(session: CassandraSession, person_id: str) -> tuple[Leases, set[str]]:
    # Another process's leases: a Leases of its own, so this process does not know they are held.
    other = Leases(session)
    keys = {f"p:{person_id}"}
    assert other.acquire_all(keys, "another-writer")
    return other, keys


def test_a_held_component_makes_the_link_wait_until_its_lease_comes_back(
        graph: IdentityGraph, identity_session: CassandraSession) -> None:
    graph.link([RawObservation([("email", "held@x.io"), ("cookie", "c-held")], Evidence("m1"))])
    person = graph.persons_of([IdKey("email", "held@x.io")])[IdKey("email", "held@x.io")]
    assert person
    other, keys = _held_by_another_writer(identity_session, person)
    threading.Timer(1.0, lambda: other.release(keys, "another-writer")).start()
    started = time.monotonic()
    outcome = graph.link([RawObservation([("email", "held@x.io"), ("cookie", "c-new")], Evidence("m2"))])[0]
    assert time.monotonic() - started >= 0.9, "the link did not wait for the other writer"
    assert outcome.person_id == person
    assert graph.persons_of([IdKey("cookie", "c-new")])[IdKey("cookie", "c-new")] == person


def test_a_component_held_past_the_deadline_is_unavailable_and_says_why(
        graph: IdentityGraph, identity_session: CassandraSession) -> None:
    graph.link([RawObservation([("email", "busy@x.io"), ("cookie", "c-busy")], Evidence("m1"))])
    person = graph.persons_of([IdKey("email", "busy@x.io")])[IdKey("email", "busy@x.io")]
    assert person
    other, keys = _held_by_another_writer(identity_session, person)
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
