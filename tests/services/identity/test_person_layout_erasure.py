"""Erasing a person that has merged persons, whichever layout (schema 0004 or earlier) each of them is stored in.

The API promises (identity_service.proto): ErasePerson resolves a merged id to the survivor and erases it
with its identifiers, links and provenance; LookupPerson answers NOT_FOUND for an erased id, so an id
merged into an erased person must not redirect anywhere either; tombstones stop late observations from
linking the identifiers again; the change feed records the erasure.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from onecdp.common.v1 import common_pb2
from onecdp.identity.v1 import identity_service_pb2 as pb

from shared.cassandra import CassandraSession
from tests.services.identity.conftest import ids, link, members, observation, person_of
from tests.services.identity.person_layout import (
    Layout,
    Stub,
    all_changes,
    assert_layout,
    assert_members_match_identifiers,
    listed_identifiers,
    lookup,
    make_pre_0004,
    not_found,
    stored_person,
)

pytestmark = pytest.mark.integration

SURVIVOR_IDS = {"email:sam@x.io", "cookie:s1"}
LOSER_IDS = ({"phone:+14155550101", "cookie:l1"}, {"cookie:l2", "device_id:DEV-L2"})
BYSTANDER_IDS = {"email:kim@x.io", "cookie:k1"}


@dataclass(frozen=True)
class Erasing:
    survivor: Layout
    losers: Layout
    selector: str  # how ErasePerson names the person: "survivor id", "loser id" or "loser identifier"


CASES = [
    pytest.param(Erasing("0004", "0004", "loser id"), id="0004 survivor, 0004 losers, by a loser's id"),
    pytest.param(Erasing("pre-0004", "0004", "survivor id"), id="pre-0004 survivor, 0004 losers, by its id"),
    pytest.param(Erasing("0004", "pre-0004", "loser identifier"),
                 id="0004 survivor, pre-0004 losers, by a loser's identifier"),
]


def _selector(erasing: Erasing, survivor: str, losers: list[str]) -> common_pb2.PersonSelector:
    if erasing.selector == "survivor id":
        return common_pb2.PersonSelector(person_id=survivor)
    if erasing.selector == "loser id":
        return common_pb2.PersonSelector(person_id=losers[0])
    return common_pb2.PersonSelector(identifier=ids("phone:+14155550101")[0])


@pytest.mark.parametrize("erasing", CASES)
def test_erasing_a_survivor_erases_it_with_its_merged_persons_in_either_layout(
        identity: Stub, identity_session: CassandraSession, erasing: Erasing) -> None:
    survivor = link(identity, observation(*SURVIVOR_IDS))[0].person_id
    if erasing.survivor == "pre-0004":
        make_pre_0004(identity_session, survivor)
    losers = [link(identity, observation(*loser))[0].person_id for loser in LOSER_IDS]
    bystander = link(identity, observation(*BYSTANDER_IDS))[0].person_id
    assert survivor < losers[0] < losers[1]  # time-ordered ids: the survivor is the oldest
    merged = link(identity, observation("cookie:s1", "cookie:l1"), observation("cookie:l1", "cookie:l2"))
    assert {r.person_id for r in merged} == {survivor}
    if erasing.losers == "pre-0004":
        # Stored as an earlier version stored them (ids are younger than the survivor's only because
        # this test made them in that order; the layout is what matters to the erasure).
        make_pre_0004(identity_session, *losers)
    everything = SURVIVOR_IDS.union(*LOSER_IDS)
    found = lookup(identity, losers[1])
    assert (found.person_id, found.redirected_from, members(found)) == (survivor, losers[1], everything)
    assert sorted(found.merged_person_ids) == losers

    erased = identity.ErasePerson(pb.ErasePersonRequest(person=_selector(erasing, survivor, losers),
                                                        reason="GDPR art. 17"), timeout=30)

    assert (erased.person_id, erased.erased_identifier_count) == (survivor, len(everything))
    assert erased.change.type == pb.IDENTITY_CHANGE_TYPE_ERASE
    assert (list(erased.change.source_person_ids), list(erased.change.result_person_ids)) == ([survivor], [])
    # Gone from every lookup: neither the survivor nor an id merged into it redirects to the erased person.
    for person_id in (survivor, *losers):
        not_found(lambda p=person_id: lookup(identity, p))
        not_found(lambda p=person_id: listed_identifiers(identity, p))
        not_found(lambda p=person_id: identity.ErasePerson(pb.ErasePersonRequest(
            person=common_pb2.PersonSelector(person_id=p)), timeout=30))
    for pair in everything:
        not_found(lambda p=pair: person_of(identity, p))
    batch = identity.BatchLookupPersons(pb.BatchLookupPersonsRequest(persons=[
        *(common_pb2.PersonSelector(person_id=p) for p in (survivor, *losers)),
        *(common_pb2.PersonSelector(identifier=ids(pair)[0]) for pair in sorted(everything))]), timeout=10)
    assert not any(r.found for r in batch.results)
    # And from every table: no identifier, link, sighting or observation, no member of any of them.
    _assert_no_trace(identity_session, everything, [survivor, *losers])
    erased_rows = stored_person(identity_session, survivor)
    assert erased_rows.persons_row is not None and erased_rows.persons_row.erased  # what reads take for erased ones
    assert erased_rows.statics is None or erased_rows.statics.create_time is None
    for loser in losers:  # what remains of a loser names only the erased survivor
        rows = stored_person(identity_session, loser)
        kept = rows.statics if erasing.losers == "0004" else rows.persons_row
        assert kept is not None and kept.merged_into == survivor
        assert_layout_of_loser(identity_session, loser, erasing.losers)
    # A bystander is untouched.
    assert members(lookup(identity, bystander)) == BYSTANDER_IDS
    assert_layout(identity_session, bystander, "0004")
    assert_members_match_identifiers(identity_session)

    # Tombstones: late observations of the erased identifiers link nothing and bring no one back.
    late = link(identity, observation("email:sam@x.io", "cookie:late1"), observation("cookie:l2", "cookie:late2"))
    assert [[d.guard for d in r.guard_decisions] for r in late] == [[pb.GUARD_KIND_ERASED]] * 2
    assert {r.person_id for r in late}.isdisjoint({survivor, *losers})
    assert members(person_of(identity, "cookie:late1")) == {"cookie:late1"}
    assert members(person_of(identity, "cookie:late2")) == {"cookie:late2"}
    for person_id in (survivor, *losers):
        not_found(lambda p=person_id: lookup(identity, p))
    for pair in everything:
        not_found(lambda p=pair: person_of(identity, p))
    _assert_no_trace(identity_session, everything, [survivor, *losers])

    changes = all_changes(identity)
    erasures = [c for c in changes if c.type == pb.IDENTITY_CHANGE_TYPE_ERASE]
    assert [c.cursor for c in erasures] == [erased.change.cursor]
    assert [(list(c.source_person_ids), list(c.result_person_ids), c.reason) for c in erasures] == [
        ([survivor], [], "GDPR art. 17")]
    merges = [c for c in changes if c.type == pb.IDENTITY_CHANGE_TYPE_MERGE]
    assert {p for c in merges for p in c.source_person_ids} == {survivor, *losers}
    assert changes.index(merges[-1]) < changes.index(erasures[0])


def assert_layout_of_loser(session: CassandraSession, loser: str, layout: Layout) -> None:
    """A merged-away person keeps its columns whole in the one place reads take them from."""
    rows = stored_person(session, loser)
    assert not rows.members
    if layout == "0004":
        assert rows.persons_row is None, rows.persons_row
        assert rows.statics is not None and rows.statics.create_time is not None
    else:
        assert rows.persons_row is not None and rows.persons_row.create_time is not None
        assert rows.statics is None or rows.statics.create_time is None


def _assert_no_trace(session: CassandraSession, identifiers: set[str], person_ids: list[str]) -> None:
    def pairs(cql: str) -> set[str]:
        return {f"{r[0]}:{r[1]}" for r in session.execute(cql)}

    assert not identifiers & pairs("SELECT id_type, id_value FROM identifiers")
    assert not identifiers & pairs("SELECT id_type, id_value FROM identifier_sightings")
    assert not identifiers & pairs("SELECT id_type, id_value FROM links")
    assert not identifiers & pairs("SELECT other_type, other_value FROM links")
    assert not identifiers & pairs("SELECT id_type, id_value FROM person_identifiers")
    observed = {f"{t}:{v}" for r in session.execute("SELECT identifiers FROM observations")
                for t, v in r.identifiers or ()}
    assert not identifiers & observed
    for person_id in person_ids:
        assert not stored_person(session, person_id).members
