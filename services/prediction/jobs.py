"""Training and score refresh as long-running operations.

`start_training` / `start_refresh` do the quick, synchronous part an RPC can answer with (validate,
number the version or pick the active one, record the operation); `run_training` / `run_refresh` do
the long part on the service's worker thread and record progress and the outcome on the operation,
so GetOperation can report it. Both check `should_stop` at each progress point, so a stopping
service ends its operations as ABORTED instead of leaving them running forever.

A process that dies without stopping (SIGKILL, OOM kill, node lost) cannot end its operations: the
registry's operation leases do (see registry.py). The process that starts an operation holds its lease
from before the operation exists until it is finished, queued or running; once the lease has expired,
the next read of the operation (GetOperation) or of its version ends it as ABORTED, telling the caller
to start it again. A run whose lease was taken that way stops at its next progress point. The
operation is not taken over and run again by another replica: what kills a training process is most
often the training itself (memory), so a second replica would likely die the same way, and the caller
who asked for it is the one to decide whether to try again.

A model deleted while one of its operations runs (DeleteModel) ends it as ABORTED, reason MODEL_DELETED.
Both runs compare the model's creation time with the one they started for (`ModelRegistry.created_at`:
a model created again with the same id is another model) at each progress point, and a refresh also
after each batch of scores it wrote and before it reports success. A training then removes what it
wrote of its version (`discard_version`); a refresh removes every score trait of the model dated up to
its last write (profile keeps the latest write of a trait by event time, so the scores a model created
again writes later stay). DeleteModel waits for the refreshes of the model to end (server.py).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from services.prediction.history import PersonHistory, ProfileSource
from services.prediction.registry import ModelRegistry, Operation, OperationKind
from services.prediction.scoring import PersonScore
from services.prediction.serving import ScoringVersion, score_histories
from services.prediction.training import (
    DEFAULT_TRAINING_THREADS,
    STAGE_DONE,
    STAGE_FEATURES,
    STAGE_QUEUED,
    STAGE_SAVING,
    check_cutoffs,
    check_horizon_reachable,
    train_version,
)
from shared.errors import Aborted, DomainError, NotFound

log = logging.getLogger(__name__)
# Progress is written at most this often: every write is a Cassandra round trip.
PROGRESS_INTERVAL_SECONDS = 1.0
# google.rpc.Code name for a bug (shared.errors.StatusCode has no INTERNAL: domain code never chooses it).
INTERNAL = "INTERNAL"


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class TrainingRequest:
    model_id: str
    training_cutoffs: tuple[datetime, ...]
    validation_cutoff: datetime
    seed: int = 1
    activate: bool = False


def start_training(registry: ModelRegistry, request: TrainingRequest,
                   now: Callable[[], datetime] = _utc_now) -> Operation:
    """Validate, create the TRAINING version and its operation; NotFound / InvalidArgument at once, and
    FailedPrecondition (VALIDATION_HORIZON_BEYOND_DATA) for a validation horizon no data can reach yet."""
    spec = registry.get_model(request.model_id).spec
    check_cutoffs(spec, request.training_cutoffs, request.validation_cutoff)
    check_horizon_reachable(spec, request.training_cutoffs, request.validation_cutoff, now())
    # Owned before the version exists: a version TRAINING is never without a live or expired lease.
    operation_id = registry.own_new_operation()
    try:
        version = registry.start_version(request.model_id, request.training_cutoffs, request.validation_cutoff,
                                         now(), operation_id=operation_id)
        return registry.create_operation(OperationKind.TRAIN, request.model_id, now(),
                                         version_id=version.version_id, stage=STAGE_QUEUED,
                                         operation_id=operation_id)
    except BaseException:
        # A version written before the failure is failed by its next read, once the lease is free.
        registry.leases.release(operation_id)
        raise


def _never() -> bool:
    return False


MODEL_DELETED = "MODEL_DELETED"
# ErrorInfo metadata of a refresh ended by its model's deletion: "true" once the scores it wrote were removed.
SCORES_REMOVED = "scores_removed"


class ModelDeleted(Aborted):
    """The model of a running operation was deleted (DeleteModel), or deleted and created again."""

    def __init__(self, model_id: str, what: str) -> None:
        super().__init__(f"models/{model_id} was deleted while {what}", reason=MODEL_DELETED,
                         metadata={"model": f"models/{model_id}"})


def _model_deleted(registry: ModelRegistry, model_id: str, created: datetime | None) -> bool:
    """Whether the model an operation started for (created at `created`; None: it was gone already) is gone."""
    return created is None or registry.created_at(model_id) != created


def _check_stop(should_stop: Callable[[], bool], registry: ModelRegistry, operation_id: str) -> None:
    if should_stop():
        raise Aborted("the prediction service stopped before the operation finished; start it again",
                      reason="SERVICE_STOPPING")
    if not registry.leases.holds(operation_id):
        # Another process found the lease expired (this one was paused too long) and ended the operation:
        # its outcome is recorded already, so this run only stops.
        raise Aborted("this process lost the operation's lease; the operation was ended without it",
                      reason="OPERATION_LEASE_LOST")


def run_training(registry: ModelRegistry, source: ProfileSource, operation: Operation, request: TrainingRequest,
                 *, num_threads: int = DEFAULT_TRAINING_THREADS, now: Callable[[], datetime] = _utc_now,
                 should_stop: Callable[[], bool] = _never,
                 compile_version: Callable[[str, int], None] | None = None,
                 activated: Callable[[str], None] | None = None) -> Operation:
    """Train the operation's version and record the outcome; never raises for a domain failure. The
    operation is one `registry` created (`start_training`): its lease, renewed by `registry`, is how
    other processes know it still runs.

    `compile_version(model_id, version_id)` (the service's Predictor.compile_version) is called once the
    version is READY and before it is activated, so that it scores compiled from its first call; a failure
    there only costs speed (LightGBM scores) and is logged. `activated(model_id)` (Predictor.forget_model) is
    called after an activation and before the operation is done, so that a score asked for once it is done
    comes from the new version.
    """
    started = time.monotonic()
    assert operation.version_id is not None
    model_id, version_id = request.model_id, operation.version_id
    last_report = [0.0]
    scanned = [0]
    # The model this training is for: a model created after the operation started is another one.
    created = registry.created_at(model_id)
    if created is not None and created > operation.start_time:
        created = None

    def check_model() -> None:
        if _model_deleted(registry, model_id, created):
            raise ModelDeleted(model_id, "this training ran; the version it trained was discarded")

    def progress(stage: str, persons: int) -> None:
        # persons_processed only grows: persons scanned while features are built, then all of them. The
        # total is known once the scan has ended (profile has no cheap count of persons).
        _check_stop(should_stop, registry, operation.operation_id)
        scanned[0] = max(scanned[0], persons)
        if stage == STAGE_FEATURES and time.monotonic() - last_report[0] < PROGRESS_INTERVAL_SECONDS:
            return
        last_report[0] = time.monotonic()
        check_model()  # as often as progress is written: one more read a second at most
        registry.report_progress(operation.operation_id, now(), stage=stage, persons_processed=scanned[0],
                                 persons_total=scanned[0] if stage != STAGE_FEATURES else 0)

    try:
        check_model()
        spec = registry.get_version(model_id, version_id).spec
        progress(STAGE_FEATURES, 0)  # out of the queue: the stage says so before the first batch is scanned
        trained = train_version(spec, source, request.training_cutoffs, request.validation_cutoff,
                                seed=request.seed, num_threads=num_threads, progress=progress)
        check_model()
        registry.report_progress(operation.operation_id, now(), stage=STAGE_SAVING, persons_processed=scanned[0],
                                 persons_total=scanned[0])
        registry.finish_version(model_id, version_id, trained, now())
        if compile_version is not None:
            _compile_quietly(compile_version, model_id, version_id)
        if request.activate:
            registry.activate(model_id, version_id, now())
            if activated is not None:
                activated(model_id)
        # A delete that raced the save (its purge read the version before the booster was written, or the
        # version became READY between the delete's steps) is only seen here.
        check_model()
    except DomainError as error:
        if not isinstance(error, ModelDeleted) and _model_deleted(registry, model_id, created):
            # finish_version / activate / get_version found the version or model gone: the delete is the cause.
            error = ModelDeleted(model_id, "this training ran; the version it trained was discarded")
        if isinstance(error, ModelDeleted):
            registry.discard_version(model_id, version_id, operation.operation_id)
        else:
            _fail_version(registry, model_id, version_id, error.message, now())
        return registry.finish_operation(operation.operation_id, now(), elapsed_seconds=time.monotonic() - started,
                                         error_code=error.code.value, error_message=error.message,
                                         error_reason=error.reason, error_metadata=error.metadata)
    except Exception as error:  # a bug: the operation must still end, without leaking internals
        log.exception("training failed", extra={"model_id": model_id, "version_id": version_id})
        _fail_version(registry, model_id, version_id, "internal error; it has been logged", now())
        return registry.finish_operation(operation.operation_id, now(), elapsed_seconds=time.monotonic() - started,
                                         error_code=INTERNAL, error_reason=INTERNAL,
                                         error_message=f"internal error ({type(error).__name__}); it has been logged")
    return registry.finish_operation(operation.operation_id, now(), elapsed_seconds=time.monotonic() - started,
                                     stage=STAGE_DONE)


def _fail_version(registry: ModelRegistry, model_id: str, version_id: int, message: str, now: datetime) -> None:
    """Fail the version; one gone with its model (deleted) has nothing left to fail, and the operation must end."""
    with contextlib.suppress(NotFound):
        registry.fail_version(model_id, version_id, message, now)



def _compile_quietly(compile_version: Callable[[str, int], None], model_id: str, version_id: int) -> None:
    try:
        compile_version(model_id, version_id)
    except Exception as error:  # the version is trained and READY: scoring compiles it on use instead
        log.warning("compiling a trained version failed; it is compiled once it has scored enough rows",
                    extra={"model_id": model_id, "version_id": version_id,
                           "error": f"{type(error).__name__}: {error}"})


# Scores written back per BatchWriteTraits call (profile's limit) and persons scored per booster call.
REFRESH_BATCH = 1000
SCORES_SOURCE = "onecdp-prediction"


def score_trait_names(model_id: str) -> tuple[str, str]:
    """The profile traits a model's scores are written to (the RefreshScores contract)."""
    return f"score_{model_id}", f"score_{model_id}_percentile"


class ScoreWriter(Protocol):
    """Where refreshed scores go (profile's BatchWriteTraits in production)."""

    def write_scores(self, model_id: str, scores: Sequence[PersonScore], written_at: datetime) -> None: ...

    def clear_scores(self, model_id: str, person_ids: Sequence[str], cleared_at: datetime) -> int: ...

    def clear_all_scores(self, model_id: str, cleared_at: datetime) -> int: ...


def start_refresh(registry: ModelRegistry, scoring: ScoringVersion, now: Callable[[], datetime] = _utc_now
                  ) -> Operation:
    return registry.create_operation(OperationKind.REFRESH, scoring.model.model_id, now(),
                                     version_id=scoring.version.version_id, stage="scoring")


def run_refresh(registry: ModelRegistry, source: ProfileSource, writer: ScoreWriter, scoring: ScoringVersion,
                operation: Operation, *, as_of: datetime, now: Callable[[], datetime] = _utc_now,
                should_stop: Callable[[], bool] = _never) -> Operation:
    """Score every eligible person as of `as_of`, shard by shard, and write the scores back; never raises
    for a domain failure. Progress (persons scored, shards done) is recorded after every shard."""
    started = time.monotonic()
    model_id = scoring.model.model_id
    scored = ineligible = 0
    # The latest event time this refresh wrote a trait with; None until its first write.
    last_written: list[datetime | None] = [None]

    def write_batch(batch: Sequence[PersonHistory]) -> None:
        nonlocal scored, ineligible
        written_at = now()
        last_written[0] = max(written_at, last_written[0] or written_at)
        batch_scored, batch_ineligible = _refresh_batch(writer, scoring, batch, as_of, written_at)
        scored, ineligible = scored + batch_scored, ineligible + batch_ineligible
        # After the write: a delete whose clearing passed these persons before the write landed is seen here.
        check_model()

    def check_model() -> None:
        if _model_deleted(registry, model_id, scoring.model.create_time):
            raise ModelDeleted(model_id, "its scores were being refreshed")

    try:
        check_model()
        shards = source.shards()
        registry.report_progress(operation.operation_id, now(), stage="scoring", shards_total=len(shards))
        for done, shard in enumerate(shards, start=1):
            batch: list[PersonHistory] = []
            for history in source.histories_of_shard(shard, as_of):
                batch.append(history)
                if len(batch) >= REFRESH_BATCH:
                    _check_stop(should_stop, registry, operation.operation_id)
                    write_batch(batch)
                    batch = []
            write_batch(batch)
            registry.report_progress(operation.operation_id, now(), stage="scoring", persons_processed=scored,
                                     shards_done=done, shards_total=len(shards))
            _check_stop(should_stop, registry, operation.operation_id)
        check_model()
    except ModelDeleted as error:
        removed, outcome = _removed_scores(writer, model_id, last_written[0])
        return registry.finish_operation(operation.operation_id, now(), elapsed_seconds=time.monotonic() - started,
                                         error_code=error.code.value, error_message=error.message + outcome,
                                         error_reason=error.reason,
                                         error_metadata={**error.metadata, SCORES_REMOVED: str(removed).lower()},
                                         persons_ineligible=ineligible)
    except DomainError as error:
        return registry.finish_operation(operation.operation_id, now(), elapsed_seconds=time.monotonic() - started,
                                         error_code=error.code.value, error_message=error.message,
                                         error_reason=error.reason, error_metadata=error.metadata,
                                         persons_ineligible=ineligible)
    except Exception as error:  # a bug: the operation must still end, without leaking internals
        log.exception("score refresh failed", extra={"model_id": model_id})
        return registry.finish_operation(operation.operation_id, now(), elapsed_seconds=time.monotonic() - started,
                                         error_code=INTERNAL, error_reason=INTERNAL,
                                         error_message=f"internal error ({type(error).__name__}); it has been logged",
                                         persons_ineligible=ineligible)
    return registry.finish_operation(operation.operation_id, now(), elapsed_seconds=time.monotonic() - started,
                                     persons_ineligible=ineligible)


def _removed_scores(writer: ScoreWriter, model_id: str, last_written: datetime | None) -> tuple[bool, str]:
    """Remove the score traits of a deleted model that this refresh wrote (up to `last_written`); whether none
    is left, and what the operation's error message adds about it."""
    if last_written is None:
        return True, "; this refresh wrote no score"
    try:
        # Dated just after this refresh's last write: its writes are undone, a later model's are not.
        writer.clear_all_scores(model_id, last_written + timedelta(milliseconds=1))
    except DomainError as error:
        log.warning("removing the scores of a deleted model failed", extra={"model_id": model_id,
                                                                            "error": error.message})
        return False, f"; removing the scores it wrote failed: {error.message}"
    return True, "; the scores it wrote were removed"


def _refresh_batch(writer: ScoreWriter, scoring: ScoringVersion, batch: Sequence[PersonHistory], as_of: datetime,
                   written_at: datetime) -> tuple[int, int]:
    """Score one batch and write the scores; returns (scored, ineligible)."""
    if not batch:
        return 0, 0
    scored = score_histories(scoring, batch, as_of, top_features=0)
    if len(scored.batch):
        writer.write_scores(scoring.model.model_id, scored.batch.scores(), written_at)
    # The ineligible (every error of a scanned batch) must not keep a score from an earlier refresh.
    writer.clear_scores(scoring.model.model_id, [batch[index].person_id for index in scored.errors], written_at)
    return len(scored.batch), len(scored) - len(scored.batch)


def abandon_operation(registry: ModelRegistry, operation: Operation, now: Callable[[], datetime] = _utc_now) -> None:
    """End an operation that will never run (the service stopped first) as ABORTED, failing its training version."""
    message = "the prediction service stopped before the operation ran; start it again"
    if operation.kind is OperationKind.TRAIN and operation.version_id is not None:
        registry.fail_version(operation.model_id, operation.version_id, message, now())
    registry.finish_operation(operation.operation_id, now(), elapsed_seconds=0.0, error_code=Aborted.code.value,
                              error_message=message, error_reason="OPERATION_NOT_STARTED",
                              error_metadata={"model": f"models/{operation.model_id}"})
