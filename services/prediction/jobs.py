"""Training as a long-running operation: what TrainModel will run once profile data is reachable.

`start_training` does the quick, synchronous part an RPC can answer with (validate the window,
number the version, record the operation); `run_training` does the long part (features, training,
saving) and records progress and the outcome on the operation, so GetOperation can report it. The
gRPC adapter will run `run_training` on a worker thread with a GrpcProfileSource.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from services.prediction.history import ProfileSource
from services.prediction.registry import ModelRegistry, Operation, OperationKind
from services.prediction.training import DEFAULT_TRAINING_THREADS, check_cutoffs, train_version
from shared.errors import DomainError

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
    """Validate, create the TRAINING version and its operation; NotFound / InvalidArgument at once."""
    spec = registry.get_model(request.model_id).spec
    check_cutoffs(spec, request.training_cutoffs, request.validation_cutoff)
    version = registry.start_version(request.model_id, request.training_cutoffs, request.validation_cutoff, now())
    return registry.create_operation(OperationKind.TRAIN, request.model_id, now(), version_id=version.version_id,
                                     stage="features")


def run_training(registry: ModelRegistry, source: ProfileSource, operation: Operation, request: TrainingRequest,
                 *, num_threads: int = DEFAULT_TRAINING_THREADS, now: Callable[[], datetime] = _utc_now) -> Operation:
    """Train the operation's version and record the outcome; never raises for a domain failure."""
    started = time.monotonic()
    assert operation.version_id is not None
    model_id, version_id = request.model_id, operation.version_id
    last_report = [0.0]

    def progress(stage: str, persons: int) -> None:
        if stage == "features" and time.monotonic() - last_report[0] < PROGRESS_INTERVAL_SECONDS:
            return
        last_report[0] = time.monotonic()
        registry.report_progress(operation.operation_id, now(), stage=stage, persons_processed=persons,
                                 persons_total=persons if stage != "features" else 0)

    try:
        spec = registry.get_version(model_id, version_id).spec
        trained = train_version(spec, source, request.training_cutoffs, request.validation_cutoff,
                                seed=request.seed, num_threads=num_threads, progress=progress)
        registry.report_progress(operation.operation_id, now(), stage="saving",
                                 persons_processed=trained.metrics.validation_examples,
                                 persons_total=trained.metrics.validation_examples)
        registry.finish_version(model_id, version_id, trained, now())
        if request.activate:
            registry.activate(model_id, version_id, now())
    except DomainError as error:
        registry.fail_version(model_id, version_id, error.message, now())
        return registry.finish_operation(operation.operation_id, now(), elapsed_seconds=time.monotonic() - started,
                                         error_code=error.code.value, error_message=error.message)
    except Exception as error:  # a bug: the operation must still end, without leaking internals
        log.exception("training failed", extra={"model_id": model_id, "version_id": version_id})
        registry.fail_version(model_id, version_id, "internal error; it has been logged", now())
        return registry.finish_operation(operation.operation_id, now(), elapsed_seconds=time.monotonic() - started,
                                         error_code=INTERNAL,
                                         error_message=f"internal error ({type(error).__name__}); it has been logged")
    return registry.finish_operation(operation.operation_id, now(), elapsed_seconds=time.monotonic() - started)

