"""Page tokens of every list (AIP-158): opaque, and bound to the request they page.

A token is urlsafe base64 of a version byte, a checksum over the list's binding and the position, and the
position masked with a keystream drawn from that checksum, so a token reads as noise. The binding names the
list, its parent and any filters of the request (not page_size, which a caller may change between pages);
the position is the sort key of the last item returned, as strings. A token sent with another parent, list
or filter, with any character changed, or of another shape is refused as INVALID_ARGUMENT naming the token's
field (reason INVALID_PAGE_TOKEN) rather than paging from a wrong place. The checksum is not a secret: a
forged position could only start the caller's own list elsewhere; what it stops is reading, editing and
mixing up tokens.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Sequence

from shared.errors import InvalidArgument

_VERSION = b"\x01"
_CHECKSUM_BYTES = 8


def _checksum(binding: str, position: bytes) -> bytes:
    return hashlib.blake2b(binding.encode() + b"\0" + position, digest_size=_CHECKSUM_BYTES,
                           person=b"onecdp.page").digest()


def _mask(checksum: bytes, data: bytes) -> bytes:
    # Its own inverse: masking the masked position gives the position back.
    keystream = hashlib.shake_256(_VERSION + checksum).digest(len(data))
    return bytes(a ^ b for a, b in zip(data, keystream, strict=True))


def encode_page_token(binding: str, position: Sequence[str]) -> str:
    """The token continuing the list `binding` names after `position` (the sort key of the last item)."""
    raw = json.dumps(list(position), ensure_ascii=False, separators=(",", ":")).encode()
    checksum = _checksum(binding, raw)
    return base64.urlsafe_b64encode(_VERSION + checksum + _mask(checksum, raw)).decode().rstrip("=")


def decode_page_token(token: str, binding: str, fields: int = 1, field_path: str = "page_token"
                      ) -> tuple[str, ...] | None:
    """The position (`fields` strings) a token continues after; None for no token (the first page).
    INVALID_ARGUMENT naming `field_path` for a token this request's list did not issue."""
    if not token:
        return None
    position: tuple[str, ...] | None = None
    try:
        data = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True)
        checksum = data[1:1 + _CHECKSUM_BYTES]
        if data[:1] == _VERSION and len(checksum) == _CHECKSUM_BYTES:
            raw = _mask(checksum, data[1 + _CHECKSUM_BYTES:])
            if hmac.compare_digest(checksum, _checksum(binding, raw)):
                parsed = json.loads(raw)
                if isinstance(parsed, list) and len(parsed) == fields and all(isinstance(p, str) for p in parsed):
                    for part in parsed:
                        part.encode()  # a lone surrogate (JSON reads "\ud800") is no string Cassandra can bind
                    position = tuple(parsed)
    except (binascii.Error, ValueError):  # JSONDecodeError, UnicodeDecodeError and UnicodeEncodeError are ValueErrors
        position = None
    if position is None:
        raise invalid_page_token(field_path)
    return position


def invalid_page_token(field_path: str = "page_token") -> InvalidArgument:
    """The error for a token this request's list did not issue (also for one whose position, checksum
    and all, names nothing this list can hold)."""
    return InvalidArgument.for_field(field_path, "not a page token of this list for this request; pass "
                                     "next_page_token of the previous response unchanged, with the same request "
                                     "(page_size may change), or start without one", reason="INVALID_PAGE_TOKEN")
