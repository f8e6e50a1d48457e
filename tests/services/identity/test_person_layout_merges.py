"""A merge of a person stored before schema 0004 (columns in `persons`) with one created since (columns with
its members): the survivor is the older id whichever holds the stronger identifiers, and both keep their
columns whole in the layout they are stored in, with every redirect readable."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from onecdp.identity.v1 import identity_service_pb2 as pb

from shared.cassandra import CassandraSession
from tests.services.identity.conftest import link, members, observation, person_of
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

# Which of the two persons holds the account id, the strongest identifier of the merged person.
STRONGER = {
    "older person holds the account": ({"account_id:olga", "cookie:o1"}, {"email:nick@x.io", "cookie:n1"}),
    "newer person holds the account": ({"email:olga@x.io", "cookie:o1"}, {"account_id:nick", "cookie:n1"}),
}


@pytest.mark.parametrize("stronger", list(STRONGER))
def test_a_pre_0004_person_and_a_0004_person_merge_into_the_older_with_both_layouts_whole(
        identity: Stub, identity_session: CassandraSession, stronger: str) -> None:
    old_ids, new_ids = STRONGER[stronger]
    # An earlier version's person `old`, which had already absorbed `old_loser`.
    old = link(identity, observation(*old_ids))[0].person_id
    old_loser = link(identity, observation("cookie:x1", "phone:+14155550102"))[0].person_id
    assert link(identity, observation("cookie:o1", "cookie:x1"))[0].person_id == old
    make_pre_0004(identity_session, old, old_loser)
    old_created = identity_session.execute("SELECT create_time FROM persons WHERE person_id = ?", (old,)).one()
    # A person of this version, `new`, which had already absorbed `new_loser`.
    new = link(identity, observation(*new_ids))[0].person_id
    new_loser = link(identity, observation("cookie:n2"))[0].person_id
    assert link(identity, observation("cookie:n1", "cookie:n2"))[0].person_id == new
    new_created = lookup(identity, new).create_time.ToDatetime()
    assert old < old_loser < new < new_loser
    now = datetime.now(UTC).replace(tzinfo=None)
    merge_at = now.replace(microsecond=now.microsecond // 1000 * 1000)  # stored times have milliseconds

    (result,) = link(identity, observation("cookie:n1", "cookie:o1", message_id="bridge"))

    # The older id survives, whichever person holds the stronger identifiers.
    assert (result.person_id, list(result.merged_person_ids)) == (old, [new])
    everything = old_ids | new_ids | {"cookie:x1", "phone:+14155550102", "cookie:n2"}
    survivor = lookup(identity, old)
    assert (survivor.person_id, survivor.redirected_from, members(survivor)) == (old, "", everything)
    assert sorted(survivor.merged_person_ids) == sorted([old_loser, new])
    assert survivor.create_time.ToDatetime() == old_created.create_time
    assert survivor.update_time.ToDatetime() >= merge_at
    assert listed_identifiers(identity, old) == everything
    for person_id in (old_loser, new, new_loser):  # new_loser's redirect was moved from new to old: one hop
        redirected = lookup(identity, person_id)
        assert (redirected.person_id, redirected.redirected_from) == (old, person_id)
        assert listed_identifiers(identity, person_id) == everything
    for pair in everything:
        assert person_of(identity, pair).person_id == old

    # Both layouts whole: `old` in `persons` (its static columns, written too, never read), `new` with its members.
    old_columns = assert_layout(identity_session, old, "pre-0004").persons_row
    assert (old_columns.merged_into, old_columns.merged_from) == (None, {old_loser, new})
    assert old_columns.create_time == old_created.create_time and old_columns.update_time >= merge_at
    new_rows = assert_layout(identity_session, new, "0004")
    assert not new_rows.members
    assert (new_rows.statics.merged_into, new_rows.statics.merged_from) == (old, {new_loser})
    assert new_rows.statics.create_time == new_created
    # The merge into `old` re-pointed what redirected to `new` (chains compressed), so it keeps new_loser listed.
    assert assert_layout(identity_session, new_loser, "0004").statics.merged_into == old
    assert assert_layout(identity_session, old_loser, "pre-0004").persons_row.merged_into == old
    assert_members_match_identifiers(identity_session)

    merges = [c for c in all_changes(identity) if c.type == pb.IDENTITY_CHANGE_TYPE_MERGE]
    assert [(list(c.source_person_ids), list(c.result_person_ids)) for c in merges] == [
        ([old, old_loser], [old]), ([new, new_loser], [new]), ([old, new], [old])]
    assert merges[-1].reason == "observation bridge"
