"""Splits that restore a person merged away while it was stored before schema 0004 (its columns in `persons`).

Two persons A (older) and B are merged into A, B being stored as a version before 0004 stored it; then
evidence is retracted (a pair, a message, an identifier) or new evidence makes the bridging device shared.
The recomputation must give B its id back, readable through every lookup, with its columns whole in the
table reads take them from, and the feed must record the split.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from onecdp.common.v1 import common_pb2
from onecdp.identity.v1 import identity_service_pb2 as pb

from shared.cassandra import CassandraSession
from tests.services.identity.conftest import ids, link, members, observation, person_of
from tests.services.identity.person_layout import (
    Stub,
    all_changes,
    assert_layout,
    assert_members_match_identifiers,
    listed_identifiers,
    lookup,
    make_pre_0004,
)

pytestmark = pytest.mark.integration

A_IDS = {"email:ann@x.io", "account_id:ann"}
B_IDS = {"phone:+14155550100", "cookie:b1"}
DEVICE = "device_id:DEV-1"  # as normalized


def _pair(a: str, b: str) -> pb.IdentifierPair:
    (ia,), (ib,) = ids(a), ids(b)
    return pb.IdentifierPair(a=ia, b=ib)


def _bridge_by_one_observation(stub: Stub) -> None:
    link(stub, observation("email:ann@x.io", "cookie:b1", message_id="bridge"))


def _bridge_by_a_device(stub: Stub) -> None:
    link(stub, observation("account_id:ann", "device_id:dev-1"))
    link(stub, observation("device_id:dev-1", "cookie:b1"))


def _unlink_pair(stub: Stub) -> pb.IdentityChange | None:
    response: pb.UnlinkIdentifiersResponse = stub.UnlinkIdentifiers(pb.UnlinkIdentifiersRequest(
        link=_pair("email:ann@x.io", "cookie:b1"), reason="wrong link"), timeout=30)
    return response.change


def _unlink_message(stub: Stub) -> pb.IdentityChange | None:
    response: pb.UnlinkIdentifiersResponse = stub.UnlinkIdentifiers(pb.UnlinkIdentifiersRequest(
        message_id="bridge", reason="bad import"), timeout=30)
    return response.change


def _unlink_identifier(stub: Stub) -> pb.IdentityChange | None:
    (device,) = ids("device_id:dev-1")
    response: pb.UnlinkIdentifiersResponse = stub.UnlinkIdentifiers(pb.UnlinkIdentifiersRequest(
        identifier=device, reason="bad device"), timeout=30)
    return response.change


def _make_the_device_shared(stub: Stub) -> pb.IdentityChange | None:
    # The device is shared once seen with more than 3 account ids (the default guard policy).
    for account in ("u2", "u3", "u4"):
        link(stub, observation("device_id:dev-1", f"account_id:{account}"))
    return None


SPLITS: dict[str, tuple[Callable[[Stub], None], Callable[[Stub], pb.IdentityChange | None]]] = {
    "unlink a pair": (_bridge_by_one_observation, _unlink_pair),
    "unlink a message": (_bridge_by_one_observation, _unlink_message),
    "unlink an identifier": (_bridge_by_a_device, _unlink_identifier),
    "a device becomes shared": (_bridge_by_a_device, _make_the_device_shared),
}


@pytest.mark.parametrize("merged", ["before 0004", "since 0004"])
@pytest.mark.parametrize("split", list(SPLITS))
def test_a_split_restores_a_person_merged_away_while_stored_before_0004(
        identity: Stub, identity_session: CassandraSession, split: str, merged: str) -> None:
    bridge, retract = SPLITS[split]
    a = link(identity, observation(*A_IDS))[0].person_id
    b = link(identity, observation(*B_IDS))[0].person_id
    assert a < b  # time-ordered ids: A is older and wins the merge
    if merged == "since 0004":
        make_pre_0004(identity_session, a, b)  # stored by an earlier version, merged by this one
    bridge(identity)
    assert lookup(identity, b).person_id == a and lookup(identity, b).redirected_from == b
    if merged == "before 0004":
        make_pre_0004(identity_session, a, b)  # merged by an earlier version, which stored both
    created = {p: lookup_created(identity_session, p) for p in (a, b)}
    now = datetime.now(UTC).replace(tzinfo=None)
    split_at = now.replace(microsecond=now.microsecond // 1000 * 1000)  # stored times have milliseconds

    change = retract(identity)

    restored = lookup(identity, b)
    assert (restored.person_id, restored.redirected_from, list(restored.merged_person_ids)) == (b, "", [])
    assert members(restored) == B_IDS and listed_identifiers(identity, b) == B_IDS
    assert restored.create_time.ToDatetime() == created[b] and restored.update_time.ToDatetime() >= split_at
    for pair in B_IDS:
        assert person_of(identity, pair).person_id == b
    survivor = lookup(identity, a)
    assert (survivor.person_id, survivor.redirected_from) == (a, "")
    assert members(survivor) == A_IDS and listed_identifiers(identity, a) == A_IDS
    assert survivor.create_time.ToDatetime() == created[a]
    batch = identity.BatchLookupPersons(pb.BatchLookupPersonsRequest(persons=[
        common_pb2.PersonSelector(person_id=b), common_pb2.PersonSelector(identifier=ids("cookie:b1")[0]),
        common_pb2.PersonSelector(person_id=a)]), timeout=10)
    assert [(r.found, r.person.person_id, r.person.redirected_from) for r in batch.results] == [
        (True, b, ""), (True, b, ""), (True, a, "")]

    # Both stay where an earlier version stored them, whole; every person made by the split is 0004's.
    assert assert_layout(identity_session, b, "pre-0004").persons_row.merged_into is None
    assert_layout(identity_session, a, "pre-0004")
    assert_members_match_identifiers(identity_session)
    changes = all_changes(identity)
    merges = [c for c in changes if c.type == pb.IDENTITY_CHANGE_TYPE_MERGE and b in c.source_person_ids]
    splits = [c for c in changes if c.type == pb.IDENTITY_CHANGE_TYPE_SPLIT]
    assert [(list(c.source_person_ids), list(c.result_person_ids)) for c in merges] == [([a, b], [a])]
    assert len(splits) == 1 and list(splits[0].source_person_ids) == [a]
    assert splits[0].result_person_ids[0] == a and b in splits[0].result_person_ids
    assert changes.index(merges[0]) < changes.index(splits[0])
    if change is not None:  # an unlink answers with the change it recorded
        assert change.cursor == splits[0].cursor and list(change.result_person_ids) == list(
            splits[0].result_person_ids)
    others = set(splits[0].result_person_ids) - {a, b}
    if split in ("unlink an identifier", "a device becomes shared"):
        (device,) = others
        assert person_of(identity, DEVICE).person_id == device and listed_identifiers(identity, device) == {DEVICE}
        assert_layout(identity_session, device, "0004")
    else:
        assert not others


def lookup_created(session: CassandraSession, person_id: str) -> datetime:
    """The create time stored for a person before 0004 (in `persons`)."""
    row = session.execute("SELECT create_time FROM persons WHERE person_id = ?", (person_id,)).one()
    assert row is not None and row.create_time is not None
    created: datetime = row.create_time
    return created
