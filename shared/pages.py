"""Pages of List responses bounded in bytes as well as in count: a page of the largest items a service stores
(events with 64 KiB of properties, segments with 32,768-character rules) would otherwise pass the 4 MiB a gRPC
client accepts by default. One cut for every List method that needs it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from google.protobuf.message import Message

# A page stops before passing this many serialized bytes, well under a client's default 4 MiB.
MAX_PAGE_BYTES = 3 * 1024 * 1024
# What a repeated message field adds per element besides the element: its tag and length prefix.
ELEMENT_OVERHEAD_BYTES = 6

_Item = TypeVar("_Item", bound=Message)


def fitting(messages: Iterable[_Item], max_bytes: int) -> list[_Item]:
    """The longest first part of `messages` that, as the elements of a repeated field, takes at most `max_bytes`;
    at least one message, so that a page always moves on. Messages past the cut are not asked for but the first
    (an iterable builds them one at a time)."""
    kept: list[_Item] = []
    size = 0
    for message in messages:
        size += message.ByteSize() + ELEMENT_OVERHEAD_BYTES
        if kept and size > max_bytes:
            break
        kept.append(message)
    return kept
