"""Merge chains: when C was merged into B and B is then merged into A, C redirects to A itself.

Winners are the oldest person id, so successive merges that each have an older winner make chains. A
lookup by any id merged away answers the survivor in one hop on data written since redirects are
compressed; chains written before (rows redirecting one merge at a time) are still followed to their end,
never answered with a person met on the way, and compressed by the next recomputation of their component.
Splits give back the ids they gave back before, and re-point the ids merged into them.
"""

from __future__ import annotations

import grpc
import pytest
from onecdp.common.v1 import common_pb2
from onecdp.identity.v1 import identity_service_pb2 as pb

from shared.cassandra import CassandraSession
from tests.services.identity.conftest import failure, link, members, observation, person_of
from tests.services.identity.person_layout import Stub, assert_members_match_identifiers, lookup, stored_person

pytestmark = pytest.mark.integration

CHAIN = 21  # persons, so 20 merges: beyond the 16 redirects reads used to follow


def _identifiers(index: int) -> set[str]:
    return {f"email:p{index}@x.io", f"cookie:c{index}"}


def _persons(stub: Stub, count: int) -> list[str]:
    """`count` persons, oldest first (ids are time-ordered: each is made a millisecond after the last)."""
    made: list[str] = []
    while len(made) < count:
        person_id = link(stub, observation(*_identifiers(len(made))))[0].person_id
        assert not made or made[-1] < person_id, "made in the same millisecond: ids are not ordered"
        made.append(person_id)
    return made


def _merge_chain(stub: Stub) -> list[str]:
    """Persons p0 (oldest) .. p20, merged newest first: p20 into p19, that into p18, ... into p0. Each merge
    is one message, merge-{i}, linking p{i-1}'s cookie to p{i}'s."""
    persons = _persons(stub, CHAIN)
    for index in range(CHAIN - 1, 0, -1):
        (result,) = link(stub, observation(f"cookie:c{index - 1}", f"cookie:c{index}", message_id=f"merge-{index}"))
        assert (result.person_id, list(result.merged_person_ids)) == (persons[index - 1], [persons[index]])
    return persons


def _redirect(session: CassandraSession, person_id: str) -> str | None:
    statics = stored_person(session, person_id).statics
    assert statics is not None and statics.create_time is not None, person_id
    return statics.merged_into  # type: ignore[no-any-return]


def _everything(indexes: range) -> set[str]:
    return {pair for index in indexes for pair in _identifiers(index)}


def test_every_id_of_a_chain_of_merges_redirects_to_the_survivor_in_one_hop(
        identity: Stub, identity_session: CassandraSession) -> None:
    persons = _merge_chain(identity)
    survivor = persons[0]

    # Each merge re-pointed every id merged into its loser: all redirect to the survivor itself.
    assert [_redirect(identity_session, p) for p in persons] == [None] + [survivor] * (CHAIN - 1)
    for person_id in persons[1:]:
        found = lookup(identity, person_id)
        assert (found.person_id, found.redirected_from) == (survivor, person_id)
        assert members(found) == _everything(range(CHAIN))
    # merged_person_ids still says what was merged into what: each person the one merged into it.
    assert list(lookup(identity, survivor).merged_person_ids) == [persons[1]]
    assert person_of(identity, f"cookie:c{CHAIN - 1}").person_id == survivor
    batch = identity.BatchLookupPersons(pb.BatchLookupPersonsRequest(persons=[
        common_pb2.PersonSelector(person_id=persons[-1]), common_pb2.PersonSelector(person_id=persons[CHAIN // 2])]),
        timeout=10)
    assert [(r.found, r.person.person_id, r.person.redirected_from) for r in batch.results] == [
        (True, survivor, persons[-1]), (True, survivor, persons[CHAIN // 2])]
    assert_members_match_identifiers(identity_session)


def test_a_chain_written_before_redirects_were_compressed_is_followed_to_its_end_then_compressed(
        identity: Stub, identity_session: CassandraSession) -> None:
    persons = _merge_chain(identity)
    survivor = persons[0]
    # As an earlier version left it: each id redirecting to the person it was merged into, 20 hops long.
    identity_session.write_all([("UPDATE person_identifiers SET merged_into = ? WHERE person_id = ?",
                                 (persons[index - 1], persons[index])) for index in range(1, CHAIN)])

    found = lookup(identity, persons[-1])
    assert (found.person_id, found.redirected_from) == (survivor, persons[-1])
    assert members(found) == _everything(range(CHAIN))

    # The next recomputation of the component (here a merge of a newer person) compresses the chain.
    newer = link(identity, observation("email:late@x.io", "cookie:late"))[0].person_id
    link(identity, observation("cookie:c0", "cookie:late"))
    assert [_redirect(identity_session, p) for p in [*persons, newer]] == [None] + [survivor] * CHAIN


def test_a_redirect_cycle_is_unavailable_not_answered_with_a_person_merged_away(
        identity: Stub, identity_session: CassandraSession) -> None:
    first, second = _persons(identity, 2)
    # Rows a merge written half way can leave: each redirecting to the other.
    identity_session.write_all([("UPDATE person_identifiers SET merged_into = ? WHERE person_id = ?", (b, a))
                                for a, b in ((first, second), (second, first))])

    code, reason, _ = failure(lambda: lookup(identity, first))
    assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "PERSON_REDIRECT_CYCLE")


def test_a_split_after_a_chain_of_merges_gives_back_the_same_ids_and_re_points_those_merged_into_them(
        identity: Stub, identity_session: CassandraSession) -> None:
    persons = _merge_chain(identity)
    # Retracting the merge of p3 into p2 splits p0's identifiers: p0..p2's stay, p3..p20's go.
    identity.UnlinkIdentifiers(pb.UnlinkIdentifiersRequest(message_id="merge-3", reason="bad import"), timeout=30)

    # p3 (the oldest of its part) gets its id back; the ids merged into it redirect to it, in one hop.
    restored = lookup(identity, persons[3])
    assert (restored.person_id, restored.redirected_from) == (persons[3], "")
    assert members(restored) == _everything(range(3, CHAIN))
    assert list(restored.merged_person_ids) == [persons[4]]
    for person_id in persons[4:]:
        assert (lookup(identity, person_id).person_id, _redirect(identity_session, person_id)) == (persons[3],
                                                                                                   persons[3])
    survivor = lookup(identity, persons[0])
    assert members(survivor) == _everything(range(3)) and list(survivor.merged_person_ids) == [persons[1]]
    for person_id in persons[1:3]:
        assert (lookup(identity, person_id).person_id, _redirect(identity_session, person_id)) == (persons[0],
                                                                                                   persons[0])
    # p2 no longer lists p3, which is live again: erasing p0 erases p0..p2's ids, not the others.
    identity.ErasePerson(pb.ErasePersonRequest(person=common_pb2.PersonSelector(person_id=persons[0]),
                                               reason="privacy request"), timeout=30)
    erased = [bool(stored_person(identity_session, p).statics and stored_person(identity_session, p).statics.erased)
              for p in persons]
    assert erased == [True] * 3 + [False] * (CHAIN - 3)
    assert lookup(identity, persons[-1]).person_id == persons[3]
    assert_members_match_identifiers(identity_session)


def test_erasing_the_survivor_of_a_long_chain_erases_every_id_merged_into_it(
        identity: Stub, identity_session: CassandraSession) -> None:
    persons = _merge_chain(identity)
    identity.ErasePerson(pb.ErasePersonRequest(person=common_pb2.PersonSelector(person_id=persons[-1]),
                                               reason="privacy request"), timeout=30)
    # Every id, however deep in merged_from, is marked erased: none is ever given out again.
    for person_id in persons[1:]:
        statics = stored_person(identity_session, person_id).statics
        assert statics is not None and statics.erased, person_id
    code, reason, _ = failure(lambda: lookup(identity, persons[-1]))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "PERSON_NOT_FOUND")


def test_an_id_merged_into_a_person_a_split_gives_back_goes_where_its_identifiers_stayed(
        identity: Stub, identity_session: CassandraSession) -> None:
    a, b, c = _persons(identity, 3)
    link(identity, observation("cookie:c1", "cookie:c2", message_id="b-c"))  # c into b
    link(identity, observation("cookie:c0", "cookie:c1", message_id="a-b"))  # b into a
    link(identity, observation("cookie:c0", "cookie:c2", message_id="a-c"))  # c's identifiers seen with a's too
    assert [_redirect(identity_session, p) for p in (a, b, c)] == [None, a, a]
    for message_id in ("b-c", "a-b"):
        identity.UnlinkIdentifiers(pb.UnlinkIdentifiersRequest(message_id=message_id), timeout=30)

    # b is given back with its own identifiers; c's stayed with a, so c redirects to a and a lists it.
    restored = lookup(identity, b)
    assert (restored.person_id, members(restored), list(restored.merged_person_ids)) == (b, _identifiers(1), [])
    found = lookup(identity, c)
    assert (found.person_id, found.redirected_from) == (a, c)
    assert members(found) == _identifiers(0) | _identifiers(2)
    assert list(lookup(identity, a).merged_person_ids) == [c]
    assert_members_match_identifiers(identity_session)
