"""Entity tags as every service shows and checks them (AIP-154): quoted strong etags (RFC 9110 section 8.8.3).

A service computes an opaque version of a resource (a digest of its content, a write version) and shows it
quoted; a request's etag matches when it carries the same opaque value, quoted as shown or bare (as a client
that strips the quotes sends it). Anything else, a weak `W/"..."` etag included, does not match: updates
need a strong etag.
"""

from __future__ import annotations


def strong_etag(opaque: str) -> str:
    """The etag a response shows for the resource version `opaque` (which carries no quotes)."""
    return f'"{opaque}"'


def etag_matches(sent: str, current: str) -> bool:
    """Whether a request's etag names the current version; `current` may be quoted or bare."""
    return sent.strip().strip('"') == current.strip('"')
