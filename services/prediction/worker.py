"""The service's background worker: runs long operations (training, score refresh) one at a time.

One thread on purpose: training and scoring are CPU-bound and LightGBM runs single-threaded here, so
a second job would only slow the first and the RPCs being served. Jobs queue in submission order.
`stop()` (registered with ServiceContext.on_stop) tells the running job to end at its next progress
point (jobs record that as ABORTED) and drops queued jobs after marking them aborted too.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from shared.errors import Unavailable

log = logging.getLogger(__name__)
# How long stop() waits for the running job to reach a progress point.
STOP_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class Job:
    """`run` does the work; `abandon` records that it will never run (the service stopped first)."""

    name: str
    run: Callable[[], object]
    abandon: Callable[[], object]


class BackgroundWorker:
    def __init__(self, name: str = "prediction-jobs") -> None:
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def stopping(self) -> bool:
        """Whether the service is stopping: jobs poll this and end early."""
        return self._stopping.is_set()

    def submit(self, job: Job) -> None:
        if self._stopping.is_set():
            raise Unavailable("the prediction service is stopping; retry on another instance",
                              reason="SERVICE_STOPPING")
        self._jobs.put(job)

    def stop(self) -> None:
        self._stopping.set()
        self._jobs.put(None)
        self._thread.join(timeout=STOP_TIMEOUT_SECONDS)
        if self._thread.is_alive():
            log.warning("a background job did not stop in time", extra={"timeout_seconds": STOP_TIMEOUT_SECONDS})

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                break
            if self._stopping.is_set():
                self._call(job.name, job.abandon)
                continue
            self._call(job.name, job.run)
        # Jobs submitted before stop() but still queued behind the sentinel.
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                self._call(job.name, job.abandon)

    @staticmethod
    def _call(name: str, action: Callable[[], object]) -> None:
        try:
            action()
        except Exception:  # the worker outlives any one job; the job records its own outcome
            log.exception("background job failed", extra={"job": name})
