"""Metrics against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from services.prediction.metrics import expected_calibration_error, log_loss, roc_auc, top_fraction_lift

pytestmark = pytest.mark.unit


def test_roc_auc_counts_pairs_with_ties_as_half() -> None:
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert roc_auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    assert roc_auc([1, 1, 0], [0.9, 0.2, 0.2]) == pytest.approx(0.75)  # (1 + 0.5) / 2 pairs
    assert roc_auc([0, 1, 1, 0], [0.1, 0.9, 0.8, 0.2]) == 1.0
    assert math.isnan(roc_auc([1, 1], [0.2, 0.3]))


def test_roc_auc_matches_brute_force() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.random(300), 1)  # many ties
    positives, negatives = scores[labels == 1], scores[labels == 0]
    wins = (positives[:, None] > negatives[None, :]).sum() + 0.5 * (positives[:, None] == negatives[None, :]).sum()
    assert roc_auc(labels, scores) == pytest.approx(wins / (len(positives) * len(negatives)))


def test_log_loss() -> None:
    assert log_loss([1, 0], [0.8, 0.4]) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)
    assert log_loss([1], [0.0]) == pytest.approx(-math.log(1e-15))  # clipped, not infinite


def test_calibration_error_over_ten_bins() -> None:
    # Bin [0.1, 0.2): mean p 0.15, rate 0.5 -> 0.35; bin [0.9, 1.0]: mean p 0.95 (1.0 belongs here), rate 1 -> 0.05.
    labels = [0, 1, 1, 1]
    probabilities = [0.1, 0.2 - 1e-9, 0.9, 1.0]
    expected = 0.5 * abs(0.5 - 0.15) + 0.5 * abs(1.0 - 0.95)
    assert expected_calibration_error(labels, probabilities) == pytest.approx(expected, abs=1e-8)
    assert expected_calibration_error([0, 1] * 50, [0.5] * 100) == pytest.approx(0.0)


def test_top_decile_lift() -> None:
    labels = [1] + [0] * 9 + [1] * 10 + [0] * 80  # 11 of 100 positive
    scores = [0.99, *([0.9] * 9), *([0.1] * 90)]
    # Top 10 has 1 positive: 0.1 / 0.11.
    assert top_fraction_lift(labels, scores) == pytest.approx(0.1 / 0.11)
    assert math.isnan(top_fraction_lift([0, 0], [0.1, 0.2]))
