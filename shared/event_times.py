"""The event times OneCDP accepts, in every service that stores evidence of when something happened.

An event time outside them is a client's clock or unit bug (seconds sent as milliseconds, a zero
date): stored, it would skew first/last seen, windows and recency. Profile refuses such an event and
identity such an observation; both read the bounds from here so that one is never stricter than
the other.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

EARLIEST_EVENT_TIME = datetime(1990, 1, 1, tzinfo=UTC)
MAX_FUTURE_SKEW = timedelta(days=1)
