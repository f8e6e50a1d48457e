"""Calls the google.longrunning.Operations tests of every service make (no tests here)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.longrunning import operations_proto_pb2 as lro_pb
from google.protobuf import duration_pb2


def seconds(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(value * 1e9))
    return duration


def settled_answers(own_get: Callable[..., lro_pb.Operation], standard_get: Callable[..., lro_pb.Operation],
                    name: str) -> tuple[lro_pb.Operation, lro_pb.Operation]:
    """(the service's own answer, the standard service's answer) read between two equal own answers, so a
    running operation's progress did not move between them."""
    request = lro_pb.GetOperationRequest(name=name)
    for _ in range(20):
        before = own_get(request, timeout=10)
        standard = standard_get(request, timeout=10)
        if own_get(request, timeout=10) == before:
            return before, standard
        time.sleep(0.1)
    raise AssertionError(f"{name} kept moving")


def status_of(call: Callable[..., Any], request: Any) -> tuple[grpc.StatusCode, str, Any]:
    """(code, message, rich status details) of a failing call."""
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=10)
    error: Any = caught.value
    details = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin")
    return error.code(), error.details(), details
