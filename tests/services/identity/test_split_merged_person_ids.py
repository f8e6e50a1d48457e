"""After a split restores a merged person, the former survivor no longer lists it among the ids merged into it
(Person.merged_person_ids: "merged into this one and now redirect to it"), in either person layout."""

from __future__ import annotations

import pytest
from onecdp.identity.v1 import identity_service_pb2 as pb

from shared.cassandra import CassandraSession
from tests.services.identity.conftest import ids, link, observation
from tests.services.identity.person_layout import Stub, lookup, make_pre_0004

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("layout", ["pre-0004", "0004"])
def test_a_restored_person_is_no_longer_listed_as_merged_into_the_survivor(
        identity: Stub, identity_session: CassandraSession, layout: str) -> None:
    a = link(identity, observation("email:ann@x.io", "cookie:a1"))[0].person_id
    b = link(identity, observation("phone:+14155550100", "cookie:b1"))[0].person_id
    link(identity, observation("cookie:a1", "cookie:b1"))
    if layout == "pre-0004":
        make_pre_0004(identity_session, a, b)
    assert list(lookup(identity, a).merged_person_ids) == [b]
    (x,), (y,) = ids("cookie:a1"), ids("cookie:b1")
    identity.UnlinkIdentifiers(pb.UnlinkIdentifiersRequest(link=pb.IdentifierPair(a=x, b=y)), timeout=30)
    assert lookup(identity, b).person_id == b  # b no longer redirects to a ...
    # ... so a must not say it does (Person.merged_person_ids: "merged into this one and now redirect to it").
    assert list(lookup(identity, a).merged_person_ids) == []
