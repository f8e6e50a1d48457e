"""A clock tests move by hand (no tests here)."""

from __future__ import annotations


class FakeClock:
    """Monotonic seconds that a test moves by hand, to make renewals due without sleeping."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now
