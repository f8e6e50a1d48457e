"""ScanProfiles' hand-encoded responses are the messages the adapter would build (parsed and compared)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf import field_mask_pb2
from onecdp.profile.v1 import profile_service_pb2 as pb

from services.profile.model import StoredEventRecord, TraitValue
from services.profile.profiles import ProfileView
from services.profile.scan_response import profile_bytes, scan_response_bytes, stored_event_bytes, varint
from services.profile.server import ReadMask, _fill_stored_event, _profile, _profile_bytes

pytestmark = pytest.mark.unit

WHEN = datetime(2026, 3, 4, 5, 6, 7, 890123, tzinfo=UTC)
TRAITS = {
    "plan": TraitValue("plan", "pró", WHEN, "crm", 1),
    "opted_out": TraitValue("opted_out", False, datetime(1969, 12, 31, 23, 59, 59, 500000, tzinfo=UTC), "", 0),
    "visits": TraitValue("visits", 3, datetime(1970, 1, 1, tzinfo=UTC), "web", 3),
    "score": TraitValue("score", -0.25, WHEN, "onecdp-prediction", 2),
    "address": TraitValue("address", {"city": "Oslo", "zip": ["0150", 2]}, WHEN, "crm", 1),
    "tags": TraitValue("tags", ["a", 1.5, True, None], WHEN + timedelta(seconds=1), "crm", 1),
}


def _view(events: list[StoredEventRecord]) -> ProfileView:
    return ProfileView(person_id="p-1", identifiers=[], traits=dict(TRAITS), computed=None, events=events,
                       merged_person_ids=["p-0", "p-9"], update_time=WHEN)


def _event(message_id: str, receive_time: datetime | None, person_id: str = "p-1") -> StoredEventRecord:
    event = pb.Event(message_id=message_id, event_name="open", type=pb.EVENT_TYPE_TRACK)
    event.event_time.FromDatetime(WHEN)
    event.properties.update({"page": "/", "n": 2})
    return StoredEventRecord(message_id, person_id, "open", WHEN, event.SerializeToString(), receive_time)


@pytest.mark.parametrize("paths", [
    ["person_id", "traits"], ["person_id", "traits.plan", "traits.tags"], ["name", "merged_person_ids", "update_time"],
    ["person_id", "traits.address", "traits.visits", "traits.opted_out", "traits.score", "update_time"],
    ["traits.nothing_by_this_name"],
])
def test_a_direct_profile_is_the_message_the_mask_selects(paths: list[str]) -> None:
    mask = ReadMask(field_mask_pb2.FieldMask(paths=paths))
    assert mask.direct
    view = _view([])
    encoded = profile_bytes(view, mask.paths, mask.wants_traits, mask.trait_names)
    assert pb.Profile.FromString(encoded) == mask.apply(_profile(view))


def test_events_and_whole_responses_are_the_messages_built_field_by_field() -> None:
    events = [_event("m-1", WHEN), _event("m-2", None, person_id="p-0"),
              _event("m-3", datetime(1960, 1, 1, 0, 0, 0, 1, tzinfo=UTC)),
              StoredEventRecord("m-4", "", "", WHEN, b"", None)]
    for event in events:
        built = pb.StoredEvent()
        _fill_stored_event(built, event)
        assert pb.StoredEvent.FromString(stored_event_bytes(event)) == built
    masks = [ReadMask(field_mask_pb2.FieldMask(paths=["person_id", "traits.plan"])),
             ReadMask(field_mask_pb2.FieldMask(paths=["person_id", "identifiers", "traits"])), ReadMask(
                 field_mask_pb2.FieldMask())]
    for mask in masks:
        views = [_view(events), _view([]), _view(events[:1])]
        expected = pb.ScanProfilesResponse()
        for view in views:
            scanned = expected.profiles.add(profile=mask.apply(_profile(view)))
            for event in view.events:
                _fill_stored_event(scanned.events.add(), event)
        encoded = scan_response_bytes((_profile_bytes(view, mask), view.events) for view in views)
        assert pb.ScanProfilesResponse.FromString(encoded) == expected
    assert scan_response_bytes([]) == b""


@pytest.mark.parametrize("value", [1, 127, 128, 300, 2**31, 2**63 - 1, -1, -(2**63)])
def test_varints_are_the_runtimes(value: int) -> None:
    assert pb.ComputedTraits(frequency=value).SerializeToString() == b"\x20" + varint(value)
