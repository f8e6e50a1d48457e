"""Validation, etags and stored documents of identifier types and the guard policy (pure logic)."""

from __future__ import annotations

import pytest

from services.identity.identifiers import BUILT_IN_TYPES, GuardPolicy, IdentifierRegistry, Normalization
from services.identity.settings import (
    PolicyDraft,
    SharedRule,
    TypeDraft,
    policy_etag,
    registry_from,
    type_etag,
    type_name_of,
    validated_policy,
    validated_type,
)
from shared.errors import InvalidArgument

pytestmark = pytest.mark.unit


def _violations(error: pytest.ExceptionInfo[InvalidArgument]) -> dict[str, str]:
    return {v.field: v.description for v in error.value.field_violations}


def test_a_valid_draft_becomes_a_type_with_normalized_blocked_values() -> None:
    created = validated_type(TypeDraft("member_email", Normalization.EMAIL, blocked_values=(" Nobody@Example.COM ",),
                                       blocked_patterns=("^noreply@", "^noreply@")),
                             path="t", default_phone_region=None)
    assert created.blocked_values == frozenset({"nobody@example.com"})
    assert created.blocked_patterns == ("^noreply@",)  # duplicates kept once
    assert (created.priority, created.built_in) == (100, False)  # 0 means the default priority
    assert created.is_blocked("noreply@shop.example")


def test_phone_blocked_values_use_the_default_region() -> None:
    created = validated_type(TypeDraft("work_phone", Normalization.PHONE_E164, blocked_values=("138 0013 8000",)),
                             path="t", default_phone_region="CN")
    assert created.blocked_values == frozenset({"+8613800138000"})


@pytest.mark.parametrize(("draft", "field", "says"), [
    (TypeDraft("Bad-Name"), "t.type", "lower_snake_case"),
    (TypeDraft("x", normalization=None), "t.normalization", "NORMALIZATION_EMAIL"),
    (TypeDraft("x", priority=1001), "t.priority", "0-1000"),
    (TypeDraft("x", max_per_person=-1), "t.max_per_person", "0 means unlimited"),
    (TypeDraft("x", display_name="d" * 129), "t.display_name", "at most 128"),
    (TypeDraft("x", hash_values=True), "t.hash_values", "not supported yet"),
    (TypeDraft("x", blocked_values=("  ",)), "t.blocked_values[0]", "must not be empty"),
    (TypeDraft("x", blocked_values=("a",) * 1001), "t.blocked_values", "at most 1000"),
    (TypeDraft("x", blocked_patterns=("a(",)), "t.blocked_patterns[0]", "not a valid regular expression"),
    (TypeDraft("x", blocked_patterns=("^$|x",)), "t.blocked_patterns[0]", "matches the empty string"),
    (TypeDraft("x", blocked_patterns=("x" * 257,)), "t.blocked_patterns[0]", "1-256 characters"),
    (TypeDraft("x", blocked_patterns=("^x$",) * 51), "t.blocked_patterns", "at most 50"),
])
def test_invalid_type_fields_are_named(draft: TypeDraft, field: str, says: str) -> None:
    with pytest.raises(InvalidArgument) as error:
        validated_type(draft, path="t", default_phone_region=None)
    assert says in _violations(error)[field]


def test_policy_values_are_lower_cased_and_rules_checked_against_the_registry() -> None:
    registry = registry_from({"member_no": {"normalization": "exact", "display_name": "", "priority": 100,
                                            "max_per_person": 1, "blocked_values": [], "blocked_patterns": [],
                                            "hash_values": False}}, None)
    policy = validated_policy(PolicyDraft(("Walk-In", "walk-in"), ("^kiosk-",),
                                          (SharedRule("device_id", "member_no", 2),)), registry, path="p")
    assert policy.blocked_values == frozenset({"walk-in"})
    assert policy.shared_identifier_limits == {("device_id", "member_no"): 2}
    assert policy.is_junk(BUILT_IN_TYPES["cookie"], "WALK-IN") and policy.is_junk(BUILT_IN_TYPES["cookie"], "kiosk-9")
    with pytest.raises(InvalidArgument) as error:
        validated_policy(PolicyDraft(shared_identifier_rules=(
            SharedRule("device_id", "member_no", 0), SharedRule("device_id", "member_no", 3),
            SharedRule("tablet", "account_id", 3))), IdentifierRegistry(), path="p")
    assert set(_violations(error)) == {
        "p.shared_identifier_rules[0].distinct_type", "p.shared_identifier_rules[0].max_distinct",
        "p.shared_identifier_rules[1].distinct_type", "p.shared_identifier_rules[1]",
        "p.shared_identifier_rules[2].identifier_type"}


def test_etags_are_quoted_digests_of_the_content() -> None:
    assert type_etag(BUILT_IN_TYPES["email"]) == type_etag(BUILT_IN_TYPES["email"])
    assert type_etag(BUILT_IN_TYPES["email"]) != type_etag(BUILT_IN_TYPES["phone"])
    default = policy_etag(GuardPolicy())
    assert default.startswith('"') and default.endswith('"')
    assert policy_etag(GuardPolicy(blocked_values=frozenset({"x"}))) != default


def test_stored_types_override_built_ins_and_join_them() -> None:
    stored = {"cookie": {"normalization": "exact", "display_name": "Cookie", "priority": 30, "max_per_person": 0,
                         "blocked_values": ["ajs-default"], "blocked_patterns": [], "hash_values": False},
              "member_no": {"normalization": "lowercase", "display_name": "", "priority": 100,
                            "max_per_person": 1, "blocked_values": [], "blocked_patterns": [], "hash_values": False}}
    registry = registry_from(stored, "CN")
    cookie, member = registry.get("cookie"), registry.get("member_no")
    assert cookie is not None and member is not None
    assert (cookie.priority, cookie.built_in, member.built_in) == (30, True, False)
    assert registry.normalize("phone", "138 0013 8000") == "+8613800138000"
    assert {t.type for t in registry.all()} == {*BUILT_IN_TYPES, "member_no"}


@pytest.mark.parametrize("name", ["email", "identifierTypes/", "identifierTypes/Email", "types/email"])
def test_type_resource_names_are_checked(name: str) -> None:
    with pytest.raises(InvalidArgument) as error:
        type_name_of(name, "name")
    assert list(_violations(error)) == ["name"]
    assert type_name_of("identifierTypes/loyalty_card", "name") == "loyalty_card"


def test_a_display_name_is_checked_only_when_given() -> None:
    """Control characters in display names are refused now; a type stored before, with one, is still updated in its
    other fields (an update checks the display name only when its mask names it)."""
    legacy = TypeDraft("legacy_id", display_name="Legacy\x07id", priority=5)
    with pytest.raises(InvalidArgument) as refused:
        validated_type(legacy, path="t", default_phone_region=None)
    assert "control character U+0007" in _violations(refused)["t.display_name"]
    updated = validated_type(legacy, path="t", default_phone_region=None, display_name_given=False)
    assert (updated.display_name, updated.priority) == ("Legacy\x07id", 5)
