"""Helpers for tests of the two person layouts (schema 0004): persons with their columns in `persons`
("pre-0004", written by earlier versions) and persons with them as static columns of their members'
partition in `person_identifiers` (created since). Row checks read the tables of the test's own keyspace.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import grpc
import pytest
from onecdp.common.v1 import common_pb2
from onecdp.identity.v1 import identity_service_pb2 as pb
from onecdp.identity.v1 import identity_service_pb2_grpc as pb_grpc

from services.identity.feed import SETTLE_SECONDS
from shared.cassandra import CassandraSession

Stub = pb_grpc.IdentityServiceStub
Layout = Literal["pre-0004", "0004"]

_COLUMNS = "merged_into, merged_from, erased, create_time, update_time"


@dataclass(frozen=True)
class StoredPerson:
    """What both tables hold for one person id."""

    statics: Any  # the static columns of its members' partition, or None when that partition is empty
    persons_row: Any  # its `persons` row, or None
    members: set[str]  # "type:value" of its clustering rows in person_identifiers


def stored_person(session: CassandraSession, person_id: str) -> StoredPerson:
    rows = list(session.execute(f"SELECT id_type, id_value, {_COLUMNS} FROM person_identifiers WHERE person_id = ?",
                                (person_id,)))
    persons_row = session.execute(f"SELECT {_COLUMNS} FROM persons WHERE person_id = ?", (person_id,)).one()
    return StoredPerson(rows[0] if rows else None, persons_row,
                        {f"{r.id_type}:{r.id_value}" for r in rows if r.id_type is not None})


def make_pre_0004(session: CassandraSession, *person_ids: str) -> None:
    """Rewrite persons created through the API as a version before schema 0004 stored them: their own
    columns in a `persons` row, none in their members' partition (the members themselves stay)."""
    for person_id in person_ids:
        stored = stored_person(session, person_id)
        assert stored.statics is not None and stored.statics.create_time is not None, person_id
        assert stored.persons_row is None, person_id
        columns = stored.statics
        session.write_all([
            (f"INSERT INTO persons (person_id, {_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
             (person_id, columns.merged_into, columns.merged_from, columns.erased, columns.create_time,
              columns.update_time)),
            (f"DELETE {_COLUMNS} FROM person_identifiers WHERE person_id = ?", (person_id,)),
        ])
        assert_layout(session, person_id, "pre-0004")


def assert_layout(session: CassandraSession, person_id: str, layout: Layout) -> StoredPerson:
    """The person's columns are whole in the one place a read takes them from, and only there.

    A read takes the static columns when their create_time is set, else the `persons` row. A person
    created since 0004 has no `persons` row at all; one stored before keeps a complete `persons` row and
    no static create_time (or its partial static columns would be read instead of that row).
    """
    stored = stored_person(session, person_id)
    if layout == "0004":
        assert stored.persons_row is None, f"{person_id} created since 0004 has a persons row: {stored.persons_row}"
        assert stored.statics is not None, f"{person_id} has no columns with its members"
        assert stored.statics.create_time is not None and stored.statics.update_time is not None, stored.statics
        assert not stored.statics.erased, stored.statics
    else:
        assert stored.persons_row is not None, f"{person_id} stored before 0004 lost its persons row"
        assert stored.persons_row.create_time is not None and stored.persons_row.update_time is not None, \
            stored.persons_row
        assert not stored.persons_row.erased, stored.persons_row
        assert stored.statics is None or stored.statics.create_time is None, \
            f"{person_id} stored before 0004 got a static create_time: its partial statics would be read"
    return stored


def columns(stored: StoredPerson, layout: Layout) -> Any:
    """The row a read takes the person's columns from."""
    return stored.statics if layout == "0004" else stored.persons_row


def assert_members_match_identifiers(session: CassandraSession) -> None:
    """Every identifier row's person lists it as a member, and every member's identifier row names its person."""
    held = {(r.person_id, f"{r.id_type}:{r.id_value}")
            for r in session.execute("SELECT id_type, id_value, person_id FROM identifiers") if r.person_id}
    listed = {(r.person_id, f"{r.id_type}:{r.id_value}")
              for r in session.execute("SELECT person_id, id_type, id_value FROM person_identifiers")
              if r.id_type is not None}
    assert held == listed, (sorted(held - listed), sorted(listed - held))


def lookup(stub: Stub, person_id: str) -> pb.Person:
    person: pb.Person = stub.LookupPerson(pb.LookupPersonRequest(
        person=common_pb2.PersonSelector(person_id=person_id)), timeout=10)
    return person


def listed_identifiers(stub: Stub, person_id: str) -> set[str]:
    response = stub.ListPersonIdentifiers(pb.ListPersonIdentifiersRequest(person_id=person_id, page_size=1000),
                                          timeout=10)
    assert not response.next_page_token
    return {f"{i.identifier.type}:{i.identifier.value}" for i in response.identifiers}


def not_found(call: Any) -> None:
    with pytest.raises(grpc.RpcError) as error:
        call()
    assert error.value.code() == grpc.StatusCode.NOT_FOUND, error.value


def all_changes(stub: Stub) -> list[pb.IdentityChange]:
    """The whole change feed of the test's keyspace, once what was recorded has settled."""
    time.sleep(SETTLE_SECONDS + 0.2)
    changes: list[pb.IdentityChange] = []
    token = ""
    while True:
        page = stub.ListIdentityChanges(pb.ListIdentityChangesRequest(page_size=1000, page_token=token), timeout=10)
        changes.extend(page.changes)
        if not page.changes:
            return changes
        token = page.next_page_token
