"""Whether a model a score condition names exists, asked of the prediction service (gRPC side).

Validation only: a rule naming an unknown model is refused, but segmentation does not depend on
prediction being up. When it cannot answer quickly the answer is None and the rule is accepted on its
shape alone (the score trait is then simply absent until the model scores persons).
"""

from __future__ import annotations

import logging

import grpc
from onecdp.prediction.v1 import prediction_service_pb2 as prediction_pb
from onecdp.prediction.v1 import prediction_service_pb2_grpc as prediction_grpc

# A create waits at most this long on the question; the prediction service answers GetModel from one row.
LOOKUP_TIMEOUT_SECONDS = 2.0

log = logging.getLogger(__name__)


class GrpcModelDirectory:
    def __init__(self, stub: prediction_grpc.PredictionServiceStub) -> None:
        self._stub = stub

    def model_exists(self, model: str) -> bool | None:
        """True/False when the prediction service says so, None when it could not be asked."""
        try:
            self._stub.GetModel(prediction_pb.GetModelRequest(name=model), timeout=LOOKUP_TIMEOUT_SECONDS)
        except grpc.RpcError as error:
            code = error.code()
            if code == grpc.StatusCode.NOT_FOUND:
                return False
            log.warning("cannot check a score condition's model; accepted on its shape",
                         extra={"model": model, "code": code.name})
            return None
        return True
