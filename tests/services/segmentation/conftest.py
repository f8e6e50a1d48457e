"""Segmentation per test, in process, on a free port (identity and profile come from tests/conftest.py)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from onecdp.common.v1 import common_pb2
from onecdp.profile.v1 import profile_service_pb2 as profile_pb
from onecdp.profile.v1 import profile_service_pb2_grpc as profile_grpc
from onecdp.segmentation.v1 import segmentation_service_pb2_grpc as pb_grpc

from services.prediction.server import DEFINITION as PREDICTION
from services.segmentation.recompute import Recomputer
from services.segmentation.server import DEFINITION as SEGMENTATION
from services.segmentation.store import OperationRecord, SegmentStore
from shared.cassandra import CassandraSession, connect_cluster, open_session
from shared.config import CassandraSettings, GrpcSettings
from shared.migrations import migrate_service
from shared.runner import RunningService, start_service

_message_ids = itertools.count()


@pytest.fixture
def segmentation_alone(grpc_settings: GrpcSettings, cassandra_settings: CassandraSettings) -> Iterator[RunningService]:
    """Segmentation without a profile service behind it (enough for segments as resources)."""
    # Nothing listens on port 9: no profile, and no prediction (score conditions are checked by shape only).
    settings = grpc_settings.model_copy(update={"profile_target": "127.0.0.1:9", "prediction_target": "127.0.0.1:9"})
    service = start_service(SEGMENTATION, settings, cassandra_settings, port=0)
    try:
        yield service
    finally:
        service.stop(None)


@pytest.fixture
def segmentation_session(cassandra_settings: CassandraSettings) -> Iterator[CassandraSession]:
    """A session on the test's migrated segmentation keyspace (for domain-level tests)."""
    cluster = connect_cluster(cassandra_settings)
    try:
        session = open_session(cluster, None, 30)
        migrate_service(session, "segmentation", cassandra_settings)
        yield open_session(cluster, cassandra_settings.keyspace("segmentation"), 10)
    finally:
        cluster.shutdown()


@pytest.fixture
def segmentation_with_prediction(grpc_settings: GrpcSettings, cassandra_settings: CassandraSettings,
                                 ) -> Iterator[tuple[RunningService, RunningService]]:
    """Segmentation (no profile) and the prediction service it asks about score conditions' models."""
    prediction = start_service(PREDICTION, grpc_settings, cassandra_settings, port=0)
    try:
        settings = grpc_settings.model_copy(update={"profile_target": "127.0.0.1:9",
                                                    "prediction_target": f"127.0.0.1:{prediction.port}"})
        segmentation = start_service(SEGMENTATION, settings, cassandra_settings, port=0)
        try:
            yield segmentation, prediction
        finally:
            segmentation.stop(None)
    finally:
        prediction.stop(None)


@pytest.fixture
def segmentation(segmentation_alone: RunningService) -> Iterator[pb_grpc.SegmentationServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{segmentation_alone.port}") as channel:
        yield pb_grpc.SegmentationServiceStub(channel)


@pytest.fixture
def segmentation_service(grpc_settings: GrpcSettings, cassandra_settings: CassandraSettings,
                         profile_service: RunningService) -> Iterator[RunningService]:
    settings = grpc_settings.model_copy(update={"profile_target": f"127.0.0.1:{profile_service.port}",
                                                "prediction_target": "127.0.0.1:9"})
    service = start_service(SEGMENTATION, settings, cassandra_settings, port=0)
    try:
        yield service
    finally:
        service.stop(None)


@pytest.fixture
def stack(segmentation_service: RunningService) -> Iterator[pb_grpc.SegmentationServiceStub]:
    """Segmentation in front of profile and identity."""
    with grpc.insecure_channel(f"127.0.0.1:{segmentation_service.port}") as channel:
        yield pb_grpc.SegmentationServiceStub(channel)


def eventually(check: Callable[[], Any], expected: Any, timeout: float = 30) -> Any:
    """`check()` once it returns `expected`, or its last answer after `timeout` (the caller asserts)."""
    end = time.monotonic() + timeout
    while True:
        got = check()
        if got == expected or time.monotonic() > end:
            return got
        time.sleep(0.1)


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def track(person: str, name: str, when: str, properties: dict[str, Any] | None = None) -> profile_pb.Event:
    """A track event of `crm_id:<person>`."""
    message = profile_pb.Event(message_id=f"seg-{next(_message_ids)}", type=profile_pb.EVENT_TYPE_TRACK,
                               identifiers=[common_pb2.Identifier(type="crm_id", value=person)], event_name=name,
                               source="test")
    message.event_time.FromDatetime(at(when))
    if properties:
        struct = struct_pb2.Struct()
        struct.update(properties)
        message.properties.CopyFrom(struct)
    return message


def identify(person: str, when: str, traits: dict[str, Any]) -> profile_pb.Event:
    message = profile_pb.Event(message_id=f"seg-{next(_message_ids)}", type=profile_pb.EVENT_TYPE_IDENTIFY,
                               identifiers=[common_pb2.Identifier(type="crm_id", value=person)], source="test")
    message.event_time.FromDatetime(at(when))
    message.traits.update(traits)
    return message


def order(person: str, order_id: str, amount: float, when: str) -> profile_pb.Event:
    message = profile_pb.Event(message_id=f"seg-{next(_message_ids)}", type=profile_pb.EVENT_TYPE_ORDER,
                               identifiers=[common_pb2.Identifier(type="crm_id", value=person)], source="test",
                               order=profile_pb.Order(order_id=order_id, amount=amount, currency_code="USD"))
    message.event_time.FromDatetime(at(when))
    return message


def ingest(stub: profile_grpc.ProfileServiceStub, *events: profile_pb.Event) -> dict[str, str]:
    """Ingest; returns person id by crm id (every event must be accepted)."""
    response = stub.IngestEvents(profile_pb.IngestEventsRequest(events=events), timeout=30)
    persons = {}
    for event, result in zip(events, response.results, strict=True):
        assert result.status == profile_pb.EVENT_STATUS_ACCEPTED, result
        persons[event.identifiers[0].value] = result.person_id
    return persons


def recomputed(recomputer: Recomputer, store: SegmentStore, segment_id: str, parallelism: int) -> OperationRecord:
    """The finished operation of a recompute of `segment_id` started on `recomputer` (at most a minute)."""
    started = recomputer.start(segment_id, parallelism=parallelism)
    end = time.monotonic() + 60
    while time.monotonic() < end:
        operation = store.get_operation(started.operation_id)
        if operation is not None and operation.done:
            return operation
        time.sleep(0.2)
    raise AssertionError(f"the recompute of {segment_id} did not finish")
