"""Shards of the profile table for parallel full scans: equal slices of the Murmur3 token ring.

A shard is the token range (start, end], written `"<start>:<end>"`; together the ranges of
`split_ring(n)` cover the ring exactly once. ScanProfiles takes any valid range, not only listed ones,
so a caller can split a shard further; the split itself can still change later (e.g. to follow the
cluster's own token ranges) without changing the API.
"""

from __future__ import annotations

import itertools
import re

from shared.errors import InvalidArgument

MIN_TOKEN = -(2**63)
MAX_TOKEN = 2**63 - 1
# What `format_shard` writes, in ASCII digits only: int() alone also takes spaces, `+`, `_` and other scripts' digits.
_SHARD = re.compile(r"(-?[0-9]{1,19}):(-?[0-9]{1,19})")


def split_ring(count: int) -> list[tuple[int, int]]:
    """`count` contiguous (start, end] ranges covering every Murmur3 token."""
    span = MAX_TOKEN - MIN_TOKEN
    bounds = [MIN_TOKEN + span * i // count for i in range(count)] + [MAX_TOKEN]
    return list(itertools.pairwise(bounds))


def format_shard(token_range: tuple[int, int]) -> str:
    return f"{token_range[0]}:{token_range[1]}"


def parse_shard(shard: str, field_path: str) -> tuple[int, int]:
    bounds = _SHARD.fullmatch(shard)
    start, end = (int(bounds[1]), int(bounds[2])) if bounds else (0, 0)
    if not MIN_TOKEN <= start < end <= MAX_TOKEN:
        raise InvalidArgument.for_field(
            field_path, f"{shard[:64]!r} is not a token range '<start>:<end>' of integers with "
            f"{MIN_TOKEN} <= start < end <= {MAX_TOKEN}; use a shard returned by ListProfileShards",
            reason="INVALID_SHARD")
    return start, end
