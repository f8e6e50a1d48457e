"""shared.pages.fitting: the byte cut every bounded List page uses (profile's events, segmentation's segments)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from google.protobuf import wrappers_pb2

from shared.pages import ELEMENT_OVERHEAD_BYTES, fitting

pytestmark = pytest.mark.unit


def test_a_page_keeps_what_fits_and_always_one() -> None:
    items = [wrappers_pb2.StringValue(value="x" * 100) for _ in range(5)]  # 102 bytes each, 108 as elements
    each = items[0].ByteSize() + ELEMENT_OVERHEAD_BYTES
    assert fitting(items, 3 * each) == items[:3]
    assert fitting(items, 3 * each - 1) == items[:2]
    assert fitting(items, 1) == items[:1]  # one too large alone still moves the page on
    assert fitting(items, 10 * each) == items
    assert fitting([], 100) == []
    built: list[int] = []

    def build() -> Iterator[wrappers_pb2.StringValue]:
        for index, item in enumerate(items):
            built.append(index)
            yield item

    assert len(fitting(build(), 2 * each)) == 2
    assert built == [0, 1, 2]  # nothing built past the first that does not fit
