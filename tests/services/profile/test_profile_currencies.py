"""Computed money traits add up one currency, the reporting currency (PROFILE_REPORTING_CURRENCY): amounts in
other currencies are reported apart, per currency, unconverted, and still count as orders placed.

An outside tester ingested USD 100 and JPY 10000 and was told monetary = 10100."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pydantic
import pytest
from google.protobuf import timestamp_pb2
from onecdp.profile.v1 import profile_service_pb2 as pb
from onecdp.profile.v1 import profile_service_pb2_grpc as pb_grpc

from services.profile.computed import ComputedTraits, compute
from services.profile.model import Event, EventType, Order, TimelineEvent, validate
from services.profile.server import DEFINITION as PROFILE
from shared.config import CassandraSettings, GrpcSettings, ProfileSettings, env_var_names
from shared.runner import RunningService, start_service
from tests.services.profile.conftest import at, event, ingest, profile_of, track

Stub = pb_grpc.ProfileServiceStub
AS_OF = "2026-03-01"


def _timeline_event(message_id: str, when: str, amount: float, currency: str = "", order_id: str = "", *,
                    name: str = "order") -> TimelineEvent:
    kind = EventType.ORDER if order_id else EventType.TRACK
    return TimelineEvent(message_id=message_id, person_id="p", event_name=name, event_time=at(when), payload=b"",
                         receive_time=None, event_type=kind, order_id=order_id, amount=amount,
                         currency_code=currency, item_count=0, categories={}, brands={})


# USD 100, JPY 10000 refunded by 3000, EUR 5, an order of 50 without a currency code, and a `revenue` of 7 on
# a track event (no currency): the money of the tester's report and then some.
MIXED = [
    _timeline_event("m-none", "2026-02-10", 50.0, "", "o-none"),
    _timeline_event("m-usd", "2026-02-20", 100.0, "USD", "o-usd"),
    _timeline_event("m-jpy", "2026-02-21", 10000.0, "JPY", "o-jpy"),
    _timeline_event("m-eur", "2026-02-22", 5.0, "EUR", "o-eur"),
    _timeline_event("m-jpy-refund", "2026-02-25", -3000.0, "JPY", "o-jpy"),
    _timeline_event("m-checkout", "2026-02-26", 7.0, name="checkout"),
]


def _windows(computed: ComputedTraits) -> dict[tuple[str, int], tuple[int, float]]:
    return {(w.event_name, w.window_days): (w.count, w.sum) for w in computed.windows}


@pytest.mark.unit
def test_money_adds_up_the_reporting_currency_and_keeps_the_others_apart() -> None:
    computed = compute(MIXED, at(AS_OF))
    # USD 100 and the order without a currency (USD, the reporting currency): not 100 + 10000 - 3000 + 5 + 50.
    assert (computed.monetary, computed.lifetime_value) == (150.0, 150.0)
    assert computed.currency_code == "USD"
    assert computed.other_currency_amounts == {"EUR": 5.0, "JPY": 7000.0}
    # Every order is an order placed, whatever its currency; the average is over the two in USD.
    assert computed.frequency == 4 and computed.average_order_value == 75.0
    assert computed.recency_days == 7.0  # the EUR order is the latest purchase
    assert computed.rfm is not None and computed.rfm.monetary_score == 3  # 150: at least 100, below 250
    windows = _windows(computed)
    # Counts take every event; sums only the reporting currency (the JPY refund alone in the last 7 days).
    assert windows[("order", 7)] == (1, 0.0)
    assert windows[("order", 30)] == (5, 150.0)
    assert windows[("checkout", 7)] == (1, 7.0)  # a revenue property is in the reporting currency
    # The transactions keep their own currency and net amount.
    assert [(t.order_id, t.currency_code, t.amount) for t in computed.transactions] == [
        ("o-eur", "EUR", 5.0), ("o-jpy", "JPY", 7000.0), ("o-usd", "USD", 100.0), ("o-none", "", 50.0)]


@pytest.mark.unit
def test_another_reporting_currency_takes_the_orders_without_a_currency_code() -> None:
    computed = compute(MIXED, at(AS_OF), reporting_currency="JPY")
    assert computed.currency_code == "JPY"
    assert (computed.monetary, computed.lifetime_value) == (7050.0, 7050.0)  # 10000 - 3000 + 50
    assert computed.other_currency_amounts == {"EUR": 5.0, "USD": 100.0}
    assert computed.frequency == 4 and computed.average_order_value == 3525.0  # o-jpy and o-none
    assert computed.rfm is not None and computed.rfm.monetary_score == 5
    windows = _windows(computed)
    assert windows[("order", 7)] == (1, -3000.0) and windows[("order", 30)] == (5, 7050.0)
    assert windows[("checkout", 30)] == (1, 7.0)


@pytest.mark.unit
def test_orders_only_in_other_currencies_leave_no_money_and_no_average_but_count() -> None:
    events = [_timeline_event("g-1", "2026-02-01", 20.0, "GBP", "o-gbp"),
              _timeline_event("g-2", "2026-02-03", -20.0, "GBP", "o-gbp"),
              _timeline_event("j-1", "2026-02-05", 10000.0, "JPY", "o-jpy")]
    computed = compute(events, at(AS_OF))
    assert (computed.monetary, computed.lifetime_value, computed.average_order_value) == (0.0, 0.0, 0.0)
    assert computed.frequency == 2 and computed.recency_days == 24.0
    # A currency whose orders net to nothing is still listed: there were orders in it.
    assert computed.other_currency_amounts == {"GBP": 0.0, "JPY": 10000.0}
    assert computed.rfm is not None and computed.rfm.monetary_score == 1
    assert _windows(computed)[("order", 30)] == (3, 0.0)


@pytest.mark.unit
def test_one_currency_keeps_its_figures() -> None:
    usd_and_none = [e for e in MIXED if e.currency_code in ("", "USD")]
    computed = compute(usd_and_none, at(AS_OF))
    assert (computed.monetary, computed.frequency, computed.average_order_value) == (150.0, 2, 75.0)
    assert computed.other_currency_amounts == {}


@pytest.mark.unit
def test_the_reporting_currency_is_a_setting_checked_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ProfileSettings().reporting_currency == "USD"
    assert "PROFILE_REPORTING_CURRENCY" in env_var_names()
    monkeypatch.setenv("PROFILE_REPORTING_CURRENCY", "EUR")
    assert ProfileSettings().reporting_currency == "EUR"
    for wrong in ("eur", "EURO", "E1R", "", "EUR\n"):
        monkeypatch.setenv("PROFILE_REPORTING_CURRENCY", wrong)
        with pytest.raises(pydantic.ValidationError, match="reporting_currency"):
            ProfileSettings()


@pytest.mark.unit
def test_an_order_currency_is_three_letters_and_nothing_after_them() -> None:
    # `^[A-Z]{3}$` with re.match took "USD\n": `$` also matches before a final newline.
    def order_in(currency: str) -> Event:
        return Event(message_id="m", event_type=EventType.ORDER, identifiers=(("crm_id", "c"),), event_name="order",
                     event_time=at("2026-02-20"), source="", source_kind=0, party=0, traits={}, properties={},
                     order=Order("o", 10.0, currency), traits_bytes=0, properties_bytes=0, payload=b"")
    assert validate(order_in("USD"), at(AS_OF)) is None
    for wrong in ("USD\n", "usd", "US"):
        rejection = validate(order_in(wrong), at(AS_OF))
        assert rejection is not None and "order.currency_code" in rejection.message


# ---- through gRPC, against the real Cassandra ------------------------------------------------------------

def _order(pair: str, order_id: str, amount: float, currency: str, when: str) -> pb.Event:
    return event(pb.EVENT_TYPE_ORDER, pair, when=when,
                 order=pb.Order(order_id=order_id, amount=amount, currency_code=currency))


def _mixed_orders(pair: str) -> list[pb.Event]:
    return [_order(pair, "o-usd", 100.0, "USD", "2026-02-20"), _order(pair, "o-jpy", 10000.0, "JPY", "2026-02-21"),
            _order(pair, "o-eur", 5.0, "EUR", "2026-02-22"), _order(pair, "o-jpy", -3000.0, "JPY", "2026-02-25"),
            track(pair, name="checkout", when="2026-02-26", properties={"revenue": 7})]


def _as_of() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(at(AS_OF))
    return stamp


def _sums(computed: pb.ComputedTraits) -> dict[tuple[str, int], tuple[int, float]]:
    return {(w.event_name, w.window_days): (w.count, w.sum) for w in computed.window_aggregates}


@pytest.mark.integration
def test_get_profile_reports_money_per_currency(profiles: Stub) -> None:
    pair = "crm_id:currencies"
    events = [*_mixed_orders(pair), _order(pair, "o-none", 50.0, "", "2026-02-10")]
    assert {r.status for r in ingest(profiles, *events)} == {pb.EVENT_STATUS_ACCEPTED}
    profile = profile_of(profiles, pair, as_of_time=_as_of())
    computed = profile.computed
    assert (computed.monetary, computed.lifetime_value, computed.average_order_value) == (150.0, 150.0, 75.0)
    assert computed.currency_code == "USD"
    assert dict(computed.other_currency_amounts) == {"EUR": 5.0, "JPY": 7000.0}
    assert (computed.frequency, computed.recency_days, computed.rfm.monetary_score) == (4, 7.0, 3)
    sums = _sums(computed)
    assert (sums[("order", 7)], sums[("order", 30)], sums[("checkout", 7)]) == ((1, 0.0), (5, 150.0), (1, 7.0))
    assert {(t.order_id, t.currency_code, t.amount) for t in profile.recent_transactions} == {
        ("o-usd", "USD", 100.0), ("o-jpy", "JPY", 7000.0), ("o-eur", "EUR", 5.0), ("o-none", "USD", 50.0)}


@pytest.fixture
def yen_profiles(monkeypatch: pytest.MonkeyPatch, grpc_settings: GrpcSettings, cassandra_settings: CassandraSettings,
                 identity_service: RunningService) -> Iterator[Stub]:
    """A profile service whose reporting currency is JPY, read from the environment as a deployment sets it."""
    monkeypatch.setenv("PROFILE_REPORTING_CURRENCY", "JPY")
    settings = grpc_settings.model_copy(update={"identity_target": f"127.0.0.1:{identity_service.port}"})
    service = start_service(PROFILE, settings, cassandra_settings, port=0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            yield pb_grpc.ProfileServiceStub(channel)
    finally:
        service.stop(None)


@pytest.mark.integration
def test_the_deployment_setting_chooses_the_reporting_currency(yen_profiles: Stub) -> None:
    pair = "crm_id:yen"
    ingest(yen_profiles, *_mixed_orders(pair))
    computed = profile_of(yen_profiles, pair, as_of_time=_as_of()).computed
    assert computed.currency_code == "JPY"
    assert (computed.monetary, computed.lifetime_value, computed.average_order_value) == (7000.0, 7000.0, 7000.0)
    assert dict(computed.other_currency_amounts) == {"EUR": 5.0, "USD": 100.0}
    assert computed.frequency == 3
    sums = _sums(computed)
    assert (sums[("order", 7)], sums[("checkout", 7)]) == ((1, -3000.0), (1, 7.0))
