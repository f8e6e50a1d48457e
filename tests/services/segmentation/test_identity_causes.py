"""Exits caused by who-is-who changes say so, over the real identity, profile and segmentation services: an
erased person leaves with cause `erase` (a consumer must not target them again), a person an identity split
takes apart leaves with cause `split`, never `realtime` like an ordinary profile change."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from onecdp.common.v1 import common_pb2
from onecdp.identity.v1 import identity_service_pb2 as identity_pb
from onecdp.identity.v1 import identity_service_pb2_grpc as identity_grpc
from onecdp.profile.v1 import profile_service_pb2 as profile_pb
from onecdp.profile.v1 import profile_service_pb2_grpc as profile_grpc
from onecdp.segmentation.v1 import segmentation_service_pb2_grpc as pb_grpc

from shared.runner import RunningService
from tests.services.profile.conftest import ident, identify, ingest, track
from tests.services.segmentation.conftest import eventually
from tests.services.segmentation.test_batch import members_of, wait_ready
from tests.services.segmentation.test_realtime import ENTER, EXIT, changes_of
from tests.services.segmentation.test_segments import create

pytestmark = pytest.mark.integration


@pytest.fixture
def identity(identity_service: RunningService) -> Iterator[identity_grpc.IdentityServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{identity_service.port}") as channel:
        yield identity_grpc.IdentityServiceStub(channel)


def person_of(results: list[profile_pb.EventResult]) -> str:
    assert results[0].status == profile_pb.EVENT_STATUS_ACCEPTED, results[0]
    return results[0].person_id


def merge_recorded(profiles: profile_grpc.ProfileServiceStub, person_id: str) -> bool:
    changes = profiles.ListProfileChanges(profile_pb.ListProfileChangesRequest(page_size=1000), timeout=10).changes
    return any(c.type == profile_pb.PROFILE_CHANGE_TYPE_MERGE and c.person_id == person_id for c in changes)


def test_erase_and_split_exits_carry_their_cause(stack: pb_grpc.SegmentationServiceStub,
                                                 profiles: profile_grpc.ProfileServiceStub,
                                                 identity: identity_grpc.IdentityServiceStub) -> None:
    create(stack, "pros", 'traits.plan = "pro"')
    create(stack, "pinged", 'event("ping").count(last 30d) >= 1')
    create(stack, "both-halves", 'event("a_only").count(last 30d) >= 1 AND event("b_only").count(last 30d) >= 1')
    for segment_id in ("pros", "pinged", "both-halves"):
        assert wait_ready(stack, f"segments/{segment_id}").member_count == 0
    recently = datetime.now(UTC) - timedelta(hours=1)

    # Erase: a member erased through identity (a privacy request) leaves with cause `erase`.
    ann = person_of(ingest(profiles, identify("crm_id:ann", when=recently, traits={"plan": "pro"})))
    assert eventually(lambda: members_of(stack, "segments/pros"), [ann]) == [ann]
    identity.ErasePerson(identity_pb.ErasePersonRequest(person=common_pb2.PersonSelector(person_id=ann),
                                                        reason="privacy request"), timeout=30)
    assert eventually(lambda: members_of(stack, "segments/pros"), []) == []
    assert changes_of(stack, "pros") == [(ann, ENTER, "realtime"), (ann, EXIT, "erase")]

    # Split: two persons linked by one observation qualify together; undoing the link takes the merged
    # person out with cause `split`.
    ingest(profiles, track("cookie:half-a", name="a_only", when=recently),
           track("email:half-b@example.com", name="b_only", when=recently))
    linked = person_of(ingest(profiles, identify("cookie:half-a", "email:half-b@example.com", when=recently)))
    assert eventually(lambda: members_of(stack, "segments/both-halves"), [linked]) == [linked]
    # The member can enter before profile records the merge; segmentation reading that merge only after
    # the split would record the exit as the merge's. So the merge is read first: segmentation follows the
    # feed in order, and a later change (a ping) has been applied.
    assert eventually(lambda: merge_recorded(profiles, linked), True)
    pinger = person_of(ingest(profiles, track("crm_id:pinger", name="ping", when=recently)))
    assert eventually(lambda: members_of(stack, "segments/pinged"), [pinger]) == [pinger]
    identity.UnlinkIdentifiers(identity_pb.UnlinkIdentifiersRequest(
        link=identity_pb.IdentifierPair(a=ident("cookie:half-a"), b=ident("email:half-b@example.com")),
        reason="wrong link"), timeout=30)
    assert eventually(lambda: members_of(stack, "segments/both-halves"), []) == []
    changes = changes_of(stack, "both-halves")
    # The entry is the merge's or the linking event's (whichever profile change segmentation reads first).
    assert [(person_id, kind) for person_id, kind, _ in changes] == [(linked, ENTER), (linked, EXIT)]
    assert changes[0][2] in ("merge", "realtime")
    assert changes[1][2] == "split"
