"""ListProfileEvents pages a long timeline reading the months a page needs, not the whole timeline per page."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from onecdp.profile.v1 import profile_service_pb2 as pb
from onecdp.profile.v1 import profile_service_pb2_grpc as pb_grpc

from services.profile.store import ProfileStore
from tests.services.profile.conftest import ingest, selector, track

pytestmark = pytest.mark.integration


def _pages(profiles: pb_grpc.ProfileServiceStub, request: pb.ListProfileEventsRequest) -> list[list[str]]:
    pages, token = [], ""
    while True:
        request.page_token = token
        page = profiles.ListProfileEvents(request, timeout=10)
        pages.append([e.event.message_id for e in page.events])
        token = page.next_page_token
        if not token:
            return pages


def test_pages_of_a_long_timeline_read_what_they_need_and_list_everything_once(
        profiles: pb_grpc.ProfileServiceStub, monkeypatch: pytest.MonkeyPatch) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    # Sparse for three years, dense in the last week; two events share an instant (ordered by message id).
    old = [track("crm_id:pg", name="open" if i % 2 else "view", when=now - timedelta(days=40 + 35 * i),
                 message_id=f"pg-old-{i:02d}") for i in range(30)]
    recent = [track("crm_id:pg", name="open" if i % 2 else "view", when=now - timedelta(hours=3 * i + 1),
                    message_id=f"pg-new-{i:02d}") for i in range(40)]
    same_instant = [track("crm_id:pg", name="open", when=now - timedelta(days=400), message_id=f"pg-tie-{k}")
                    for k in "ab"]
    ingest(profiles, *old, *recent, *same_instant)
    everything = sorted(old + recent + same_instant,
                        key=lambda e: (e.event_time.ToDatetime(), e.message_id), reverse=True)
    read: list[int] = []
    original = ProfileStore.read_persons

    def counting(self: ProfileStore, *args: Any, **kwargs: Any) -> Any:
        contents = original(self, *args, **kwargs)
        read.append(sum(len(c.events) for c in contents))
        return contents
    monkeypatch.setattr(ProfileStore, "read_persons", counting)

    pages = _pages(profiles, pb.ListProfileEventsRequest(person=selector("crm_id:pg"), page_size=7))
    assert [m for page in pages for m in page] == [e.message_id for e in everything]
    assert all(len(page) == 7 for page in pages[:-1])
    # The first page is found among the last month's 40 events; no page reads the whole timeline of 72.
    assert read[0] <= 40 and max(read) < 72, read
    # Names and a time range page the same way.
    request = pb.ListProfileEventsRequest(person=selector("crm_id:pg"), page_size=4, event_names=["open"])
    request.start_time.FromDatetime(now - timedelta(days=500))
    request.end_time.FromDatetime(now - timedelta(hours=10))
    expected = [e.message_id for e in everything if e.event_name == "open"
                and now - timedelta(days=500) <= e.event_time.ToDatetime(tzinfo=UTC) < now - timedelta(hours=10)]
    assert [m for page in _pages(profiles, request) for m in page] == expected
