"""The gRPC adapter of the prediction service: onecdp.prediction.v1 messages in, domain calls, messages out.

Models and versions are registry calls. Training and score refresh answer at once with an operation
and run on the service's background worker (stopped with the service) and read histories from the
profile service (GrpcProfileSource). Scoring and features read them through the online store
(OnlineHistories, kept current by a ChangeFollower of profile's feed, stopped with the service), which
reads from profile what it does not hold; a second ChangeFollower reads identity's feed (identity_feed.py),
so an erased person leaves the store without waiting for profile to apply the erasure. Scores go back
through BatchWriteTraits (GrpcScoreWriter).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import TypeVar

import grpc
from google.longrunning import operations_pb2
from google.protobuf import any_pb2, timestamp_pb2
from google.protobuf.message import Message
from onecdp.common.v1 import common_pb2
from onecdp.prediction.v1 import prediction_service_pb2 as pb
from onecdp.prediction.v1 import prediction_service_pb2_grpc as pb_grpc

from services.prediction.batch_request import BatchRequest, StreamedRequest
from services.prediction.batch_response import batch_response_bytes, finite, streamed_batch_response_bytes
from services.prediction.history import PersonRef, RefsByPersonId, refs_by_person_id
from services.prediction.identity_feed import GrpcIdentityChanges
from services.prediction.jobs import (
    MODEL_DELETED,
    SCORES_REMOVED,
    TrainingRequest,
    abandon_operation,
    run_refresh,
    run_training,
    start_refresh,
    start_training,
)
from services.prediction.online import ChangeFollower, OnlineHistories
from services.prediction.pages import page_size_of
from services.prediction.profile_source import (
    GrpcProfileSource,
    GrpcScoreWriter,
    RefusedSelector,
    raise_refused_selectors,
    selector_problem,
    selector_violations,
)
from services.prediction.registry import Model, ModelRegistry, ModelVersion, Operation, OperationKind, VersionState
from services.prediction.scoring import PersonScore
from services.prediction.serving import Predictor, ScorerCache
from services.prediction.spec import (
    MODEL_ID,
    ModelSpec,
    PredictionKind,
    display_name_violations,
    model_name,
    operation_name,
    parse_model_name,
    parse_operation_name,
    parse_version_name,
    resolve_spec,
    version_name,
)
from services.prediction.worker import BackgroundWorker, Job
from shared.clients import identity_stub, profile_stub
from shared.errors import DomainError, InvalidArgument, ResourceExhausted, Violations, error_domain
from shared.event_times import request_time_problem
from shared.longrunning import Instead, operation_error, operations_registration
from shared.page_tokens import decode_page_token, encode_page_token, invalid_page_token
from shared.runner import ServiceContext, ServiceDefinition
from shared.server import ServiceRegistration

T = TypeVar("T")
MAX_BATCH_PERSONS = 10_000
DEFAULT_TOP_FEATURES = 5
MAX_TOP_FEATURES = 50
_SCORE_VIEWS = frozenset(pb.ScoreView.values())
# DeleteModel waits this long at most for the model's running refreshes to see the deletion and end.
DELETE_WAIT_SECONDS = 30.0
DELETE_POLL_SECONDS = 0.2
# How far the clocks of the replicas that ran a refresh may be behind this one's (operations' update times).
REFRESH_CLOCK_SKEW = timedelta(seconds=5)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PredictionService"].full_name
# The service's name (its DEFINITION), and the ErrorInfo domain its operation errors share with its statuses.
NAME = "prediction"
ERROR_DOMAIN = error_domain(NAME)
# What google.longrunning.Operations says instead of the methods the stored operations cannot support.
OPERATIONS_INSTEAD = Instead(
    list_operations="operations are stored by id only, so there is nothing to list them by; keep the name "
                    "TrainModel or RefreshScores returned and poll it with GetOperation or WaitOperation "
                    "(ListModelVersions shows each version's state: TRAINING, READY or FAILED)",
    cancel_operation="a training or a score refresh runs to its end once started (unless its model is deleted: "
                     "it then ends as ABORTED, reason MODEL_DELETED, and what it wrote is removed); to keep a new "
                     "version from serving, train without `activate` (ActivateModelVersion activates a version "
                     "later, or rolls back to an earlier one)",
    delete_operation="operations expire by themselves 30 days after they were last written")

_KIND_FROM_PROTO = {pb.PREDICTION_KIND_CONVERSION: PredictionKind.CONVERSION,
                    pb.PREDICTION_KIND_CHURN: PredictionKind.CHURN}
_KIND_TO_PROTO = {kind: value for value, kind in _KIND_FROM_PROTO.items()}
_STATE_TO_PROTO = {VersionState.TRAINING: pb.MODEL_VERSION_STATE_TRAINING,
                   VersionState.READY: pb.MODEL_VERSION_STATE_READY,
                   VersionState.FAILED: pb.MODEL_VERSION_STATE_FAILED}


def _now() -> datetime:
    return datetime.now(UTC)


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
            roc_auc=finite(metrics.roc_auc), log_loss=finite(metrics.log_loss),
            calibration_error=finite(metrics.calibration_error), top_decile_lift=finite(metrics.top_decile_lift),
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
        message.error.CopyFrom(operation_error(operation.error_code, operation.error_message, domain=ERROR_DOMAIN,
                                               reason=operation.error_reason, metadata=operation.error_metadata))
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


# ---- scoring messages ----------------------------------------------------------------------------

def _collect(violations: Violations, parse: Callable[[], T]) -> T | None:
    """The parsed value, or None after adding the parse's field violations to the request's others."""
    try:
        return parse()
    except InvalidArgument as error:
        violations.items.extend(error.field_violations)
        return None


def _person_ref(selector: common_pb2.PersonSelector, field_path: str, violations: Violations) -> PersonRef | None:
    which = selector.WhichOneof("selector")
    if which == "person_id" and selector.person_id:
        return PersonRef(person_id=selector.person_id)
    if which == "identifier" and selector.identifier.type and selector.identifier.value:
        return PersonRef(identifier_type=selector.identifier.type, identifier_value=selector.identifier.value)
    violations.add(field_path, "set exactly one of person_id or identifier (type and value)")
    return None


def _one_person(selector: common_pb2.PersonSelector, field_path: str, violations: Violations) -> PersonRef | None:
    """`_person_ref` of a request's one person, also refused when it can match nobody (selector_problem)."""
    person = _person_ref(selector, field_path, violations)
    if person is not None and (problem := selector_problem(person)) is not None:
        violations.add(field_path, problem)
        return None
    return person


def _person_refs(selectors: Sequence[common_pb2.PersonSelector], field_path: str,
                 violations: Violations) -> Sequence[PersonRef]:
    """`_person_ref` of every selector; those by person id (the usual batch) take one attribute read each."""
    person_ids = [selector.person_id for selector in selectors]  # "" unless the selector is a non-empty id
    if all(person_ids):
        return RefsByPersonId(person_ids)
    refs = refs_by_person_id(person_ids)
    for index in [index for index, person_id in enumerate(person_ids) if not person_id]:
        ref = _person_ref(selectors[index], f"{field_path}[{index}]", violations)
        if ref is not None:
            refs[index] = ref
    return refs


def _top_features(requested: int, default: int, field_path: str, violations: Violations) -> int:
    violations.check(0 <= requested <= MAX_TOP_FEATURES, field_path,
                     f"must be 0-{MAX_TOP_FEATURES} (0: default {default}), got {requested}")
    return requested or default


def _version_id(model_id: str | None, requested: str, field_path: str, violations: Violations) -> int | None:
    """The version number of `model_version` when given (it must belong to the model); None for the active one."""
    if not requested:
        return None
    parsed = _collect(violations, lambda: parse_version_name(requested, field_path))
    if parsed is None:
        return None
    version_model, version_id = parsed
    if model_id is not None and version_model != model_id:
        violations.add(field_path, f"{requested!r} is not a version of models/{model_id}")
    return version_id


def _time(holder: timestamp_pb2.Timestamp, field_path: str, violations: Violations) -> datetime | None:
    """The time a request names, or None after adding its violation (shared.event_times.request_time_problem)."""
    if problem := request_time_problem(holder):
        violations.add(field_path, problem)
        return None
    return holder.ToDatetime(tzinfo=UTC)


def _time_or_now(holder: timestamp_pb2.Timestamp, present: bool, field_path: str,
                 violations: Violations) -> datetime | None:
    """`_time` of the field when it is set, else now."""
    return _time(holder, field_path, violations) if present else _now()


def _score_message(score: PersonScore, model_version: str) -> pb.Score:
    message = pb.Score(person_id=score.person_id, model_version=model_version, probability=score.probability,
                       percentile=score.percentile, base_value=score.base_value,
                       top_features=[pb.FeatureContribution(feature=c.feature, value=finite(c.value),
                                                            contribution=c.contribution)
                                     for c in score.top_features])
    message.as_of_time.FromDatetime(score.as_of)
    return message


def _score_result(result: PersonScore | DomainError, model_version: str) -> pb.ScoreResult:
    if isinstance(result, DomainError):
        return pb.ScoreResult(error=pb.ScoreError(code=result.code.value, message=result.message))
    return pb.ScoreResult(score=_score_message(result, model_version))


def _check_batch_alone(request: pb.StreamScorePersonsRequest, index: int) -> None:
    """A streamed batch comes without the one-person fields: a request with both would leave one of them unread."""
    violations = Violations()
    for field, present in (("model", bool(request.model)), ("person", request.HasField("person")),
                           ("top_features", bool(request.top_features))):
        violations.check(not present, f"requests[{index}].{field}",
                         "set either batch or the one-person fields (model, person, top_features), not both")
    violations.raise_if_any()


class PredictionServicer(pb_grpc.PredictionServiceServicer):
    def __init__(self, registry: ModelRegistry, source: GrpcProfileSource, online: OnlineHistories,
                 writer: GrpcScoreWriter, worker: BackgroundWorker) -> None:
        self._registry = registry
        self._source = source
        self._writer = writer
        self._worker = worker
        self._predictor = Predictor(registry, online, ScorerCache(registry))

    def CreateModel(self, request: pb.CreateModelRequest, context: grpc.ServicerContext) -> pb.Model:
        violations = Violations()
        violations.check(bool(MODEL_ID.match(request.model_id)), "model_id",
                         f"{request.model_id!r} is not a model id: 1-63 lower-case letters, digits and hyphens, "
                         "starting with a letter")
        violations.check(request.HasField("model"), "model", "required")
        violations.items.extend(display_name_violations(request.model.display_name))
        violations.check(request.model.HasField("spec"), "model.spec", "required")
        spec = _requested_spec(request, violations)
        violations.raise_if_any("the model is invalid", reason="INVALID_MODEL")
        assert spec is not None
        self._predictor.forget_model(request.model_id)
        return _model_message(self._registry.create_model(request.model_id, request.model.display_name, spec,
                                                          _now()))

    def GetModel(self, request: pb.GetModelRequest, context: grpc.ServicerContext) -> pb.Model:
        return _model_message(self._registry.get_model(parse_model_name(request.name)))

    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext) -> pb.ListModelsResponse:
        violations = Violations()
        page_size = page_size_of(request.page_size, violations)
        violations.raise_if_any()
        after = decode_page_token(request.page_token, "models")
        models, next_after = self._registry.list_models(page_size, after[0] if after is not None else None)
        return pb.ListModelsResponse(models=[_model_message(m) for m in models],
                                     next_page_token=encode_page_token("models", (next_after,)) if next_after else "")

    def DeleteModel(self, request: pb.DeleteModelRequest, context: grpc.ServicerContext) -> pb.DeleteModelResponse:
        model_id = parse_model_name(request.name)
        self._registry.get_model(model_id)  # NOT_FOUND before any profile is touched
        # Scores first: when clearing fails the model is still there and the call can be retried, while a
        # model deleted first would leave its scores in profiles (and segments) with nothing to retry.
        active_since = _now() - REFRESH_CLOCK_SKEW
        self._writer.clear_all_scores(model_id, _now())
        self._registry.delete_model(model_id)
        self._predictor.forget_model(model_id)
        self._clear_scores_of_refreshes(model_id, active_since)
        return pb.DeleteModelResponse()

    def _clear_scores_of_refreshes(self, model_id: str, active_since: datetime) -> None:
        """Remove the scores refreshes of the deleted model wrote while it was being deleted.

        A refresh running meanwhile (here or on another replica) may write a batch after the clearing above
        passed its persons. It sees the deletion after its next write and removes what it wrote (jobs.py), so
        this waits (up to DELETE_WAIT_SECONDS) for every refresh of the model active since the delete began to
        end; then, unless each ended that way, clears once more: a refresh may also have finished between the
        clearing and the deletion, before it could see it."""
        refreshes = self._registry.refreshes_of(model_id, active_since)
        if not refreshes:
            return
        give_up = time.monotonic() + DELETE_WAIT_SECONDS
        while True:
            # get_operation also ends a refresh whose process died (its lease expired).
            refreshes = [self._registry.get_operation(r.operation_id) for r in refreshes]
            if all(r.done for r in refreshes) or time.monotonic() >= give_up:
                break
            time.sleep(DELETE_POLL_SECONDS)
        if not all(r.done and r.error_reason == MODEL_DELETED and r.error_metadata.get(SCORES_REMOVED) == "true"
                   for r in refreshes):
            self._writer.clear_all_scores(model_id, _now())

    def GetModelVersion(self, request: pb.GetModelVersionRequest, context: grpc.ServicerContext) -> pb.ModelVersion:
        model_id, version_id = parse_version_name(request.name)
        return _version_message(self._registry.get_version(model_id, version_id))

    def ListModelVersions(self, request: pb.ListModelVersionsRequest,
                          context: grpc.ServicerContext) -> pb.ListModelVersionsResponse:
        violations = Violations()
        page_size = page_size_of(request.page_size, violations)
        violations.raise_if_any()
        model_id = parse_model_name(request.parent, "parent")
        before = _version_position(decode_page_token(request.page_token, request.parent))
        versions, next_before = self._registry.list_versions(model_id, page_size, before)
        return pb.ListModelVersionsResponse(
            model_versions=[_version_message(v) for v in versions],
            next_page_token=encode_page_token(request.parent, (str(next_before),)) if next_before is not None else "")

    def ActivateModelVersion(self, request: pb.ActivateModelVersionRequest,
                             context: grpc.ServicerContext) -> pb.Model:
        model_id, version_id = parse_version_name(request.name)
        activated = self._registry.activate(model_id, version_id, _now())
        self._predictor.forget_model(model_id)
        return _model_message(activated)

    def GetOperation(self, request: operations_pb2.GetOperationRequest,
                     context: grpc.ServicerContext) -> operations_pb2.Operation:
        operation = self._registry.get_operation(parse_operation_name(request.name))
        return operation_message(operation, self._registry)

    # ---- long-running operations

    def TrainModel(self, request: pb.TrainModelRequest, context: grpc.ServicerContext) -> operations_pb2.Operation:
        violations = Violations()
        model_id = _collect(violations, lambda: parse_model_name(request.name))
        violations.check(bool(request.training_cutoffs), "training_cutoffs", "at least one training cutoff is required")
        cutoffs = [_time(cutoff, f"training_cutoffs[{index}]", violations)
                   for index, cutoff in enumerate(request.training_cutoffs)]
        validation_cutoff = (_time(request.validation_cutoff, "validation_cutoff", violations)
                             if violations.check(request.HasField("validation_cutoff"), "validation_cutoff",
                                                 "required") else None)
        violations.check(request.seed >= 0, "seed", f"must not be negative, got {request.seed}")
        violations.raise_if_any("the training request is invalid", reason="INVALID_TRAINING_REQUEST")
        assert model_id is not None and validation_cutoff is not None
        training = TrainingRequest(
            model_id=model_id, training_cutoffs=tuple(c for c in cutoffs if c is not None),
            validation_cutoff=validation_cutoff, seed=request.seed or 1, activate=request.activate)
        operation = start_training(self._registry, training)
        self._submit(Job(
            name=f"train {model_name(model_id)}",
            run=partial(run_training, self._registry, self._source, operation, training,
                        should_stop=self._worker.stopping, compile_version=self._predictor.compile_version,
                        activated=self._predictor.forget_model),
            abandon=partial(abandon_operation, self._registry, operation)), operation)
        return operation_message(operation, self._registry)

    def RefreshScores(self, request: pb.RefreshScoresRequest,
                      context: grpc.ServicerContext) -> operations_pb2.Operation:
        violations = Violations()
        model_id = _collect(violations, lambda: parse_model_name(request.name))
        as_of = _time_or_now(request.as_of_time, request.HasField("as_of_time"), "as_of_time", violations)
        violations.raise_if_any()
        assert model_id is not None and as_of is not None
        scoring = self._predictor.scoring_version(model_id)
        operation = start_refresh(self._registry, scoring)
        self._submit(Job(
            name=f"refresh {model_name(model_id)}",
            run=partial(run_refresh, self._registry, self._source, self._writer, scoring, operation, as_of=as_of,
                        should_stop=self._worker.stopping),
            abandon=partial(abandon_operation, self._registry, operation)), operation)
        return operation_message(operation, self._registry)

    def _submit(self, job: Job, operation: Operation) -> None:
        try:
            self._worker.submit(job)
        except DomainError:
            abandon_operation(self._registry, operation)
            raise

    # ---- scoring

    def ScorePerson(self, request: pb.ScorePersonRequest, context: grpc.ServicerContext) -> pb.Score:
        violations = Violations()
        model_id = _collect(violations, lambda: parse_model_name(request.model, "model"))
        person = _one_person(request.person, "person", violations)
        version_id = _version_id(model_id, request.model_version, "model_version", violations)
        top = _top_features(request.top_features, DEFAULT_TOP_FEATURES, "top_features", violations)
        as_of = _time_or_now(request.as_of_time, request.HasField("as_of_time"), "as_of_time", violations)
        violations.raise_if_any()
        assert model_id is not None and person is not None and as_of is not None
        scoring, score = self._predictor.score(model_id, version_id, person, as_of, top)
        return _score_message(score, scoring.name)

    def BatchScorePersons(self, request: pb.BatchScorePersonsRequest,
                          context: grpc.ServicerContext) -> pb.BatchScorePersonsResponse:
        """The response `batch_score_persons_wire` encodes, as a message (the server sends the bytes)."""
        return pb.BatchScorePersonsResponse.FromString(self.batch_score_persons_wire(BatchRequest.of(request), context))

    def batch_score_persons_wire(self, received: BatchRequest, context: grpc.ServicerContext) -> bytes:
        """BatchScorePersons on the request as it arrived (its person ids read from its bytes when they allow it,
        batch_request.py), answered with the response's wire bytes (batch_response.batch_response_bytes)."""
        return self._score_batch_wire(received, "")

    def _score_batch_wire(self, received: BatchRequest, field_prefix: str) -> bytes:
        """`batch_score_persons_wire` of a batch at `field_prefix` (e.g. `requests[3].batch.`) in its request."""
        request = received.message
        if len(request.persons) > MAX_BATCH_PERSONS:
            raise ResourceExhausted(f"{len(request.persons)} persons in one call; at most {MAX_BATCH_PERSONS} are "
                                    "allowed, split the batch", reason="BATCH_TOO_LARGE")
        violations = Violations()
        model_id = _collect(violations, lambda: parse_model_name(request.model, f"{field_prefix}model"))
        violations.check(bool(request.persons), f"{field_prefix}persons", "at least one person is required")
        person_ids = received.person_ids()
        persons = (RefsByPersonId(person_ids) if person_ids is not None
                   else _person_refs(request.persons, f"{field_prefix}persons", violations))
        violations.items.extend(selector_violations(persons, f"{field_prefix}persons"))
        version_id = _version_id(model_id, request.model_version, f"{field_prefix}model_version", violations)
        top = _top_features(request.top_features, 0, f"{field_prefix}top_features", violations)
        violations.check(request.view in _SCORE_VIEWS, f"{field_prefix}view", f"unknown view {request.view}")
        full = request.view != pb.SCORE_VIEW_BASIC
        violations.check(full or not top, f"{field_prefix}top_features",
                         "top features come with the FULL view; ask for SCORE_VIEW_FULL or leave top_features 0")
        as_of = _time_or_now(request.as_of_time, request.HasField("as_of_time"), f"{field_prefix}as_of_time",
                             violations)
        violations.raise_if_any()
        assert model_id is not None and as_of is not None
        scoring = self._predictor.scoring_version(model_id, version_id)
        scored = self._predictor.score_many(scoring, persons, as_of, top)
        # A selector profile refused is the request's error: the call fails naming each (a person's own error
        # is NOT_FOUND or FAILED_PRECONDITION).
        raise_refused_selectors(scored.errors, f"{field_prefix}persons")
        return batch_response_bytes(scored, scoring.name, as_of, full)

    def StreamScorePersons(self, request_iterator: Iterable[pb.StreamScorePersonsRequest],
                           context: grpc.ServicerContext) -> Iterator[pb.StreamScorePersonsResponse]:
        """The responses `stream_score_persons_wire` encodes, as messages (the server sends the bytes)."""
        requests = (StreamedRequest.parse(request.SerializeToString()) for request in request_iterator)
        return map(pb.StreamScorePersonsResponse.FromString, self.stream_score_persons_wire(requests, context))

    def stream_score_persons_wire(self, requests: Iterable[StreamedRequest],
                                  context: grpc.ServicerContext) -> Iterator[bytes]:
        """StreamScorePersons on the requests as they arrived, answered with each response's wire bytes: a batch
        goes the way of BatchScorePersons (its bytes read and written in bulk), a person is scored alone.
        A bad or unscorable request gets an error result; the stream goes on with the next one."""
        for index, request in enumerate(requests):
            if request.batch is not None:
                try:
                    _check_batch_alone(request.message, index)
                    yield streamed_batch_response_bytes(
                        self._score_batch_wire(request.batch, f"requests[{index}].batch."))
                except DomainError as error:
                    yield pb.StreamScorePersonsResponse(result=_score_result(error, "")).SerializeToString()
                continue
            try:
                result = _score_result(*self._score_streamed(request.message, index))
            except DomainError as error:
                result = _score_result(error, "")
            yield pb.StreamScorePersonsResponse(result=result).SerializeToString()

    def _score_streamed(self, request: pb.StreamScorePersonsRequest, index: int) -> tuple[PersonScore, str]:
        violations = Violations()
        model_id = _collect(violations, lambda: parse_model_name(request.model, f"requests[{index}].model"))
        person = _one_person(request.person, f"requests[{index}].person", violations)
        top = _top_features(request.top_features, 0, f"requests[{index}].top_features", violations)
        violations.raise_if_any()
        assert model_id is not None and person is not None
        try:
            scoring, score = self._predictor.score(model_id, None, person, _now(), top)
        except RefusedSelector as refused:
            raise RefusedSelector(refused.why, f"requests[{index}].person") from refused
        return score, scoring.name

    def GetPersonFeatures(self, request: pb.GetPersonFeaturesRequest,
                          context: grpc.ServicerContext) -> pb.PersonFeatures:
        violations = Violations()
        person = _one_person(request.person, "person", violations)
        as_of = _time_or_now(request.as_of_time, request.HasField("as_of_time"), "as_of_time", violations)
        violations.raise_if_any()
        assert person is not None and as_of is not None
        person_id, values = self._predictor.features(person, as_of)
        # NaN is kept: it is how training and scoring see a value that does not exist (LightGBM's missing).
        message = pb.PersonFeatures(person_id=person_id, values=values)
        message.as_of_time.FromDatetime(as_of)
        return message


def _version_position(position: tuple[str, ...] | None) -> int | None:
    """The version number a ListModelVersions token continues before (its position is that number)."""
    if position is None:
        return None
    number = position[0]
    # Versions are numbered from 1 in an int column: a (forged) position beyond it could not be bound.
    if not (number.isascii() and number.isdigit() and len(number) <= 10 and 1 <= int(number) <= 2**31 - 1):
        raise invalid_page_token()
    return int(number)


def build(context: ServiceContext) -> list[ServiceRegistration]:
    registry = ModelRegistry(context.session)
    profiles = profile_stub(context.grpc_settings, context.on_stop)
    worker = BackgroundWorker()
    context.on_stop(worker.stop)
    source = GrpcProfileSource(profiles)
    online = OnlineHistories(source)
    follower = ChangeFollower(online, source)
    follower.start()
    context.on_stop(follower.stop)
    # Erasures (merges, splits) from identity itself, ~1 s before profile's feed has them (online.py).
    identity_follower = ChangeFollower(
        online, GrpcIdentityChanges(identity_stub(context.grpc_settings, context.on_stop)), keeps_current=False,
        name="prediction-identity-follower",
        failure_message="following identity changes failed; erasures reach the online store through profile's "
                        "feed (about 1.5 s later) until it works again")
    identity_follower.start()
    context.on_stop(identity_follower.stop)
    servicer = PredictionServicer(registry, source, online, GrpcScoreWriter(profiles), worker)
    return [ServiceRegistration(SERVICE_NAME, partial(_add_to_server, servicer)),
            operations_registration(SERVICE_NAME, servicer.GetOperation, OPERATIONS_INSTEAD)]


def _add_to_server(servicer: PredictionServicer, server: grpc.Server) -> None:
    pb_grpc.add_PredictionServiceServicer_to_server(servicer, server)
    # BatchScorePersons and StreamScorePersons send the bytes they encode (a registered handler replaces the
    # generated one of the same method): results built as a message cost a parse here and a serialization in
    # gRPC, ~0.2 µs a person.
    server.add_registered_method_handlers(SERVICE_NAME, {
        "BatchScorePersons": grpc.unary_unary_rpc_method_handler(
            servicer.batch_score_persons_wire, request_deserializer=BatchRequest.parse,
            response_serializer=_wire_bytes),
        "StreamScorePersons": grpc.stream_stream_rpc_method_handler(
            servicer.stream_score_persons_wire, request_deserializer=StreamedRequest.parse,
            response_serializer=_wire_bytes)})


def _wire_bytes(response: bytes) -> bytes:
    return response


DEFINITION = ServiceDefinition(name=NAME, build=build)
