"""The event times OneCDP accepts, in every service that stores evidence of when something happened.

An event time outside them is a client's clock or unit bug (seconds sent as milliseconds, a zero
date): stored, it would skew first/last seen, windows and recency. Profile refuses such an event and
identity such an observation; both read the bounds from here so that one is never stricter than
the other.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from google.protobuf import timestamp_pb2

EARLIEST_EVENT_TIME = datetime(1990, 1, 1, tzinfo=UTC)
MAX_FUTURE_SKEW = timedelta(days=1)

# The times a request may ask about (an as-of time, a training cutoff), in profile and prediction alike. No
# stored event is older than EARLIEST_EVENT_TIME, so an earlier time sees nobody's data; the latest is far
# past any data and leaves centuries below datetime's end (9999-12-31) for what is computed from a time: a
# horizon, an eligibility window or a computed trait's window.
EARLIEST_REQUEST_TIME = EARLIEST_EVENT_TIME
LATEST_REQUEST_TIME = datetime(9000, 1, 1, tzinfo=UTC)
_EARLIEST_REQUEST_SECONDS = int(EARLIEST_REQUEST_TIME.timestamp())
_LATEST_REQUEST_SECONDS = int(LATEST_REQUEST_TIME.timestamp())
_REQUEST_TIME_RANGE = (f"{EARLIEST_REQUEST_TIME:%Y-%m-%dT%H:%M:%SZ} (no stored event is older) to "
                       f"{LATEST_REQUEST_TIME:%Y-%m-%dT%H:%M:%SZ}")


def request_time_problem(stamp: timestamp_pb2.Timestamp) -> str:
    """Why a request's Timestamp is not a time it may ask about ("" when it is), worded for the caller: outside
    the range the date arithmetic of windows and horizons would overflow (or it is no date at all, which only
    a binary client can send)."""
    if not 0 <= stamp.nanos < 1_000_000_000:
        return f"nanos must be 0-999999999, got {stamp.nanos}"
    if not _EARLIEST_REQUEST_SECONDS <= stamp.seconds <= _LATEST_REQUEST_SECONDS:
        try:
            shown = stamp.ToJsonString()
        except ValueError:  # not a date protobuf can show (beyond years 1-9999)
            shown = f"{stamp.seconds} seconds from 1970-01-01"
        return f"must be from {_REQUEST_TIME_RANGE}, got {shown}"
    return ""
