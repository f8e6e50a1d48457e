"""The gRPC adapter of the prediction service: onecdp.prediction.v1 messages in, domain calls, messages out.

Built: models (create/get/list/delete), versions (get/list/activate) and GetOperation. Training,
scoring, score refresh and GetPersonFeatures need the profile service's data and are inherited from
the generated servicer, which answers UNIMPLEMENTED; the shared interceptor names the method in that
message, so nothing pretends to work.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from functools import partial

import grpc
from google.longrunning import operations_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, status_pb2
from onecdp.prediction.v1 import prediction_service_pb2 as pb
from onecdp.prediction.v1 import prediction_service_pb2_grpc as pb_grpc

from services.prediction.pages import decode_token, encode_token, page_size_of
from services.prediction.registry import Model, ModelRegistry, ModelVersion, Operation, OperationKind, VersionState
from services.prediction.spec import (
    MAX_DISPLAY_NAME_LENGTH,
    MODEL_ID,
    ModelSpec,
    PredictionKind,
    model_name,
    operation_name,
    parse_model_name,
    parse_operation_name,
    parse_version_name,
    resolve_spec,
    version_name,
)
from shared.errors import InvalidArgument, Violations
from shared.runner import ServiceContext, ServiceDefinition
from shared.server import ServiceRegistration

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PredictionService"].full_name

_KIND_FROM_PROTO = {pb.PREDICTION_KIND_CONVERSION: PredictionKind.CONVERSION,
                    pb.PREDICTION_KIND_CHURN: PredictionKind.CHURN}
_KIND_TO_PROTO = {kind: value for value, kind in _KIND_FROM_PROTO.items()}
_STATE_TO_PROTO = {VersionState.TRAINING: pb.MODEL_VERSION_STATE_TRAINING,
                   VersionState.READY: pb.MODEL_VERSION_STATE_READY,
                   VersionState.FAILED: pb.MODEL_VERSION_STATE_FAILED}


def _now() -> datetime:
    return datetime.now(UTC)


def _finite(value: float) -> float:
    # Proto doubles can carry NaN, but a client comparing metrics should get 0 rather than NaN surprises.
    return value if math.isfinite(value) else 0.0


def _spec_message(spec: ModelSpec) -> pb.ModelSpec:
    return pb.ModelSpec(kind=_KIND_TO_PROTO[spec.kind], event_names=spec.event_names,
                        horizon_days=spec.horizon_days, eligibility_days=spec.eligibility_days,
                        min_class_count=spec.min_class_count)


def _model_message(model: Model) -> pb.Model:
    message = pb.Model(name=model_name(model.model_id), display_name=model.display_name,
                       spec=_spec_message(model.spec),
                       active_version=version_name(model.model_id, model.active_version)
                       if model.active_version else "")
    message.create_time.FromDatetime(model.create_time)
    message.update_time.FromDatetime(model.update_time)
    return message


def _version_message(version: ModelVersion) -> pb.ModelVersion:
    message = pb.ModelVersion(
        name=version_name(version.model_id, version.version_id), state=_STATE_TO_PROTO[version.state],
        spec=_spec_message(version.spec), feature_names=version.feature_names,
        feature_importance=[pb.FeatureImportance(feature=name, gain=gain) for name, gain in version.importance],
        failure_message=version.failure_message, best_iteration=version.best_iteration)
    for cutoff in version.training_cutoffs:
        message.training_cutoffs.add().FromDatetime(cutoff)
    message.validation_cutoff.FromDatetime(version.validation_cutoff)
    message.create_time.FromDatetime(version.create_time)
    if version.metrics is not None:
        metrics = version.metrics
        message.metrics.CopyFrom(pb.ModelMetrics(
            roc_auc=_finite(metrics.roc_auc), log_loss=_finite(metrics.log_loss),
            calibration_error=_finite(metrics.calibration_error), top_decile_lift=_finite(metrics.top_decile_lift),
            training_examples=metrics.training_examples, validation_examples=metrics.validation_examples,
            training_positive_rate=metrics.training_positive_rate,
            validation_positive_rate=metrics.validation_positive_rate))
    return message


def _pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def operation_message(operation: Operation, registry: ModelRegistry) -> operations_pb2.Operation:
    """The google.longrunning.Operation of a stored operation: progress metadata, then error or response."""
    version = version_name(operation.model_id, operation.version_id) if operation.version_id else ""
    message = operations_pb2.Operation(name=operation_name(operation.operation_id), done=operation.done)
    if operation.kind is OperationKind.TRAIN:
        train_metadata = pb.TrainModelMetadata(model_version=version, stage=operation.stage,
                                               persons_processed=operation.persons_processed,
                                               persons_total=operation.persons_total)
        train_metadata.start_time.FromDatetime(operation.start_time)
        message.metadata.CopyFrom(_pack(train_metadata))
    else:
        refresh_metadata = pb.RefreshScoresMetadata(model_version=version, persons_scored=operation.persons_processed,
                                                    shards_done=operation.shards_done,
                                                    shards_total=operation.shards_total)
        refresh_metadata.start_time.FromDatetime(operation.start_time)
        message.metadata.CopyFrom(_pack(refresh_metadata))
    if not operation.done:
        return message
    if operation.error_code is not None:
        message.error.CopyFrom(status_pb2.Status(code=code_pb2.Code.Value(operation.error_code),
                                                 message=operation.error_message))
    elif operation.kind is OperationKind.TRAIN and operation.version_id:
        message.response.CopyFrom(_pack(_version_message(
            registry.get_version(operation.model_id, operation.version_id))))
    elif operation.kind is OperationKind.REFRESH:
        message.response.CopyFrom(_pack(pb.RefreshScoresResponse(
            model_version=version, persons_scored=operation.persons_processed,
            persons_ineligible=operation.persons_ineligible, elapsed_seconds=operation.elapsed_seconds)))
    return message


def _requested_spec(request: pb.CreateModelRequest, violations: Violations) -> ModelSpec | None:
    """The resolved spec, or None after adding its violations to the others of the request."""
    spec = request.model.spec
    try:
        return resolve_spec(_KIND_FROM_PROTO.get(spec.kind), list(spec.event_names), spec.horizon_days,
                            eligibility_days=spec.eligibility_days, min_class_count=spec.min_class_count)
    except InvalidArgument as error:
        violations.items.extend(error.field_violations)
        return None


class PredictionServicer(pb_grpc.PredictionServiceServicer):
    def __init__(self, registry: ModelRegistry) -> None:
        self._registry = registry

    def CreateModel(self, request: pb.CreateModelRequest, context: grpc.ServicerContext) -> pb.Model:
        violations = Violations()
        violations.check(bool(MODEL_ID.match(request.model_id)), "model_id",
                         f"{request.model_id!r} is not a model id: 1-63 lower-case letters, digits and hyphens, "
                         "starting with a letter")
        violations.check(request.HasField("model"), "model", "required")
        violations.check(len(request.model.display_name) <= MAX_DISPLAY_NAME_LENGTH, "model.display_name",
                         f"at most {MAX_DISPLAY_NAME_LENGTH} characters")
        violations.check(request.model.HasField("spec"), "model.spec", "required")
        spec = _requested_spec(request, violations)
        violations.raise_if_any("the model is invalid", reason="INVALID_MODEL")
        assert spec is not None
        return _model_message(self._registry.create_model(request.model_id, request.model.display_name, spec,
                                                          _now()))

    def GetModel(self, request: pb.GetModelRequest, context: grpc.ServicerContext) -> pb.Model:
        return _model_message(self._registry.get_model(parse_model_name(request.name)))

    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext) -> pb.ListModelsResponse:
        violations = Violations()
        page_size = page_size_of(request.page_size, violations)
        violations.raise_if_any()
        after = decode_token(request.page_token, "models", str)
        models, next_after = self._registry.list_models(page_size, str(after) if after is not None else None)
        return pb.ListModelsResponse(models=[_model_message(m) for m in models],
                                     next_page_token=encode_token("models", next_after) if next_after else "")

    def DeleteModel(self, request: pb.DeleteModelRequest, context: grpc.ServicerContext) -> pb.DeleteModelResponse:
        self._registry.delete_model(parse_model_name(request.name))
        return pb.DeleteModelResponse()

    def GetModelVersion(self, request: pb.GetModelVersionRequest, context: grpc.ServicerContext) -> pb.ModelVersion:
        model_id, version_id = parse_version_name(request.name)
        return _version_message(self._registry.get_version(model_id, version_id))

    def ListModelVersions(self, request: pb.ListModelVersionsRequest,
                          context: grpc.ServicerContext) -> pb.ListModelVersionsResponse:
        violations = Violations()
        page_size = page_size_of(request.page_size, violations)
        violations.raise_if_any()
        model_id = parse_model_name(request.parent, "parent")
        before = decode_token(request.page_token, request.parent, int)
        versions, next_before = self._registry.list_versions(model_id, page_size,
                                                             int(before) if before is not None else None)
        return pb.ListModelVersionsResponse(
            model_versions=[_version_message(v) for v in versions],
            next_page_token=encode_token(request.parent, next_before) if next_before is not None else "")

    def ActivateModelVersion(self, request: pb.ActivateModelVersionRequest,
                             context: grpc.ServicerContext) -> pb.Model:
        model_id, version_id = parse_version_name(request.name)
        return _model_message(self._registry.activate(model_id, version_id, _now()))

    def GetOperation(self, request: operations_pb2.GetOperationRequest,
                     context: grpc.ServicerContext) -> operations_pb2.Operation:
        operation = self._registry.get_operation(parse_operation_name(request.name))
        return operation_message(operation, self._registry)


def build(context: ServiceContext) -> list[ServiceRegistration]:
    # Methods not built yet stay abstract in the typed stubs; at run time they answer UNIMPLEMENTED.
    servicer = PredictionServicer(ModelRegistry(context.session))  # type: ignore[abstract]
    return [ServiceRegistration(SERVICE_NAME, partial(pb_grpc.add_PredictionServiceServicer_to_server, servicer))]


DEFINITION = ServiceDefinition(name="prediction", build=build)
