"""Blocked patterns are RE2: a caller's pattern cannot make matching take exponential time (ReDoS), one RE2
cannot compile is refused naming its field, and patterns stored before keep working."""

from __future__ import annotations

import logging
import time

import grpc
import pytest
from google.protobuf import field_mask_pb2
from onecdp.identity.v1 import identity_service_pb2 as pb
from onecdp.identity.v1 import identity_service_pb2_grpc as pb_grpc

from services.identity.identifiers import (
    DEFAULT_BLOCKED_PATTERNS,
    GuardPolicy,
    IdentifierRegistry,
    IdentifierType,
    Normalization,
)
from services.identity.settings import PolicyDraft, TypeDraft, registry_from, validated_policy, validated_type
from shared.errors import InvalidArgument
from tests.services.identity.conftest import failure, link, observation, person_of

CATASTROPHIC = "^(a+)+$"  # exponential on a backtracking engine: each extra "a" doubles the time
SLOW_VALUE = "a" * 26 + "!"  # seconds on Python's re, microseconds on RE2


@pytest.mark.unit
def test_a_catastrophic_pattern_matches_in_linear_time() -> None:
    rd = IdentifierType("rd", Normalization.EXACT, blocked_patterns=(CATASTROPHIC,))
    started = time.monotonic()
    assert not rd.is_blocked(SLOW_VALUE) and not rd.is_blocked("a" * 500 + "!")
    assert time.monotonic() - started < 0.5
    assert rd.is_blocked("aaaa")
    policy = GuardPolicy(blocked_patterns=(CATASTROPHIC,))
    started = time.monotonic()
    assert not policy.is_junk(rd, SLOW_VALUE)
    assert time.monotonic() - started < 0.5


@pytest.mark.unit
@pytest.mark.parametrize("pattern", [r"^(\w)\1+$", r"^(?=.*x)", r"(?<!a)b", r"(?P<c>x)(?P=c)"])
def test_a_pattern_re2_cannot_compile_is_refused_naming_its_field(pattern: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validated_type(TypeDraft("rd", blocked_patterns=("^ok$", pattern)), path="identifier_type",
                       default_phone_region=None)
    (violation,) = caught.value.field_violations
    assert violation.field == "identifier_type.blocked_patterns[1]" and "RE2 syntax" in violation.description
    with pytest.raises(InvalidArgument) as caught:
        validated_policy(PolicyDraft(blocked_patterns=(pattern,)), IdentifierRegistry(), path="guard_policy")
    (violation,) = caught.value.field_violations
    assert violation.field == "guard_policy.blocked_patterns[0]" and "RE2 syntax" in violation.description


@pytest.mark.unit
def test_the_default_patterns_keep_their_meaning_and_pass_validation() -> None:
    policy = validated_policy(PolicyDraft(blocked_patterns=DEFAULT_BLOCKED_PATTERNS), IdentifierRegistry(),
                              path="guard_policy")
    cookie = IdentifierType("cookie", Normalization.EXACT)
    junk = ["000000", "00000000-0000-0000-0000-000000000000", "xxxxxx", "111111111", "Test@example.com",
            "demo@x.io"]
    kept = ["xxxxx", "xxxxxy", "abc123", "contest@example.com", "0001"]
    assert [policy.is_junk(cookie, v) for v in junk] == [True] * len(junk)
    assert [policy.is_junk(cookie, v) for v in kept] == [False] * len(kept)


@pytest.mark.unit
def test_a_stored_pattern_re2_cannot_compile_still_blocks_and_is_named_in_a_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    # Stored by the code before patterns had to be RE2: loading must not fail the whole document, nor drop
    # the pattern (its junk would link persons); it runs as before and the operator is told to replace it.
    document = {"normalization": "exact", "display_name": "", "priority": 100, "max_per_person": 0,
                "blocked_values": [], "blocked_patterns": [r"^(\w)\1+$"], "hash_values": False}
    with caplog.at_level(logging.WARNING, logger="services.identity.identifiers"):
        legacy = registry_from({"legacy_code": document}, None).get("legacy_code")
    assert legacy is not None and legacy.is_blocked("zz") and not legacy.is_blocked("zy")
    assert [getattr(r, "pattern", None) for r in caplog.records] == [r"^(\w)\1+$"]
    assert "RE2" in caplog.records[0].getMessage()


@pytest.mark.integration
def test_a_catastrophic_pattern_over_grpc_is_accepted_and_links_quickly(
        identity: pb_grpc.IdentityServiceStub) -> None:
    identity.CreateIdentifierType(pb.CreateIdentifierTypeRequest(identifier_type=pb.IdentifierType(
        type="rd", normalization=pb.NORMALIZATION_EXACT, blocked_patterns=[CATASTROPHIC])), timeout=30)
    started = time.monotonic()
    (result,) = link(identity, observation(f"rd:{SLOW_VALUE}", "email:rd@example.com"))
    assert time.monotonic() - started < 3  # the old code spent ~8 s of CPU on the pattern
    assert not result.guard_decisions
    assert person_of(identity, f"rd:{SLOW_VALUE}").person_id == result.person_id
    (blocked,) = link(identity, observation("rd:aaaa", "email:rd2@example.com"))
    assert [d.guard for d in blocked.guard_decisions] == [pb.GUARD_KIND_BLOCKED_VALUE]


@pytest.mark.integration
def test_a_backreference_over_grpc_is_invalid_argument_naming_the_pattern(
        identity: pb_grpc.IdentityServiceStub) -> None:
    assert failure(lambda: identity.CreateIdentifierType(pb.CreateIdentifierTypeRequest(
        identifier_type=pb.IdentifierType(type="rd", normalization=pb.NORMALIZATION_EXACT,
                                          blocked_patterns=["^x", r"^(a)\1$"])), timeout=30)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_IDENTIFIER_TYPE", ["identifier_type.blocked_patterns[1]"])
    policy = identity.GetGuardPolicy(pb.GetGuardPolicyRequest(), timeout=10)
    policy.blocked_patterns.append(r"^(?!ok)")
    index = len(policy.blocked_patterns) - 1
    with pytest.raises(grpc.RpcError) as caught:
        identity.UpdateGuardPolicy(pb.UpdateGuardPolicyRequest(
            guard_policy=policy, update_mask=field_mask_pb2.FieldMask(paths=["blocked_patterns"])), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"guard_policy.blocked_patterns[{index}]" in (caught.value.details() or "")
    assert "RE2 syntax" in (caught.value.details() or "")
