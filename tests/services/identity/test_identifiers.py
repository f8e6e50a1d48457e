"""Identifier normalization and junk recognition (pure logic)."""

from __future__ import annotations

import pytest

from services.identity.identifiers import (
    BUILT_IN_TYPES,
    GuardPolicy,
    IdentifierRegistry,
    IdentifierType,
    InvalidIdentifierValue,
    Normalization,
)
from services.identity.settings import type_name_of
from shared.errors import InvalidArgument

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("type_name", "raw", "normalized"), [
    ("email", "  Ada.Lovelace@Example.COM ", "ada.lovelace@example.com"),
    # Internationalized domains are stored in their ASCII form, so both spellings are one identifier.
    ("email", "张伟@例子.中国", "张伟@xn--fsqu00a.xn--fiqs8s"),
    ("email", "张伟@xn--fsqu00a.xn--fiqs8s", "张伟@xn--fsqu00a.xn--fiqs8s"),
    ("email", "Muller@Exämple.DE", "muller@xn--exmple-cua.de"),
    ("phone", "+86 138 0013 8000", "+8613800138000"),
    ("phone", "+1 (415) 555-2671", "+14155552671"),
    ("device_id", "6d92078a-8246-4ba4-ae5b-76104861e7dc", "6D92078A-8246-4BA4-AE5B-76104861E7DC"),
    ("device_id", "6D92078A82464BA4AE5B76104861E7DC", "6D92078A-8246-4BA4-AE5B-76104861E7DC"),
    ("device_id", "9774d56d682e549c", "9774D56D682E549C"),
    ("cookie", " ajs_anon_Ab12 ", "ajs_anon_Ab12"),
    ("wechat_openid", "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o", "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"),
    ("account_id", "\uff21\uff22\uff23123", "ABC123"),  # full-width forms fold to ASCII (NFKC)
])
def test_values_are_normalized_before_comparison(type_name: str, raw: str, normalized: str) -> None:
    assert IdentifierRegistry().normalize(type_name, raw) == normalized


@pytest.mark.parametrize(("type_name", "raw", "message"), [
    ("email", "ada-at-example.com", "not an email address"),
    ("email", "ada@localhost", "not an email address"),
    ("phone", "13800138000", r"country code is missing or unknown; write national numbers with their \+country"),
    ("phone", "call me", "does not look like a phone number"),
    ("email", "ada@exa mple.中国", "not an email address"),
    ("phone", "+1 12", "not a possible phone number"),
    ("device_id", "not a device id!", "not a device id"),
    ("cookie", "   ", "must not be empty"),
    ("cookie", "x" * 513, "at most 512 bytes"),
    ("loyalty_card", "123", "unknown identifier type 'loyalty_card'"),
])
def test_malformed_values_are_refused_with_a_reason(type_name: str, raw: str, message: str) -> None:
    with pytest.raises(InvalidIdentifierValue, match=message):
        IdentifierRegistry().normalize(type_name, raw)


def test_national_phone_numbers_use_the_configured_region() -> None:
    assert IdentifierRegistry(default_phone_region="CN").normalize("phone", "138 0013 8000") == "+8613800138000"


@pytest.mark.parametrize(("raw", "region", "normalized"), [
    ("008613800138000", None, "+8613800138000"),
    ("0086 138 0013 8000", None, "+8613800138000"),
    ("00 44 20 7946 0958", None, "+442079460958"),
    ("0086 138 0013 8000", "US", "+8613800138000"),  # no US number starts with 0: read as international too
    ("0086 138 0013 8000", "CN", "+8613800138000"),
    ("0011 86 138 0013 8000", "AU", "+8613800138000"),  # a region's own prefix still reads as before
])
def test_the_00_international_prefix_is_read_as_plus(raw: str, region: str | None, normalized: str) -> None:
    assert IdentifierRegistry(default_phone_region=region).normalize("phone", raw) == normalized


def test_a_00_number_that_is_no_number_either_way_is_refused() -> None:
    with pytest.raises(InvalidIdentifierValue, match=r"'0086 12' is not a possible phone number"):
        IdentifierRegistry().normalize("phone", "0086 12")


def test_a_phone_extension_is_dropped() -> None:
    # E.164 has no extensions: a number with one is the same identifier as without it.
    for raw in ("+1 650 253 0000 ext. 123", "+1 650 253 0000 x123", "+16502530000;ext=123"):
        assert IdentifierRegistry().normalize("phone", raw) == "+16502530000"


def test_custom_types_join_the_built_in_ones() -> None:
    loyalty = IdentifierType("loyalty_card", Normalization.LOWERCASE, "Loyalty card", 140, max_per_person=1)
    registry = IdentifierRegistry([loyalty])
    assert registry.normalize("loyalty_card", " LC-001 ") == "lc-001"
    assert {t.type for t in registry.all()} == {*BUILT_IN_TYPES, "loyalty_card"}
    with pytest.raises(ValueError, match="lower_snake_case"):
        IdentifierType("Loyalty Card", Normalization.EXACT)


def test_a_type_name_ending_in_a_newline_is_refused() -> None:
    # `$` matches before a final newline: "loyalty_card\n" passed a `^...$` pattern with re.match.
    with pytest.raises(ValueError, match="lower_snake_case"):
        IdentifierType("loyalty_card\n", Normalization.EXACT)
    with pytest.raises(InvalidArgument) as refused:
        type_name_of("identifierTypes/loyalty_card\n", "name")
    assert refused.value.reason == "INVALID_IDENTIFIER_TYPE_NAME"


@pytest.mark.parametrize(("type_name", "normalized", "junk"), [
    ("cookie", "undefined", True),
    ("account_id", "NULL", True),
    ("account_id", "-1", True),
    ("device_id", "00000000-0000-0000-0000-000000000000", True),
    ("account_id", "aaaaaaaa", True),
    ("email", "test@example.com", True),
    ("account_id", "u_1024", False),
    ("email", "ada@example.com", False),
    ("device_id", "6D92078A-8246-4BA4-AE5B-76104861E7DC", False),
])
def test_junk_values_are_recognised(type_name: str, normalized: str, junk: bool) -> None:
    assert GuardPolicy().is_junk(BUILT_IN_TYPES[type_name], normalized) is junk
