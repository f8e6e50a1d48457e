"""The yardstick: our conversion model against BG/NBD on CDNOW, same customers, same run.

Cutoff T = 1997-09-30, horizon 39 weeks: will a customer buy in [T, T+273 days)? BG/NBD (lifetimes'
BetaGeoFitter) is fitted on the purchases before T and scores each customer by expected purchases
over the horizon. Our model may not look past T either: with only nine months of history before T,
a 39-week label cannot fit before T, so it learns "buys within 60 days" at monthly cutoffs whose
labels all end before T (validation cutoff 1997-08-01, ending 1997-09-30), and then ranks customers
as of T. Both are judged by ROC AUC on the 39-week outcome of every customer known at T.
"""

from __future__ import annotations

import time
from datetime import UTC, date, datetime, timedelta

import lightgbm as lgb
import numpy as np
import numpy.typing as npt
import pytest
from lifetimes import BetaGeoFitter

from deploy.cdnow import CdnowPurchase, read_cdnow
from services.prediction.datasets import TrainingSet, add_example
from services.prediction.history import ORDER_EVENT, ActivityEvent, InMemoryProfileSource
from services.prediction.metrics import roc_auc
from services.prediction.spec import PredictionKind, resolve_spec
from services.prediction.training import train_version

pytestmark = pytest.mark.unit

CUTOFF = datetime(1997, 9, 30, tzinfo=UTC)
HORIZON_DAYS = 39 * 7
TRAINING_HORIZON_DAYS = 60
TRAINING_CUTOFFS = [datetime(1997, month, 1, tzinfo=UTC) for month in (4, 5, 6)]
VALIDATION_CUTOFF = datetime(1997, 8, 1, tzinfo=UTC)


def _at_midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def bg_nbd_expected_purchases(purchases: list[CdnowPurchase], customers: list[str]) -> npt.NDArray[np.float64]:
    """BG/NBD fitted on purchases before CUTOFF: expected purchases in the next HORIZON_DAYS per customer."""
    days: dict[str, set[date]] = {}
    for purchase in purchases:
        if purchase.date < CUTOFF.date():
            days.setdefault(purchase.customer_id, set()).add(purchase.date)
    # The model's calibration summary, in days: repeat purchase days, first-to-last span, and age at T.
    frequency = np.array([len(days[c]) - 1 for c in customers], dtype=np.float64)
    recency = np.array([(max(days[c]) - min(days[c])).days for c in customers], dtype=np.float64)
    age = np.array([(CUTOFF.date() - min(days[c])).days for c in customers], dtype=np.float64)
    fitter = BetaGeoFitter(penalizer_coef=0.0)
    fitter.fit(frequency, recency, age)
    expected = fitter.conditional_expected_number_of_purchases_up_to_time(HORIZON_DAYS, frequency, recency, age)
    return np.asarray(expected, dtype=np.float64)


def test_our_conversion_model_is_not_worse_than_bg_nbd(capsys: pytest.CaptureFixture[str]) -> None:
    started = time.perf_counter()
    purchases = read_cdnow()
    events: dict[str, list[ActivityEvent]] = {}
    for purchase in purchases:
        events.setdefault(purchase.customer_id, []).append(
            ActivityEvent(ORDER_EVENT, _at_midnight(purchase.date), purchase.dollars))
    source = InMemoryProfileSource(events)

    # The held-out customers: everyone with a purchase before T, labelled by the 39 weeks after it.
    spec = resolve_spec(PredictionKind.CONVERSION, [], HORIZON_DAYS, eligibility_days=0, min_class_count=0)
    held_out = TrainingSet()
    for history in source.histories(before=CUTOFF + timedelta(days=HORIZON_DAYS)):
        add_example(held_out, spec, history, CUTOFF)

    training_spec = resolve_spec(PredictionKind.CONVERSION, [], TRAINING_HORIZON_DAYS, eligibility_days=0,
                                 min_class_count=0)
    # Nothing at or after T reaches training: features, labels and validation all end before it.
    assert VALIDATION_CUTOFF + timedelta(days=TRAINING_HORIZON_DAYS) <= CUTOFF
    model = train_version(training_spec, source, TRAINING_CUTOFFS, VALIDATION_CUTOFF, seed=1)
    ours = lgb.Booster(model_str=model.model_string).predict(held_out.features, num_threads=1)
    our_auc = roc_auc(held_out.labels, ours)
    baseline_auc = roc_auc(held_out.labels, bg_nbd_expected_purchases(purchases, held_out.person_ids))
    elapsed = time.perf_counter() - started

    with capsys.disabled():
        print(f"\nCDNOW, cutoff {CUTOFF.date()}, {HORIZON_DAYS}-day horizon: {len(held_out)} customers, "
              f"{held_out.positives} bought again; ROC AUC ours (LightGBM, {model.best_iteration} trees) "
              f"{our_auc:.4f} vs BG/NBD {baseline_auc:.4f} ({elapsed:.1f} s)")
    assert len(held_out) == 23_570  # every customer first bought in early 1997
    assert baseline_auc > 0.7  # the baseline is a real one, not a strawman
    assert our_auc >= baseline_auc
