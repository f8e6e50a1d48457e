"""The gRPC ProfileSource against a stand-in profile service that follows the proto contract.

The stand-in exercises what the real service rarely does with small data (pages smaller than asked,
refund corrections of an order); test_serving.py reads through the real profile service.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf import struct_pb2
from onecdp.profile.v1 import profile_service_pb2 as profile_pb
from onecdp.profile.v1 import profile_service_pb2_grpc as profile_grpc

from services.prediction.history import ORDER_EVENT, ActivityEvent, PersonRef
from services.prediction.profile_source import ORDER_UPDATE_EVENT, GrpcProfileSource, activity_events
from shared.errors import NotFound, Unavailable

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
        stored("p1", "m4", 10, profile_pb.EVENT_TYPE_ORDER, order=profile_pb.Order(order_id="o1", amount=25.0)),
        stored("p1", "m5", 20, profile_pb.EVENT_TYPE_PAGE, "home", revenue="n/a"),
    ],
    "p2": [stored("p2", f"n{i}", i, profile_pb.EVENT_TYPE_TRACK, "view") for i in range(25)],
    "p3": [],
}


def test_stored_events_become_activity() -> None:
    assert activity_events(EVENTS["p1"]) == [
        ActivityEvent("add_to_cart", T0 + timedelta(days=1), 12.5, "books"),
        ActivityEvent(ORDER_EVENT, T0 + timedelta(days=3), 40.0, "books"),
        # The same order id again is a correction (a partial refund), not a second order.
        ActivityEvent(ORDER_UPDATE_EVENT, T0 + timedelta(days=10), -15.0, None),
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

    def ListProfileEvents(self, request: profile_pb.ListProfileEventsRequest,
                          context: grpc.ServicerContext) -> profile_pb.ListProfileEventsResponse:
        self.requests.append(request)
        person = request.person.person_id or {"email:ann@example.com": "p2", "email:new@example.com": "p3"}.get(
            f"{request.person.identifier.type}:{request.person.identifier.value}", "")
        if person not in EVENTS:
            context.abort(grpc.StatusCode.NOT_FOUND, "no such person")
        end = request.end_time.ToDatetime(tzinfo=UTC)
        events = sorted((e for e in EVENTS[person] if e.event.event_time.ToDatetime(tzinfo=UTC) < end),
                        key=lambda e: e.event.event_time.ToDatetime(), reverse=True)
        start = int(request.page_token or 0)
        page = events[start:start + 10]  # smaller pages than asked, as a server may
        more = start + 10 < len(events)
        return profile_pb.ListProfileEventsResponse(events=page, next_page_token=str(start + 10) if more else "")

    def GetProfile(self, request: profile_pb.GetProfileRequest, context: grpc.ServicerContext) -> profile_pb.Profile:
        assert list(request.read_mask.paths) == ["person_id"]
        return profile_pb.Profile(person_id="p3")


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
    assert [e.name for e in histories["p1"]] == ["add_to_cart", ORDER_EVENT, ORDER_UPDATE_EVENT]
    assert len(histories["p2"]) == 12 and histories["p3"] == []
    scans = [r for r in servicer.requests if isinstance(r, profile_pb.ScanProfilesRequest)]
    assert all(r.include_events and list(r.read_mask.paths) == ["person_id"] for r in scans)


def test_history_of_one_person_pages_and_resolves_identifiers(fake: tuple[FakeProfile, GrpcProfileSource]) -> None:
    _, source = fake
    by_identifier = source.history(PersonRef(identifier_type="email", identifier_value="ann@example.com"),
                                   T0 + timedelta(days=30))
    assert by_identifier.person_id == "p2" and len(by_identifier.events) == 25
    assert [e.time for e in by_identifier.events] == sorted(e.time for e in by_identifier.events)
    no_events = source.history(PersonRef(identifier_type="email", identifier_value="new@example.com"), T0)
    assert no_events.person_id == "p3" and no_events.events == []
    with pytest.raises(NotFound):
        source.history(PersonRef(person_id="nobody"), T0)


def test_an_unreachable_profile_service_is_unavailable() -> None:
    with grpc.insecure_channel("127.0.0.1:1") as channel:
        source = GrpcProfileSource(profile_grpc.ProfileServiceStub(channel))
        with pytest.raises(Unavailable):
            source.history(PersonRef(person_id="p1"), T0)
