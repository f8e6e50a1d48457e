"""ExplainLink near densely linked identifiers: a pair linked directly (or through one identifier) is
explained whatever the degrees, and a search that does hit the limit says what it ruled out and what to do."""

from __future__ import annotations

import grpc
import pytest
from onecdp.identity.v1 import identity_service_pb2 as pb
from onecdp.identity.v1 import identity_service_pb2_grpc as pb_grpc

from services.identity import explain
from tests.services.identity.conftest import failure, ids, link, observation

pytestmark = pytest.mark.integration

Stub = pb_grpc.IdentityServiceStub
LIMIT = 10  # stands for MAX_EXPLORED_IDENTIFIERS (5000): each hub below has three times as many links
LEAVES = 3 * LIMIT


@pytest.fixture
def small_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(explain, "MAX_EXPLORED_IDENTIFIERS", LIMIT)


def _hub(stub: Stub, device: str, prefix: str) -> None:
    link(stub, *[observation(f"device_id:{device}", f"account_id:{prefix}{i}") for i in range(LEAVES)])


def _explain(stub: Stub, a: str, b: str) -> pb.ExplainLinkResponse:
    (ia,), (ib,) = ids(a), ids(b)
    response: pb.ExplainLinkResponse = stub.ExplainLink(pb.ExplainLinkRequest(a=ia, b=ib), timeout=30)
    return response


def _chain(response: pb.ExplainLinkResponse) -> list[tuple[str, str]]:
    return [(getattr(s, "from").value, s.to.value) for s in response.path]


def test_a_directly_linked_pair_is_explained_whatever_the_degree(identity: Stub, small_limit: None) -> None:
    _hub(identity, "hub-dev-1", "acct-")
    assert _chain(_explain(identity, "device_id:hub-dev-1", "account_id:acct-17")) == [("HUB-DEV-1", "acct-17")]
    assert _chain(_explain(identity, "account_id:acct-17", "device_id:hub-dev-1")) == [("acct-17", "HUB-DEV-1")]
    # Two accounts through the hub: one link from each end.
    through = _explain(identity, "account_id:acct-3", "account_id:acct-17")
    assert _chain(through) == [("acct-3", "HUB-DEV-1"), ("HUB-DEV-1", "acct-17")]
    assert [g.guard for g in through.blocking_guards] == [pb.GUARD_KIND_SHARED_IDENTIFIER]


def test_a_search_over_the_limit_says_what_it_ruled_out(identity: Stub, small_limit: None) -> None:
    _hub(identity, "hub-dev-a", "left-")
    _hub(identity, "hub-dev-b", "right-")
    (a,), (b,) = ids("account_id:left-0"), ids("account_id:right-0")
    code, reason, _ = failure(lambda: identity.ExplainLink(pb.ExplainLinkRequest(a=a, b=b), timeout=30))
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "EXPLANATION_TOO_LARGE")
    with pytest.raises(grpc.RpcError) as caught:
        identity.ExplainLink(pb.ExplainLinkRequest(a=a, b=b), timeout=30)
    message = caught.value.details() or ""
    # True: both ends and the left hub were read (two levels from the left, one from the right), so no
    # chain of three links or fewer exists; reading the right hub's links would pass the limit.
    assert "no chain of 3 links or fewer connects" in message and f"more than {LIMIT} identifiers" in message
    assert "different persons" in message and "explain each of them with an identifier" in message
