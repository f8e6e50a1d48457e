"""The person partition from an evidence set: the product brief's scenarios, and order independence."""

from __future__ import annotations

import random

import pytest

from services.identity.identifiers import GuardPolicy, IdentifierRegistry
from services.identity.partition import IdKey, fingerprint, partition

pytestmark = pytest.mark.unit

REGISTRY = IdentifierRegistry()
POLICY = GuardPolicy()


def _k(text: str) -> IdKey:
    type_name, value = text.split(":", 1)
    return IdKey(type_name, value)


def _observations(*observations: str) -> list[tuple[IdKey, IdKey]]:
    """Each observation 'a b c' links every pair of its identifiers."""
    links = []
    for observation in observations:
        keys = [_k(t) for t in observation.split()]
        links += [(a, b) for i, a in enumerate(keys) for b in keys[i + 1:]]
    return links


def _groups(*observations: str) -> set[frozenset[str]]:
    result = partition([], _observations(*observations), REGISTRY, POLICY)
    return {frozenset(str(m) for m in group) for group in result.groups}


def test_multi_device_one_account_is_one_person() -> None:
    assert _groups(
        "account_id:u1 device_id:AAAA1111 cookie:c-phone",
        "account_id:u1 device_id:BBBB2222",
        "account_id:u1 cookie:c-laptop",
    ) == {frozenset({"account_id:u1", "device_id:AAAA1111", "device_id:BBBB2222", "cookie:c-phone",
                     "cookie:c-laptop"})}


def test_one_device_many_accounts_is_shared_and_merges_nobody() -> None:
    result = partition([], _observations(*(f"device_id:TABLET01 account_id:u{i}" for i in range(5))),
                       REGISTRY, POLICY)
    assert result.shared == {_k("device_id:TABLET01"): "device_id seen with 5 distinct account_id (limit 3)"}
    assert sorted(len(g) for g in result.groups) == [1] * 6


def test_many_accounts_one_person_through_phone_and_email() -> None:
    assert _groups(
        "account_id:shop-42 email:ada@example.com",
        "wechat_openid:o-miniapp email:ada@example.com phone:+8613800138000",
        "crm_id:crm-7 phone:+8613800138000",
    ) == {frozenset({"account_id:shop-42", "email:ada@example.com", "wechat_openid:o-miniapp",
                     "phone:+8613800138000", "crm_id:crm-7"})}


def test_login_logout_on_a_shared_device_keeps_two_accounts_apart() -> None:
    # Two people take turns on one tablet (below the shared threshold): the tablet's cookie and the
    # tablet go with one of them, and the two accounts are never merged (one account per person).
    result = partition([], _observations(
        "device_id:TABLET02 cookie:c-tab account_id:alice",
        "device_id:TABLET02 cookie:c-tab account_id:bob",
        "account_id:alice email:alice@example.com",
        "account_id:bob email:bob@example.com",
    ), REGISTRY, POLICY)
    group_of = {str(m): i for i, g in enumerate(result.groups) for m in g}
    assert group_of["account_id:alice"] != group_of["account_id:bob"]
    assert group_of["email:alice@example.com"] == group_of["account_id:alice"]
    assert group_of["email:bob@example.com"] == group_of["account_id:bob"]
    assert group_of["device_id:TABLET02"] == group_of["cookie:c-tab"]
    assert {b.limited_type for b in result.blocked_links} == {"account_id"}


def test_junk_values_link_nothing() -> None:
    result = partition([], _observations("cookie:undefined account_id:u1", "cookie:undefined account_id:u2"),
                       REGISTRY, POLICY)
    assert result.junk == {_k("cookie:undefined")}
    assert {frozenset(str(m) for m in g) for g in result.groups} == {
        frozenset({"account_id:u1"}), frozenset({"account_id:u2"})}


def test_the_partition_does_not_depend_on_the_order_of_evidence() -> None:
    rng = random.Random(7)
    observations = []
    for person in range(60):
        account = f"account_id:u{person}"
        devices = [f"device_id:D{person:04d}{d}" for d in range(rng.randint(1, 3))]
        observations += [f"{account} {d} cookie:c{person}-{i}" for i, d in enumerate(devices)]
        if person % 10 == 0:  # households: one tablet used by 2-5 accounts
            observations += [f"device_id:HOUSE{person} account_id:u{person + j}" for j in range(rng.randint(2, 5))]
    links = _observations(*observations)
    fingerprints = set()
    for _ in range(5):
        rng.shuffle(links)
        shuffled = [(b, a) if rng.random() < 0.5 else (a, b) for a, b in links]
        fingerprints.add(fingerprint(partition([], shuffled, REGISTRY, POLICY).groups))
    assert len(fingerprints) == 1
