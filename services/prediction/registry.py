"""The model registry in Cassandra: models, versions with their boosters and metrics, and operations.

Every statement is prepared once and bound through CassandraSession. Writes to a model row are
lightweight transactions, so creation is exclusive, version numbers are never handed out twice and
activation cannot resurrect a deleted model.

An operation outlives the process running it. The registry that creates an operation holds its lease
(shared.leases.OwnedLeases, name `operations/<id>`, the mechanism segmentation's recomputes use) and
renews it on a thread of its own until the operation is finished. Reading an operation that is not
done, or a version still TRAINING, checks its lease: when it has expired (the process was killed,
its node lost) the reader takes it and ends the operation as ABORTED and fails its version, so a
caller polling GetOperation gets an answer within the lease time. The end of an operation (`done`)
and of a version (`state`) are written only with lightweight transactions conditioned on their not
having ended, so a reader ending an abandoned operation and its owner finishing it late cannot both
win. Like every lease here it is a hint, not a fence: an owner paused longer than the lease finds its
operation ended and stops at its next progress point.
"""

from __future__ import annotations

import logging
import uuid
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from functools import partial
from typing import Any

from services.prediction.metrics import ModelMetrics
from services.prediction.spec import ModelSpec, PredictionKind, version_name
from services.prediction.training import TrainedModel
from shared.cassandra import CassandraSession
from shared.errors import Aborted, AlreadyExists, DomainError, FailedPrecondition, NotFound
from shared.leases import FollowerLease, OwnedLeases, operation_lease_name

log = logging.getLogger(__name__)
SCOPE = "models"
# The lease of a running operation: renewed every third of this, ended by a reader once it has expired.
LEASE_SECONDS = 15
# How many times version numbering retries a lost compare-and-set before giving up (each retry is a race lost).
MAX_CAS_ATTEMPTS = 20


class VersionState(StrEnum):
    TRAINING = "training"
    READY = "ready"
    FAILED = "failed"


class OperationKind(StrEnum):
    TRAIN = "train"
    REFRESH = "refresh"


@dataclass(frozen=True)
class Model:
    model_id: str
    display_name: str
    spec: ModelSpec
    active_version: int | None
    create_time: datetime
    update_time: datetime


@dataclass(frozen=True)
class ModelVersion:
    model_id: str
    version_id: int
    state: VersionState
    spec: ModelSpec
    training_cutoffs: tuple[datetime, ...]
    validation_cutoff: datetime
    create_time: datetime
    feature_names: tuple[str, ...] = ()
    metrics: ModelMetrics | None = None
    importance: tuple[tuple[str, float], ...] = ()
    score_quantiles: tuple[float, ...] = ()
    best_iteration: int = 0
    failure_message: str = ""
    operation_id: str = ""  # the operation training it ("" for versions trained before operations had leases)


@dataclass(frozen=True)
class Operation:
    operation_id: str
    kind: OperationKind
    model_id: str
    start_time: datetime
    update_time: datetime
    version_id: int | None = None
    stage: str = ""
    persons_processed: int = 0
    persons_total: int = 0
    persons_ineligible: int = 0
    shards_done: int = 0
    shards_total: int = 0
    done: bool = False
    error_code: str | None = None  # a google.rpc.Code name, e.g. FAILED_PRECONDITION
    error_message: str = ""
    elapsed_seconds: float = 0.0
    # The failure's ErrorInfo reason and metadata (schema 0003); None for failures recorded before.
    error_reason: str | None = None
    error_metadata: Mapping[str, str] = field(default_factory=dict)


def _utc(value: datetime | None) -> datetime | None:
    # The driver returns timestamps as naive UTC datetimes (millisecond precision).
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


def _required_utc(value: datetime) -> datetime:
    result = _utc(value)
    assert result is not None
    return result


def _spec_of(row: Any) -> ModelSpec:
    return ModelSpec(kind=PredictionKind(row.kind), event_names=tuple(row.event_names or ()),
                     horizon_days=row.horizon_days, eligibility_days=row.eligibility_days or 0,
                     min_class_count=row.min_class_count)


_MODEL_COLUMNS = ("model_id, display_name, kind, event_names, horizon_days, eligibility_days, min_class_count, "
                  "active_version, create_time, update_time")
_VERSION_COLUMNS = ("model_id, version_id, state, kind, event_names, horizon_days, eligibility_days, min_class_count, "
                    "feature_names, training_cutoffs, validation_cutoff, roc_auc, log_loss, calibration_error, "
                    "top_decile_lift, training_examples, validation_examples, training_positive_rate, "
                    "validation_positive_rate, importance, best_iteration, failure_message, create_time, operation_id")
_OPERATION_COLUMNS = ("operation_id, kind, model_id, version_id, stage, persons_processed, persons_total, "
                      "persons_ineligible, shards_done, shards_total, start_time, update_time, done, error_code, "
                      "error_message, elapsed_seconds, error_reason, error_metadata")


def _model_of(row: Any) -> Model:
    return Model(model_id=row.model_id, display_name=row.display_name or "", spec=_spec_of(row),
                 active_version=row.active_version, create_time=_required_utc(row.create_time),
                 update_time=_required_utc(row.update_time))


def _version_of(row: Any, score_quantiles: Sequence[float] = ()) -> ModelVersion:
    metrics = None
    if row.roc_auc is not None:
        metrics = ModelMetrics(
            roc_auc=row.roc_auc, log_loss=row.log_loss, calibration_error=row.calibration_error,
            top_decile_lift=row.top_decile_lift, training_examples=row.training_examples,
            validation_examples=row.validation_examples, training_positive_rate=row.training_positive_rate,
            validation_positive_rate=row.validation_positive_rate)
    return ModelVersion(
        model_id=row.model_id, version_id=row.version_id, state=VersionState(row.state), spec=_spec_of(row),
        training_cutoffs=tuple(_required_utc(t) for t in row.training_cutoffs or ()),
        validation_cutoff=_required_utc(row.validation_cutoff), create_time=_required_utc(row.create_time),
        feature_names=tuple(row.feature_names or ()), metrics=metrics,
        importance=tuple((name, gain) for name, gain in row.importance or ()),
        score_quantiles=tuple(score_quantiles), best_iteration=row.best_iteration or 0,
        failure_message=row.failure_message or "", operation_id=row.operation_id or "")


def _operation_of(row: Any) -> Operation:
    return Operation(
        operation_id=row.operation_id, kind=OperationKind(row.kind), model_id=row.model_id,
        start_time=_required_utc(row.start_time), update_time=_required_utc(row.update_time),
        version_id=row.version_id, stage=row.stage or "", persons_processed=row.persons_processed or 0,
        persons_total=row.persons_total or 0, persons_ineligible=row.persons_ineligible or 0,
        shards_done=row.shards_done or 0, shards_total=row.shards_total or 0, done=bool(row.done),
        error_code=row.error_code or None, error_message=row.error_message or "",
        elapsed_seconds=row.elapsed_seconds or 0.0, error_reason=row.error_reason,
        error_metadata=dict(row.error_metadata or {}))


def _model_not_found(model_id: str) -> NotFound:
    return NotFound(f"model models/{model_id} does not exist", reason="MODEL_NOT_FOUND",
                    metadata={"model": f"models/{model_id}"})


def _version_not_found(model_id: str, version_id: int) -> NotFound:
    name = version_name(model_id, version_id)
    return NotFound(f"model version {name} does not exist", reason="MODEL_VERSION_NOT_FOUND",
                    metadata={"model_version": name})


def abandoned_message(kind: OperationKind) -> str:
    """What a caller reads on an operation whose process stopped without finishing it."""
    rpc = "TrainModel" if kind is OperationKind.TRAIN else "RefreshScores"
    return (f"the process running this operation stopped (it was killed or its node was lost) before the "
            f"operation finished; start it again with {rpc}")


def _log_lost_lease(operation_id: str) -> None:
    # The run finds `leases.holds` False at its next progress point and stops (jobs._check_stop).
    log.warning("lost the lease of a running operation; it was ended as abandoned", extra={"operation": operation_id})


class ModelRegistry:
    def __init__(self, session: CassandraSession, *, lease_seconds: int | None = None) -> None:
        self._session = session
        # The leases of the operations this registry's process runs, renewed on a thread of their own.
        self.leases = OwnedLeases(partial(FollowerLease, session), lease_seconds or LEASE_SECONDS,
                                  what="an operation", on_lost=_log_lost_lease, renewer="operation-leases")

    # ---- models

    def create_model(self, model_id: str, display_name: str, spec: ModelSpec, now: datetime) -> Model:
        """Create a model; AlreadyExists when the id is taken."""
        existing = self._session.execute("SELECT model_id FROM models WHERE scope = ? AND model_id = ?",
                                         (SCOPE, model_id)).one()
        if existing is None:
            # A delete interrupted between its steps may have left versions behind; a new model with the
            # same id must not inherit them.
            self._purge_versions(model_id)
        result = self._session.execute(
            "INSERT INTO models (scope, model_id, display_name, kind, event_names, horizon_days, eligibility_days, "
            "min_class_count, last_version, create_time, update_time) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "IF NOT EXISTS",
            (SCOPE, model_id, display_name, spec.kind.value, list(spec.event_names), spec.horizon_days,
             spec.eligibility_days, spec.min_class_count, 0, now, now))
        if not result.was_applied:
            raise AlreadyExists(f"model models/{model_id} already exists", reason="MODEL_EXISTS",
                                metadata={"model": f"models/{model_id}"})
        return self.get_model(model_id)

    def get_model(self, model_id: str) -> Model:
        row = self._session.execute(f"SELECT {_MODEL_COLUMNS} FROM models WHERE scope = ? AND model_id = ?",
                                    (SCOPE, model_id)).one()
        if row is None:
            raise _model_not_found(model_id)
        return _model_of(row)

    def list_models(self, page_size: int, after: str | None = None) -> tuple[list[Model], str | None]:
        """Up to page_size models in id order after `after`; and the id to continue after, if more exist."""
        rows = self._session.execute(
            f"SELECT {_MODEL_COLUMNS} FROM models WHERE scope = ? AND model_id > ? LIMIT ?",
            (SCOPE, after or "", page_size + 1))
        models = [_model_of(row) for row in rows]
        more = len(models) > page_size
        models = models[:page_size]
        return models, (models[-1].model_id if more else None)

    def created_at(self, model_id: str) -> datetime | None:
        """When the model was created, None when it does not exist: a long operation compares it with the model
        it started for to learn whether that model was deleted meanwhile (a model created again with the same
        id is another model, with another creation time)."""
        row = self._session.execute("SELECT create_time FROM models WHERE scope = ? AND model_id = ?",
                                    (SCOPE, model_id)).one()
        return _utc(row.create_time) if row is not None else None

    def refreshes_of(self, model_id: str, active_since: datetime) -> list[Operation]:
        """The score refreshes of the model that are not done, or were last written at or after `active_since`
        (DeleteModel: the refreshes that may have written scores while it ran).

        Operations are keyed by id alone, so this reads the whole operations table (ALLOW FILTERING): kept 30
        days, it holds one row per training or refresh, and only DeleteModel asks."""
        rows = self._session.execute(
            "SELECT operation_id, kind, done, update_time FROM operations WHERE model_id = ? ALLOW FILTERING",
            (model_id,))
        return [self._read_operation(row.operation_id) for row in rows
                if row.kind == OperationKind.REFRESH.value
                and (not row.done or _required_utc(row.update_time) >= active_since)]

    def discard_version(self, model_id: str, version_id: int, operation_id: str) -> None:
        """Remove what a training of a deleted model wrote of its version (the booster, the version row when the
        delete did not remove it), unless the number belongs by now to a version of a model created again."""
        row = self._session.execute("SELECT operation_id FROM model_versions WHERE model_id = ? AND version_id = ?",
                                    (model_id, version_id)).one()
        if row is not None and row.operation_id != operation_id:
            return
        # The version row before the booster: a READY version must always have its booster.
        if row is not None:
            self._session.execute("DELETE FROM model_versions WHERE model_id = ? AND version_id = ? "
                                  "IF operation_id = ?", (model_id, version_id, operation_id))
        self._session.execute("DELETE FROM model_boosters WHERE model_id = ? AND version_id = ?",
                              (model_id, version_id))

    def delete_model(self, model_id: str) -> None:
        result = self._session.execute("DELETE FROM models WHERE scope = ? AND model_id = ? IF EXISTS",
                                       (SCOPE, model_id))
        if not result.was_applied:
            raise _model_not_found(model_id)
        self._purge_versions(model_id)

    def _purge_versions(self, model_id: str) -> None:
        rows = self._session.execute("SELECT version_id FROM model_versions WHERE model_id = ?", (model_id,))
        self._session.execute_many("DELETE FROM model_boosters WHERE model_id = ? AND version_id = ?",
                                   [(model_id, row.version_id) for row in rows])
        self._session.execute("DELETE FROM model_versions WHERE model_id = ?", (model_id,))

    def activate(self, model_id: str, version_id: int, now: datetime) -> Model:
        """Make a ready version the active one (also how to roll back)."""
        version = self.get_version(model_id, version_id)
        if version.state is not VersionState.READY:
            raise FailedPrecondition(
                f"model version {version_name(model_id, version_id)} is {version.state.value}; only a version that "
                "finished training can be activated", reason="MODEL_VERSION_NOT_READY",
                metadata={"model_version": version_name(model_id, version_id), "state": version.state.value})
        result = self._session.execute(
            "UPDATE models SET active_version = ?, update_time = ? WHERE scope = ? AND model_id = ? IF EXISTS",
            (version_id, now, SCOPE, model_id))
        if not result.was_applied:
            raise _model_not_found(model_id)
        return self.get_model(model_id)

    # ---- versions

    def start_version(self, model_id: str, training_cutoffs: Sequence[datetime], validation_cutoff: datetime,
                      now: datetime, operation_id: str = "") -> ModelVersion:
        """Number and record a new version in state TRAINING, with a copy of the model's spec, trained by
        `operation_id` (whose lease the caller holds already)."""
        for _ in range(MAX_CAS_ATTEMPTS):
            row = self._session.execute(
                "SELECT last_version FROM models WHERE scope = ? AND model_id = ?", (SCOPE, model_id)).one()
            if row is None:
                raise _model_not_found(model_id)
            last = row.last_version or 0
            claimed = self._session.execute(
                "UPDATE models SET last_version = ? WHERE scope = ? AND model_id = ? IF last_version = ?",
                (last + 1, SCOPE, model_id, row.last_version))
            if claimed.was_applied:
                break
        else:
            raise FailedPrecondition(f"could not number a new version of models/{model_id}: too many concurrent "
                                     "trainings; retry", reason="VERSION_NUMBER_CONTENDED")
        version_id = last + 1
        spec = self.get_model(model_id).spec
        # IF NOT EXISTS although the number is ours alone: `state` is only ever written by lightweight
        # transactions, whose timestamps are Paxos ballots (a plain write's could order after them).
        self._session.execute(
            "INSERT INTO model_versions (model_id, version_id, state, kind, event_names, horizon_days, "
            "eligibility_days, min_class_count, training_cutoffs, validation_cutoff, create_time, operation_id) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) IF NOT EXISTS",
            (model_id, version_id, VersionState.TRAINING.value, spec.kind.value, list(spec.event_names),
             spec.horizon_days, spec.eligibility_days, spec.min_class_count, list(training_cutoffs),
             validation_cutoff, now, operation_id or None))
        return self.get_version(model_id, version_id)

    def finish_version(self, model_id: str, version_id: int, trained: TrainedModel, now: datetime) -> ModelVersion:
        """Store a trained booster and its metrics; the version becomes READY. Aborted when the version is
        no longer TRAINING (it was failed meanwhile, e.g. as abandoned while this process was paused)."""
        # The booster first: a READY version must always have its booster.
        self._session.execute(
            "INSERT INTO model_boosters (model_id, version_id, model_string) VALUES (?, ?, ?)",
            (model_id, version_id, zlib.compress(trained.model_string.encode(), 6)))
        metrics = trained.metrics
        result = self._session.execute(
            "UPDATE model_versions SET state = ?, feature_names = ?, roc_auc = ?, log_loss = ?, "
            "calibration_error = ?, top_decile_lift = ?, training_examples = ?, validation_examples = ?, "
            "training_positive_rate = ?, validation_positive_rate = ?, importance = ?, score_quantiles = ?, "
            "best_iteration = ?, create_time = ? WHERE model_id = ? AND version_id = ? IF state = ?",
            (VersionState.READY.value, list(trained.feature_names), metrics.roc_auc, metrics.log_loss,
             metrics.calibration_error, metrics.top_decile_lift, metrics.training_examples,
             metrics.validation_examples, metrics.training_positive_rate, metrics.validation_positive_rate,
             list(trained.importance), list(trained.score_quantiles), trained.best_iteration, now,
             model_id, version_id, VersionState.TRAINING.value))
        if not result.was_applied:
            version = self._read_version(model_id, version_id)
            name = version_name(model_id, version_id)
            raise Aborted(f"model version {name} is {version.state.value}, no longer training: "
                          f"{version.failure_message or 'it ended meanwhile'}", reason="MODEL_VERSION_NOT_TRAINING",
                          metadata={"model_version": name, "state": version.state.value})
        return self.get_version(model_id, version_id)

    def fail_version(self, model_id: str, version_id: int, message: str, now: datetime) -> ModelVersion:
        """Fail a version that is still TRAINING; a version that ended already is left as it is. NotFound when
        the version does not exist (its model was deleted): the conditional update creates no row."""
        self._session.execute(
            "UPDATE model_versions SET state = ?, failure_message = ?, create_time = ? "
            "WHERE model_id = ? AND version_id = ? IF state = ?",
            (VersionState.FAILED.value, message, now, model_id, version_id, VersionState.TRAINING.value))
        return self._read_version(model_id, version_id)

    def get_version(self, model_id: str, version_id: int, *, with_quantiles: bool = False) -> ModelVersion:
        """One version; `with_quantiles` also reads the score distribution that scoring needs. A version
        TRAINING whose operation was abandoned is failed first."""
        version = self._read_version(model_id, version_id, with_quantiles=with_quantiles)
        if self._ended_abandoned_training(version):
            version = self._read_version(model_id, version_id, with_quantiles=with_quantiles)
        return version

    def _read_version(self, model_id: str, version_id: int, *, with_quantiles: bool = False) -> ModelVersion:
        columns = f"{_VERSION_COLUMNS}, score_quantiles" if with_quantiles else _VERSION_COLUMNS
        row = self._session.execute(
            f"SELECT {columns} FROM model_versions WHERE model_id = ? AND version_id = ?",
            (model_id, version_id)).one()
        if row is None:
            raise _version_not_found(model_id, version_id)
        return _version_of(row, (row.score_quantiles or ()) if with_quantiles else ())

    def list_versions(self, model_id: str, page_size: int, before: int | None = None
                      ) -> tuple[list[ModelVersion], int | None]:
        """Versions newest first, below `before`; and the version to continue below, if more exist."""
        self.get_model(model_id)
        rows = self._session.execute(
            f"SELECT {_VERSION_COLUMNS} FROM model_versions WHERE model_id = ? AND version_id < ? LIMIT ?",
            (model_id, before if before is not None else 2**31 - 1, page_size + 1))
        versions = [_version_of(row) for row in rows]
        more = len(versions) > page_size
        versions = [self._read_version(model_id, version.version_id) if self._ended_abandoned_training(version)
                    else version for version in versions[:page_size]]
        return versions, (versions[-1].version_id if more else None)

    def load_booster(self, model_id: str, version_id: int) -> str:
        row = self._session.execute(
            "SELECT model_string FROM model_boosters WHERE model_id = ? AND version_id = ?",
            (model_id, version_id)).one()
        if row is None:
            raise _version_not_found(model_id, version_id)
        return zlib.decompress(row.model_string).decode()

    # ---- operations

    def own_new_operation(self) -> str:
        """A new operation id whose lease this registry holds (and renews) until the operation is finished."""
        operation_id = uuid.uuid4().hex
        self.leases.take_new(operation_id)
        return operation_id

    def create_operation(self, kind: OperationKind, model_id: str, now: datetime, *,
                         version_id: int | None = None, stage: str = "", operation_id: str = "") -> Operation:
        """Record a running operation owned by this registry: `operation_id` from `own_new_operation`, or a
        new one."""
        operation_id = operation_id or self.own_new_operation()
        try:
            # IF NOT EXISTS although the id is new: `done` is only ever written by lightweight transactions.
            self._session.execute(
                "INSERT INTO operations (operation_id, kind, model_id, version_id, stage, start_time, update_time, "
                "done) VALUES (?, ?, ?, ?, ?, ?, ?, ?) IF NOT EXISTS",
                (operation_id, kind.value, model_id, version_id, stage, now, now, False))
        except DomainError:
            self.leases.release(operation_id)
            raise
        return self.get_operation(operation_id)

    def report_progress(self, operation_id: str, now: datetime, *, stage: str, persons_processed: int = 0,
                        persons_total: int = 0, shards_done: int = 0, shards_total: int = 0) -> None:
        self._session.execute(
            "UPDATE operations SET stage = ?, persons_processed = ?, persons_total = ?, shards_done = ?, "
            "shards_total = ?, update_time = ? WHERE operation_id = ?",
            (stage, persons_processed, persons_total, shards_done, shards_total, now, operation_id))

    def finish_operation(self, operation_id: str, now: datetime, *, elapsed_seconds: float,
                         error_code: str | None = None, error_message: str = "", error_reason: str | None = None,
                         error_metadata: Mapping[str, str] | None = None, persons_ineligible: int = 0,
                         stage: str | None = None) -> Operation:
        """Record the outcome of an operation not done yet (one ended already keeps its outcome), and give
        its lease back. A failure has its google.rpc code name, message, and ErrorInfo reason and metadata;
        `stage`, when given, is the operation's last stage (else it keeps the one it reached)."""
        self._end_operation(operation_id, now, elapsed_seconds=elapsed_seconds, error_code=error_code,
                            error_message=error_message, error_reason=error_reason, error_metadata=error_metadata,
                            persons_ineligible=persons_ineligible, stage=stage)
        self.leases.release(operation_id)
        return self.get_operation(operation_id)

    def _end_operation(self, operation_id: str, now: datetime, *, elapsed_seconds: float, error_code: str | None,
                       error_message: str, error_reason: str | None = None,
                       error_metadata: Mapping[str, str] | None = None, persons_ineligible: int = 0,
                       stage: str | None = None) -> bool:
        # One conditional update: the stage moves only with the outcome, so a reader never sees a last stage on
        # an operation not done (nor on one another process ended first).
        set_stage, stage_values = ("stage = ?, ", (stage,)) if stage is not None else ("", ())
        result = self._session.execute(
            f"UPDATE operations SET {set_stage}done = ?, error_code = ?, error_message = ?, error_reason = ?, "
            "error_metadata = ?, elapsed_seconds = ?, persons_ineligible = ?, update_time = ? "
            "WHERE operation_id = ? IF done = ?",
            (*stage_values, True, error_code, error_message, error_reason, dict(error_metadata or {}) or None,
             elapsed_seconds, persons_ineligible, now, operation_id, False))
        return bool(result.was_applied)

    def get_operation(self, operation_id: str) -> Operation:
        """One operation; one that is not done and whose process stopped is ended as ABORTED first."""
        operation = self._read_operation(operation_id)
        if not operation.done and self._ended_abandoned(operation_id, operation.kind, operation.model_id,
                                                        operation.version_id, operation.start_time):
            operation = self._read_operation(operation_id)
        return operation

    def _read_operation(self, operation_id: str) -> Operation:
        row = self._session.execute(f"SELECT {_OPERATION_COLUMNS} FROM operations WHERE operation_id = ?",
                                    (operation_id,)).one()
        if row is None:
            raise NotFound(f"operation operations/{operation_id} does not exist (operations are kept 30 days)",
                           reason="OPERATION_NOT_FOUND", metadata={"operation": f"operations/{operation_id}"})
        return _operation_of(row)

    # ---- abandoned operations

    def _ended_abandoned_training(self, version: ModelVersion) -> bool:
        """End the training of a TRAINING version whose operation was abandoned; True if it was."""
        if version.state is not VersionState.TRAINING or not version.operation_id:
            return False  # ended, or trained before operations had leases (nothing tells whether it runs)
        return self._ended_abandoned(version.operation_id, OperationKind.TRAIN, version.model_id,
                                     version.version_id, version.create_time)

    def _ended_abandoned(self, operation_id: str, kind: OperationKind, model_id: str, version_id: int | None,
                         start_time: datetime) -> bool:
        """If the lease of an operation not done has expired (its process stopped), take it and end the
        operation as ABORTED, failing the version it trains; True if it was ended here."""
        if self.leases.holds(operation_id):
            return False
        # A plain read first: a live owner's lease is there, and polling a running operation then costs
        # no lightweight transaction.
        if self._session.execute("SELECT owner FROM follower_leases WHERE name = ?",
                                 (operation_lease_name(operation_id),)).one() is not None:
            return False
        # Taken under a name of its own and left to expire: an owner that was only paused finds it taken
        # and stops, instead of taking it back for an operation that has ended.
        lease = FollowerLease(self._session, operation_lease_name(operation_id), ttl_seconds=self.leases.ttl_seconds)
        if not lease.hold():
            return False
        now = datetime.now(UTC)
        message = abandoned_message(kind)
        log.warning("ending an operation whose process stopped", extra={"operation": operation_id,
                                                                        "model_id": model_id})
        # The operation first: once it is done, a late owner's outcome is refused (it fails its version,
        # which it finds failed already, and stops).
        self._end_operation(operation_id, now, elapsed_seconds=(now - start_time).total_seconds(),
                            error_code=Aborted.code.value, error_message=message,
                            error_reason="OPERATION_INTERRUPTED", error_metadata={"model": f"models/{model_id}"})
        if kind is OperationKind.TRAIN and version_id is not None:
            self.fail_version(model_id, version_id, message, now)
        return True
