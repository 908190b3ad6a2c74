"""Metrics against hand computations and scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
from sklearn.metrics import average_precision_score, roc_auc_score

from uad.metrics import auroc, average_precision, best_dice, dice, evaluate


def test_ap_and_auroc_by_hand():
    s = np.array([0.1, 0.4, 0.35, 0.8])
    y = np.array([0, 0, 1, 1])
    # ranking 0.8(+) 0.4(-) 0.35(+) 0.1(-): precision at the positives 1 and 2/3 -> AP = (1 + 2/3) / 2
    assert average_precision(s, y) == pytest.approx((1 + 2 / 3) / 2)
    # positive/negative pairs ordered correctly: (0.8>0.4, 0.8>0.1, 0.35>0.1) of 4 -> 0.75
    assert auroc(s, y) == pytest.approx(0.75)


def test_ap_auroc_match_sklearn_with_mask():
    rng = np.random.default_rng(0)
    s = rng.random((6, 7, 8))
    y = (rng.random((6, 7, 8)) < 0.2).astype(np.uint8)
    s += 0.3 * y
    m = rng.random((6, 7, 8)) < 0.6
    assert average_precision(s, y, m) == pytest.approx(average_precision_score(y[m], s[m]))
    assert auroc(s, y, m) == pytest.approx(roc_auc_score(y[m], s[m]))
    assert average_precision(s, y) == pytest.approx(average_precision_score(y.ravel(), s.ravel()))


def test_sitk_images_are_accepted():
    rng = np.random.default_rng(1)
    s = rng.random((4, 5, 6)).astype(np.float32)
    y = (s > 0.7).astype(np.uint8)
    s_img, y_img = sitk.GetImageFromArray(s), sitk.GetImageFromArray(y)
    m = np.ones_like(y)
    m[0] = 0
    m_img = sitk.GetImageFromArray(m)
    assert average_precision(s_img, y_img, m_img) == pytest.approx(1.0)
    assert auroc(s_img, y_img) == pytest.approx(1.0)
    assert dice(y_img, y_img, m_img) == 1.0
    assert best_dice(s_img, y_img) == pytest.approx(1.0)


def test_dice_by_hand():
    p = np.array([1, 1, 0, 0, 1])
    t = np.array([1, 0, 1, 0, 1])
    assert dice(p, t) == pytest.approx(2 * 2 / (3 + 3))
    assert dice(p, t, mask=np.array([1, 1, 1, 1, 0])) == pytest.approx(2 * 1 / (2 + 2))
    assert dice(np.zeros(4), np.zeros(4)) == 1.0
    assert dice(np.ones(4), np.zeros(4)) == 0.0


def _brute_best_dice(s, y):
    best = 1.0 if y.sum() == 0 else 0.0
    for t in np.unique(s):
        best = max(best, dice(s >= t, y))
    return best


def test_best_dice_is_the_maximum_over_thresholds():
    rng = np.random.default_rng(2)
    for trial in range(5):
        s = np.round(rng.random(300), 2)  # many ties
        y = (rng.random(300) < 0.15).astype(int)
        s = s + 0.4 * y * rng.random(300)
        m = rng.random(300) < 0.8
        bd, thr = best_dice(s, y, m, return_threshold=True)
        assert bd == pytest.approx(_brute_best_dice(s[m], y[m]))
        assert dice(s[m] >= thr, y[m]) == pytest.approx(bd)
    assert best_dice(np.array([0.1, 0.9, 0.8]), np.array([0, 1, 1])) == pytest.approx(1.0)
    assert best_dice(np.array([0.1, 0.9]), np.array([0, 0]), return_threshold=True) == (1.0, math.inf)


def test_degenerate_cases_and_errors():
    assert math.isnan(average_precision(np.array([0.2, 0.3]), np.array([0, 0])))
    assert math.isnan(auroc(np.array([0.2, 0.3]), np.array([1, 1])))
    with pytest.raises(ValueError):
        average_precision(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError):
        auroc(np.array([np.nan, 1.0]), np.array([0, 1]))
    r = evaluate(np.array([0.1, 0.9]), np.array([0, 1]))
    assert r == {"ap": 1.0, "auroc": 1.0, "best_dice": 1.0, "best_dice_threshold": 0.9}
