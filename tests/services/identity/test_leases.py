"""Leases serialize recomputation between threads of one process as well as between processes."""

from __future__ import annotations

import itertools
import uuid

import pytest

from services.identity.leases import Leases, bucket_of
from shared.cassandra import CassandraSession

pytestmark = pytest.mark.integration


@pytest.fixture
def leases(identity_session: CassandraSession) -> Leases:
    return Leases(identity_session)


def _same_bucket(count: int) -> list[str]:
    """Keys that share one bucket, so that one conditional batch carries all of them."""
    keys = (f"i:cookie:{n}" for n in itertools.count())
    first = next(keys)
    return [first, *itertools.islice((k for k in keys if bucket_of(k) == bucket_of(first)), count - 1)]


def test_a_held_lease_is_refused_to_another_acquisition_of_the_same_process(leases: Leases) -> None:
    first, second = uuid.uuid4().hex, uuid.uuid4().hex
    assert leases.acquire_all({"p:someone", "i:cookie:abc"}, first)
    assert not leases.acquire_all({"i:cookie:abc"}, second)
    leases.release({"p:someone", "i:cookie:abc"}, first)
    assert leases.acquire_all({"i:cookie:abc"}, second)


def test_groups_with_free_leases_proceed_while_a_blocked_group_gives_its_leases_back(leases: Leases) -> None:
    busy, blocked_too, free_a, free_b = _same_bucket(4)
    holder, writer, later = uuid.uuid4().hex, uuid.uuid4().hex, uuid.uuid4().hex
    assert leases.acquire_all({busy}, holder)
    # One batch holds all four keys: it fails on `busy`, and is retried without the blocked group.
    granted = leases.acquire_groups([{busy, blocked_too}, {free_a}, {free_b, "p:elsewhere"}], writer)
    assert granted == [False, True, True]
    assert leases.acquire_all({blocked_too}, later)  # given back at once, not held until the round ends
    assert not leases.acquire_all({free_a}, later) and not leases.acquire_all({"p:elsewhere"}, later)
    leases.release({free_a, free_b, "p:elsewhere"}, writer)
    assert leases.acquire_all({free_a, free_b, "p:elsewhere"}, later)


def test_release_by_another_owner_frees_nothing(leases: Leases) -> None:
    owner, intruder = uuid.uuid4().hex, uuid.uuid4().hex
    assert leases.acquire_all({"p:kept"}, owner)
    leases.release({"p:kept"}, intruder)
    assert not leases.acquire_all({"p:kept"}, intruder)
