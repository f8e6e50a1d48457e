"""Ingestion over real gRPC into the real Cassandra: idempotency, late events, rejections, traits."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf import field_mask_pb2, timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from onecdp.profile.v1 import profile_service_pb2 as pb
from onecdp.profile.v1 import profile_service_pb2_grpc as pb_grpc

from tests.services.profile.conftest import at, event, ident, identify, ingest, order, profile_of, selector, track

pytestmark = pytest.mark.integration

Stub = pb_grpc.ProfileServiceStub


def test_events_build_a_profile_readable_by_any_identifier(profiles: Stub) -> None:
    results = ingest(
        profiles,
        identify("email:Ann@Example.com", "cookie:c-ann", when="2026-01-01", traits={"first_name": "Ann"}),
        track("cookie:c-ann", name="view_item", when="2026-01-02", properties={"category": "shoes"}),
        order("email:ann@example.com", order_id="o-1", amount=40.0, when="2026-01-03",
              items=[pb.OrderItem(sku="s1", category="shoes", brand="acme", quantity=2, unit_price=20.0)]),
    )
    assert [r.status for r in results] == [pb.EVENT_STATUS_ACCEPTED] * 3
    assert len({r.person_id for r in results}) == 1
    by_cookie = profile_of(profiles, "cookie:c-ann")
    by_email = profile_of(profiles, "email:ANN@example.com")
    assert by_cookie.person_id == by_email.person_id == results[0].person_id
    assert by_cookie.name == f"profiles/{results[0].person_id}"
    assert by_cookie.traits["first_name"].value.string_value == "Ann"
    assert by_cookie.traits["first_name"].source == "test"
    assert {(i.type, i.value) for i in by_cookie.identifiers} >= {("email", "ann@example.com"), ("cookie", "c-ann")}
    computed = by_cookie.computed
    assert (computed.event_count, computed.frequency, computed.monetary) == (3, 1, 40.0)
    assert computed.first_seen_time.ToDatetime(tzinfo=UTC) == datetime(2026, 1, 1, tzinfo=UTC)
    assert computed.last_seen_time.ToDatetime(tzinfo=UTC) == datetime(2026, 1, 3, tzinfo=UTC)
    assert list(by_cookie.preferences.top_categories) == ["shoes"]  # 2 items + 1 view
    assert list(by_cookie.preferences.top_brands) == ["acme"]
    assert [t.order_id for t in by_cookie.recent_transactions] == ["o-1"]
    assert by_cookie.recent_transactions[0].item_count == 2


def test_a_replayed_event_is_stored_and_counted_once(profiles: Stub) -> None:
    first = order("crm_id:c1", order_id="o-1", amount=10.0, message_id="replayed-order")
    results = ingest(profiles, first, first)
    assert [r.status for r in results] == [pb.EVENT_STATUS_ACCEPTED, pb.EVENT_STATUS_DUPLICATE]
    assert results[1].person_id == results[0].person_id
    again = ingest(profiles, first)
    assert again[0].status == pb.EVENT_STATUS_DUPLICATE and again[0].person_id == results[0].person_id
    computed = profile_of(profiles, "crm_id:c1").computed
    assert (computed.event_count, computed.frequency, computed.monetary) == (1, 1, 10.0)


def test_traits_resolve_by_event_time_not_arrival(profiles: Stub) -> None:
    ingest(profiles, identify("crm_id:c2", when="2026-03-01", traits={"plan": "pro", "city": "Lyon"}))
    ingest(profiles, identify("crm_id:c2", when="2026-02-01", traits={"plan": "free", "age": 30}))
    traits = profile_of(profiles, "crm_id:c2").traits
    assert traits["plan"].value.string_value == "pro"
    assert traits["city"].value.string_value == "Lyon"
    assert traits["age"].value.number_value == 30
    # A later null deletes the trait; an earlier one does not.
    ingest(profiles, identify("crm_id:c2", when="2026-01-01", traits={"city": None}))
    assert "city" in profile_of(profiles, "crm_id:c2").traits
    ingest(profiles, identify("crm_id:c2", when="2026-04-01", traits={"city": None}))
    assert "city" not in profile_of(profiles, "crm_id:c2").traits


def test_late_events_land_in_their_place_in_time(profiles: Stub) -> None:
    ingest(profiles, track("crm_id:c3", name="open", when="2026-05-10"))
    ingest(profiles, track("crm_id:c3", name="open", when="2025-11-20"))
    ingest(profiles, order("crm_id:c3", order_id="late", amount=5.0, when="2026-01-15"))
    listed = profiles.ListProfileEvents(pb.ListProfileEventsRequest(
        person=selector("crm_id:c3")), timeout=10).events
    times = [e.event.event_time.ToDatetime() for e in listed]
    assert times == sorted(times, reverse=True) and len(times) == 3
    computed = profile_of(profiles, "crm_id:c3").computed
    assert computed.first_seen_time.ToDatetime(tzinfo=UTC) == datetime(2025, 11, 20, tzinfo=UTC)


def _as_of(text: str) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(at(text))
    return stamp


def test_a_partial_refund_nets_out_of_its_order(profiles: Stub) -> None:
    ingest(profiles, order("crm_id:refund-partial", order_id="R-1", amount=100.0, when="2026-01-01T10:00",
                           message_id="refund-partial-1"),
           order("crm_id:refund-partial", order_id="R-1", amount=-30.0, when="2026-01-02T10:00"))
    profile = profile_of(profiles, "crm_id:refund-partial", as_of_time=_as_of("2026-01-05"))
    computed = profile.computed
    assert (computed.monetary, computed.lifetime_value, computed.frequency, computed.average_order_value) == (
        70.0, 70.0, 1, 70.0)
    order_windows = [(w.window_days, w.count, w.sum) for w in computed.window_aggregates if w.event_name == "order"]
    assert order_windows == [(7, 2, 70.0), (30, 2, 70.0), (90, 2, 70.0)]
    (transaction,) = profile.recent_transactions
    assert (transaction.order_id, transaction.amount, transaction.message_id) == ("R-1", 70.0, "refund-partial-1")
    assert transaction.event_time.ToDatetime(tzinfo=UTC) == at("2026-01-01T10:00")
    assert transaction.update_time.ToDatetime(tzinfo=UTC) == at("2026-01-02T10:00")
    # Recency counts from the purchase: the refund is no order.
    assert computed.recency_days == pytest.approx(3 + 14 / 24)


def test_a_full_refund_leaves_an_order_placed_worth_nothing(profiles: Stub) -> None:
    ingest(profiles, order("crm_id:refund-full", order_id="o-9", amount=100.0, when="2026-01-01"),
           order("crm_id:refund-full", order_id="o-10", amount=20.0, when="2026-01-02"))
    ingest(profiles, order("crm_id:refund-full", order_id="o-9", amount=-100.0, when="2026-01-05"))
    profile = profile_of(profiles, "crm_id:refund-full")
    computed = profile.computed
    assert (computed.frequency, computed.monetary, computed.lifetime_value, computed.average_order_value) == (
        2, 20.0, 20.0, 10.0)
    assert [(t.order_id, t.amount) for t in profile.recent_transactions] == [("o-10", 20.0), ("o-9", 0.0)]
    ingest(profiles, order("crm_id:refund-only-full", order_id="o-11", amount=50.0, when="2026-01-01"),
           order("crm_id:refund-only-full", order_id="o-11", amount=-50.0, when="2026-01-03"))
    computed = profile_of(profiles, "crm_id:refund-only-full").computed
    assert (computed.frequency, computed.monetary, computed.average_order_value) == (1, 0.0, 0.0)


def test_a_refund_of_an_unknown_order_adds_no_order(profiles: Stub) -> None:
    ingest(profiles, order("crm_id:refund-orphan", order_id="kept", amount=40.0, when="2026-01-01"),
           order("crm_id:refund-orphan", order_id="elsewhere", amount=-15.0, when="2026-01-02"))
    profile = profile_of(profiles, "crm_id:refund-orphan")
    computed = profile.computed
    assert (computed.frequency, computed.monetary, computed.average_order_value) == (1, 25.0, 25.0)
    assert [(t.order_id, t.amount) for t in profile.recent_transactions] == [("elsewhere", -15.0), ("kept", 40.0)]
    ingest(profiles, order("crm_id:refund-orphan-only", order_id="x", amount=-5.0, when="2026-01-02"))
    computed = profile_of(profiles, "crm_id:refund-orphan-only").computed
    assert (computed.frequency, computed.monetary, computed.average_order_value) == (0, -5.0, 0.0)
    assert not computed.HasField("recency_days") and not computed.HasField("rfm")


def _reason(results: list[pb.EventResult], message_id: str) -> int:
    (result,) = [r for r in results if r.message_id == message_id]
    assert result.status == pb.EVENT_STATUS_REJECTED, result
    assert result.message, "a rejection says why"
    return result.rejection_reason


def test_each_rejection_reason_and_one_bad_event_never_sinks_its_batch(profiles: Stub) -> None:
    now = datetime.now(UTC)
    no_time = pb.Event(message_id="no-time", type=pb.EVENT_TYPE_TRACK, event_name="x",
                       identifiers=[ident("crm_id:r1")])
    batch = [
        track("crm_id:r1", message_id="good-1"),
        track("crm_id:r1", message_id="x" * 129),
        event(pb.EVENT_TYPE_UNSPECIFIED, "crm_id:r1", message_id="no-type"),
        no_time,
        track("crm_id:r1", message_id="future", when=now + timedelta(days=2)),
        track("crm_id:r1", message_id="ancient", when="1989-12-31"),
        event(pb.EVENT_TYPE_TRACK, name="x", message_id="no-identifier"),
        track("email:not-an-email", message_id="bad-email"),
        track("crm_id:r1", message_id="huge", properties={"blob": "x" * 70_000}),
        event(pb.EVENT_TYPE_TRACK, "crm_id:r1", message_id="no-name"),
        event(pb.EVENT_TYPE_ORDER, "crm_id:r1", message_id="no-order"),
        event(pb.EVENT_TYPE_ALIAS, "crm_id:r1", message_id="lonely-alias"),
        track("crm_id:r1", name="n" * 129, message_id="long-name"),
        order("crm_id:r1", order_id="o", amount=float("nan"), message_id="nan-amount"),
        track("cookie:unknown", message_id="junk-only"),
        track("crm_id:r1", message_id="good-2"),
    ]
    results = ingest(profiles, *batch)
    assert [r.message_id for r in results] == [e.message_id for e in batch]
    expected = {
        "x" * 129: pb.EVENT_REJECTION_REASON_BAD_MESSAGE_ID,
        "no-type": pb.EVENT_REJECTION_REASON_UNKNOWN_TYPE,
        "no-time": pb.EVENT_REJECTION_REASON_BAD_TIMESTAMP,
        "future": pb.EVENT_REJECTION_REASON_BAD_TIMESTAMP,
        "ancient": pb.EVENT_REJECTION_REASON_BAD_TIMESTAMP,
        "no-identifier": pb.EVENT_REJECTION_REASON_MISSING_IDENTIFIER,
        "bad-email": pb.EVENT_REJECTION_REASON_INVALID_IDENTIFIER,
        "huge": pb.EVENT_REJECTION_REASON_OVERSIZED_PAYLOAD,
        "no-name": pb.EVENT_REJECTION_REASON_MISSING_FIELD,
        "no-order": pb.EVENT_REJECTION_REASON_MISSING_FIELD,
        "lonely-alias": pb.EVENT_REJECTION_REASON_MISSING_FIELD,
        "long-name": pb.EVENT_REJECTION_REASON_INVALID_FIELD,
        "nan-amount": pb.EVENT_REJECTION_REASON_INVALID_FIELD,
        "junk-only": pb.EVENT_REJECTION_REASON_MISSING_IDENTIFIER,
    }
    assert {m: _reason(results, m) for m in expected} == expected
    assert "not an email" in next(r for r in results if r.message_id == "bad-email").message
    # The message names the identifier by its place in the event, as a field path would.
    assert next(r for r in results if r.message_id == "bad-email").message.startswith("identifiers[0].value: ")
    # A repeat of a rejected event in the same batch is rejected alike, not reported as stored.
    twice = ingest(profiles, track("email:still-bad", message_id="bad-twice"),
                   track("email:still-bad", message_id="bad-twice"))
    assert [r.status for r in twice] == [pb.EVENT_STATUS_REJECTED] * 2
    good = [r for r in results if r.message_id.startswith("good")]
    assert [r.status for r in good] == [pb.EVENT_STATUS_ACCEPTED] * 2
    # Nothing of a rejected event was written: only the two good events are on the profile.
    assert profile_of(profiles, "crm_id:r1").computed.event_count == 2


def test_whole_call_errors_are_precise(profiles: Stub) -> None:
    with pytest.raises(grpc.RpcError) as empty:
        profiles.IngestEvents(pb.IngestEventsRequest(), timeout=10)
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as too_many:
        profiles.IngestEvents(pb.IngestEventsRequest(events=[track("crm_id:z")] * 1001), timeout=10)
    assert too_many.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as unknown:
        profile_of(profiles, "crm_id:nobody")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_stream_ingest_totals(profiles: Stub) -> None:
    def batches() -> list[pb.StreamIngestEventsRequest]:
        repeated = track("crm_id:s1", message_id="stream-dup")
        without_id = track("crm_id:s1")
        without_id.message_id = ""
        return [pb.StreamIngestEventsRequest(events=[repeated, track("crm_id:s1")]),
                pb.StreamIngestEventsRequest(events=[repeated, without_id])]
    response = profiles.StreamIngestEvents(iter(batches()), timeout=30)
    assert (response.accepted_count, response.duplicate_count, response.rejected_count) == (2, 1, 1)
    assert len(response.results) == 4


def test_read_mask_selects_fields_and_rejects_unknown_paths(profiles: Stub) -> None:
    ingest(profiles, identify("crm_id:m1", traits={"plan": "pro", "city": "Oslo"}),
           order("crm_id:m1", order_id="o", amount=12.5))
    masked = profile_of(profiles, "crm_id:m1", read_mask={"paths": ["traits.plan", "computed.frequency"]})
    assert list(masked.traits) == ["plan"]
    assert masked.computed.frequency == 1 and masked.computed.monetary == 0
    assert not masked.recent_transactions and not masked.person_id
    with pytest.raises(grpc.RpcError) as bad:
        profile_of(profiles, "crm_id:m1", read_mask={"paths": ["computed.nonsense", "traits"]})
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(bad.value)
    assert status is not None
    violations = error_details_pb2.BadRequest()
    assert any(d.Unpack(violations) for d in status.details if d.Is(violations.DESCRIPTOR))
    assert [v.field for v in violations.field_violations] == ["read_mask.paths[0]"]


def test_events_page_newest_first_with_filters(profiles: Stub) -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    ingest(profiles, *[track("crm_id:p1", name="click" if i % 3 else "open", when=start + timedelta(days=i))
                       for i in range(25)])
    person = selector("crm_id:p1")
    seen: list[datetime] = []
    token = ""
    for _ in range(5):
        page = profiles.ListProfileEvents(pb.ListProfileEventsRequest(person=person, page_size=10,
                                                                      page_token=token), timeout=10)
        seen += [e.event.event_time.ToDatetime(tzinfo=UTC) for e in page.events]
        token = page.next_page_token
        if not token:
            break
    assert seen == [start + timedelta(days=i) for i in reversed(range(25))]
    request = pb.ListProfileEventsRequest(person=person, event_names=["open"], page_size=100)
    request.start_time.FromDatetime(start + timedelta(days=3))
    request.end_time.FromDatetime(start + timedelta(days=12))
    opens = profiles.ListProfileEvents(request, timeout=10).events
    assert [e.event.event_time.ToDatetime(tzinfo=UTC).day for e in opens] == [10, 7, 4]
    with pytest.raises(grpc.RpcError) as bad:
        profiles.ListProfileEvents(pb.ListProfileEventsRequest(person=person, page_token="garbage"), timeout=10)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_as_of_time_gives_a_point_in_time_view(profiles: Stub) -> None:
    ingest(profiles, order("crm_id:a1", order_id="o1", amount=10.0, when="2026-01-01"),
           order("crm_id:a1", order_id="o2", amount=30.0, when="2026-03-01"))
    as_of = pb.GetProfileRequest().as_of_time
    as_of.FromDatetime(datetime(2026, 2, 1, tzinfo=UTC))
    computed = profile_of(profiles, "crm_id:a1", as_of_time=as_of).computed
    assert (computed.frequency, computed.monetary) == (1, 10.0)
    assert computed.recency_days == pytest.approx(31.0)
    assert computed.lifecycle_stage == pb.LIFECYCLE_STAGE_SILENT


def test_time_filters_use_the_exact_event_time(profiles: Stub) -> None:
    exact = datetime(2026, 1, 5, 12, 0, 0, 513736, tzinfo=UTC)
    ingest(profiles, track("crm_id:us1", name="tick", when=exact))
    request = pb.ListProfileEventsRequest(person=selector("crm_id:us1"))
    request.end_time.FromDatetime(exact)
    assert not profiles.ListProfileEvents(request, timeout=10).events, "end_time is exclusive to the microsecond"
    request.end_time.FromDatetime(exact + timedelta(microseconds=1))
    (stored,) = profiles.ListProfileEvents(request, timeout=10).events
    assert stored.event.event_time.ToDatetime(tzinfo=UTC) == exact


def test_batch_get_reads_many_profiles_and_their_events_in_one_call(profiles: Stub) -> None:
    ingest(profiles, order("crm_id:b1", order_id="o1", amount=5.0, when="2026-01-01"),
           track("crm_id:b1", name="open", when="2026-01-03"), track("crm_id:b2", name="open", when="2026-01-02"))
    request = pb.BatchGetProfilesRequest(persons=[selector("crm_id:b1"), selector("crm_id:nobody"),
                                                  selector("crm_id:b2")], include_events=True,
                                         read_mask=field_mask_pb2.FieldMask(paths=["person_id", "computed.frequency"]))
    request.events_end_time.FromDatetime(datetime(2026, 1, 3, tzinfo=UTC))
    first, missing, second = profiles.BatchGetProfiles(request, timeout=10).results
    assert (first.found, missing.found, second.found) == (True, False, True)
    assert first.profile.computed.frequency == 1 and not first.profile.traits
    assert [e.event.type for e in first.events] == [pb.EVENT_TYPE_ORDER], "oldest first, before events_end_time"
    assert [e.event.event_name for e in second.events] == ["open"]


def test_an_invalid_identifier_in_a_read_is_invalid_argument_not_unavailable(profiles: Stub) -> None:
    with pytest.raises(grpc.RpcError) as bad:
        profile_of(profiles, "email:not-an-email")
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not an email" in (bad.value.details() or "")


def test_batch_get_names_an_invalid_selector(profiles: Stub) -> None:
    ingest(profiles, track("crm_id:v1", name="open"))
    with pytest.raises(grpc.RpcError) as bad:
        profiles.BatchGetProfiles(pb.BatchGetProfilesRequest(
            persons=[selector("crm_id:v1"), selector("email:nope")]), timeout=10)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(bad.value)
    assert status is not None
    violations = error_details_pb2.BadRequest()
    assert any(d.Unpack(violations) for d in status.details if d.Is(violations.DESCRIPTOR))
    # The path of the bad part in this request, and a description that does not repeat it.
    assert [v.field for v in violations.field_violations] == ["persons[1].identifier.value"]
    (description,) = [v.description for v in violations.field_violations]
    assert "'nope' is not an email" in description and not description.startswith("identifier")
