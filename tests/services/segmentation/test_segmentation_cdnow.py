"""The yardstick: on a CDNOW slice loaded through profile, segments spanning every condition kind have exactly
the members an independent pandas evaluation of the raw purchases gives, after the real-time path has processed
the ingest, and again from a batch recompute (which finds nothing to enter or exit).

CDNOW is 1997-98 and rules are evaluated now, so event windows here are fixed (`from ... to ...`); relative
windows (`last N days`) and their expiry are proven on recent synthetic events in test_realtime.py.

The demo's own identify traits are nearly the same for everyone (`signup_channel`, `app_user`), so the test also
writes CRM-like traits per customer through BatchWriteTraits, derived from the raw purchases (`enrichment`): a tier
from spend, a CD count, a list of badges, a referrer only some customers have. Every comparison operator of the
rule language is applied to values that differ between persons, with persons on every bound, so an operator read
wrongly (`<` as `<=`, `!=` false on a missing trait, IN on its first value only, ...) changes a member set.
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
ENRICHMENT_SOURCE = "crm-enrichment"
ALL_TIME = "from 1997-01-01T00:00:00Z to 1998-07-01T00:00:00Z"
# Two frequent CDNOW line amounts (the most frequent and the third): many orders sit exactly on these bounds.
LIST_PRICE, LOW_PRICE = 14.96, 11.77

# Every condition kind: trait and computed-trait comparisons (all ten operators), event counts (at least / at
# most / exactly, with property filters), sum / avg / max over fixed windows, a prediction score written back
# through BatchWriteTraits, segment membership, NOT and OR.
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
    # Every operator on values that vary (the traits `enrichment` writes, the ingested first purchase date, order
    # amounts), each bound some person's value (checked in the test), so each segment pins its operator.
    "silver": 'traits.tier = "silver"',
    "six-cds": "traits.total_cds = 6",
    "not-friend-referred": 'traits.referrer != "friend"',  # the customers without a referrer are members
    "not-one-cd": "traits.total_cds != 1",
    "under-three-cds": "traits.total_cds < 3",
    "up-to-four-cds": "traits.total_cds <= 4",
    "over-ten-cds": "traits.total_cds > 10",
    "five-cds-or-more": "traits.total_cds >= 5",
    "two-to-four-cds": "traits.total_cds BETWEEN 2 AND 4",
    "gold-or-bronze": 'traits.tier IN ["gold", "bronze"]',
    "weekend-buyers": 'traits.badges CONTAINS "weekend"',  # an element of a list
    "february-starters": 'traits.first_purchase_date CONTAINS "-02-"',  # a substring of a text
    "referred": "traits.referrer EXISTS",
    "only-list-price": f'event("order", amount != {LIST_PRICE}).count({ALL_TIME}) = 0',
    "standard-prices": f'event("order", amount BETWEEN {LOW_PRICE} AND {LIST_PRICE}).count({ALL_TIME}) >= 2',
    "chart-prices": f'event("order", amount IN [{LOW_PRICE}, {LIST_PRICE}]).count({ALL_TIME}) >= 1',
}
# Where the new segments' comparisons have persons exactly on the bound (asserted before anything is compared).
CD_BOUNDS = {1, 2, 3, 4, 5, 6, 10}


def score_of(customer_id: str) -> float | None:
    """A made-up churn score for most customers (none for every seventh), stable from the id."""
    digest = int(hashlib.sha256(customer_id.encode()).hexdigest()[:8], 16)
    return None if digest % 7 == 0 else round((digest % 1000) / 1000, 3)


def enrichment(purchases: pd.DataFrame) -> pd.DataFrame:
    """The traits the test writes for each customer (indexed by customer id), from the raw purchases.

    `tier`: "gold" from 150 dollars spent, "silver" from 50, else "bronze". `total_cds`: CDs bought (a whole
    number). `badges`: a list, possibly empty, of "multi-cd" (a purchase of 3 or more CDs), "big-order" (one over
    50 dollars), "weekend" (one on a Saturday or Sunday) and "loyal" (4 or more purchases). `referrer`: "friend"
    when the first purchase had 2 or more CDs, else "ad", for repeat customers only (None: not written).
    """
    weekend = pd.to_datetime(purchases["date"]).dt.day_of_week >= 5
    grouped = purchases.assign(weekend=weekend).groupby("customer_id", sort=True)
    spend, purchase_count, first_cds = grouped["dollars"].sum(), grouped.size(), grouped["cds"].first()
    badges = {"multi-cd": grouped["cds"].max() >= 3, "big-order": grouped["dollars"].max() > 50,
              "weekend": grouped["weekend"].any(), "loyal": purchase_count >= 4}
    customers = spend.index
    return pd.DataFrame({
        "tier": ["gold" if s >= 150 else "silver" if s >= 50 else "bronze" for s in spend],
        "total_cds": grouped["cds"].sum().astype(int),
        "badges": pd.Series([[b for b, has in badges.items() if has[c]] for c in customers], index=customers,
                            dtype=object),
        "referrer": pd.Series([None if purchase_count[c] < 2 else "friend" if first_cds[c] >= 2 else "ad"
                               for c in customers], index=customers, dtype=object),
    }, index=customers)


def at(text: str) -> pd.Timestamp:
    return pd.Timestamp(text, tz="UTC")


def reference(purchases: pd.DataFrame, enriched: pd.DataFrame) -> dict[str, set[str]]:
    """The customers each rule selects, from the raw CDNOW rows (orders at noon UTC, as the loader stores them)
    and the traits written from them (`enrichment`)."""
    orders = purchases.assign(time=pd.to_datetime(purchases["date"]).dt.tz_localize("UTC") + pd.Timedelta(hours=12))
    customers = pd.Index(sorted(orders["customer_id"].unique()))

    def window(start: str, end: str) -> pd.DataFrame:
        return orders[(orders["time"] >= at(start)) & (orders["time"] < at(end))]

    def count(frame: pd.DataFrame) -> pd.Series:
        # Counts of orders count purchases only: a refund (a negative amount) is no order placed. CDNOW has none.
        return frame[frame["dollars"] >= 0].groupby("customer_id").size().reindex(customers, fill_value=0)

    def members(mask: pd.Series) -> set[str]:
        return set(mask[mask].index)

    assert (orders["dollars"] >= 0).all()  # no refunds: the purchase rule below is stated, not exercised
    purchases_of = orders[orders["dollars"] >= 0].groupby("customer_id")
    frequency = purchases_of.size()
    first_order = purchases_of["time"].min()
    average = orders.groupby("customer_id")["dollars"].sum() / frequency  # net sum over the purchases
    first_seen = first_order - pd.Timedelta(hours=1)  # the web sign-in an hour before the first order
    all_time = window("1997-01-01", "1998-07-01")
    scores = pd.Series({c: score_of(c) for c in customers}, dtype="float64")  # NaN: no score written
    h1_sum = window("1997-01-01", "1997-07-01").groupby("customer_id")["dollars"].sum().reindex(customers,
                                                                                                fill_value=0.0)
    first_date = first_order.dt.strftime("%Y-%m-%d")  # the ingested trait first_purchase_date
    cds, tier, referrer = enriched["total_cds"], enriched["tier"], enriched["referrer"]
    expected = {
        "web-signups-early": members(first_date < "1997-01-15"),
        "repeat": members(frequency >= 3),
        "mid-basket": members(average.between(15, 40)),
        "first-seen-feb": members(first_seen >= at("1997-02-01")),
        "music-fans": set(customers),
        "q1-twice": members(count(window("1997-01-01", "1997-04-01")) >= 2),
        "quiet-after-q1": members(count(window("1997-04-01", "1998-07-01")) <= 1),
        "one-and-done": members(count(all_time) == 1),
        "big-orders": members(count(all_time[all_time["dollars"] > 50]) >= 2),
        "h1-spenders": members(h1_sum > 60),
        "high-average": members(all_time.groupby("customer_id")["dollars"].sum() / count(all_time) >= 30),
        "top-order": members(all_time[all_time["dollars"] >= 0].groupby("customer_id")["dollars"].max()
                             .between(20, 60)),
        "at-risk": members(scores >= 0.6),
        "silver": members(tier == "silver"),
        "six-cds": members(cds == 6),
        "not-friend-referred": members(referrer.isna() | (referrer != "friend")),
        "not-one-cd": members(cds != 1),
        "under-three-cds": members(cds < 3),
        "up-to-four-cds": members(cds <= 4),
        "over-ten-cds": members(cds > 10),
        "five-cds-or-more": members(cds >= 5),
        "two-to-four-cds": members((cds >= 2) & (cds <= 4)),
        "gold-or-bronze": members(tier.isin(["gold", "bronze"])),
        "weekend-buyers": members(enriched["badges"].map(lambda badges: "weekend" in badges).astype(bool)),
        "february-starters": members(first_date.str.contains("-02-", regex=False)),
        "referred": members(referrer.notna()),
        "only-list-price": members(count(all_time[all_time["dollars"] != LIST_PRICE]) == 0),
        "standard-prices": members(count(all_time[(all_time["dollars"] >= LOW_PRICE)
                                                  & (all_time["dollars"] <= LIST_PRICE)]) >= 2),
        "chart-prices": members(count(all_time[all_time["dollars"].isin([LOW_PRICE, LIST_PRICE])]) >= 1),
    }
    recent = count(window("1998-01-01", "1998-07-01")) >= 1
    expected["repeat-at-risk-not-recent"] = expected["repeat"] & members(scores >= 0.3) & members(~recent)
    expected["spenders-or-fans"] = expected["h1-spenders"] | ({"00003", "00010", "00042"} & set(customers)
                                                              - expected["one-and-done"])
    return expected


def export(stub: pb_grpc.SegmentationServiceStub, segment_id: str) -> set[str]:
    return {m.person_id for chunk in stub.ExportSegmentMembers(
        pb.ExportSegmentMembersRequest(parent=f"segments/{segment_id}"), timeout=30) for m in chunk.members}


def change_log(stub: pb_grpc.SegmentationServiceStub, segment_id: str) -> list[pb.MembershipChange]:
    """A segment's changes, oldest first, up to the settle horizon (a page stops a second short of now)."""
    return list(stub.ListSegmentMembershipChanges(pb.ListSegmentMembershipChangesRequest(
        parent=f"segments/{segment_id}", page_size=10_000), timeout=30).changes)


def replay(segment_id: str, changes: list[pb.MembershipChange]) -> set[str]:
    """The members the changes give, applied in order."""
    members: set[str] = set()
    for change in changes:
        if change.type == pb.MEMBERSHIP_CHANGE_TYPE_ENTER:
            assert change.person_id not in members, f"{segment_id}: entered twice without leaving"
            members.add(change.person_id)
        else:
            members.remove(change.person_id)
    return members


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
    raw = pd.DataFrame(purchases, columns=["customer_id", "date", "cds", "dollars"])
    enriched = enrichment(raw)
    writes = []
    for customer, tier, total_cds, badges, referrer in enriched.itertuples(name=None):
        traits = struct_pb2.Struct()
        traits.update({"tier": tier, "total_cds": int(total_cds), "badges": badges}
                      | ({"referrer": referrer} if referrer is not None else {}))
        writes.append(profile_pb.TraitWrite(person_id=person_of[customer], traits=traits, source=ENRICHMENT_SOURCE))
        score = score_of(customer)
        if score is not None:
            traits = struct_pb2.Struct()
            traits.update({f"score_{MODEL}": score})
            writes.append(profile_pb.TraitWrite(person_id=person_of[customer], traits=traits, source="prediction"))
    for start in range(0, len(writes), 1000):  # BatchWriteTraits takes up to 1,000 writes
        profiles.BatchWriteTraits(profile_pb.BatchWriteTraitsRequest(writes=writes[start:start + 1000]), timeout=60)
    loaded = time.monotonic()

    # The new segments pin their operators: persons sit on every bound they compare CD counts and amounts with,
    # all three tiers occur, and both referrers and no referrer (`!=` must keep those without one).
    assert set(enriched["total_cds"]) >= CD_BOUNDS, sorted(set(enriched["total_cds"]))
    assert {LOW_PRICE, LIST_PRICE} <= set(raw["dollars"])
    assert set(enriched["tier"]) == {"gold", "silver", "bronze"}
    assert set(enriched["referrer"]) == {"friend", "ad", None}
    expected = {segment_id: {person_of[c] for c in members}
                for segment_id, members in reference(raw, enriched).items()}
    assert set(expected) == set(RULES)
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
    # The change log, applied in order, gives the members; its pages stop a settle second short of now, so the
    # last changes real time made show up a moment after the members do.
    settled = time.monotonic() + 15
    for segment_id in RULES:
        changes = change_log(stack, segment_id)
        while replay(segment_id, changes) != expected[segment_id] and time.monotonic() < settled:
            time.sleep(0.5)
            changes = change_log(stack, segment_id)
        assert {c.cause for c in changes} == {"realtime"}, segment_id
        assert replay(segment_id, changes) == expected[segment_id], segment_id

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
