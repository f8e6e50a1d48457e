"""An observation that passed the tombstone check just before an erasure must not bring the identifier back."""

from __future__ import annotations

import pytest

from services.identity.graph import Evidence, GuardKind, IdentityGraph, RawObservation
from services.identity.partition import IdKey

pytestmark = pytest.mark.integration



def test_evidence_appended_after_an_erasure_is_dropped_under_the_lease(graph: IdentityGraph) -> None:
    email, cookie, late_cookie = IdKey("email", "gone@x.io"), IdKey("cookie", "c1"), IdKey("cookie", "late")
    graph.link([RawObservation([("email", "gone@x.io"), ("cookie", "c1")], Evidence("m1"))])
    person = graph.persons_of([email])[email]
    assert person
    graph.erase(person, allow_relink=False, reason="test")
    # The late observation checked the tombstones before the erasure wrote them, and appends its
    # evidence after the erasure finished: what link() does between its check and its recomputation.
    graph._start_appending_evidence([([email, late_cookie], Evidence("m2"))])()
    reconciled = graph.reconcile({email, late_cookie}, "late observation")
    assert reconciled.erased == {email}
    assert graph.persons_of([email, cookie]) == {email: None, cookie: None}
    assert graph.neighbours_of(email) == set() and graph.neighbours_of(late_cookie) == set()
    assert graph.persons_of([late_cookie])[late_cookie]
    # A call that sees the tombstone at once says so.
    outcome = graph.link([RawObservation([("email", "gone@x.io"), ("cookie", "late")], Evidence("m3"))])[0]
    assert [d.guard for d in outcome.guard_decisions] == [GuardKind.ERASED]


def test_a_seed_the_caller_found_assigned_and_that_was_erased_since_is_dropped_under_the_lease(
        graph: IdentityGraph) -> None:
    email, late_cookie = IdKey("email", "went@x.io"), IdKey("cookie", "later")
    graph.link([RawObservation([("email", "went@x.io"), ("cookie", "c2")], Evidence("m1"))])
    person = graph.persons_of([email])[email]
    assert person
    # The caller read the email's person (and no tombstone) just before the erasure, and appended its
    # evidence just after it: only identifiers found without a person are checked alongside the
    # load, so this one must be checked once it is found without one.
    graph.erase(person, allow_relink=False, reason="test")
    graph._start_appending_evidence([([email, late_cookie], Evidence("m2"))])()
    reconciled = graph.reconcile_many([{email, late_cookie}], ["late observation"],
                                      persons={email: person, late_cookie: None})[0]
    assert reconciled.erased == {email}
    assert graph.persons_of([email])[email] is None
    assert graph.neighbours_of(email) == set() and graph.neighbours_of(late_cookie) == set()
    assert graph.persons_of([late_cookie])[late_cookie]


def test_a_call_replaying_erased_identifiers_links_none_of_them_and_records_without_them(
        graph: IdentityGraph) -> None:
    first, second = IdKey("email", "one@x.io"), IdKey("phone", "+14155550123")
    graph.link([RawObservation([("email", "one@x.io"), ("cookie", "o1")], Evidence("e1")),
                RawObservation([("phone", "+1 415 555 0123"), ("cookie", "o2")], Evidence("e2"))])
    for key in (first, second):
        person = graph.persons_of([key])[key]
        assert person
        graph.erase(person, allow_relink=False, reason="test")
    # One call: two late observations of erased identifiers (checked under the leases, together) and
    # one that has nothing to do with them.
    outcomes = graph.link([RawObservation([("email", "one@x.io"), ("cookie", "n1")], Evidence("late-1")),
                           RawObservation([("phone", "+1 415 555 0123"), ("cookie", "n2")], Evidence("late-2")),
                           RawObservation([("cookie", "n3"), ("device_id", "dev-3")], Evidence("late-3"))])
    assert [[(d.identifier, d.guard) for d in o.guard_decisions] for o in outcomes] == [
        [(first, GuardKind.ERASED)], [(second, GuardKind.ERASED)], []]
    assert graph.persons_of([first, second]) == {first: None, second: None}
    assert graph.neighbours_of(first) == set() and graph.neighbours_of(second) == set()
    assert graph.neighbours_of(IdKey("cookie", "n1")) == set()
    assert graph.neighbours_of(IdKey("cookie", "n3")) == {IdKey("device_id", "DEV-3")}
    new_persons = graph.persons_of([IdKey("cookie", "n1"), IdKey("cookie", "n2"), IdKey("cookie", "n3")])
    assert all(new_persons.values()) and len(set(new_persons.values())) == 3
    # An observation dropped for an erasure is not recorded as applied: a replay is judged again (dropped again
    # while the tombstone stands; linked once it is lifted), not answered as a duplicate of nothing.
    replayed = graph.link([RawObservation([("email", "one@x.io"), ("cookie", "n1")], Evidence("late-1"))])[0]
    assert not replayed.duplicate
    assert [(d.identifier, d.guard) for d in replayed.guard_decisions] == [(first, GuardKind.ERASED)]
    assert replayed.person_id == new_persons[IdKey("cookie", "n1")]
