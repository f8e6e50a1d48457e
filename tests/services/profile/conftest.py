"""Helpers for profile tests; the identity and profile service fixtures live in tests/conftest.py."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf import struct_pb2
from onecdp.common.v1 import common_pb2
from onecdp.identity.v1 import identity_service_pb2_grpc as identity_grpc
from onecdp.profile.v1 import profile_service_pb2 as pb
from onecdp.profile.v1 import profile_service_pb2_grpc as pb_grpc

from shared.runner import RunningService

_message_ids = itertools.count()
T = TypeVar("T")


@pytest.fixture
def identity(identity_service: RunningService) -> Iterator[identity_grpc.IdentityServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{identity_service.port}") as channel:
        yield identity_grpc.IdentityServiceStub(channel)


def ident(pair: str) -> common_pb2.Identifier:
    type_name, value = pair.split(":", 1)
    return common_pb2.Identifier(type=type_name, value=value)


def selector(pair: str) -> common_pb2.PersonSelector:
    return common_pb2.PersonSelector(identifier=ident(pair))


def at(text: str) -> datetime:
    """`at("2026-01-02")` or `at("2026-01-02T10:00")` as an aware UTC datetime."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def event(kind: int, *pairs: str, when: datetime | str = "2026-01-02", name: str = "", message_id: str = "",
          traits: dict[str, Any] | None = None, properties: dict[str, Any] | None = None,
          order: pb.Order | None = None, source: str = "test") -> pb.Event:
    message = pb.Event(message_id=message_id or f"m{next(_message_ids)}", type=pb.EventType.ValueType(kind),
                       identifiers=[ident(p) for p in pairs], event_name=name, source=source,
                       source_kind=common_pb2.SOURCE_KIND_SERVER, party=common_pb2.DATA_PARTY_FIRST)
    message.event_time.FromDatetime(at(when) if isinstance(when, str) else when)
    if traits is not None:
        message.traits.CopyFrom(_struct(traits))
    if properties is not None:
        message.properties.CopyFrom(_struct(properties))
    if order is not None:
        message.order.CopyFrom(order)
    return message


def _struct(values: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


def identify(*pairs: str, **kwargs: Any) -> pb.Event:
    return event(pb.EVENT_TYPE_IDENTIFY, *pairs, **kwargs)


def track(*pairs: str, name: str = "view_item", **kwargs: Any) -> pb.Event:
    return event(pb.EVENT_TYPE_TRACK, *pairs, name=name, **kwargs)


def order(*pairs: str, order_id: str, amount: float, **kwargs: Any) -> pb.Event:
    items = kwargs.pop("items", [])
    return event(pb.EVENT_TYPE_ORDER, *pairs, order=pb.Order(order_id=order_id, amount=amount, items=items), **kwargs)


def ingest(stub: pb_grpc.ProfileServiceStub, *events: pb.Event) -> list[pb.EventResult]:
    return list(stub.IngestEvents(pb.IngestEventsRequest(events=events), timeout=30).results)


def profile_of(stub: pb_grpc.ProfileServiceStub, pair: str, **kwargs: Any) -> pb.Profile:
    result: pb.Profile = stub.GetProfile(pb.GetProfileRequest(person=selector(pair), **kwargs), timeout=10)
    return result


def eventually(check: Callable[[], T], timeout: float = 15.0) -> T:
    """The first truthy result of `check` (background followers apply identity changes within seconds)."""
    end = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > end:
            return result
        time.sleep(0.2)
