"""A person's own columns kept with its members (schema 0004), and persons stored before that version."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.identity.graph import Evidence, IdentityGraph, RawObservation
from services.identity.partition import IdKey
from shared.cassandra import CassandraSession

pytestmark = pytest.mark.integration


def _link(graph: IdentityGraph, message_id: str, *pairs: tuple[str, str]) -> str:
    return graph.link([RawObservation(list(pairs), Evidence(message_id))])[0].person_id


def test_a_person_is_read_with_its_members_alone(graph: IdentityGraph, identity_session: CassandraSession) -> None:
    winner = _link(graph, "m1", ("email", "ann@x.io"), ("cookie", "a1"))
    loser = _link(graph, "m2", ("phone", "+14155550100"), ("cookie", "a2"))
    assert _link(graph, "m3", ("cookie", "a1"), ("cookie", "a2")) == winner
    # Persons created since schema 0004 have no `persons` rows: their members' partitions alone give
    # the persons, the redirect and the merge history, in the one request a lookup makes.
    assert identity_session.execute("SELECT count(*) AS rows FROM persons").one().rows == 0
    person = graph.get_person(loser)
    assert (person.person_id, person.redirected_from, person.merged_person_ids) == (winner, loser, [loser])
    assert set(person.identifiers) == {IdKey("email", "ann@x.io"), IdKey("cookie", "a1"), IdKey("cookie", "a2"),
                                       IdKey("phone", "+14155550100")}
    assert person.create_time is not None and person.update_time is not None
    assert graph.person_members(loser) == []


def test_persons_stored_before_the_person_columns_are_read_from_persons(
        graph: IdentityGraph, identity_session: CassandraSession) -> None:
    # Rows as a version before schema 0004 wrote them: `persons` rows, members without static columns.
    created = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    identity_session.write_all([
        ("INSERT INTO persons (person_id, create_time, update_time, merged_from) VALUES (?, ?, ?, ?)",
         ("p_old1", created, created, {"p_old2"})),
        ("INSERT INTO persons (person_id, create_time, update_time, merged_into) VALUES (?, ?, ?, ?)",
         ("p_old2", created, created, "p_old1")),
        ("INSERT INTO persons (person_id, create_time, update_time, erased) VALUES (?, ?, ?, ?)",
         ("p_old3", created, created, True)),
        ("INSERT INTO person_identifiers (person_id, id_type, id_value) VALUES (?, ?, ?)",
         ("p_old1", "email", "old@x.io")),
        ("INSERT INTO identifiers (id_type, id_value, person_id, origin_person_id) VALUES (?, ?, ?, ?)",
         ("email", "old@x.io", "p_old1", "p_old1")),
    ])
    found = graph.get_persons(["p_old1", "p_old2", "p_old3", "p_never"])
    assert sorted(found) == ["p_old1", "p_old2"]
    assert found["p_old2"].person_id == "p_old1" and found["p_old2"].redirected_from == "p_old2"
    assert found["p_old1"].merged_person_ids == ["p_old2"]
    assert found["p_old1"].identifiers == [IdKey("email", "old@x.io")]
    assert found["p_old1"].create_time == created.replace(tzinfo=None)
    # New evidence changes the earlier person through both tables: still read whole, from `persons`.
    assert _link(graph, "m4", ("email", "old@x.io"), ("cookie", "o1")) == "p_old1"
    person = graph.get_person("p_old1")
    assert person.create_time == created.replace(tzinfo=None) and person.merged_person_ids == ["p_old2"]
    assert set(person.identifiers) == {IdKey("email", "old@x.io"), IdKey("cookie", "o1")}
    assert person.update_time is not None and person.update_time > created.replace(tzinfo=None)
    # And a merge of an earlier person with a new one keeps both readable, with the redirect.
    newer = _link(graph, "m5", ("phone", "+14155550111"), ("cookie", "o2"))
    merged = _link(graph, "m6", ("cookie", "o1"), ("cookie", "o2"))
    loser = newer if merged == "p_old1" else "p_old1"
    assert graph.get_person(loser).person_id == merged and graph.get_person("p_old2").person_id == merged
    assert loser in graph.get_person(merged).merged_person_ids


def test_an_erased_person_is_not_found_by_either_table(graph: IdentityGraph) -> None:
    person_id = _link(graph, "m5", ("email", "bye@x.io"), ("cookie", "b1"))
    graph.erase(person_id, allow_relink=True, reason="test")
    assert graph.get_persons([person_id]) == {}


def test_a_call_dropping_erased_evidence_still_keeps_other_persons_columns_with_their_members(
        graph: IdentityGraph, identity_session: CassandraSession) -> None:
    kept = _link(graph, "k1", ("email", "kim@x.io"), ("cookie", "k1"))
    erased = _link(graph, "e1", ("email", "eve@x.io"), ("cookie", "e1"))
    graph.erase(erased, allow_relink=False, reason="test")
    # One call: a late observation of the erased email (its evidence is dropped under the leases, and what was
    # read is read again) beside a new cookie for the kept person, planned in the same round.
    outcomes = graph.link([RawObservation([("email", "eve@x.io"), ("cookie", "e2")], Evidence("e2")),
                           RawObservation([("cookie", "k1"), ("cookie", "k2")], Evidence("k2"))])
    assert outcomes[1].person_id == kept
    assert IdKey("cookie", "k2") in graph.get_person(kept).identifiers
    # The kept person was created since schema 0004: its columns stay with its members only.
    assert identity_session.execute("SELECT count(*) AS rows FROM persons WHERE person_id = ?",
                                    (kept,)).one().rows == 0
