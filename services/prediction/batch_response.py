"""BatchScorePersons' results as messages: encoded for the whole batch at once where the batch allows it.

Setting a result's fields one by one costs about 1.3 µs a person (a Python step per field into the
protobuf runtime): with the booster compiled, more than the booster itself. A batch of plain scores
(no explanations) has one shape per person: the person id, two doubles and, in the FULL view, the same
model version and time for everyone. So its wire bytes are laid out with a few array operations for the
whole batch, and the runtime parses them into the response in one C call: the same message as set field
by field (the tests compare both), in about a tenth of the time.

The bulk path takes the common case and leaves the rest to the field-by-field path: explained scores
(top features), and batches with a person id that is not ASCII or so long that a length takes more than
one byte on the wire (127; ids are UUIDs). Errors ride along in the bulk path, each serialized by the
runtime.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime

import numpy as np
import numpy.typing as npt
from google.protobuf import timestamp_pb2
from google.protobuf.message import Message
from onecdp.prediction.v1 import prediction_service_pb2 as pb

from services.prediction.serving import ScoredBatch

# Wire types: 2 is a length-delimited field, 1 a 64-bit one.
LENGTH_DELIMITED, FIXED_64 = 2, 1


def field_tag(message: type[Message], field: str, wire_type: int) -> int:
    """The wire tag of `message.field`, from the descriptor (so the layout follows the proto); one byte."""
    tag = message.DESCRIPTOR.fields_by_name[field].number << 3 | wire_type
    if tag >= 128:
        raise ValueError(f"{message.__name__}.{field}'s tag takes more than one byte on the wire")
    return tag


_RESULTS = field_tag(pb.BatchScorePersonsResponse, "results", LENGTH_DELIMITED)
_RESULT_SCORE = field_tag(pb.ScoreResult, "score", LENGTH_DELIMITED)
_PERSON_ID = field_tag(pb.Score, "person_id", LENGTH_DELIMITED)
_MODEL_VERSION = field_tag(pb.Score, "model_version", LENGTH_DELIMITED)
_PROBABILITY = field_tag(pb.Score, "probability", FIXED_64)
_PERCENTILE = field_tag(pb.Score, "percentile", FIXED_64)
_AS_OF_TIME = field_tag(pb.Score, "as_of_time", LENGTH_DELIMITED)
_STREAMED_BATCH = field_tag(pb.StreamScorePersonsResponse, "batch", LENGTH_DELIMITED)
# A length below this takes one byte on the wire (a varint of 7 bits).
ONE_BYTE = 128
# A score's row starts with the result's tag and length, then the score's tag and length.
_HEADS = 4


def finite(value: float) -> float:
    """Proto doubles can carry NaN, but a client comparing values should get 0 rather than NaN surprises."""
    return value if math.isfinite(value) else 0.0


def batch_response_bytes(scored: ScoredBatch, model_version: str, as_of: datetime, full: bool) -> bytes:
    """The whole BatchScorePersonsResponse as the wire carries it: the version and time, then the results (a
    message's fields may come in any order and pieces, so the encoded results follow the head as they are).
    What the server sends: parsing the bytes into a message only for gRPC to serialize it again cost about as
    much as encoding them."""
    head = pb.BatchScorePersonsResponse(model_version=model_version)
    head.as_of_time.FromDatetime(as_of)
    if scored.batch.contributions is None:
        encoded = _encoded_results(scored, model_version, full, head.as_of_time)
        if encoded is not None:
            return head.SerializeToString() + encoded
    add_score_results_by_field(head, scored, model_version, full)
    return head.SerializeToString()


def streamed_batch_response_bytes(batch_response: bytes) -> bytes:
    """The StreamScorePersonsResponse whose batch is `batch_response` (a BatchScorePersonsResponse's wire bytes), as
    the wire carries it: the field's tag and length, then the bytes as they are."""
    return bytes([_STREAMED_BATCH]) + _varint(len(batch_response)) + batch_response


def add_score_results(response: pb.BatchScorePersonsResponse, scored: ScoredBatch, model_version: str,
                      full: bool) -> None:
    """Append the results of `scored` to `response.results`, in request order; `full`: the FULL view's fields
    (model version, percentile, time, explanations) besides the person id and probability."""
    if scored.batch.contributions is None:
        encoded = _encoded_results(scored, model_version, full, response.as_of_time)
        if encoded is not None:
            response.MergeFromString(encoded)
            return
    add_score_results_by_field(response, scored, model_version, full)


def add_score_results_by_field(response: pb.BatchScorePersonsResponse, scored: ScoredBatch, model_version: str,
                               full: bool) -> None:
    """`add_score_results` one field at a time: any batch (the bulk path's reference in the tests)."""
    batch = scored.batch
    person_ids = batch.person_ids
    probabilities = batch.probabilities.tolist()
    percentiles = batch.percentiles.tolist()
    as_of = response.as_of_time
    explained = batch.contributions is not None
    add = response.results.add
    for index, row in enumerate(scored.rows):
        if row < 0:
            add(error=_error_message(scored, index))
            continue
        # Each score's fields set in place: a Score built apart and then copied into its result costs twice.
        score = add().score
        score.person_id = person_ids[row]
        score.probability = probabilities[row]
        if not full:
            continue
        score.model_version = model_version
        score.percentile = percentiles[row]
        score.as_of_time.CopyFrom(as_of)
        if explained:
            score.base_value = batch.base_value(row)
            score.top_features.extend(pb.FeatureContribution(feature=c.feature, value=finite(c.value),
                                                             contribution=c.contribution)
                                      for c in batch.top_contributions(row))


def _error_message(scored: ScoredBatch, index: int) -> pb.ScoreError:
    error = scored.errors[index]
    return pb.ScoreError(code=error.code.value, message=error.message)


def _encoded_results(scored: ScoredBatch, model_version: str, full: bool,
                     as_of: timestamp_pb2.Timestamp) -> bytes | None:
    """The wire bytes of the results (repeated field 1 of the response), or None when the batch is not one the
    bulk path takes (module docstring).

    One row of a byte matrix per result, in request order: a score is its two heads (result, score), its
    fixed-size fields, then its person id (fields may come in any order on the wire; the runtime writes them
    in number order again), so only the id's length varies; an error is its serialized result. The rows'
    used bytes, read in order, are the field.
    """
    batch = scored.batch
    person_ids: Sequence[str] = batch.person_ids
    scores = len(person_ids)
    id_lengths = np.fromiter(map(len, person_ids), dtype=np.int64, count=scores)
    joined = "".join(person_ids).encode()
    if len(joined) != int(id_lengths.sum()):
        return None  # a non-ASCII id: its length in bytes is not its length in characters
    longest = int(id_lengths.max()) if scores else 0
    if scores and int(id_lengths.min()) == longest:  # ids of one length (UUIDs): a row each, as they are
        ids = np.frombuffer(joined, dtype=np.uint8).reshape(scores, longest)
    else:  # padded to the longest with zero bytes
        ids = np.array(person_ids, dtype=np.bytes_).view(np.uint8).reshape(scores, longest)
    # The fields after the heads: the probability, and in the FULL view the percentile and the fields that are
    # the same for everyone.
    shared = b""
    if full:
        version_bytes, time_bytes = model_version.encode(), as_of.SerializeToString()
        if max(len(version_bytes), len(time_bytes)) >= ONE_BYTE:
            return None
        shared = (bytes([_MODEL_VERSION, len(version_bytes)]) + version_bytes
                  + bytes([_AS_OF_TIME, len(time_bytes)]) + time_bytes)
    fixed = 9 * (1 + full) + len(shared)
    score_lengths = fixed + 2 + id_lengths
    if scores and int(score_lengths.max()) + 2 >= ONE_BYTE:
        return None
    id_at = _HEADS + fixed + 2  # where the id's bytes start in a score's row
    score_rows = np.empty((scores, id_at + longest), dtype=np.uint8)
    score_rows[:, 0] = _RESULTS
    score_rows[:, 1] = score_lengths + 2
    score_rows[:, 2] = _RESULT_SCORE
    score_rows[:, 3] = score_lengths
    score_rows[:, 4] = _PROBABILITY
    score_rows[:, 5:13] = _double_bytes(batch.probabilities)
    if full:
        score_rows[:, 13] = _PERCENTILE
        score_rows[:, 14:22] = _double_bytes(batch.percentiles)
        score_rows[:, 22:id_at - 2] = np.frombuffer(shared, dtype=np.uint8)
    score_rows[:, id_at - 2] = _PERSON_ID
    score_rows[:, id_at - 1] = id_lengths
    score_rows[:, id_at:] = ids
    used = _HEADS + score_lengths

    if not scored.errors:  # every person scored: rows are the batch's rows in order
        if not scores or int(used.min()) == score_rows.shape[1]:
            return score_rows.tobytes()
        return score_rows[np.arange(score_rows.shape[1]) < used[:, None]].tobytes()
    errors = {index: bytes([_RESULTS]) + _varint(len(error)) + error for index, error in (
        (index, pb.ScoreResult(error=_error_message(scored, index)).SerializeToString()) for index in scored.errors)}
    rows = np.asarray(scored.rows, dtype=np.int64)
    scored_at = np.flatnonzero(rows >= 0)
    matrix = np.zeros((len(rows), max(score_rows.shape[1], *map(len, errors.values()))), dtype=np.uint8)
    matrix[scored_at, :score_rows.shape[1]] = score_rows[rows[scored_at]]
    lengths = np.empty(len(rows), dtype=np.int64)
    lengths[scored_at] = used[rows[scored_at]]
    for index, error in errors.items():
        matrix[index, :len(error)] = np.frombuffer(error, dtype=np.uint8)
        lengths[index] = len(error)
    return matrix[np.arange(matrix.shape[1]) < lengths[:, None]].tobytes()


def _double_bytes(values: npt.NDArray[np.float64]) -> npt.NDArray[np.uint8]:
    """Each value's 8 bytes as the wire has them (little-endian IEEE 754), one row per value."""
    little: npt.NDArray[np.float64] = np.ascontiguousarray(values, dtype="<f8")
    return little.view(np.uint8).reshape(len(values), 8)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= ONE_BYTE:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
