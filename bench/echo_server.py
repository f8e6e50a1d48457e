"""A bare gRPC echo as its own process: `python -m bench.echo_server` (port in ONECDP_ECHO_PORT).

The server bootstrap every service uses (shared.server.create_server: health, reflection,
interceptors, thread pool) with no service of its own; grpc.health.v1 Check is the echo. Benchmarks
compare a service with it, each in a process of its own as deployed.
"""

from __future__ import annotations

import os

from shared.config import GrpcSettings
from shared.server import create_server, serve_until_signalled
from shared.telemetry import configure_logging

PORT_VARIABLE = "ONECDP_ECHO_PORT"


def main() -> None:
    settings = GrpcSettings()
    configure_logging("echo", settings)
    server = create_server([], settings, port=int(os.environ.get(PORT_VARIABLE, "0")), error_domain="onecdp.echo")
    serve_until_signalled(server, settings.grace_period_seconds)


if __name__ == "__main__":
    main()
