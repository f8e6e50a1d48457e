"""The gRPC ProfileSource against a stand-in profile service that follows the proto contract.

The stand-in exercises what the real service rarely does with small data (batches above profile's
limit of 1,000 persons, refused selectors, refund corrections of an order); test_serving.py reads
through the real profile service.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf import any_pb2, struct_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from onecdp.profile.v1 import profile_service_pb2 as profile_pb
from onecdp.profile.v1 import profile_service_pb2_grpc as profile_grpc

from services.prediction.history import ORDER_EVENT, ActivityEvent, PersonHistory, PersonRef
from services.prediction.profile_source import GrpcProfileSource, activity_events
from shared.errors import InvalidArgument, NotFound, Unavailable

pytestmark = pytest.mark.unit

T0 = datetime(2024, 5, 1, tzinfo=UTC)


def stored(person_id: str, message_id: str, days: float, event_type: int, name: str = "", *,
           order: profile_pb.Order | None = None, **properties: str | float) -> profile_pb.StoredEvent:
    event = profile_pb.Event(message_id=message_id, type=event_type, event_name=name)  # type: ignore[arg-type]
    event.event_time.FromDatetime(T0 + timedelta(days=days))
    if order is not None:
        event.order.CopyFrom(order)
    if properties:
        struct = struct_pb2.Struct()
        struct.update(properties)
        event.properties.CopyFrom(struct)
    return profile_pb.StoredEvent(event=event, person_id=person_id)


EVENTS = {
    "p1": [
        stored("p1", "m3", 3, profile_pb.EVENT_TYPE_ORDER, order=profile_pb.Order(
            order_id="o1", amount=40.0, items=[profile_pb.OrderItem(sku="a"), profile_pb.OrderItem(category="books")])),
        stored("p1", "m1", 1, profile_pb.EVENT_TYPE_TRACK, "add_to_cart", revenue=12.5, category="books"),
        stored("p1", "m2", 2, profile_pb.EVENT_TYPE_IDENTIFY),
        stored("p1", "m4", 10, profile_pb.EVENT_TYPE_ORDER, order=profile_pb.Order(order_id="o1", amount=-15.0)),
        stored("p1", "m5", 20, profile_pb.EVENT_TYPE_PAGE, "home", revenue="n/a"),
    ],
    "p2": [stored("p2", f"n{i}", i, profile_pb.EVENT_TYPE_TRACK, "view") for i in range(25)],
    "p3": [],
}


def test_stored_events_become_activity() -> None:
    assert activity_events(EVENTS["p1"]) == [
        ActivityEvent("add_to_cart", T0 + timedelta(days=1), 12.5, "books"),
        ActivityEvent(ORDER_EVENT, T0 + timedelta(days=3), 40.0, "books"),
        # A partial refund under the same order id is its own money movement: it replaces nothing (the
        # features tell it from a purchase by its negative amount).
        ActivityEvent(ORDER_EVENT, T0 + timedelta(days=10), -15.0, None),
        ActivityEvent("home", T0 + timedelta(days=20), None, None),
    ]


class FakeProfile(profile_grpc.ProfileServiceServicer):
    """Answers as the contract says: shards cover everyone once, events filtered by end time, newest first."""

    def __init__(self) -> None:
        self.requests: list[object] = []

    def ListProfileShards(self, request: profile_pb.ListProfileShardsRequest,
                          context: grpc.ServicerContext) -> profile_pb.ListProfileShardsResponse:
        return profile_pb.ListProfileShardsResponse(shards=["s0", "s1"])

    def ScanProfiles(self, request: profile_pb.ScanProfilesRequest,
                     context: grpc.ServicerContext) -> Iterator[profile_pb.ScanProfilesResponse]:
        self.requests.append(request)
        persons = {"s0": ["p1", "p3"], "s1": ["p2"]}[request.shard]
        end = request.events_end_time.ToDatetime(tzinfo=UTC)
        for person in persons:
            events = [e for e in EVENTS[person] if e.event.event_time.ToDatetime(tzinfo=UTC) < end]
            yield profile_pb.ScanProfilesResponse(profiles=[profile_pb.ScannedProfile(
                profile=profile_pb.Profile(person_id=person),
                events=sorted(events, key=lambda e: e.event.event_time.ToDatetime()))])

    def BatchGetProfiles(self, request: profile_pb.BatchGetProfilesRequest,
                         context: grpc.ServicerContext) -> profile_pb.BatchGetProfilesResponse:
        self.requests.append(request)
        assert request.include_events and list(request.read_mask.paths) == ["person_id"]
        if len(request.persons) > 1000:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "at most 1,000 persons")
        results = []
        for index, selector in enumerate(request.persons):
            identifier = f"{selector.identifier.type}:{selector.identifier.value}"
            if selector.identifier.type == "email" and "@" not in selector.identifier.value:
                # As identity does: the first bad selector fails the whole call, named in a field violation.
                bad_request = error_details_pb2.BadRequest(field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=f"persons[{index}].identifier.value",
                                                                description="not an email address")])
                details = any_pb2.Any()
                details.Pack(bad_request)
                context.abort_with_status(rpc_status.to_status(status_pb2.Status(
                    code=code_pb2.INVALID_ARGUMENT, message="invalid identifier", details=[details])))
            if selector.identifier.type == "phone" and not selector.identifier.value.startswith("+"):
                # What profile does today for an invalid identifier in a batch read (a bug on its side).
                context.abort(grpc.StatusCode.INTERNAL, "internal error")
            person = selector.person_id or {"email:ann@example.com": "p2", "email:new@example.com": "p3"}.get(
                identifier, "")
            if person not in EVENTS:
                results.append(profile_pb.ProfileLookupResult(found=False))
                continue
            end = request.events_end_time.ToDatetime(tzinfo=UTC)
            events = sorted((e for e in EVENTS[person] if e.event.event_time.ToDatetime(tzinfo=UTC) < end),
                            key=lambda e: e.event.event_time.ToDatetime())
            results.append(profile_pb.ProfileLookupResult(found=True, profile=profile_pb.Profile(person_id=person),
                                                          events=events))
        return profile_pb.BatchGetProfilesResponse(results=results)

    def GetProfile(self, request: profile_pb.GetProfileRequest, context: grpc.ServicerContext) -> profile_pb.Profile:
        self.requests.append(request)
        if request.person.identifier.type == "phone" and not request.person.identifier.value.startswith("+"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "not a phone number")
        return profile_pb.Profile(person_id=request.person.person_id)


@pytest.fixture
def fake() -> Iterator[tuple[FakeProfile, GrpcProfileSource]]:
    servicer = FakeProfile()  # type: ignore[abstract]  # only the methods the source calls
    server = grpc.server(ThreadPoolExecutor(2))
    profile_grpc.add_ProfileServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield servicer, GrpcProfileSource(profile_grpc.ProfileServiceStub(channel))
    finally:
        server.stop(None)


def test_histories_scan_every_shard_before_a_time(fake: tuple[FakeProfile, GrpcProfileSource]) -> None:
    servicer, source = fake
    before = T0 + timedelta(days=12)
    histories = {h.person_id: h.events for h in source.histories(before)}
    assert set(histories) == {"p1", "p2", "p3"}
    assert [e.name for e in histories["p1"]] == ["add_to_cart", ORDER_EVENT, ORDER_EVENT]
    assert len(histories["p2"]) == 12 and histories["p3"] == []
    scans = [r for r in servicer.requests if isinstance(r, profile_pb.ScanProfilesRequest)]
    assert all(r.include_events and list(r.read_mask.paths) == ["person_id"] for r in scans)


def test_history_of_one_person_by_identifier_is_one_call(fake: tuple[FakeProfile, GrpcProfileSource]) -> None:
    servicer, source = fake
    by_identifier = source.history(PersonRef(identifier_type="email", identifier_value="ann@example.com"),
                                   T0 + timedelta(days=30))
    assert by_identifier.person_id == "p2" and len(by_identifier.events) == 25
    assert [e.time for e in by_identifier.events] == sorted(e.time for e in by_identifier.events)
    assert len(servicer.requests) == 1
    # Known, but without events before the time: found (profile gives the person id), with no history.
    no_events = source.history(PersonRef(identifier_type="email", identifier_value="new@example.com"), T0)
    assert no_events.person_id == "p3" and no_events.events == []
    with pytest.raises(NotFound):
        source.history(PersonRef(person_id="nobody"), T0)
    # The time boundary is exclusive: an event exactly at `before` is not history yet.
    at_the_order = source.history(PersonRef(person_id="p1"), T0 + timedelta(days=3))
    assert [e.name for e in at_the_order.events] == ["add_to_cart"]


def test_many_persons_are_read_in_order_in_calls_of_at_most_a_thousand(
        fake: tuple[FakeProfile, GrpcProfileSource]) -> None:
    servicer, source = fake
    cycle = [PersonRef(person_id="p1"), PersonRef(identifier_type="email", identifier_value="ann@example.com"),
             PersonRef(person_id="p3"), PersonRef(person_id="nobody")]
    persons = [cycle[i % 4] for i in range(2_300)]
    results = source.histories_of(persons, T0 + timedelta(days=30))
    sizes = [len(r.persons) for r in servicer.requests if isinstance(r, profile_pb.BatchGetProfilesRequest)]
    assert sorted(sizes) == [300, 1000, 1000]
    assert len(results) == 2_300
    for index, result in enumerate(results):
        if index % 4 == 3:
            assert isinstance(result, NotFound)
        else:
            assert isinstance(result, PersonHistory) and result.person_id == ["p1", "p2", "p3"][index % 4]
    assert [len(r.events) for r in results[:3] if isinstance(r, PersonHistory)] == [4, 25, 0]


def test_selectors_profile_refuses_are_their_own_errors(fake: tuple[FakeProfile, GrpcProfileSource]) -> None:
    servicer, source = fake
    persons = [PersonRef(person_id="p1"), PersonRef(identifier_type="email", identifier_value="bad-1"),
               PersonRef(person_id="p2"), PersonRef(identifier_type="email", identifier_value="bad-2"),
               PersonRef(person_id="nobody")]
    first, bad_1, second, bad_2, nobody = source.histories_of(persons, T0 + timedelta(days=30))
    assert isinstance(first, PersonHistory) and first.person_id == "p1"
    assert isinstance(second, PersonHistory) and second.person_id == "p2"
    assert isinstance(nobody, NotFound)
    for refused in (bad_1, bad_2):
        assert isinstance(refused, InvalidArgument) and refused.reason == "BAD_PERSON_SELECTOR"
        assert "not an email address" in refused.message
    # Each call names one bad selector; the others are read again without it.
    assert [len(r.persons) for r in servicer.requests if isinstance(r, profile_pb.BatchGetProfilesRequest)] == [5, 4, 3]
    with pytest.raises(InvalidArgument):
        source.history(PersonRef(identifier_type="email", identifier_value="bad-3"), T0)


def test_a_batch_profile_fails_as_a_whole_is_halved_down_to_the_unreadable_person(
        fake: tuple[FakeProfile, GrpcProfileSource]) -> None:
    servicer, source = fake
    persons = [PersonRef(person_id=p) for p in ("p1", "p2", "p3", "nobody", "p1")]
    persons.insert(3, PersonRef(identifier_type="phone", identifier_value="12345"))
    results = source.histories_of(persons, T0 + timedelta(days=30))
    # The refused selector is the request's error (RefusedSelector: the adapter fails the call naming it).
    assert [type(r).__name__ for r in results] == ["PersonHistory"] * 3 + ["RefusedSelector", "NotFound",
                                                                          "PersonHistory"]
    assert isinstance(results[3], InvalidArgument) and "not a phone number" in results[3].message
    reads = [len(r.persons) for r in servicer.requests if isinstance(r, profile_pb.BatchGetProfilesRequest)]
    assert reads[0] == 6 and len(reads) > 1 and max(reads[1:]) <= 3
    with pytest.raises(InvalidArgument):
        source.history(PersonRef(identifier_type="phone", identifier_value="555"), T0)


def test_an_unreachable_profile_service_is_unavailable() -> None:
    with grpc.insecure_channel("127.0.0.1:1") as channel:
        source = GrpcProfileSource(profile_grpc.ProfileServiceStub(channel))
        with pytest.raises(Unavailable):
            source.history(PersonRef(person_id="p1"), T0)
