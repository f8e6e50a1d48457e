"""The etag form every service shows (quoted, strong) and how a request's etag is compared with it."""

from __future__ import annotations

import pytest

from shared.etags import etag_matches, strong_etag

pytestmark = pytest.mark.unit


def test_an_etag_is_shown_quoted() -> None:
    assert strong_etag("985cb8519d3d6e65") == '"985cb8519d3d6e65"'


@pytest.mark.parametrize("sent", ['"985cb8519d3d6e65"', "985cb8519d3d6e65", ' "985cb8519d3d6e65" '])
def test_the_shown_etag_matches_quoted_or_bare(sent: str) -> None:
    assert etag_matches(sent, strong_etag("985cb8519d3d6e65"))
    assert etag_matches(sent, "985cb8519d3d6e65")  # a version stored bare


@pytest.mark.parametrize("sent", ['"985cb8519d3d6e66"', 'W/"985cb8519d3d6e65"', '""', "985cb851",
                                  '"985cb8519d3d6e65"x'])
def test_another_version_a_weak_or_a_malformed_etag_does_not_match(sent: str) -> None:
    assert not etag_matches(sent, strong_etag("985cb8519d3d6e65"))
