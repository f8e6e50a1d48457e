"""Identity's change feed as the online store's second feed: erasures, merges and splits reach the store from
identity directly, before profile has applied them (online.py's module docstring says why)."""

from __future__ import annotations

import uuid
from datetime import datetime

import grpc
from onecdp.identity.v1 import identity_service_pb2 as identity_pb
from onecdp.identity.v1 import identity_service_pb2_grpc as identity_grpc

from services.prediction.online import ChangeKind, HistoryChange
from shared.changefeed import cursor_at
from shared.errors import Unavailable

_IDENTITY_CHANGE_KINDS = {identity_pb.IDENTITY_CHANGE_TYPE_MERGE: ChangeKind.MERGE,
                          identity_pb.IDENTITY_CHANGE_TYPE_SPLIT: ChangeKind.SPLIT,
                          identity_pb.IDENTITY_CHANGE_TYPE_ERASE: ChangeKind.ERASE}
IDENTITY_FEED_TIMEOUT_SECONDS = 5.0


class GrpcIdentityChanges:
    """Identity's change feed (ListIdentityChanges) as the online store's ProfileChangeFeed: each change drops
    every person it names, before profile has applied it (online.py's module docstring says why)."""

    def __init__(self, stub: identity_grpc.IdentityServiceStub) -> None:
        self._stub = stub

    def cursor_at(self, time: datetime) -> str:
        """Identity's feed cursor before every change taken at or after `time` (shared.changefeed.cursor_at)."""
        return cursor_at(time)

    def changes(self, cursor: str, limit: int) -> tuple[list[HistoryChange], str]:
        try:
            page = self._stub.ListIdentityChanges(
                identity_pb.ListIdentityChangesRequest(page_size=limit, page_token=cursor),
                timeout=IDENTITY_FEED_TIMEOUT_SECONDS)
        except grpc.RpcError as error:
            code = error.code().name if isinstance(error, grpc.Call) else "an error"
            raise Unavailable(f"reading identity's changes: the identity service answered {code}",
                              reason="IDENTITY_UNAVAILABLE") from error
        changes = []
        for change in page.changes:
            persons = list(dict.fromkeys([*change.source_person_ids, *change.result_person_ids]))
            if persons:
                # A kind this release does not know may change anything: treat it as a merge (drop the persons).
                changes.append(HistoryChange(uuid.UUID(change.cursor), persons[0],
                                             _IDENTITY_CHANGE_KINDS.get(change.type, ChangeKind.MERGE),
                                             tuple(persons[1:])))
        return changes, page.next_page_token
