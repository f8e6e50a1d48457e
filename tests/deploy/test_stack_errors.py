"""`make up` on a shared machine: the Cassandra answering on 9042 when it started was someone else's, and its owner
stopped it while the schemas were applied. `make up` printed a 40-line traceback ending in "NoHostAvailable ...
defunct" (an outside check); it now says what happened and what to do, and exits 1."""

from __future__ import annotations

from typing import Any

import pytest

from deploy import cassandra as launcher
from deploy import stack
from shared.errors import Unavailable

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("running_after", "advice"), [
    (False, "it was running before `make up` (someone else's node on this machine?) and has stopped: run `make up` "
            "again, which then starts a node of its own"),
    (True, "it is still there but did not answer in time (a busy machine?): run `make up` again"),
])
def test_a_cassandra_that_goes_away_during_make_up_is_said_plainly(monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str],
                                                                  running_after: bool, advice: str) -> None:
    monkeypatch.delenv("CASSANDRA_CONTACT_POINTS", raising=False)
    monkeypatch.setattr(launcher, "ensure_running", lambda nodes: None)  # someone else's node
    monkeypatch.setattr(launcher, "is_running", lambda: running_after)

    class _Cluster:
        def shutdown(self) -> None:
            pass

    def gone(*_: Any) -> list[str]:
        raise Unavailable("Cassandra could not serve the request (NoHostAvailable: connection defunct)")

    monkeypatch.setattr(stack, "connect_cluster", lambda settings: _Cluster())
    monkeypatch.setattr(stack, "open_session", lambda cluster, keyspace, timeout: object())
    monkeypatch.setattr(stack, "migrate_service", gone)
    monkeypatch.setattr(stack, "_start_service", lambda *_: pytest.fail("no service starts without schemas"))
    assert stack.main(["up"]) == 1
    said = " ".join(capsys.readouterr().out.split())
    assert "did not answer while the schemas were applied (Cassandra could not serve the request (NoHostAvailable: " \
           "connection defunct))" in said
    assert advice in said
