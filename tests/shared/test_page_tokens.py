"""Page tokens (AIP-158, shared.page_tokens): opaque, bound to the request they page, refused when changed."""

from __future__ import annotations

import base64
import json

import pytest

from shared import page_tokens
from shared.errors import InvalidArgument
from shared.page_tokens import decode_page_token, encode_page_token

pytestmark = pytest.mark.unit
KIND = "members/q1-repeat-buyers"
POSITION = ("p_0f3a9c81d2e54b7a",)


def refused(token: str, kind: str = KIND) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as caught:
        decode_page_token(token, kind)
    return caught.value


def test_a_token_gives_back_its_position_and_no_token_is_the_first_page() -> None:
    for kind, position in ((KIND, POSITION), ("segments", ("vip",)), ("members/x", ("é-ü",)),
                           ("changes/vip", ("8f0e6c2e-c9a4-11f0-8000-0a1b2c3d4e5f",))):
        assert decode_page_token(encode_page_token(kind, position), kind) == position
    two = ("1795398081921947", 'a|b%"c')
    assert decode_page_token(encode_page_token(KIND, two), KIND, fields=2) == two
    assert decode_page_token("", KIND) is None


def test_a_token_does_not_show_its_position_or_its_list() -> None:
    token = encode_page_token(KIND, POSITION)
    decoded = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    for readable in (POSITION[0], "p_0f3a", KIND, "q1-repeat", '"p"'):
        assert readable not in token and readable.encode() not in decoded


def test_a_token_of_another_list_is_refused_naming_page_token() -> None:
    token = encode_page_token(KIND, POSITION)
    for other in ("members/q2-repeat-buyers", "changes/q1-repeat-buyers", "segments"):
        error = refused(token, other)
        assert error.reason == "INVALID_PAGE_TOKEN"
        assert [v.field for v in error.field_violations] == ["page_token"]


def test_every_changed_character_is_refused() -> None:
    token = encode_page_token(KIND, POSITION)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    for index, character in enumerate(token):
        changed = alphabet[(alphabet.index(character) + 1) % len(alphabet)]
        tampered = token[:index] + changed + token[index + 1:]
        # The last character may carry only padding bits: a change there that decodes to the same bytes
        # is the same token.
        if base64.urlsafe_b64decode(tampered + "=" * (-len(tampered) % 4)) == \
                base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)):
            continue
        assert refused(tampered).reason == "INVALID_PAGE_TOKEN", index
    for shortened in (token[:-1], token[:-4], token[:12], token + "A", token + "AAAA"):
        assert refused(shortened).reason == "INVALID_PAGE_TOKEN"


def test_the_readable_form_of_earlier_tokens_and_garbage_are_refused() -> None:
    earlier = base64.urlsafe_b64encode(json.dumps({"k": KIND, "p": POSITION[0]}).encode()).decode().rstrip("=")
    for token in (earlier, "garbage", "!!!!", "A", "AQ", "=" * 8, "a b c d"):
        assert refused(token).reason == "INVALID_PAGE_TOKEN", token


def test_a_token_of_another_shape_is_refused() -> None:
    """A position of another number of fields than the list's, checksum and all, names nothing it holds."""
    assert refused(encode_page_token(KIND, ("a", "b"))).reason == "INVALID_PAGE_TOKEN"
    with pytest.raises(InvalidArgument):
        decode_page_token(encode_page_token(KIND, POSITION), KIND, fields=2)


def test_a_position_no_string_column_can_hold_is_refused() -> None:
    """JSON reads a lone surrogate ("\\ud800") into a str that no UTF-8 column can bind: refused, not INTERNAL."""
    assert refused(encode_page_token_raw('["\\ud800"]')).reason == "INVALID_PAGE_TOKEN"


def encode_page_token_raw(raw_json: str, binding: str = KIND) -> str:
    """A token whose position is `raw_json` as written (encode_page_token cannot write a lone surrogate)."""
    raw = raw_json.encode()
    checksum = page_tokens._checksum(binding, raw)
    return base64.urlsafe_b64encode(page_tokens._VERSION + checksum + page_tokens._mask(checksum, raw)).decode()
