"""The rich error details a test reads back: a failed call's BadRequest field violations, and the one
ErrorInfo of a google.rpc.Status (e.g. a failed operation's `error`)."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status


def field_violations(error: grpc.RpcError) -> list[tuple[str, str]]:
    """The (field, description) of each BadRequest field violation the failed call carries."""
    status = rpc_status.from_call(error)
    assert status is not None, error
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            return [(v.field, v.description) for v in bad_request.field_violations]
    return []


def error_info(status: status_pb2.Status) -> error_details_pb2.ErrorInfo:
    """The status's ErrorInfo; there must be exactly one."""
    infos = []
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):  # False for another detail type
            infos.append(info)
    assert len(infos) == 1, status
    return infos[0]
