"""Recompute operations outlive the process running them: when it is killed, another process takes its
operations over and finishes them; an operation interrupted too often ends with ABORTED and leaves its
segment FAILED, never COMPUTING forever."""

from __future__ import annotations

import time
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.longrunning import operations_pb2
from onecdp.profile.v1 import profile_service_pb2_grpc as profile_grpc
from onecdp.segmentation.v1 import segmentation_service_pb2 as pb
from onecdp.segmentation.v1 import segmentation_service_pb2_grpc as pb_grpc

from bench.common import free_port, service_env, start_service_process
from services.segmentation.catalog import RuleInput, SegmentCatalog, SegmentState
from services.segmentation.follower import Memberships
from services.segmentation.profile_source import GrpcProfileSource
from services.segmentation.recompute import LEASE_SECONDS, MAX_ATTEMPTS, Recomputer
from services.segmentation.server import DEFINITION as SEGMENTATION
from services.segmentation.store import SegmentStore
from services.segmentation.text import parse
from shared.cassandra import CassandraSession
from shared.clients import profile_stub
from shared.config import CassandraSettings, GrpcSettings
from shared.leases import operation_lease_name
from shared.runner import RunningService, start_service
from tests.services.segmentation.conftest import identify, ingest
from tests.services.segmentation.test_batch import finished, members_of, wait_ready

pytestmark = pytest.mark.integration


def stamp(when: datetime) -> str:
    return when.astimezone(UTC).replace(tzinfo=None).isoformat()


def test_operations_of_a_killed_process_are_taken_over(
        cassandra_settings: CassandraSettings, grpc_settings: GrpcSettings, admin_session: CassandraSession,
        profile_service: RunningService, profiles: profile_grpc.ProfileServiceStub) -> None:
    week_ago = stamp(datetime.now(UTC) - timedelta(days=7))
    persons = ingest(profiles, identify("ann", week_ago, {"plan": "pro"}), identify("bob", week_ago, {"plan": "free"}))
    keyspace = cassandra_settings.keyspace("segmentation")

    # Segmentation as a process of its own, in front of a profile address nobody answers: the first
    # computations of two new segments keep retrying, until the process is killed.
    port = free_port()
    env = {**service_env(cassandra_settings, {"segmentation": port}),
           "CASSANDRA_CONTACT_POINTS": ",".join(cassandra_settings.contact_points),
           "ONECDP_PROFILE_TARGET": f"127.0.0.1:{free_port()}"}
    process = start_service_process("segmentation", port, env)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            doomed_process = pb_grpc.SegmentationServiceStub(channel)
            for segment_id, text in [("pros", 'traits.plan = "pro"'), ("frees", 'traits.plan = "free"')]:
                doomed_process.CreateSegment(pb.CreateSegmentRequest(segment_id=segment_id, segment=pb.Segment(
                    rule_text=text)), timeout=10)
            running = {row.operation_id for row in admin_session.execute(
                f"SELECT operation_id FROM {keyspace}.running_operations WHERE catalog = 0")}
            operations = {}
            for operation_id in running:
                operation = doomed_process.GetOperation(operations_pb2.GetOperationRequest(
                    name=f"operations/{operation_id}"), timeout=10)
                metadata = pb.RecomputeSegmentMetadata()
                assert operation.metadata.Unpack(metadata) and not operation.done
                assert metadata.attempt == 1
                operations[metadata.segment.removeprefix("segments/")] = operation.name
            assert set(operations) == {"pros", "frees"}
    finally:
        process.kill()
        process.wait(timeout=30)

    # The operation of "frees" has been taken over and interrupted before (its last attempt died just now).
    frees_id = operations["frees"].removeprefix("operations/")
    admin_session.execute(f"UPDATE {keyspace}.operations SET attempt = ? WHERE operation_id = ?",
                          (MAX_ATTEMPTS, frees_id))
    # The lease time passes: expired now rather than in 15 s.
    for name in operations.values():
        admin_session.execute(f"DELETE FROM {keyspace}.follower_leases WHERE name = ?",
                              (operation_lease_name(name.removeprefix("operations/")),))

    # A new process (in this one) with the profile service behind it takes both over.
    settings = grpc_settings.model_copy(update={"profile_target": f"127.0.0.1:{profile_service.port}"})
    service = start_service(SEGMENTATION, settings, cassandra_settings, port=0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            stub = pb_grpc.SegmentationServiceStub(channel)
            done = finished(stub, operations_pb2.Operation(name=operations["pros"]), timeout=90)
            metadata, response = pb.RecomputeSegmentMetadata(), pb.RecomputeSegmentResponse()
            assert done.done and done.metadata.Unpack(metadata) and done.response.Unpack(response), done
            assert (metadata.attempt, response.member_count) == (2, 1)
            assert wait_ready(stub, "segments/pros").state == pb.SEGMENT_STATE_READY
            assert members_of(stub, "segments/pros") == [persons["ann"]]
            # Ann entered once: by the taken-over recompute, or first by this process's real time (its follower
            # reads the profile feed from the start, and can apply her identify before the recompute's diff).
            changes = stub.ListSegmentMembershipChanges(pb.ListSegmentMembershipChangesRequest(
                parent="segments/pros", include_unsettled=True), timeout=10).changes
            assert [(c.person_id, c.type) for c in changes] == [(persons["ann"], pb.MEMBERSHIP_CHANGE_TYPE_ENTER)]
            assert response.entered_count == (1 if changes[0].cause == "recompute" else 0)

            aborted = finished(stub, operations_pb2.Operation(name=operations["frees"]), timeout=90)
            assert aborted.done and aborted.error.code == grpc.StatusCode.ABORTED.value[0], aborted
            assert f"interrupted {MAX_ATTEMPTS} times" in aborted.error.message
            frees = stub.GetSegment(pb.GetSegmentRequest(name="segments/frees"), timeout=10)
            assert frees.state == pb.SEGMENT_STATE_FAILED

            # Asking again computes it.
            again = finished(stub, stub.RecomputeSegment(pb.RecomputeSegmentRequest(name="segments/frees"),
                                                         timeout=10), timeout=90)
            assert again.done and not again.HasField("error"), again
            assert wait_ready(stub, "segments/frees").state == pb.SEGMENT_STATE_READY
            assert members_of(stub, "segments/frees") == [persons["bob"]]
            assert not list(admin_session.execute(f"SELECT operation_id FROM {keyspace}.running_operations "
                                                  "WHERE catalog = 0"))
    finally:
        service.stop(None)


def test_a_segment_left_computing_without_an_operation_is_completed(
        segmentation_session: CassandraSession, grpc_settings: GrpcSettings, profile_service: RunningService,
        profiles: profile_grpc.ProfileServiceStub) -> None:
    week_ago = stamp(datetime.now(UTC) - timedelta(days=7))
    persons = ingest(profiles, identify("ann", week_ago, {"plan": "pro"}), identify("bob", week_ago, {"plan": "free"}))
    store = SegmentStore(segmentation_session)
    # A catalog that starts no computation leaves what a process dying between saving a new segment and
    # starting its operation leaves: a COMPUTING segment and no operation.
    catalog = SegmentCatalog(store)
    for segment_id, text in [("pros", 'traits.plan = "pro"'), ("frees", 'traits.plan = "free"')]:
        created = catalog.create(segment_id, "", "", RuleInput(parse(text), "segment.rule_text", from_text=True))
        assert (created.state, created.operation_id) == (SegmentState.COMPUTING, "")
    channels = ExitStack()
    source = GrpcProfileSource(profile_stub(grpc_settings.model_copy(
        update={"profile_target": f"127.0.0.1:{profile_service.port}"}), channels.callback))

    recomputer = Recomputer(catalog, store, source, reconciler=Memberships(catalog, store, source))
    try:
        # Within the grace time the segment's own process may still be starting its operation.
        assert recomputer.complete_stuck() == []
        later = datetime.now(UTC) + timedelta(seconds=LEASE_SECONDS + 1)
        assert recomputer.complete_stuck(later) == ["frees", "pros"]
        operation_id = catalog.get("pros").operation_id
        assert operation_id and store.get_operation(operation_id) is not None
        assert recomputer.complete_stuck(later) == []  # their operations are live now
        for segment_id, person in [("pros", "ann"), ("frees", "bob")]:
            end = time.monotonic() + 60
            while catalog.get(segment_id).state is SegmentState.COMPUTING and time.monotonic() < end:
                time.sleep(0.2)
            segment = catalog.get(segment_id)
            assert segment.state is SegmentState.READY and store.member_ids(segment_id) == {persons[person]}
            operation = store.get_operation(segment.operation_id)
            assert operation is not None and operation.done and operation.revision == segment.revision
    finally:
        recomputer.stop()

    # The supervisor does it by itself: a rule change whose operation was never started (lease time 1 s).
    updated = catalog.update("pros", ["rule_text"], display_name="", description="", etag="",
                             rule_input=RuleInput(parse('traits.plan EXISTS'), "segment.rule_text", from_text=True))
    assert (updated.state, updated.revision, updated.operation_id) == (SegmentState.COMPUTING, 2, "")
    supervised = Recomputer(catalog, store, source, reconciler=Memberships(catalog, store, source),
                            lease_seconds=1)
    supervised.start_supervisor()
    try:
        end = time.monotonic() + 60
        while catalog.get("pros").state is SegmentState.COMPUTING and time.monotonic() < end:
            time.sleep(0.2)
        segment = catalog.get("pros")
        assert segment.state is SegmentState.READY and segment.operation_id
        assert store.member_ids("pros") == {persons["ann"], persons["bob"]}
    finally:
        supervised.stop()
        channels.close()
