"""The allocator's thresholds are set where the C library is glibc (this project's images and CI)."""

from __future__ import annotations

import platform

import pytest

from services.prediction.memory import keep_freed_memory

pytestmark = pytest.mark.unit


def test_glibc_keeps_freed_memory_for_the_next_batch() -> None:
    assert platform.libc_ver()[0] == "glibc"  # what the service runs on; elsewhere nothing is set
    assert keep_freed_memory()
