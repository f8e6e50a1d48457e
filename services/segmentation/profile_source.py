"""Profiles as evaluation facts, read from the profile service over its gRPC contract (part of the adapter).

Shards and ScanProfiles for batch work, GetProfile + ListProfileEvents for one person. The profile
service computes computed traits as of the time asked, so facts and windows share one `as_of`.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf import json_format
from onecdp.common.v1 import common_pb2
from onecdp.profile.v1 import profile_service_pb2 as profile_pb
from onecdp.profile.v1 import profile_service_pb2_grpc as profile_grpc

from services.segmentation.evaluation import EventFact, ProfileFacts
from shared.errors import DeadlineExceeded, DomainError, InvalidArgument, NotFound, Unavailable

_DEFAULT_EVENT_NAMES = {profile_pb.EVENT_TYPE_ORDER: "order", profile_pb.EVENT_TYPE_IDENTIFY: "identify",
                        profile_pb.EVENT_TYPE_ALIAS: "alias"}
_LIFECYCLE = {profile_pb.LIFECYCLE_STAGE_NEW: "new", profile_pb.LIFECYCLE_STAGE_ACTIVE: "active",
              profile_pb.LIFECYCLE_STAGE_SILENT: "silent", profile_pb.LIFECYCLE_STAGE_CHURNED: "churned"}
SCAN_BATCH = 500
EVENTS_PAGE = 1000


def event_fact(stored: profile_pb.StoredEvent) -> EventFact:
    event = stored.event
    properties: dict[str, Any] = json_format.MessageToDict(event.properties) if event.HasField("properties") else {}
    if event.HasField("order"):
        # An order's own fields are properties too, so rules can sum `amount` of `order` events.
        properties.update(amount=event.order.amount, order_id=event.order.order_id,
                          currency_code=event.order.currency_code or "USD")
    name = event.event_name or _DEFAULT_EVENT_NAMES.get(event.type, "")
    return EventFact(name, event.event_time.ToDatetime(tzinfo=UTC), properties)


def computed_of(profile: profile_pb.Profile) -> dict[str, Any]:
    if not profile.HasField("computed"):
        return {}
    computed = profile.computed
    values: dict[str, Any] = {
        "frequency": float(computed.frequency), "monetary": computed.monetary,
        "average_order_value": computed.average_order_value, "lifetime_value": computed.lifetime_value,
        "event_count": float(computed.event_count),
        "top_categories": list(profile.preferences.top_categories), "top_brands": list(profile.preferences.top_brands),
    }
    if computed.HasField("recency_days"):
        values["recency_days"] = computed.recency_days
    if computed.HasField("rfm"):
        values.update({"rfm.recency_score": float(computed.rfm.recency_score),
                       "rfm.frequency_score": float(computed.rfm.frequency_score),
                       "rfm.monetary_score": float(computed.rfm.monetary_score), "rfm.segment": computed.rfm.segment})
    if computed.lifecycle_stage in _LIFECYCLE:
        values["lifecycle_stage"] = _LIFECYCLE[computed.lifecycle_stage]
    for name in ("first_seen_time", "last_seen_time"):
        if computed.HasField(name):
            values[name] = getattr(computed, name).ToDatetime(tzinfo=UTC)
    return values


def facts_of(profile: profile_pb.Profile, events: list[profile_pb.StoredEvent]) -> ProfileFacts:
    traits = {name: json_format.MessageToDict(trait.value) for name, trait in profile.traits.items()}
    return ProfileFacts(profile.person_id, traits, computed_of(profile), [event_fact(e) for e in events])


def profile_error(error: grpc.RpcError) -> DomainError:
    """The domain error of a failed profile call: its code and message carried over (never INTERNAL here)."""
    code: grpc.StatusCode = error.code()
    details = f"the profile service answered {code.name}: {error.details()}"
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(details, reason="PERSON_NOT_FOUND")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(details, reason="PROFILE_REJECTED_REQUEST")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(details, reason="PROFILE_DEADLINE")
    return Unavailable(details, reason="PROFILE_UNAVAILABLE")


class GrpcProfileSource:
    """Reads profiles through the profile service's API; failures become domain errors."""

    def __init__(self, stub: profile_grpc.ProfileServiceStub) -> None:
        self._stub = stub

    def shards(self, count: int) -> list[str]:
        try:
            return self._shards(count)
        except grpc.RpcError as error:
            raise profile_error(error) from error

    def scan(self, shard: str, as_of: datetime, with_events: bool) -> Iterator[list[ProfileFacts]]:
        try:
            yield from self._scan(shard, as_of, with_events)
        except grpc.RpcError as error:
            raise profile_error(error) from error

    def person(self, selector: common_pb2.PersonSelector, as_of: datetime) -> ProfileFacts:
        try:
            return self._person(selector, as_of)
        except grpc.RpcError as error:
            raise profile_error(error) from error

    def _shards(self, count: int) -> list[str]:
        response = self._stub.ListProfileShards(profile_pb.ListProfileShardsRequest(shard_count=count))
        return list(response.shards)

    def _scan(self, shard: str, as_of: datetime, with_events: bool) -> Iterator[list[ProfileFacts]]:
        request = profile_pb.ScanProfilesRequest(shard=shard, include_events=with_events, batch_size=SCAN_BATCH)
        request.as_of_time.FromDatetime(as_of)
        for response in self._stub.ScanProfiles(request):
            yield [facts_of(p.profile, list(p.events)) for p in response.profiles]

    def _person(self, selector: common_pb2.PersonSelector, as_of: datetime) -> ProfileFacts:
        request = profile_pb.GetProfileRequest(person=selector)
        request.as_of_time.FromDatetime(as_of)
        profile = self._stub.GetProfile(request)
        events: list[profile_pb.StoredEvent] = []
        token = ""
        while True:
            page = self._stub.ListProfileEvents(profile_pb.ListProfileEventsRequest(
                person=common_pb2.PersonSelector(person_id=profile.person_id), page_size=EVENTS_PAGE,
                page_token=token))
            events.extend(page.events)
            token = page.next_page_token
            if not token:
                break
        return facts_of(profile, events)
