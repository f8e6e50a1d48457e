"""Lookups that accept an answer up to `max_staleness` old: answered from what this replica read that
recently, never older than asked, never from before this replica's own changes, and bounded in memory."""

from __future__ import annotations

import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from onecdp.common.v1 import common_pb2
from onecdp.identity.v1 import identity_service_pb2 as pb
from onecdp.identity.v1 import identity_service_pb2_grpc as pb_grpc

from services.identity.partition import IdKey
from services.identity.person import Person
from services.identity.recent import MAX_STALENESS_SECONDS, RecentLookups
from tests.services.identity.conftest import failure, ids, link, members, observation, person_of
from tests.shared.clocks import FakeClock


def _person(person_id: str, *identifiers: str, merged: tuple[str, ...] = ()) -> Person:
    return Person(person_id, [IdKey(*i.split(":", 1)) for i in identifiers], list(merged), "", None, None,
                  read_time=datetime.now(UTC))


# ---- the memory alone (pure logic) -----------------------------------------------------------------------


def test_an_answer_is_given_only_within_the_staleness_asked_for() -> None:
    clock = FakeClock()
    recent = RecentLookups(clock=clock)
    a = IdKey("cookie", "a")
    recent.remember(recent.begin(), {a: _person("p1", "cookie:a", "cookie:b")})
    clock.now += 2.0
    assert recent.answers([a], 2.5)[a].person_id == "p1"
    assert recent.answers([a], 1.5) == {}, "read 2 s ago: too old for 1.5 s"
    assert recent.answers([IdKey("cookie", "b")], 5) == {}, "b was never looked up: no holder known"


def test_a_person_read_again_without_the_identifier_does_not_answer_for_it() -> None:
    clock = FakeClock()
    recent = RecentLookups(clock=clock)
    a, b = IdKey("cookie", "a"), IdKey("cookie", "b")
    recent.remember(recent.begin(), {a: _person("p1", "cookie:a", "cookie:b")})
    clock.now += 0.1
    # Read again through b after a split moved a to another person: p1 no longer lists a.
    recent.remember(recent.begin(), {b: _person("p1", "cookie:b")})
    assert recent.answers([a, b], 10).keys() == {b}


def test_person_ids_answer_for_themselves_and_for_the_ids_merged_into_them() -> None:
    recent = RecentLookups(clock=FakeClock())
    survivor = _person("p1", "cookie:a", merged=("p2",))
    recent.remember(recent.begin(), {"p1": survivor, "p2": survivor})
    answers = recent.answers(["p1", "p2", "p3"], 10)
    assert answers.keys() == {"p1", "p2"}
    assert (answers["p1"].redirected_from, answers["p2"].redirected_from) == ("", "p2")


def test_a_change_made_here_drops_its_persons_and_what_was_read_before_it() -> None:
    recent = RecentLookups(clock=FakeClock())
    a, c = IdKey("cookie", "a"), IdKey("cookie", "c")
    recent.remember(recent.begin(), {a: _person("p1", "cookie:a"), c: _person("p3", "cookie:c")})
    reading = recent.begin()  # a lookup starts reading p1 ...
    recent.forget(["p1"])  # ... while this process changes it
    recent.remember(reading, {a: _person("p1", "cookie:a")})  # ... and finds it as it was before
    assert recent.answers([a, c], 10).keys() == {c}, "p1 as read before the change is not kept"
    assert recent.hints([a]) == {a: "p1"}, "the holder stays a hint (exact lookups check it)"


def test_a_change_to_an_identifier_drops_the_person_it_was_last_found_in() -> None:
    recent = RecentLookups(clock=FakeClock())
    x = IdKey("cookie", "x")
    recent.remember(recent.begin(), {x: _person("p_r", "cookie:x")})
    # Another replica merged p_r into p_a since; this process now links x: its component's person is p_a.
    recent.forget(["p_a"], [x, IdKey("cookie", "y")])
    assert recent.answers([x], 10) == {}


def test_memory_is_bounded_by_identifiers_held_and_by_the_largest_staleness() -> None:
    clock = FakeClock()
    recent = RecentLookups(clock=clock, identifiers_held=4)
    for n in range(3):
        recent.remember(recent.begin(), {IdKey("cookie", f"{n}"): _person(f"p{n}", f"cookie:{n}", f"device_id:{n}")})
    assert recent.answers([IdKey("cookie", f"{n}") for n in range(3)], 10).keys() == {
        IdKey("cookie", "1"), IdKey("cookie", "2")}, "the person read first went first"
    clock.now += MAX_STALENESS_SECONDS + 1
    recent.remember(recent.begin(), {IdKey("cookie", "9"): _person("p9", "cookie:9")})
    assert len(recent._persons) == 1, "answers older than any caller may accept are not kept"


# ---- through gRPC --------------------------------------------------------------------------------------


def _lookup(stub: pb_grpc.IdentityServiceStub, pair: str, seconds: float | None = None) -> pb.Person:
    (identifier,) = ids(pair)
    request = pb.LookupPersonRequest(person=common_pb2.PersonSelector(identifier=identifier))
    if seconds is not None:
        request.max_staleness.FromTimedelta(timedelta(seconds=seconds))
    person: pb.Person = stub.LookupPerson(request, timeout=10)
    return person


@pytest.mark.integration
def test_a_lookup_accepting_staleness_is_answered_without_reading(identity: pb_grpc.IdentityServiceStub,
                                                                  reads: Counter[str]) -> None:
    link(identity, observation("account_id:st-1", "cookie:st-1c"))
    before = datetime.now(UTC)
    first = _lookup(identity, "cookie:st-1c", 30)
    assert before - timedelta(seconds=1) <= first.read_time.ToDatetime(UTC) <= datetime.now(UTC)
    reads.clear()
    again = _lookup(identity, "cookie:st-1c", 30)
    assert reads == {}, "the person was read a moment ago: answered from memory"
    assert again == first, "the same answer, with the same read_time"
    exact = _lookup(identity, "cookie:st-1c")
    assert reads["person_identifiers"] == 1 and not exact.HasField("read_time")
    assert members(exact) == members(first) == {"account_id:st-1", "cookie:st-1c"}


@pytest.mark.integration
def test_this_replicas_own_changes_are_never_missed(identity: pb_grpc.IdentityServiceStub) -> None:
    link(identity, observation("account_id:st-2", "cookie:st-2c"))
    assert members(_lookup(identity, "cookie:st-2c", 60)) == {"account_id:st-2", "cookie:st-2c"}
    link(identity, observation("account_id:st-2", "device_id:ST-2D"))
    assert members(_lookup(identity, "cookie:st-2c", 60)) == {"account_id:st-2", "cookie:st-2c", "device_id:ST-2D"}
    (cookie,) = ids("cookie:st-2c")
    identity.ErasePerson(pb.ErasePersonRequest(person=common_pb2.PersonSelector(identifier=cookie), reason="test"),
                         timeout=30)
    code, reason, _ = failure(lambda: _lookup(identity, "cookie:st-2c", 60))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "PERSON_NOT_FOUND")


@pytest.mark.integration
def test_another_replicas_changes_are_seen_once_the_answer_is_older_than_asked(
        identity: pb_grpc.IdentityServiceStub, other_identity: pb_grpc.IdentityServiceStub) -> None:
    link(other_identity, observation("account_id:st-3", "cookie:st-3c"))
    held = _lookup(identity, "cookie:st-3c", 60)
    link(other_identity, observation("account_id:st-3", "device_id:ST-3D"))
    # Within 60 s: the answer read before the other replica's link (and it says when it was read).
    assert _lookup(identity, "cookie:st-3c", 60) == held
    time.sleep(0.3)
    fresh = _lookup(identity, "cookie:st-3c", 0.2)
    assert members(fresh) == {"account_id:st-3", "cookie:st-3c", "device_id:ST-3D"}
    assert fresh.read_time.ToDatetime() > held.read_time.ToDatetime()


@pytest.mark.integration
def test_a_link_here_is_seen_after_another_replica_merged_the_person_remembered(
        identity: pb_grpc.IdentityServiceStub, other_identity: pb_grpc.IdentityServiceStub) -> None:
    (older,) = link(other_identity, observation("cookie:st-6b"))
    (newer,) = link(other_identity, observation("cookie:st-6a", "cookie:st-6c"))
    assert _lookup(identity, "cookie:st-6c", 60).person_id == newer.person_id
    link(other_identity, observation("cookie:st-6a", "cookie:st-6b"))
    assert person_of(other_identity, "cookie:st-6c").person_id == older.person_id, "a merge keeps the oldest id"
    link(identity, observation("cookie:st-6c", "cookie:st-6y"))
    answer = _lookup(identity, "cookie:st-6c", 60)
    assert (answer.person_id, members(answer)) == (
        older.person_id, {"cookie:st-6a", "cookie:st-6b", "cookie:st-6c", "cookie:st-6y"})


@pytest.mark.integration
def test_batch_lookups_accept_staleness_for_identifiers_and_merged_person_ids(
        identity: pb_grpc.IdentityServiceStub, reads: Counter[str]) -> None:
    first, second = link(identity, observation("cookie:st-4a"), observation("cookie:st-4b"))
    link(identity, observation("cookie:st-4a", "cookie:st-4b"))
    survivor = person_of(identity, "cookie:st-4a").person_id
    loser = ({first.person_id, second.person_id} - {survivor}).pop()
    request = pb.BatchLookupPersonsRequest(persons=[
        common_pb2.PersonSelector(identifier=ids("cookie:st-4b")[0]), common_pb2.PersonSelector(person_id=loser),
        common_pb2.PersonSelector(identifier=ids("cookie:st-4-nobody")[0])])
    request.max_staleness.FromTimedelta(timedelta(seconds=30))
    answered = identity.BatchLookupPersons(request, timeout=10)
    reads.clear()
    again = identity.BatchLookupPersons(request, timeout=10)
    assert reads == {"identifiers": 1}, "only the identifier nobody holds is read again"
    assert again == answered
    assert [r.found for r in again.results] == [True, True, False]
    assert again.results[1].person.person_id == survivor and again.results[1].person.redirected_from == loser
    assert again.results[0].person.redirected_from == ""


@pytest.mark.integration
@pytest.mark.parametrize(("seconds", "nanos"), [(-1, 0), (0, -5), (61, 0), (60, 1)])
def test_a_staleness_outside_0_to_60_seconds_is_invalid(identity: pb_grpc.IdentityServiceStub,
                                                        seconds: int, nanos: int) -> None:
    (identifier,) = ids("cookie:st-5")
    selector = common_pb2.PersonSelector(identifier=identifier)
    duration = Duration(seconds=seconds, nanos=nanos)
    for call in (lambda: identity.LookupPerson(pb.LookupPersonRequest(person=selector, max_staleness=duration),
                                               timeout=10),
                 lambda: identity.BatchLookupPersons(
                     pb.BatchLookupPersonsRequest(persons=[selector], max_staleness=duration), timeout=10)):
        assert failure(call) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_MAX_STALENESS", ["max_staleness"])
