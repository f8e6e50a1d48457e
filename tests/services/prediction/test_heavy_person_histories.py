"""A heavy person's history through the real profile service: profile sends a person whose events are more than
one message carries with `events_omitted` (they failed the whole scan or batch read before), and prediction's
profile source pages those events with ListProfileEvents, so the history is whole, not empty.

Profile runs with a 1 MiB maximum message size (ONECDP_MAX_MESSAGE_BYTES), so 18 events make a heavy person."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from onecdp.profile.v1 import profile_service_pb2 as profile_pb
from onecdp.profile.v1 import profile_service_pb2_grpc as profile_grpc

from services.prediction.history import PersonHistory, PersonRef
from services.prediction.profile_source import GrpcProfileSource
from shared.config import GrpcSettings
from tests.services.profile.conftest import ingest, order, track

pytestmark = pytest.mark.integration
BLOB = "x" * (63 * 1024)
BEFORE = datetime(2024, 3, 19, tzinfo=UTC)  # 18 heavy events before it: still more than a message carries


@pytest.fixture
def grpc_settings() -> GrpcSettings:
    return GrpcSettings(bind_host="127.0.0.1", grace_period_seconds=2.0, log_format="text",
                        max_message_bytes=1024 * 1024)


def test_a_heavy_persons_history_is_whole_in_scans_and_batch_reads(profiles: profile_grpc.ProfileServiceStub) -> None:
    heavy = ""
    for start in range(0, 24, 8):  # a request stays under the 1 MiB limit too
        results = ingest(profiles, *(track("crm_id:heavy", name="view", when=f"2024-03-{1 + k:02d}",
                                           properties={"blob": BLOB, "revenue": k})
                                     for k in range(start, min(24, start + 8))))
        assert {r.status for r in results} == {profile_pb.EVENT_STATUS_ACCEPTED}
        heavy = results[0].person_id
    light = ingest(profiles, order("crm_id:light", order_id="o1", amount=10.0, when="2024-03-02"))[0].person_id
    source = GrpcProfileSource(profiles, shard_count=1)

    def revenues(history: PersonHistory) -> list[float | None]:
        return [e.amount for e in history.events]

    scanned = {h.person_id: h for h in source.histories(BEFORE)}
    assert set(scanned) == {heavy, light}
    assert revenues(scanned[heavy]) == [float(k) for k in range(18)], "events before the cutoff, in time order"
    assert revenues(scanned[light]) == [10.0]
    read = source.start_histories_of([PersonRef(identifier_type="crm_id", identifier_value="heavy"),
                                      PersonRef(person_id=light)], BEFORE).result()
    assert [(h.person_id, revenues(h)) for h in read if isinstance(h, PersonHistory)] == [
        (heavy, [float(k) for k in range(18)]), (light, [10.0])]
    whole = source.start_histories_of([PersonRef(person_id=heavy)], None).result()
    assert isinstance(whole[0], PersonHistory) and len(whole[0].events) == 24
