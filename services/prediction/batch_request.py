"""BatchScorePersons' person ids read from the request's wire bytes for the whole batch at once (also for a batch
streamed in StreamScorePersons: `StreamedRequest`).

Reading `selector.person_id` of each parsed selector costs about 0.2 µs a person (a Python object for
the selector, then one for its id): on a batch of thousands, a tenth of what the service does. Person
ids are minted with one length ("p_" and 24 hex digits), so a batch of them is, on the wire, a run of
entries of one size: the persons tag, the entry's length, the person_id tag, the id's length, the id.
The run is checked as a byte matrix (every entry's four heads, ASCII ids) and the ids are cut from it
in C; any other batch (identifiers, ids of several lengths, empty ids, a client that interleaves
fields) is read from the parsed message as before. The entries found this way are all of the
request's persons, in order: the run starts at the first persons entry and holds as many entries as
the parsed message has persons, each one checked to be a persons entry.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from onecdp.common.v1 import common_pb2
from onecdp.prediction.v1 import prediction_service_pb2 as pb

from services.prediction.batch_response import FIXED_64, LENGTH_DELIMITED, ONE_BYTE, field_tag

_PERSONS = field_tag(pb.BatchScorePersonsRequest, "persons", LENGTH_DELIMITED)
_PERSON_ID = field_tag(common_pb2.PersonSelector, "person_id", LENGTH_DELIMITED)
_STREAMED_BATCH = field_tag(pb.StreamScorePersonsRequest, "batch", LENGTH_DELIMITED)
_VARINT, _FIXED_32 = 0, 5
_ASCII = 128


@dataclass(frozen=True)
class BatchRequest:
    """A BatchScorePersonsRequest as it arrived: the parsed message and its wire bytes."""

    message: pb.BatchScorePersonsRequest
    wire: bytes

    @classmethod
    def parse(cls, wire: bytes) -> BatchRequest:
        """The server's request deserializer for BatchScorePersons."""
        return cls(pb.BatchScorePersonsRequest.FromString(wire), wire)

    @classmethod
    def of(cls, message: pb.BatchScorePersonsRequest) -> BatchRequest:
        return cls(message, message.SerializeToString())

    def person_ids(self) -> list[str] | None:
        """Every selector's person id when all are person ids of one length (module docstring), else None."""
        count = len(self.message.persons)
        wire = self.wire
        first = _first_persons_entry(wire)
        if not count or first is None or first + 4 > len(wire):
            return None
        length = wire[first + 3]
        stride = 4 + length
        if not 0 < length < ONE_BYTE - 2 or first + stride * count > len(wire):
            return None
        entries = np.frombuffer(wire, dtype=np.uint8, count=stride * count, offset=first).reshape(count, stride)
        heads = np.asarray([_PERSONS, length + 2, _PERSON_ID, length], dtype=np.uint8)
        ids = entries[:, 4:]
        # Zero bytes excluded too: fixed-width byte strings would drop them at the end of an id.
        if not (entries[:, :4] == heads).all() or int(ids.min()) == 0 or int(ids.max()) >= _ASCII:
            return None
        as_bytes: list[bytes] = np.ascontiguousarray(ids).view(f"S{length}").ravel().tolist()
        return list(map(bytes.decode, as_bytes))


@dataclass(frozen=True)
class StreamedRequest:
    """A StreamScorePersonsRequest as it arrived; a batch in it as a `BatchRequest` (its own wire bytes), so a
    streamed batch is read as BatchScorePersons reads one."""

    message: pb.StreamScorePersonsRequest
    batch: BatchRequest | None

    @classmethod
    def parse(cls, wire: bytes) -> StreamedRequest:
        """The server's request deserializer for StreamScorePersons."""
        message = pb.StreamScorePersonsRequest.FromString(wire)
        if not message.HasField("batch"):
            return cls(message, None)
        spans = [(start, end) for tag, _, start, end in _top_level_fields(wire) if tag == _STREAMED_BATCH]
        # A batch sent in several pieces (the runtime merges them) is serialized again: no client here does that.
        batch_wire = wire[spans[0][0]:spans[0][1]] if len(spans) == 1 else message.batch.SerializeToString()
        return cls(message, BatchRequest(message.batch, batch_wire))


def _first_persons_entry(wire: bytes) -> int | None:
    """Where the first persons entry starts, walking the top-level fields before it (a few: model and the like);
    None when there is none or the bytes are not what this walk reads (then the message is read instead)."""
    return next((start for tag, start, _, _ in _top_level_fields(wire) if tag == _PERSONS), None)


def _top_level_fields(wire: bytes) -> Iterator[tuple[int, int, int, int]]:
    """Each top-level field of a message's wire bytes, in order: its tag, where it starts, where its value starts
    (after the length of a length-delimited one) and where it ends; the walk stops at bytes it does not read."""
    position = 0
    while position < len(wire):
        tag, after_tag = _varint(wire, position)
        wire_type = tag & 7
        value_at = after_tag
        if wire_type == _VARINT:
            _, end = _varint(wire, after_tag)
        elif wire_type == LENGTH_DELIMITED:
            size, value_at = _varint(wire, after_tag)
            end = value_at + size
        elif wire_type == FIXED_64:
            end = after_tag + 8
        elif wire_type == _FIXED_32:
            end = after_tag + 4
        else:
            return  # groups: not in this proto
        if end > len(wire):
            return  # truncated
        yield tag, position, value_at, end
        position = end


def _varint(wire: bytes, position: int) -> tuple[int, int]:
    """The varint at `position` and where the next field starts."""
    value, shift = 0, 0
    while position < len(wire):
        byte = wire[position]
        value |= (byte & 0x7F) << shift
        position += 1
        if byte < ONE_BYTE:
            return value, position
        shift += 7
    return value, len(wire) + 1  # truncated: past the end, so the walk stops
