"""An erased person's id is never given out again, even through an identifier outside the person that still
names it as its origin (a device that was shared when the person was erased)."""

from __future__ import annotations

import pytest
from onecdp.common.v1 import common_pb2
from onecdp.identity.v1 import identity_service_pb2 as pb

from shared.cassandra import CassandraSession
from tests.services.identity.conftest import link, members, observation, person_of
from tests.services.identity.person_layout import Stub, assert_members_match_identifiers, lookup, not_found

pytestmark = pytest.mark.integration


def test_an_identifier_first_held_by_an_erased_person_does_not_bring_its_id_back(
        identity: Stub, identity_session: CassandraSession) -> None:
    # The kiosk is first seen with ann's account: ann's person is its origin.
    ann = link(identity, observation("account_id:ann", "email:ann@x.io", "device_id:kiosk-1"))[0].person_id
    others = [link(identity, observation("device_id:kiosk-1", f"account_id:u{i}"))[0].person_id for i in (2, 3, 4)]
    # Seen with 4 accounts (more than 3), the kiosk is shared: a person of its own, its origin still ann's.
    kiosk = person_of(identity, "device_id:KIOSK-1")
    assert kiosk.person_id not in {ann, *others} and members(kiosk) == {"device_id:KIOSK-1"}
    identity.ErasePerson(pb.ErasePersonRequest(person=common_pb2.PersonSelector(person_id=ann)), timeout=30)
    # Erasing ann leaves the kiosk with 3 accounts: no longer shared, it joins one of them again.
    not_found(lambda: lookup(identity, ann))
    # The recomputation of the kiosk's component must not give the erased id to the kiosk's new person.
    held_by = {f"{r.id_type}:{r.id_value}": r.person_id for r in identity_session.execute(
        "SELECT id_type, id_value, person_id FROM identifiers")}
    assert ann not in held_by.values(), (ann, held_by)
    holder = person_of(identity, "device_id:KIOSK-1")
    assert holder.person_id != ann
    assert members(holder) == {"device_id:KIOSK-1", "account_id:u2"}
    for i, person_id in zip((2, 3, 4), others, strict=True):
        assert person_of(identity, f"account_id:u{i}").person_id != ann
        assert lookup(identity, person_id).person_id != ann
    assert_members_match_identifiers(identity_session)
