"""Calls between services spread over every pod a headless Service's DNS name returns, call by call.

A headless Service answers with one address per ready pod; shared.clients' channels then balance each
call over them (round_robin). Two real servers on two loopback addresses stand in for two pods, and a
target listing both stands in for the DNS answer: the channel the services use must send calls to both,
where a plain channel (pick_first, what a ClusterIP Service would get per connection) sends all to one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2

from shared.clients import open_channel
from shared.config import GrpcSettings

pytestmark = pytest.mark.unit

POD_ADDRESSES = ("127.0.0.1", "127.0.0.2")
METHOD = "/onecdp.test.v1.WhoAmI/Name"
CALLS = 40


def _pod(address: str, port: int) -> tuple[grpc.Server, int]:
    """A server that answers with its own address; port 0 binds a free one."""
    def name(_request: bytes, _context: grpc.ServicerContext) -> bytes:
        return address.encode()
    server = grpc.server(ThreadPoolExecutor(max_workers=2), options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "onecdp.test.v1.WhoAmI", {"Name": grpc.unary_unary_rpc_method_handler(name)})])
    bound = server.add_insecure_port(f"{address}:{port}")
    assert bound != 0
    server.start()
    return server, bound


@pytest.fixture
def pods() -> Iterator[str]:
    """Two 'pods' on one port, as a headless Service's pods are; yields the target naming both."""
    first, port = _pod(POD_ADDRESSES[0], 0)
    second, _ = _pod(POD_ADDRESSES[1], port)
    servers = [first, second]
    yield "ipv4:" + ",".join(f"{address}:{port}" for address in POD_ADDRESSES)
    for server in servers:
        server.stop(None)


def _answers(channel: grpc.Channel) -> Counter[str]:
    call = channel.unary_unary(METHOD)
    return Counter(call(b"", timeout=5, wait_for_ready=True).decode() for _ in range(CALLS))


def test_the_services_channels_spread_calls_over_every_pod(pods: str) -> None:
    health = health_pb2.DESCRIPTOR.services_by_name["Health"]
    channel = open_channel(pods, [health], GrpcSettings(log_format="text"))
    try:
        answers = _answers(channel)
    finally:
        channel.close()
    assert set(answers) == set(POD_ADDRESSES)
    assert min(answers.values()) >= CALLS // 4, answers


def test_a_plain_channel_would_pin_every_call_to_one_pod(pods: str) -> None:
    with grpc.insecure_channel(pods) as channel:
        answers = _answers(channel)
    assert len(answers) == 1, answers
