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


# ----------------------------------------------------------------------------- pr_stats (one sort)
from uad.metrics import dice_at, pr_stats, threshold_at_fpr  # noqa: E402


def test_pr_stats_matches_sklearn_and_brute_force_sweep():
    rng = np.random.default_rng(7)
    for trial in range(6):
        n = int(rng.integers(50, 400))
        s = np.round(rng.random(n), 2 if trial % 2 else 6).astype(np.float32 if trial % 3 else np.float64)
        y = rng.random(n) < 0.2
        s = s + (0.3 * y * rng.random(n)).astype(s.dtype)
        m = rng.random(n) < 0.85
        st = pr_stats(s, y, m)
        assert st["ap"] == pytest.approx(average_precision_score(y[m], s[m]), abs=1e-12)
        assert st["auroc"] == pytest.approx(roc_auc_score(y[m], s[m]), abs=1e-12)
        # closed-form best Dice == the brute-force sweep over every threshold
        assert st["best_dice"] == pytest.approx(_brute_best_dice(s[m], y[m]), abs=1e-12)
        assert dice(s[m] >= st["best_dice_threshold"], y[m]) == pytest.approx(st["best_dice"])
        assert st["positives"] == int(y[m].sum()) and st["n"] == int(m.sum())


def test_pr_stats_by_hand():
    # ranking 0.9(+) 0.8(-) 0.8(+) 0.1(-): the tie at 0.8 is one step: P = 1, then 2/3 at R = 1
    st = pr_stats(np.array([0.9, 0.8, 0.8, 0.1]), np.array([1, 0, 1, 0]))
    assert st["ap"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # best Dice: thr 0.9 -> 2*1/(1+2) = 2/3; thr 0.8 -> 2*2/(3+2) = 0.8; thr 0.1 -> 2*2/(4+2) = 2/3
    assert st["best_dice"] == pytest.approx(0.8) and st["best_dice_threshold"] == pytest.approx(0.8)
    # AUROC: pairs (+0.9 > -0.8, +0.9 > -0.1, +0.8 = -0.8 (1/2), +0.8 > -0.1) -> 3.5 / 4
    assert st["auroc"] == pytest.approx(3.5 / 4)
    empty = pr_stats(np.array([0.3, 0.2]), np.array([0, 0]))
    assert math.isnan(empty["ap"]) and empty["best_dice"] == 1.0 and empty["best_dice_threshold"] == math.inf


def test_threshold_at_fpr_and_dice_at():
    h = np.arange(1000, dtype=np.float64)  # healthy scores 0..999
    t = threshold_at_fpr(h, 0.01)
    assert (h > t).sum() == 10 and (h > t - 1).sum() == 11  # the smallest threshold that flags at most 1 %
    assert threshold_at_fpr([h[:500], h[500:]], 0.05) == threshold_at_fpr(h, 0.05)
    assert (h > threshold_at_fpr(h, 0.0)).sum() == 0
    with pytest.raises(ValueError):
        threshold_at_fpr(h, 1.0)
    assert dice_at(np.array([0.1, 0.6, 0.7]), np.array([0, 1, 0]), 0.5) == pytest.approx(2 * 1 / (2 + 1))
