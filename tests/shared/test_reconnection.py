"""After Cassandra comes back, services answer again within seconds, however long it was away. With the driver's
default (retry after 1 s, doubling to 10 minutes, 64 tries), identity answered UNAVAILABLE for 33 s after a 90 s
outage here (measured with the stack up: deploy.cassandra stop, start), minutes after a longer one, and for ever
once the tries ran out. The cluster every service opens retries a lost node at least every 5 s, without end."""

from __future__ import annotations

from itertools import islice

import pytest

from shared.cassandra import RECONNECT_MAX_SECONDS, connect_cluster
from shared.config import CassandraSettings

pytestmark = pytest.mark.unit


def test_a_lost_node_is_tried_again_every_few_seconds_for_ever() -> None:
    cluster = connect_cluster(CassandraSettings())  # not connected: nothing is contacted until connect()
    try:
        delays = list(islice(cluster.reconnection_policy.new_schedule(), 10_000))
    finally:
        cluster.shutdown()
    assert len(delays) == 10_000  # a schedule without end (the default stops after 64 tries)
    assert delays[0] <= 1.0 and max(delays) <= RECONNECT_MAX_SECONDS == 5.0
