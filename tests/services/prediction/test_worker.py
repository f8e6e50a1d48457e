"""The background worker: jobs run in order, and stopping ends the running job early and abandons queued ones."""

from __future__ import annotations

import threading

import pytest

from services.prediction.worker import BackgroundWorker, Job
from shared.errors import Unavailable

pytestmark = pytest.mark.unit


def test_jobs_run_in_order_and_stop_aborts_the_running_one_and_abandons_the_queue() -> None:
    worker = BackgroundWorker()
    log: list[str] = []
    running = threading.Event()

    def long_job() -> None:
        running.set()
        # A job polls `stopping` at its progress points; this one has nothing else to do.
        while not worker.stopping():
            threading.Event().wait(0.01)
        log.append("long stopped early")

    worker.submit(Job("first", run=lambda: log.append("first ran"), abandon=lambda: log.append("first abandoned")))
    worker.submit(Job("long", run=long_job, abandon=lambda: log.append("long abandoned")))
    worker.submit(Job("queued", run=lambda: log.append("queued ran"), abandon=lambda: log.append("queued abandoned")))
    assert running.wait(5)
    worker.stop()
    assert log == ["first ran", "long stopped early", "queued abandoned"]
    with pytest.raises(Unavailable):
        worker.submit(Job("late", run=lambda: None, abandon=lambda: None))


def test_a_failing_job_does_not_stop_the_worker() -> None:
    worker = BackgroundWorker()
    done = threading.Event()

    def broken() -> None:
        raise RuntimeError("bug")

    worker.submit(Job("broken", run=broken, abandon=lambda: None))
    worker.submit(Job("next", run=done.set, abandon=lambda: None))
    assert done.wait(5)
    worker.stop()
