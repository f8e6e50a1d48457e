"""Opaque page tokens (AIP-158): where to continue, bound to the request they came from.

A token is base64url JSON of the position and the list's parent; a token from another list, or one
that does not decode, is INVALID_ARGUMENT on `page_token` rather than a silently wrong page.
"""

from __future__ import annotations

import base64
import binascii
import json

from shared.errors import InvalidArgument, Violations

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


def page_size_of(requested: int, violations: Violations, field_path: str = "page_size") -> int:
    violations.check(requested >= 0, field_path, f"must not be negative, got {requested}")
    return DEFAULT_PAGE_SIZE if requested <= 0 else min(requested, MAX_PAGE_SIZE)


def encode_token(parent: str, position: str | int) -> str:
    payload = json.dumps({"p": parent, "k": position}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(payload).decode().rstrip("=")


def decode_token(token: str, parent: str, position_type: type[str] | type[int],
                 field_path: str = "page_token") -> str | int | None:
    """The position a token continues from; None for an empty token (the first page)."""
    if not token:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        position = payload["k"]
        valid = payload["p"] == parent and isinstance(position, position_type) and not isinstance(position, bool)
    except (binascii.Error, ValueError, TypeError, KeyError):
        valid = False
    if not valid:
        raise InvalidArgument.for_field(field_path, "not a page token of this list; pass next_page_token of the "
                                        "previous response unchanged", reason="BAD_PAGE_TOKEN")
    result: str | int = position
    return result
