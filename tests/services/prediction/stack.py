"""Identity, profile and prediction in process on free ports, and synthetic shop data ingested through profile.

Integration tests of the prediction service need the real profile service behind it (which needs
identity). Starting three services and ingesting a few thousand events costs seconds, so test
modules share one `Stack` (module scope) with keyspaces of their own, dropped afterwards.
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
from onecdp.common.v1 import common_pb2
from onecdp.prediction.v1 import prediction_service_pb2_grpc as prediction_grpc
from onecdp.profile.v1 import profile_service_pb2 as profile_pb
from onecdp.profile.v1 import profile_service_pb2_grpc as profile_grpc

from services.identity.server import DEFINITION as IDENTITY
from services.prediction.history import ORDER_EVENT, ActivityEvent
from services.prediction.server import DEFINITION as PREDICTION
from services.profile.server import DEFINITION as PROFILE
from shared.cassandra import CassandraSession
from shared.config import CassandraSettings, GrpcSettings
from shared.errors import Unavailable
from shared.runner import RunningService, start_service

IDENTIFIER_TYPE = "account_id"
INGEST_BATCH = 1000


@dataclass
class Stack:
    identity: RunningService
    profile: RunningService
    prediction: RunningService
    profiles: profile_grpc.ProfileServiceStub
    predictions: prediction_grpc.PredictionServiceStub
    grpc_settings: GrpcSettings
    # The services' keyspaces are `<prefix>_<service>`.
    keyspace_prefix: str


@contextmanager
def running_stack(base: CassandraSettings, admin: CassandraSession,
                  grpc_settings: GrpcSettings | None = None) -> Iterator[Stack]:
    """The three services on free ports against keyspaces of their own; keyspaces dropped at the end."""
    cassandra = base.model_copy(update={"keyspace_prefix": f"t{uuid.uuid4().hex[:12]}"})
    settings = grpc_settings or GrpcSettings(bind_host="127.0.0.1", grace_period_seconds=2.0, log_format="text")
    started: list[RunningService] = []
    try:
        identity = start_service(IDENTITY, settings, cassandra, port=0)
        started.append(identity)
        settings = settings.model_copy(update={"identity_target": f"127.0.0.1:{identity.port}"})
        profile = start_service(PROFILE, settings, cassandra, port=0)
        started.append(profile)
        settings = settings.model_copy(update={"profile_target": f"127.0.0.1:{profile.port}"})
        prediction = start_service(PREDICTION, settings, cassandra, port=0)
        started.append(prediction)
        with grpc.insecure_channel(f"127.0.0.1:{profile.port}") as profile_channel, \
                grpc.insecure_channel(f"127.0.0.1:{prediction.port}") as prediction_channel:
            yield Stack(identity, profile, prediction, profile_grpc.ProfileServiceStub(profile_channel),
                        prediction_grpc.PredictionServiceStub(prediction_channel), settings,
                        cassandra.keyspace_prefix)
    finally:
        for service in reversed(started):
            service.stop(None)
        for row in admin.execute("SELECT keyspace_name FROM system_schema.keyspaces"):
            if row.keyspace_name.startswith(f"{cassandra.keyspace_prefix}_"):
                try:
                    admin.execute(f"DROP KEYSPACE IF EXISTS {row.keyspace_name}", timeout=60)
                except Unavailable as error:
                    # Clean-up, not behaviour (as tests/conftest.py's cassandra_settings): on a loaded node a
                    # drop can outlast its timeout; the keyspace has a prefix of its own and the session's
                    # wipe removes it.
                    warnings.warn(f"could not drop {row.keyspace_name}: {error.message}", stacklevel=1)


def identifier_of(name: str) -> common_pb2.Identifier:
    return common_pb2.Identifier(type=IDENTIFIER_TYPE, value=name)


def profile_events(name: str, events: Sequence[ActivityEvent]) -> list[profile_pb.Event]:
    """One synthetic person's activity as profile events: orders as ORDER events, the rest as TRACK."""
    messages = []
    for index, activity in enumerate(events):
        message = profile_pb.Event(message_id=f"{name}-{index}", identifiers=[identifier_of(name)],
                                   source="synthetic-shop")
        message.event_time.FromDatetime(activity.time)
        if activity.name == ORDER_EVENT:
            message.type = profile_pb.EVENT_TYPE_ORDER
            message.order.CopyFrom(profile_pb.Order(
                order_id=f"{name}-o{index}", amount=activity.amount or 0.0,
                items=[profile_pb.OrderItem(sku="sku", category=activity.category or "", quantity=1,
                                            unit_price=activity.amount or 0.0)]))
        else:
            message.type = profile_pb.EVENT_TYPE_TRACK
            message.event_name = activity.name
            if activity.category:
                message.properties.update({"category": activity.category})
        messages.append(message)
    return messages


def ingest(stub: profile_grpc.ProfileServiceStub, events_by_person: Mapping[str, Sequence[ActivityEvent]]
           ) -> dict[str, str]:
    """Ingest everyone's events through IngestEvents; returns the person id profile gave each synthetic name."""
    pending = [e for name, events in events_by_person.items() for e in profile_events(name, events)]
    person_ids: dict[str, str] = {}
    for start in range(0, len(pending), INGEST_BATCH):
        batch = pending[start:start + INGEST_BATCH]
        response = stub.IngestEvents(profile_pb.IngestEventsRequest(events=batch), timeout=120)
        for event, result in zip(batch, response.results, strict=True):
            if result.status == profile_pb.EVENT_STATUS_REJECTED:
                raise AssertionError(f"profile rejected {event.message_id}: {result.message}")
            person_ids[event.identifiers[0].value] = result.person_id
    return person_ids
