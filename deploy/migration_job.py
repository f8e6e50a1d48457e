"""The Kubernetes schema-migration Job's command: wait for Cassandra, then apply the migrations.

    python -m deploy.migration_job [--wait-seconds 1500] [service ...]

The Job is applied together with Cassandra, so at first Cassandra is not there yet: the Service name
does not resolve, nothing listens, or (cass-operator) the login role is created only once the whole
datacenter is ready, and the migrations' lightweight transactions need a quorum of replicas up. Each of
these is retried here, every few seconds, until `--wait-seconds` have passed; the Job's own pod
backoff would instead grow to six minutes between attempts and give up after `backoffLimit` pods.
Anything else (a bad setting, an edited migration) fails at once: waiting would not fix it.
Migrations are idempotent, so an attempt cut short by Cassandra is simply run again.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable

from cassandra import OperationTimedOut, UnresolvableContactPoints
from cassandra.cluster import NoHostAvailable
from pydantic import ValidationError

from shared import migrations
from shared.config import GrpcSettings
from shared.errors import Unavailable
from shared.telemetry import configure_logging

log = logging.getLogger("deploy.migration_job")

# Longer than Cassandra takes to come up in the overlays: cass-operator starts a 3-node datacenter one
# node at a time and creates the login role last. The Job's activeDeadlineSeconds must exceed it.
DEFAULT_WAIT_SECONDS = 1500.0
RETRY_INTERVAL_SECONDS = 5.0
# Cassandra not (yet) resolvable or reachable, not yet accepting the login (NoHostAvailable wraps
# AuthenticationFailed), or not enough replicas up: CassandraSession turns these into Unavailable; the
# driver's own types are for what escapes before it (building the Cluster). A rejected statement
# (InvalidRequest, SyntaxException) is none of them and fails at once.
NOT_READY_ERRORS: tuple[type[Exception], ...] = (Unavailable, NoHostAvailable, UnresolvableContactPoints,
                                                 OperationTimedOut)


def migrate_when_ready(migrate: Callable[[], int], wait_seconds: float,
                       retry_interval: float = RETRY_INTERVAL_SECONDS) -> int:
    """Run `migrate` until it returns, retrying while Cassandra is not ready, for at most `wait_seconds`."""
    give_up_at = time.monotonic() + wait_seconds
    attempt = 0
    while True:
        attempt += 1
        try:
            return migrate()
        except NOT_READY_ERRORS as error:
            left = give_up_at - time.monotonic()
            reason = ("no contact point in CASSANDRA_CONTACT_POINTS resolves yet"
                      if isinstance(error, UnresolvableContactPoints) else f"{type(error).__name__}: {error}")
            if left <= 0:
                log.error("Cassandra was not ready after %g s (%d attempts); giving up. Last error: %s",
                          wait_seconds, attempt, reason)
                return 1
            # One line per attempt: the pod's log shows what it is waiting for.
            log.warning("Cassandra is not ready yet (attempt %d, giving up in %.0f s): %s", attempt, left, reason)
            time.sleep(min(retry_interval, left))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Wait for Cassandra, then apply OneCDP schema migrations.")
    parser.add_argument("--wait-seconds", type=float, default=DEFAULT_WAIT_SECONDS,
                        help=f"how long to wait for Cassandra (default {DEFAULT_WAIT_SECONDS:g})")
    migrations.add_services_argument(parser)
    args = parser.parse_args(argv)
    services = migrations.chosen_services(parser, args.services)
    try:
        configure_logging("migrations", GrpcSettings())
        # The driver logs a traceback for every failed connection; while waiting, that is one per attempt.
        # The line logged here per attempt names the same error.
        logging.getLogger("cassandra").setLevel(logging.CRITICAL)
        return migrate_when_ready(lambda: migrations.main(services), args.wait_seconds)
    except ValidationError as error:
        # A setting that does not parse will not parse on the next attempt either.
        print(f"invalid settings: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
