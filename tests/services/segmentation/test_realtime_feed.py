"""The real-time follower reads profile's unsettled tail: a change counts as soon as profile wrote it, and a
change stamped earlier but written later than one already applied is still applied (once)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from onecdp.profile.v1 import profile_service_pb2_grpc as profile_grpc

from services.segmentation.catalog import RuleInput, SegmentCatalog
from services.segmentation.follower import PROFILE_FEED, TAIL_REREAD_SECONDS, FeedFollower, Memberships
from services.segmentation.profile_source import GrpcProfileSource
from services.segmentation.store import SegmentStore
from services.segmentation.text import parse
from shared import changefeed
from shared.cassandra import CassandraSession
from shared.config import CassandraSettings
from shared.runner import RunningService
from tests.services.segmentation.conftest import ingest, track

pytestmark = pytest.mark.integration


def stamp(when: datetime) -> str:
    return when.astimezone(UTC).replace(tzinfo=None).isoformat()


def test_a_change_written_after_a_newer_one_was_applied_is_still_applied(
        segmentation_session: CassandraSession, admin_session: CassandraSession,
        cassandra_settings: CassandraSettings, profile_service: RunningService,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Changes of the last minute are unsettled here, so the test holds however slowly this machine runs it.
    monkeypatch.setattr(changefeed, "SETTLE_SECONDS", 60.0)
    store = SegmentStore(segmentation_session)
    catalog = SegmentCatalog(store)  # no recompute: memberships come from the feed alone
    catalog.create("pinged", "", "", RuleInput(parse('event("ping").count(last 1d) >= 1'), "segment.rule_text", True))
    with grpc.insecure_channel(f"127.0.0.1:{profile_service.port}") as channel:
        profiles = profile_grpc.ProfileServiceStub(channel)
        source = GrpcProfileSource(profiles)
        follower = FeedFollower(Memberships(catalog, store, source), store, source)  # driven by hand, no thread

        now = datetime.now(UTC)
        early = ingest(profiles, track("early", "ping", stamp(now - timedelta(minutes=1))))["early"]
        late = ingest(profiles, track("late", "ping", stamp(now)))["late"]
        # `early`'s change was stamped first; pretend its write is still on its way.
        feed = f"{cassandra_settings.keyspace('profile')}.changes"
        rows = list(admin_session.execute(f"SELECT * FROM {feed}"))
        assert sorted(r.person_id for r in rows) == sorted([early, late])
        slow, newer = (next(r for r in rows if r.person_id == p) for p in (early, late))
        assert changefeed.time_of(slow.change_id) < changefeed.time_of(newer.change_id)
        admin_session.execute(f"DELETE FROM {feed} WHERE bucket = ? AND change_id = ?", (slow.bucket, slow.change_id))

        assert follower.follow_once() == 1  # `late`, at once: it is not settled
        assert (store.is_member("pinged", late), store.is_member("pinged", early)) == (True, False)
        saved = store.feed_position(PROFILE_FEED)
        assert saved is not None and saved.endswith(changefeed.UNSETTLED_SUFFIX)
        assert changefeed.parse_cursor(saved) == changefeed.FEED_START, "the saved cursor waits for settling"

        # The slow write lands, stamped before the change already applied.
        columns = list(slow._fields)
        admin_session.execute(f"INSERT INTO {feed} ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})",
                              tuple(slow))
        # Rounds read on from the last change seen; within TAIL_REREAD_SECONDS one reads the unsettled tail
        # again and applies `early` (only: `late` is not applied again).
        applied, deadline = 0, time.monotonic() + 10 * TAIL_REREAD_SECONDS + 5
        while not store.is_member("pinged", early) and time.monotonic() < deadline:
            applied += follower.follow_once()
        assert (store.is_member("pinged", early), applied) == (True, 1)
        assert follower.follow_once() == 0
        changes = store.changes_page("pinged", changefeed.FEED_START, 10)
        assert [(c.person_id, c.entered, c.cause) for c in changes] == [(late, True, "realtime"),
                                                                       (early, True, "realtime")]

        # Settled (the usual settle time, long passed for both), the saved cursor moves past them, and a
        # follower starting from it (after a restart) has nothing left to apply.
        monkeypatch.setattr(changefeed, "SETTLE_SECONDS", 0.0)
        time.sleep(TAIL_REREAD_SECONDS)  # the next round reads from the settled cursor
        assert follower.follow_once() == 0
        saved = store.feed_position(PROFILE_FEED)
        assert saved is not None and changefeed.parse_cursor(saved) == newer.change_id
        restarted = FeedFollower(Memberships(catalog, store, source), store, source)
        assert restarted.follow_once() == 0
        assert len(store.changes_page("pinged", changefeed.FEED_START, 10)) == 2

