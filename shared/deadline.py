"""The deadline of the RPC being served, visible to domain and storage code without grpc.

The server interceptor sets it from the caller's deadline; the Cassandra session clamps each query
timeout to it, so a caller that gives up after 200 ms does not leave 10-second queries behind.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from shared.errors import DeadlineExceeded

_deadline: ContextVar[float | None] = ContextVar("onecdp_rpc_deadline", default=None)


@contextmanager
def deadline_after(seconds: float | None) -> Iterator[None]:
    """Run the block under a deadline `seconds` from now (None: no deadline)."""
    token = _deadline.set(None if seconds is None else time.monotonic() + seconds)
    try:
        yield
    finally:
        _deadline.reset(token)


def remaining() -> float | None:
    """Seconds left before the current deadline, or None when there is none."""
    deadline = _deadline.get()
    return None if deadline is None else deadline - time.monotonic()


def timeout_within(default: float) -> float:
    """`default`, shortened to the time left; DeadlineExceeded when nothing is left."""
    left = remaining()
    if left is None:
        return default
    if left <= 0.001:
        raise DeadlineExceeded("the caller's deadline passed before the work finished; retry with a longer deadline",
                               reason="DEADLINE_PASSED")
    return min(default, left)
