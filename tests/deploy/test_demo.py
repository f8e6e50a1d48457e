"""The CDNOW demo load through real gRPC, checked customer by customer against pandas over the raw file."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest
from onecdp.common.v1 import common_pb2
from onecdp.profile.v1 import profile_service_pb2 as pb
from onecdp.profile.v1 import profile_service_pb2_grpc as pb_grpc

from deploy.cdnow import read_cdnow
from deploy.demo import BATCH_SIZE, BATCHES_PER_CALL, crm_id, customers_of, load

pytestmark = pytest.mark.integration

# The suite loads a slice; ONECDP_DEMO_CUSTOMERS=23570 checks every CDNOW customer.
CUSTOMERS = int(os.environ.get("ONECDP_DEMO_CUSTOMERS", "300"))
AS_OF = datetime(1998, 7, 1, tzinfo=UTC)


def reference(purchases: pd.DataFrame) -> pd.DataFrame:
    """Per customer, what the profile must show, computed independently from the raw purchases."""
    purchases = purchases.assign(time=pd.to_datetime(purchases["date"]).dt.tz_localize("UTC") + pd.Timedelta(hours=12))
    in_90_days = purchases[purchases["time"] > pd.Timestamp(AS_OF - timedelta(days=90))]
    in_30_days = purchases[purchases["time"] > pd.Timestamp(AS_OF - timedelta(days=30))]
    grouped = purchases.groupby("customer_id")
    table = pd.DataFrame({
        "frequency": grouped.size(),
        "monetary": grouped["dollars"].sum(),
        "first_order": grouped["time"].min(),
        "last_order": grouped["time"].max(),
        "cds": grouped["cds"].sum(),
    })
    table["orders_90d"] = in_90_days.groupby("customer_id").size().reindex(table.index, fill_value=0)
    table["amount_90d"] = in_90_days.groupby("customer_id")["dollars"].sum().reindex(table.index, fill_value=0.0)
    table["orders_30d"] = in_30_days.groupby("customer_id").size().reindex(table.index, fill_value=0)
    table["recency_days"] = (pd.Timestamp(AS_OF) - table["last_order"]).dt.total_seconds() / 86400
    # Each customer also has a web sign-in an hour before the first order and an app sign-in a day after it.
    table["first_seen"] = table["first_order"] - pd.Timedelta(hours=1)
    table["last_seen"] = table[["last_order"]].join(
        (table["first_order"] + pd.Timedelta(days=1)).rename("app")).max(axis=1)
    table["event_count"] = table["frequency"] + 2
    return table


# The suite's 300 s per test covers the slice; the whole data set loads for several minutes more.
@pytest.mark.timeout(max(300, CUSTOMERS // 10))
def test_demo_load_matches_an_independent_calculation_for_every_customer(
        profiles: pb_grpc.ProfileServiceStub) -> None:
    purchases = customers_of(read_cdnow(), CUSTOMERS)
    summary = load(profiles, purchases, streams=2)
    assert summary.rejected == 0, [r.message for r in summary.rejections]
    assert summary.events == len(purchases) + 2 * CUSTOMERS
    # A call cut short (UNAVAILABLE under load) is sent again whole: what it had stored comes back as
    # duplicates, and nothing else may. The profiles below prove each event was counted once.
    assert summary.accepted + summary.duplicate == summary.events
    assert summary.duplicate <= summary.retried * BATCH_SIZE * BATCHES_PER_CALL
    expected = reference(pd.DataFrame(purchases, columns=["customer_id", "date", "cds", "dollars"]))
    as_of = pb.GetProfileRequest().as_of_time
    as_of.FromDatetime(AS_OF)
    selectors = [common_pb2.PersonSelector(identifier=common_pb2.Identifier(type="crm_id", value=crm_id(c)))
                 for c in expected.index]
    found = [result for start in range(0, len(selectors), 1000)  # the API's largest batch
             for result in profiles.BatchGetProfiles(pb.BatchGetProfilesRequest(
                 persons=selectors[start:start + 1000], as_of_time=as_of), timeout=120).results]
    assert all(r.found for r in found)
    person_ids = set()
    for customer, result in zip(expected.index, found, strict=True):
        want = expected.loc[customer]
        computed = result.profile.computed
        person_ids.add(result.profile.person_id)
        windows = {(w.event_name, w.window_days): w for w in computed.window_aggregates}
        got = (computed.frequency, round(computed.monetary, 6), computed.event_count,
               computed.first_seen_time.ToDatetime(tzinfo=UTC), computed.last_seen_time.ToDatetime(tzinfo=UTC),
               round(computed.recency_days, 6), windows[("order", 90)].count if ("order", 90) in windows else 0,
               round(windows[("order", 90)].sum, 6) if ("order", 90) in windows else 0.0,
               windows[("order", 30)].count if ("order", 30) in windows else 0)
        assert got == (want.frequency, round(want.monetary, 6), want.event_count,
                       want.first_seen.to_pydatetime(), want.last_seen.to_pydatetime(),
                       round(want.recency_days, 6), want.orders_90d, round(want.amount_90d, 6),
                       want.orders_30d), customer
        assert computed.lifetime_value == pytest.approx(want.monetary)
        assert list(result.profile.preferences.top_categories) == ["music"]
        assert {i.type for i in result.profile.identifiers} == {"crm_id", "email", "cookie", "account_id",
                                                                "device_id"}
        assert result.profile.traits["customer_id"].value.string_value == customer
    assert len(person_ids) == CUSTOMERS, "every customer is one person, and no two customers merged"
    # Loading again stores nothing new.
    again = load(profiles, purchases, streams=2)
    assert (again.accepted, again.duplicate, again.rejected) == (0, again.events, 0)
