"""A link or unlink answers with every change it recorded in the feed, as the feed has them."""

from __future__ import annotations

import pytest
from onecdp.identity.v1 import identity_service_pb2 as pb
from onecdp.identity.v1 import identity_service_pb2_grpc as pb_grpc

from tests.services.identity.conftest import link, members, observation, person_of
from tests.services.identity.person_layout import all_changes

pytestmark = pytest.mark.integration

MERGE, SPLIT = pb.IDENTITY_CHANGE_TYPE_MERGE, pb.IDENTITY_CHANGE_TYPE_SPLIT


def test_link_and_unlink_answer_with_the_changes_they_recorded(identity: pb_grpc.IdentityServiceStub) -> None:
    (ana,) = link(identity, observation("email:ana@example.com", "cookie:ana-web"))
    (app,) = link(identity, observation("phone:+8613800138000", "cookie:ana-app"))
    assert ana.person_id != app.person_id and not ana.changes and not app.changes

    (joined,) = link(identity, observation("cookie:ana-web", "cookie:ana-app", message_id="join"))
    assert [c.type for c in joined.changes] == [MERGE]
    (merge,) = joined.changes
    assert set(merge.source_person_ids) == {ana.person_id, app.person_id}
    assert list(merge.result_person_ids) == [joined.person_id] and list(joined.merged_person_ids) != []
    assert merge == {c.cursor: c for c in all_changes(identity)}[merge.cursor], "as the feed has it"

    (again,) = link(identity, observation("cookie:ana-web", "cookie:ana-app", message_id="join"))
    assert again.duplicate and not again.changes

    retraction = identity.UnlinkIdentifiers(pb.UnlinkIdentifiersRequest(message_id="join", reason="test"),
                                            timeout=30)
    assert [c.type for c in retraction.changes] == [SPLIT] and retraction.change == retraction.changes[0]
    assert set(retraction.change.result_person_ids) == set(retraction.person_ids)
    feed = {c.cursor: c for c in all_changes(identity)}
    assert retraction.change == feed[retraction.change.cursor]


def test_a_person_that_loses_one_identifier_to_another_keeps_its_id(identity: pb_grpc.IdentityServiceStub) -> None:
    """Zed's phone is seen with Amy's email: links are united strongest first, then by key, so the phone
    joins Amy (amy@ sorts before zed@) and its link to Zed is cut (one account_id a person). Zed keeps
    his id, Amy keeps hers: the group holding one of Zed's identifiers does not take his id."""
    (zed,) = link(identity, observation("account_id:zed", "email:zed@example.com", "cookie:zed-web"))
    link(identity, observation("email:zed@example.com", "phone:+8613800138000"))
    (amy,) = link(identity, observation("account_id:amy", "email:amy@example.com"))
    assert zed.person_id < amy.person_id, "Zed's is the older (smaller) id, the one a merge would keep"

    (joined,) = link(identity, observation("email:amy@example.com", "phone:+8613800138000"))
    assert members(person_of(identity, "cookie:zed-web")) == {"account_id:zed", "email:zed@example.com",
                                                              "cookie:zed-web"}
    assert person_of(identity, "cookie:zed-web").person_id == zed.person_id
    assert members(person_of(identity, "phone:+8613800138000")) == {"account_id:amy", "email:amy@example.com",
                                                                    "phone:+8613800138000"}
    assert person_of(identity, "account_id:amy").person_id == amy.person_id == joined.person_id
    assert not joined.merged_person_ids
    assert [(c.type, list(c.source_person_ids), list(c.result_person_ids)) for c in joined.changes] == [
        (SPLIT, [zed.person_id], [zed.person_id, amy.person_id])]
