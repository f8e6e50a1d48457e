"""The yardstick: on a CDNOW slice loaded through profile, segments spanning every condition kind have exactly
the members an independent pandas evaluation of the raw purchases gives, after the real-time path has processed
the ingest, and again from a batch recompute (which finds nothing to enter or exit).

CDNOW is 1997-98 and rules are evaluated now, so event windows here are fixed (`from ... to ...`); relative
windows (`last N days`) and their expiry are proven on recent synthetic events in test_realtime.py.
"""

from __future__ import annotations

import hashlib
import os
import time
from datetime import UTC, datetime

import pandas as pd
import pytest
from google.protobuf import struct_pb2
from onecdp.common.v1 import common_pb2
from onecdp.profile.v1 import profile_service_pb2 as profile_pb
from onecdp.profile.v1 import profile_service_pb2_grpc as profile_grpc
from onecdp.segmentation.v1 import segmentation_service_pb2 as pb
from onecdp.segmentation.v1 import segmentation_service_pb2_grpc as pb_grpc

from deploy.cdnow import read_cdnow
from deploy.demo import crm_id, customers_of, load
from tests.services.segmentation.test_batch import finished, wait_ready

pytestmark = pytest.mark.integration

CUSTOMERS = int(os.environ.get("ONECDP_SEGMENT_YARDSTICK_CUSTOMERS", "300"))
MODEL = "churn-90d"

# Every condition kind: trait and computed-trait comparisons (=, IN, <, >=, BETWEEN, CONTAINS, EXISTS),
# event counts (at least / at most / exactly, with a property filter), sum / avg / max over fixed windows,
# a prediction score written back through BatchWriteTraits, segment membership, NOT and OR.
RULES = {
    "web-signups-early": 'traits.signup_channel = "web" AND traits.first_purchase_date < "1997-01-15"',
    "repeat": "computed.frequency >= 3",
    "mid-basket": "computed.average_order_value BETWEEN 15 AND 40",
    "first-seen-feb": 'computed.first_seen_time >= "1997-02-01T00:00:00Z"',
    "music-fans": 'computed.top_categories CONTAINS "music" AND traits.app_user EXISTS',
    "q1-twice": 'event("order").count(from 1997-01-01T00:00:00Z to 1997-04-01T00:00:00Z) >= 2',
    "quiet-after-q1": 'event("order").count(from 1997-04-01T00:00:00Z to 1998-07-01T00:00:00Z) <= 1',
    "one-and-done": 'event("order").count(from 1997-01-01T00:00:00Z to 1998-07-01T00:00:00Z) = 1',
    "big-orders": 'event("order", amount > 50).count(from 1997-01-01T00:00:00Z to 1998-07-01T00:00:00Z) >= 2',
    "h1-spenders": 'event("order").sum(amount, from 1997-01-01T00:00:00Z to 1997-07-01T00:00:00Z) > 60',
    "high-average": 'event("order").avg(amount, from 1997-01-01T00:00:00Z to 1998-07-01T00:00:00Z) >= 30',
    "top-order": 'event("order").max(amount, from 1997-01-01T00:00:00Z to 1998-07-01T00:00:00Z) BETWEEN 20 AND 60',
    "at-risk": f'score("models/{MODEL}") >= 0.6',
    "repeat-at-risk-not-recent": f'segment("repeat") AND score("models/{MODEL}") >= 0.3 AND NOT '
                                 'event("order").count(from 1998-01-01T00:00:00Z to 1998-07-01T00:00:00Z) >= 1',
    "spenders-or-fans": 'segment("h1-spenders") OR (traits.customer_id IN ["00003", "00010", "00042"] '
                        'AND NOT segment("one-and-done"))',
}


def score_of(customer_id: str) -> float | None:
    """A made-up churn score for most customers (none for every seventh), stable from the id."""
    digest = int(hashlib.sha256(customer_id.encode()).hexdigest()[:8], 16)
    return None if digest % 7 == 0 else round((digest % 1000) / 1000, 3)


def at(text: str) -> pd.Timestamp:
    return pd.Timestamp(text, tz="UTC")


def reference(purchases: pd.DataFrame) -> dict[str, set[str]]:
    """The customers each rule selects, from the raw CDNOW rows (orders at noon UTC, as the loader stores them)."""
    orders = purchases.assign(time=pd.to_datetime(purchases["date"]).dt.tz_localize("UTC") + pd.Timedelta(hours=12))
    customers = pd.Index(sorted(orders["customer_id"].unique()))

    def window(start: str, end: str) -> pd.DataFrame:
        return orders[(orders["time"] >= at(start)) & (orders["time"] < at(end))]

    def count(frame: pd.DataFrame) -> pd.Series:
        return frame.groupby("customer_id").size().reindex(customers, fill_value=0)

    def members(mask: pd.Series) -> set[str]:
        return set(mask[mask].index)

    grouped = orders.groupby("customer_id")
    frequency = grouped.size()
    first_order = grouped["time"].min()
    average = grouped["dollars"].sum() / frequency
    first_seen = first_order - pd.Timedelta(hours=1)  # the web sign-in an hour before the first order
    all_time = window("1997-01-01", "1998-07-01")
    scores = pd.Series({c: score_of(c) for c in customers}, dtype="float64")  # NaN: no score written
    h1_sum = window("1997-01-01", "1997-07-01").groupby("customer_id")["dollars"].sum().reindex(customers,
                                                                                                fill_value=0.0)
    expected = {
        "web-signups-early": members(first_order.dt.strftime("%Y-%m-%d") < "1997-01-15"),
        "repeat": members(frequency >= 3),
        "mid-basket": members(average.between(15, 40)),
        "first-seen-feb": members(first_seen >= at("1997-02-01")),
        "music-fans": set(customers),
        "q1-twice": members(count(window("1997-01-01", "1997-04-01")) >= 2),
        "quiet-after-q1": members(count(window("1997-04-01", "1998-07-01")) <= 1),
        "one-and-done": members(count(all_time) == 1),
        "big-orders": members(count(all_time[all_time["dollars"] > 50]) >= 2),
        "h1-spenders": members(h1_sum > 60),
        "high-average": members(all_time.groupby("customer_id")["dollars"].mean() >= 30),
        "top-order": members(all_time.groupby("customer_id")["dollars"].max().between(20, 60)),
        "at-risk": members(scores >= 0.6),
    }
    recent = count(window("1998-01-01", "1998-07-01")) >= 1
    expected["repeat-at-risk-not-recent"] = expected["repeat"] & members(scores >= 0.3) & members(~recent)
    expected["spenders-or-fans"] = expected["h1-spenders"] | ({"00003", "00010", "00042"} & set(customers)
                                                              - expected["one-and-done"])
    return expected


def export(stub: pb_grpc.SegmentationServiceStub, segment_id: str) -> set[str]:
    return {m.person_id for chunk in stub.ExportSegmentMembers(
        pb.ExportSegmentMembersRequest(parent=f"segments/{segment_id}"), timeout=30) for m in chunk.members}


def test_cdnow_segments_match_pandas_in_real_time_and_in_batch(stack: pb_grpc.SegmentationServiceStub,
                                                               profiles: profile_grpc.ProfileServiceStub) -> None:
    started = time.monotonic()
    # Real time: the segments exist before any data, so every member comes from following profile's feed.
    for segment_id, text in RULES.items():
        stack.CreateSegment(pb.CreateSegmentRequest(segment_id=segment_id, segment=pb.Segment(rule_text=text)),
                            timeout=10)
    # A new segment is computed at once; that (empty) recompute ends before the data comes, or a slow one
    # on a loaded machine would still be scanning while the first events arrive and record some enters.
    for segment_id in RULES:
        assert wait_ready(stack, f"segments/{segment_id}", timeout=120).state == pb.SEGMENT_STATE_READY, segment_id
    purchases = customers_of(read_cdnow(), CUSTOMERS)
    summary = load(profiles, purchases, streams=2)
    assert summary.rejected == 0 and summary.accepted == len(purchases) + 2 * CUSTOMERS
    customer_ids = sorted({p.customer_id for p in purchases})
    found = profiles.BatchGetProfiles(profile_pb.BatchGetProfilesRequest(persons=[
        common_pb2.PersonSelector(identifier=common_pb2.Identifier(type="crm_id", value=crm_id(c)))
        for c in customer_ids]), timeout=60).results
    person_of = {c: r.profile.person_id for c, r in zip(customer_ids, found, strict=True)}
    writes = []
    for customer in customer_ids:
        score = score_of(customer)
        if score is not None:
            traits = struct_pb2.Struct()
            traits.update({f"score_{MODEL}": score})
            writes.append(profile_pb.TraitWrite(person_id=person_of[customer], traits=traits, source="prediction"))
    profiles.BatchWriteTraits(profile_pb.BatchWriteTraitsRequest(writes=writes), timeout=60)
    loaded = time.monotonic()

    raw = pd.DataFrame(purchases, columns=["customer_id", "date", "cds", "dollars"])
    expected = {segment_id: {person_of[c] for c in members} for segment_id, members in reference(raw).items()}
    sizes = {segment_id: len(members) for segment_id, members in expected.items()}
    # Not a trivial yardstick: every segment selects someone, and not everyone, except the tautology.
    assert all(0 < size < CUSTOMERS for segment_id, size in sizes.items() if segment_id != "music-fans"), sizes

    deadline = time.monotonic() + 90
    realtime: dict[str, set[str]] = {}
    while time.monotonic() < deadline:
        realtime = {segment_id: export(stack, segment_id) for segment_id in RULES}
        if realtime == expected:
            break
        time.sleep(1)
    caught_up = time.monotonic()
    wrong = {s: (len(realtime[s] - expected[s]), len(expected[s] - realtime[s])) for s in RULES
             if realtime[s] != expected[s]}
    assert not wrong, f"real time: (extra, missing) members by segment: {wrong}"
    for segment_id in RULES:
        changes = stack.ListSegmentMembershipChanges(pb.ListSegmentMembershipChangesRequest(
            parent=f"segments/{segment_id}", page_size=10_000), timeout=30).changes
        assert {c.cause for c in changes} == {"realtime"}, segment_id
        replayed: set[str] = set()  # the change log, applied in order, gives the members
        for change in changes:
            if change.type == pb.MEMBERSHIP_CHANGE_TYPE_ENTER:
                assert change.person_id not in replayed, f"{segment_id}: entered twice without leaving"
                replayed.add(change.person_id)
            else:
                replayed.remove(change.person_id)
        assert replayed == expected[segment_id], segment_id

    # Batch: a recompute of every segment evaluates all profiles afresh and diffs with the members real time
    # left; no enter and no exit means the batch evaluation selected exactly the same persons.
    operations = {segment_id: stack.RecomputeSegment(pb.RecomputeSegmentRequest(
        name=f"segments/{segment_id}", parallelism=2), timeout=10) for segment_id in RULES}
    for segment_id, operation in operations.items():
        done = finished(stack, operation, timeout=120)
        response = pb.RecomputeSegmentResponse()
        assert done.response.Unpack(response), (segment_id, done.error)
        assert (response.profiles_scanned, response.member_count, response.entered_count,
                response.exited_count) == (CUSTOMERS, len(expected[segment_id]), 0, 0), segment_id
        assert export(stack, segment_id) == expected[segment_id], segment_id
    print(f"\nCDNOW yardstick: {CUSTOMERS} customers, {len(purchases)} purchases, {len(RULES)} segments; "
          f"load {loaded - started:.1f} s, real time caught up {caught_up - loaded:.1f} s later, "
          f"batch {time.monotonic() - caught_up:.1f} s; sizes {sizes}; now {datetime.now(UTC):%Y-%m-%d}")
