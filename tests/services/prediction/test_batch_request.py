"""Person ids read from a BatchScorePersons request's bytes are the parsed message's, or not read at all; a batch
streamed in StreamScorePersons is read the same way, from its own bytes."""

from __future__ import annotations

import random

import pytest
from onecdp.common.v1 import common_pb2
from onecdp.prediction.v1 import prediction_service_pb2 as pb

from services.prediction.batch_request import BatchRequest, StreamedRequest

pytestmark = pytest.mark.unit


def by_id(person_id: str) -> common_pb2.PersonSelector:
    return common_pb2.PersonSelector(person_id=person_id)


def minted(count: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [f"p_{rng.getrandbits(96):024x}" for _ in range(count)]


def request_ids(wire: bytes) -> list[str] | None:
    received = BatchRequest.parse(wire)
    ids = received.person_ids()
    if ids is not None:  # whenever read from the bytes, they are exactly the parsed selectors' ids
        assert ids == [selector.person_id for selector in received.message.persons]
        assert all(selector.WhichOneof("selector") == "person_id" for selector in received.message.persons)
    return ids


@pytest.mark.parametrize("count", [1, 2, 400, 10_000])
def test_minted_ids_are_read_from_the_bytes_whatever_else_the_request_holds(count: int) -> None:
    ids = minted(count)
    request = pb.BatchScorePersonsRequest(model="models/buyers", persons=[by_id(i) for i in ids],
                                          model_version="models/buyers/versions/2", top_features=3,
                                          view=pb.SCORE_VIEW_BASIC)
    request.as_of_time.FromSeconds(1_700_000_000)
    assert request_ids(request.SerializeToString()) == ids
    # Fields may come in any order: here the model and view after the persons.
    tail = pb.BatchScorePersonsRequest(model="models/buyers", view=pb.SCORE_VIEW_FULL).SerializeToString()
    persons_first = pb.BatchScorePersonsRequest(persons=[by_id(i) for i in ids]).SerializeToString() + tail
    assert request_ids(persons_first) == ids


@pytest.mark.parametrize("selectors", [
    [by_id("p_1"), by_id("p_22")],  # lengths differ
    [by_id("p_abc"), common_pb2.PersonSelector(identifier=common_pb2.Identifier(type="email", value="a@b.c"))],
    [by_id("p_abc"), by_id("")],  # an empty id (the server names it)
    [by_id("p_äbc"), by_id("p_öbc")],  # not ASCII
    [by_id("p_a\x00c"), by_id("p_abc")],  # a zero byte
    [common_pb2.PersonSelector()],
    [],
], ids=["lengths", "identifier", "empty", "unicode", "zero", "unset", "none"])
def test_other_batches_are_left_to_the_message(selectors: list[common_pb2.PersonSelector]) -> None:
    wire = pb.BatchScorePersonsRequest(model="models/buyers", persons=selectors).SerializeToString()
    assert request_ids(wire) is None


def test_persons_split_by_another_field_are_left_to_the_message() -> None:
    ids = minted(6)
    wire = (pb.BatchScorePersonsRequest(persons=[by_id(i) for i in ids[:3]]).SerializeToString()
            + pb.BatchScorePersonsRequest(model="models/buyers").SerializeToString()
            + pb.BatchScorePersonsRequest(persons=[by_id(i) for i in ids[3:]]).SerializeToString())
    assert [s.person_id for s in BatchRequest.parse(wire).message.persons] == ids
    assert request_ids(wire) is None


def test_a_message_built_in_process_reads_the_same() -> None:
    ids = minted(5)
    assert BatchRequest.of(pb.BatchScorePersonsRequest(persons=[by_id(i) for i in ids])).person_ids() == ids


def test_a_streamed_batch_is_read_from_its_own_bytes() -> None:
    ids = minted(400)
    batch = pb.BatchScorePersonsRequest(model="models/buyers", persons=[by_id(i) for i in ids],
                                        view=pb.SCORE_VIEW_BASIC)
    # Fields around the batch (a client may set them; the service ignores them when a batch is set).
    wire = pb.StreamScorePersonsRequest(model="models/other", top_features=2, batch=batch).SerializeToString()
    received = StreamedRequest.parse(wire)
    assert received.batch is not None
    assert received.batch.wire == batch.SerializeToString()
    assert received.batch.message == batch
    assert received.batch.person_ids() == ids


def test_a_streamed_batch_in_two_pieces_is_the_merged_batch() -> None:
    ids = minted(6)
    first = pb.StreamScorePersonsRequest(batch=pb.BatchScorePersonsRequest(persons=[by_id(i) for i in ids[:3]]))
    second = pb.StreamScorePersonsRequest(batch=pb.BatchScorePersonsRequest(model="models/buyers",
                                                                            persons=[by_id(i) for i in ids[3:]]))
    received = StreamedRequest.parse(first.SerializeToString() + second.SerializeToString())
    assert received.batch is not None
    assert received.batch.message == pb.BatchScorePersonsRequest(model="models/buyers", persons=[by_id(i) for i in ids])
    assert received.batch.person_ids() == ids


def test_a_streamed_person_has_no_batch() -> None:
    request = pb.StreamScorePersonsRequest(model="models/buyers", person=by_id("p_1"))
    received = StreamedRequest.parse(request.SerializeToString())
    assert received.batch is None and received.message == request
