"""Page sizes of the prediction service's lists (their tokens are shared.page_tokens')."""

from __future__ import annotations

from shared.errors import Violations

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


def page_size_of(requested: int, violations: Violations, field_path: str = "page_size") -> int:
    violations.check(requested >= 0, field_path, f"must not be negative, got {requested}")
    return DEFAULT_PAGE_SIZE if requested <= 0 else min(requested, MAX_PAGE_SIZE)
