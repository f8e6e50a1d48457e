"""EvaluatePersonSegments reads a person's events as a recompute does: only those of the names its rules read, from
their earliest window on. It paged every event the person had (a person with a million page views took ~18 s for
rules about orders, past any caller's deadline); the answer is the same, since an event no rule names, or older
than every window, changes no evaluation."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from onecdp.common.v1 import common_pb2
from onecdp.profile.v1 import profile_service_pb2 as profile_pb
from onecdp.profile.v1 import profile_service_pb2_grpc as profile_grpc
from onecdp.segmentation.v1 import segmentation_service_pb2 as pb
from onecdp.segmentation.v1 import segmentation_service_pb2_grpc as pb_grpc

from services.segmentation.evaluation import evaluate
from services.segmentation.profile_source import GrpcProfileSource, facts_of
from services.segmentation.realtime import events_read, profile_reads
from services.segmentation.text import parse
from shared.clients import every_profile_event
from shared.errors import NotFound
from shared.runner import RunningService
from tests.services.segmentation.conftest import at, ingest, order, track

pytestmark = pytest.mark.integration
RULE = 'event("order").count(from 2024-03-01T00:00:00Z to 2024-06-01T00:00:00Z) >= 2'


class _EventPages(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Records the events of every ListProfileEvents page a client receives."""

    def __init__(self) -> None:
        self.received: list[profile_pb.StoredEvent] = []

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: grpc.ClientCallDetails,
                              request: Any) -> Any:
        outcome = continuation(details, request)
        if details.method.endswith("/ListProfileEvents"):
            self.received.extend(outcome.result().events)
        return outcome


@pytest.fixture
def recorded(profile_service: RunningService) -> Iterator[tuple[GrpcProfileSource, _EventPages]]:
    pages = _EventPages()
    with grpc.insecure_channel(f"127.0.0.1:{profile_service.port}") as channel:
        yield GrpcProfileSource(profile_grpc.ProfileServiceStub(grpc.intercept_channel(channel, pages))), pages


def test_a_person_is_evaluated_on_the_events_its_rules_read(stack: pb_grpc.SegmentationServiceStub,
                                                            profiles: profile_grpc.ProfileServiceStub,
                                                            recorded: tuple[GrpcProfileSource, _EventPages]) -> None:
    person = ingest(profiles, order("viewer", "o-1", 20.0, "2024-03-10T10:00:00"),
                    order("viewer", "o-2", 30.0, "2024-04-10T10:00:00"),
                    order("viewer", "o-old", 40.0, "2024-01-10T10:00:00"),  # before the window
                    *(track("viewer", "page_view", f"2024-04-{1 + k:02d}T09:00:00") for k in range(25)))["viewer"]
    stack.CreateSegment(pb.CreateSegmentRequest(segment_id="buyers", segment=pb.Segment(rule_text=RULE)), timeout=10)

    # Through the API: the same answer as ever (two orders in the window).
    answer = stack.EvaluatePersonSegments(pb.EvaluatePersonSegmentsRequest(
        person=common_pb2.PersonSelector(person_id=person), segments=["segments/buyers"]), timeout=30)
    assert [(e.segment, e.matched) for e in answer.evaluations] == [("segments/buyers", True)]
    assert answer.evaluations[0].conditions[0].observed_value.number_value == 2

    # What the source reads for it: the orders from the window's start, not the page views nor the older order.
    source, pages = recorded
    rules = {"buyers": parse(RULE)}
    as_of = datetime.now(UTC)
    wanted = events_read(rules.values(), rules, as_of)
    facts = source.person(common_pb2.PersonSelector(person_id=person), as_of, wanted,
                          profile_reads(rules.values(), rules, as_of))
    received = sorted(e.event.message_id for e in pages.received)
    assert len(received) == 2 and all(e.event.type == profile_pb.EVENT_TYPE_ORDER
                                      and e.event.event_time.ToDatetime(tzinfo=UTC) >= at("2024-03-01T00:00:00")
                                      for e in pages.received), received
    # ... and it decides as every event would.
    everything = every_profile_event(profiles, profile_pb.ListProfileEventsRequest(
        person=common_pb2.PersonSelector(person_id=person), page_size=1000))
    assert len(everything) == 28
    full = facts_of(profiles.GetProfile(profile_pb.GetProfileRequest(
        person=common_pb2.PersonSelector(person_id=person)), timeout=10), everything)
    assert evaluate(rules["buyers"], facts, as_of, rules.get) == evaluate(rules["buyers"], full, as_of, rules.get)


def test_rules_that_read_no_events_read_none(profiles: profile_grpc.ProfileServiceStub,
                                             recorded: tuple[GrpcProfileSource, _EventPages]) -> None:
    person = ingest(profiles, track("quiet", "page_view", "2024-04-01T09:00:00"))["quiet"]
    rules = {"pros": parse('traits.plan = "pro"')}
    source, pages = recorded
    facts = source.person(common_pb2.PersonSelector(person_id=person), datetime.now(UTC),
                          events_read(rules.values(), rules, datetime.now(UTC)),
                          profile_reads(rules.values(), rules, datetime.now(UTC)))
    assert facts.person_id == person and list(facts.events) == [] and pages.received == []


class _ErasedMeanwhile:
    """A profile service whose person is erased between GetProfile and ListProfileEvents."""

    def GetProfile(self, request: Any, timeout: float | None = None) -> profile_pb.Profile:
        return profile_pb.Profile(person_id="p_gone")

    def ListProfileEvents(self, request: Any, timeout: float | None = None) -> Any:
        raise _NotFound()


class _NotFound(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.NOT_FOUND

    def details(self) -> str:
        return "no person 'p_gone' (never issued, or erased)"


@pytest.mark.unit
def test_a_person_erased_between_the_reads_is_not_found() -> None:
    """Not an evaluation of a person with no events: NOT_FOUND, as a call a moment later answers."""
    rules = {"buyers": parse(RULE)}
    now = datetime.now(UTC)
    source = GrpcProfileSource(_ErasedMeanwhile())  # type: ignore[arg-type]
    with pytest.raises(NotFound) as gone:
        source.person(common_pb2.PersonSelector(person_id="p_gone"), now, events_read(rules.values(), rules, now),
                      profile_reads(rules.values(), rules, now))
    assert "p_gone" in gone.value.message
