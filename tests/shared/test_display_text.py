"""Display names and descriptions are bounded and printable in every service (shared.errors): a segment with a 5 MB
description was accepted, and then every ListSegments page that held it, and GetSegment of it, passed a client's
default 4 MiB message limit (RESOURCE_EXHAUSTED for everyone listing segments)."""

from __future__ import annotations

import pytest

from shared.errors import (
    MAX_DESCRIPTION_LENGTH,
    MAX_DISPLAY_NAME_LENGTH,
    Violations,
    check_description,
    check_display_name,
)

pytestmark = pytest.mark.unit


def _problems(check: object, text: str) -> list[str]:
    violations = Violations()
    check(violations, text, "thing.field")  # type: ignore[operator]
    assert all(v.field == "thing.field" for v in violations.items)
    return [v.description for v in violations.items]


def test_a_display_name_is_one_short_line() -> None:
    assert _problems(check_display_name, "Loyal buyers \u00e0 risque \U0001f600" + "x" * 200) == []
    assert _problems(check_display_name, "x" * MAX_DISPLAY_NAME_LENGTH) == []
    assert _problems(check_display_name, "x" * (MAX_DISPLAY_NAME_LENGTH + 1)) == ["at most 256 characters, got 257"]
    (problem,) = _problems(check_display_name, "two\nlines")
    assert "control character U+000A at position 3" in problem


def test_a_description_may_have_lines_and_tabs_but_is_bounded() -> None:
    assert _problems(check_description, "What it is for.\n\n\tFirst:\r\n" + "x" * 4000) == []
    assert _problems(check_description, "d" * 5_000_000) == ["at most 4,096 characters, got 5,000,000"]
    assert MAX_DESCRIPTION_LENGTH == 4096
    (problem,) = _problems(check_description, "line\nbell\x07")
    assert problem.endswith("found control character U+0007 at position 9")
