"""Request bytes that are not a valid protobuf of the method's request type are INVALID_ARGUMENT with an
ErrorInfo (reason MALFORMED_REQUEST, the service's domain), for every kind of method, instead of grpcio's
bare INTERNAL "Exception deserializing request!"; a raw channel sends the bytes to a real server."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from onecdp.prediction.v1 import prediction_service_pb2 as prediction_pb
from onecdp.prediction.v1 import prediction_service_pb2_grpc as prediction_grpc
from onecdp.profile.v1 import profile_service_pb2 as pb
from onecdp.profile.v1 import profile_service_pb2_grpc as pb_grpc

from shared.config import GrpcSettings
from shared.server import RunningServer, ServiceRegistration, create_server

pytestmark = pytest.mark.unit

DOMAIN = "onecdp.test"
PROFILE = "/onecdp.profile.v1.ProfileService"
# GetProfileRequest{person{person_id: "p_\xffx"}}: well-formed wire format, a string that is not UTF-8.
BAD_UTF8 = b"\n\x06\n\x04p_\xffx"
# A tag of field 0 / an unterminated varint: not protobuf wire format at all.
CORRUPT = b"\xff\xff"


class _Profiles(pb_grpc.ProfileServiceServicer):
    def GetProfile(self, request: pb.GetProfileRequest, context: grpc.ServicerContext) -> pb.Profile:
        return pb.Profile(person_id=request.person.person_id)

    def StreamIngestEvents(self, request_iterator: Iterator[pb.StreamIngestEventsRequest],
                           context: grpc.ServicerContext) -> pb.StreamIngestEventsResponse:
        return pb.StreamIngestEventsResponse(accepted_count=sum(len(r.events) for r in request_iterator))

    def ScanProfiles(self, request: pb.ScanProfilesRequest,
                     context: grpc.ServicerContext) -> Iterator[pb.ScanProfilesResponse]:
        yield pb.ScanProfilesResponse()


class _Scores(prediction_grpc.PredictionServiceServicer):
    def StreamScorePersons(self, request_iterator: Iterator[prediction_pb.StreamScorePersonsRequest],
                           context: grpc.ServicerContext) -> Iterator[prediction_pb.StreamScorePersonsResponse]:
        for _ in request_iterator:
            yield prediction_pb.StreamScorePersonsResponse()


@pytest.fixture
def server(grpc_settings: GrpcSettings) -> Iterator[RunningServer]:
    profiles, scores = _Profiles(), _Scores()  # type: ignore[abstract]
    running = create_server([
        ServiceRegistration("onecdp.profile.v1.ProfileService",
                            lambda s: pb_grpc.add_ProfileServiceServicer_to_server(profiles, s)),
        ServiceRegistration("onecdp.prediction.v1.PredictionService",
                            lambda s: prediction_grpc.add_PredictionServiceServicer_to_server(scores, s)),
    ], grpc_settings, port=0, error_domain=DOMAIN)
    yield running
    running.stop(None)


@pytest.fixture
def channel(server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as opened:
        yield opened


def _assert_malformed(error: grpc.RpcError, message_type: str, why: str,
                      index: int | None = None) -> None:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert f"not a valid {message_type}: {why}" in error.details()
    status = rpc_status.from_call(error)
    assert status is not None
    packed = [d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    assert len(packed) == 1
    info = error_details_pb2.ErrorInfo()
    packed[0].Unpack(info)
    assert (info.reason, info.domain, info.metadata["message_type"]) == ("MALFORMED_REQUEST", DOMAIN, message_type)
    assert info.metadata.get("message_index") == (None if index is None else str(index))


@pytest.mark.parametrize(("payload", "why"), [(BAD_UTF8, "String field had bad UTF-8"),
                                              (CORRUPT, "Wire format was corrupt")])
def test_unary_request_that_does_not_parse(channel: grpc.Channel, payload: bytes, why: str) -> None:
    call = channel.unary_unary(f"{PROFILE}/GetProfile")
    with pytest.raises(grpc.RpcError) as caught:
        call(payload, timeout=5)
    _assert_malformed(caught.value, "onecdp.profile.v1.GetProfileRequest", why)


def test_valid_bytes_still_reach_the_handler(channel: grpc.Channel) -> None:
    call = channel.unary_unary(f"{PROFILE}/GetProfile")
    answer = call(b"\n\x06\n\x04p_ok", timeout=5)
    assert pb.Profile.FromString(answer).person_id == "p_ok"


def test_server_streaming_request_that_does_not_parse(channel: grpc.Channel) -> None:
    call = channel.unary_stream(f"{PROFILE}/ScanProfiles")
    with pytest.raises(grpc.RpcError) as caught:
        list(call(b"\n\x02\xc3\x28", timeout=5))
    _assert_malformed(caught.value, "onecdp.profile.v1.ScanProfilesRequest",
                      "String field had bad UTF-8")


def test_client_stream_whose_second_message_does_not_parse(channel: grpc.Channel) -> None:
    call = channel.stream_unary(f"{PROFILE}/StreamIngestEvents")
    good = pb.StreamIngestEventsRequest(events=[pb.Event()]).SerializeToString()
    assert pb.StreamIngestEventsResponse.FromString(call(iter([good, good]), timeout=5)).accepted_count == 2
    with pytest.raises(grpc.RpcError) as caught:
        call(iter([good, CORRUPT, good]), timeout=5)
    _assert_malformed(caught.value, "onecdp.profile.v1.StreamIngestEventsRequest",
                      "Wire format was corrupt", index=1)


def test_bidirectional_stream_whose_second_message_does_not_parse(channel: grpc.Channel) -> None:
    call = channel.stream_stream("/onecdp.prediction.v1.PredictionService/StreamScorePersons")
    good = prediction_pb.StreamScorePersonsRequest(model="m").SerializeToString()
    answers = call(iter([good, b"\n\x02\xc3\x28"]), timeout=5)
    assert prediction_pb.StreamScorePersonsResponse.FromString(next(answers)) == \
        prediction_pb.StreamScorePersonsResponse()
    with pytest.raises(grpc.RpcError) as caught:
        next(answers)
    _assert_malformed(caught.value, "onecdp.prediction.v1.StreamScorePersonsRequest",
                      "String field had bad UTF-8", index=1)
