"""The copy of the month-bucketed `timeline` table (written by versions before migration 0004) into
`person_timeline`: what an older version stored reads the same afterwards, the copy runs once, and a
copy run again never brings back a row deleted after the old one was written."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from onecdp.profile.v1 import profile_service_pb2 as pb
from onecdp.profile.v1 import profile_service_pb2_grpc as pb_grpc

from services.profile.backfill import PERSON_TIMELINE, copy_timeline
from services.profile.model import bucket_of
from services.profile.store import ProfileStore, micros
from shared.cassandra import CassandraSession, connect_cluster, open_session
from shared.config import CassandraSettings
from shared.runner import RunningService
from tests.services.profile.conftest import at, ingest, order, selector, track

OLD_INSERT = ("INSERT INTO timeline (person_id, bucket, event_time, message_id, event_micros, event_type, event_name, "
              "order_id, amount, currency_code, item_count, categories, brands, payload, receive_time) "
              "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?")


@pytest.fixture
def profile_session(cassandra_settings: CassandraSettings, profile_service: RunningService
                    ) -> Iterator[CassandraSession]:
    cluster = connect_cluster(cassandra_settings)
    try:
        yield open_session(cluster, cassandra_settings.keyspace("profile"), 30)
    finally:
        cluster.shutdown()


def _store_old(session: CassandraSession, person_id: str, message: pb.Event, written: int) -> None:
    """An event as a version before person_timeline stored it: a timeline row and its month, written at `written`."""
    when = message.event_time.ToDatetime()
    exact = at(when.isoformat())
    order_fields = (message.order.order_id, message.order.amount, "USD", 0) if message.HasField("order") \
        else (None, None, None, None)
    session.execute(OLD_INSERT, (person_id, bucket_of(exact), exact, message.message_id, micros(exact), message.type,
                                 message.event_name or ("order" if message.HasField("order") else ""), *order_fields,
                                 {}, {}, message.SerializeToString(), at("2026-03-01"), written))
    session.execute("INSERT INTO timeline_buckets (person_id, bucket) VALUES (?, ?)", (person_id, bucket_of(exact)))


def _message_ids(profiles: pb_grpc.ProfileServiceStub, pair: str) -> list[str]:
    page = profiles.ListProfileEvents(pb.ListProfileEventsRequest(person=selector(pair)), timeout=30)
    return [e.event.message_id for e in page.events]


def test_old_timeline_rows_read_the_same_after_the_copy_and_a_later_delete_stays(
        profiles: pb_grpc.ProfileServiceStub, profile_session: CassandraSession) -> None:
    person_id = ingest(profiles, track("crm_id:old-1", name="visit", when="2026-02-10T08:00",
                                       message_id="new-visit"))[0].person_id
    assert copy_timeline(profile_session) == 0  # the service copied its (empty) old table when it started
    old_order = order("crm_id:old-1", order_id="o-1", amount=12.5, when="2025-12-31T23:59:59.123456",
                      message_id="old-order")
    old_view = track("crm_id:old-1", name="view_item", when="2026-01-15T10:00", message_id="old-view")
    _store_old(profile_session, person_id, old_order, written=1_000)
    _store_old(profile_session, person_id, old_view, written=2_000)
    profile_session.execute("DELETE FROM backfills WHERE name = ?", (PERSON_TIMELINE,))

    assert copy_timeline(profile_session) == 2
    assert copy_timeline(profile_session) == 0  # done: recorded
    assert _message_ids(profiles, "crm_id:old-1") == ["new-visit", "old-view", "old-order"]
    copied = profiles.GetProfile(pb.GetProfileRequest(person=selector("crm_id:old-1")), timeout=10)
    assert copied.computed.monetary == pytest.approx(12.5)
    page = profiles.ListProfileEvents(pb.ListProfileEventsRequest(person=selector("crm_id:old-1"),
                                                                  event_names=["order"]), timeout=30)
    assert page.events[0].event.event_time.ToDatetime().isoformat() == "2025-12-31T23:59:59.123456"

    # A newer process deletes a copied row (a move or an erasure); copying again, as a process that
    # started before it would, must not bring it back: the copy keeps the old row's write time.
    profile_session.execute("DELETE FROM person_timeline WHERE person_id = ? AND event_time = ? AND message_id = ?",
                            (person_id, at("2026-01-15T10:00"), "old-view"))
    profile_session.execute("DELETE FROM backfills WHERE name = ?", (PERSON_TIMELINE,))
    assert copy_timeline(profile_session) == 2
    assert _message_ids(profiles, "crm_id:old-1") == ["new-visit", "old-order"]


def test_erasure_deletes_what_the_old_timeline_still_holds(
        profiles: pb_grpc.ProfileServiceStub, profile_session: CassandraSession) -> None:
    person_id = ingest(profiles, track("crm_id:old-2", name="visit", when="2026-02-10T08:00"))[0].person_id
    _store_old(profile_session, person_id, track("crm_id:old-2", name="view_item", when="2026-01-15T10:00"),
               written=1_000)
    profile_session.execute("DELETE FROM backfills WHERE name = ?", (PERSON_TIMELINE,))
    assert copy_timeline(profile_session) == 1
    assert len(_message_ids(profiles, "crm_id:old-2")) == 2

    assert ProfileStore(profile_session).erase([person_id], at("2026-03-02")) == 2
    for table in ("timeline", "person_timeline", "timeline_buckets"):
        assert profile_session.execute(f"SELECT person_id FROM {table} WHERE person_id = ? ALLOW FILTERING",
                                       (person_id,)).one() is None, table
