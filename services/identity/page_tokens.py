"""Page tokens of the identity service's lists: opaque (AIP-158) and bound to the request they page.

The format is segmentation's (services/segmentation/catalog.py): urlsafe base64 of a version byte, a
checksum over the list's binding (which names the list, its parent and any filters) and the position, and
the position masked with a keystream drawn from that checksum, so a token reads as noise. A token sent
with another person, list or filter, or with any character changed, fails the checksum and is refused as
INVALID_ARGUMENT naming page_token rather than paging from a wrong place. The checksum is not a secret:
a forged position could only start the same list elsewhere, which the caller may read anyway; what it
stops is reading, editing and mixing up tokens. (Kept here rather than imported, for services do not
import one another; one copy in shared/ would serve both.)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json

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


def encode(binding: str, position: tuple[str, ...]) -> str:
    """The token continuing the list `binding` names after `position` (the sort key of the last item)."""
    raw = json.dumps(list(position), ensure_ascii=False, separators=(",", ":")).encode()
    checksum = _checksum(binding, raw)
    return base64.urlsafe_b64encode(_VERSION + checksum + _mask(checksum, raw)).decode().rstrip("=")


def decode(token: str, binding: str, field_path: str = "page_token") -> tuple[str, ...] | None:
    """The position a token continues after (None for no token); INVALID_ARGUMENT naming `field_path` for a
    token this request's list did not issue (another person's or list's, a changed one, or none at all)."""
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
                if isinstance(parsed, list) and all(isinstance(p, str) for p in parsed):
                    position = tuple(parsed)
    except (binascii.Error, ValueError):  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        position = None
    if position is None:
        raise InvalidArgument.for_field(field_path, "not a page token of this list for this request; pass "
                                        "next_page_token of the previous response unchanged, with the same "
                                        "request, or start without one", reason="INVALID_PAGE_TOKEN")
    return position
