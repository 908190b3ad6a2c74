"""Voxel-level evaluation: average precision, AUROC, Dice, best Dice.

Every function takes numpy arrays or SimpleITK images of the same shape and an
optional ``mask`` (e.g. the brain) restricting the voxels considered.
Labels / masks are binarised with ``> 0``.
"""

from __future__ import annotations

import math

import numpy as np


def _array(x) -> np.ndarray:
    try:
        import SimpleITK as sitk

        if isinstance(x, sitk.Image):
            return sitk.GetArrayFromImage(x)
    except ImportError:  # pragma: no cover - SimpleITK is a dependency
        pass
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _select(scores, labels, mask=None) -> tuple[np.ndarray, np.ndarray]:
    s = _array(scores).astype(np.float64)
    y = _array(labels) > 0
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} have different shapes")
    if mask is not None:
        m = _array(mask) > 0
        if m.shape != s.shape:
            raise ValueError(f"mask {m.shape} and scores {s.shape} have different shapes")
        s, y = s[m], y[m]
    s, y = s.ravel(), y.ravel()
    if s.size and not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    return s, y


def average_precision(scores, labels, mask=None) -> float:
    """Average precision (area under the precision-recall curve, scikit-learn's step definition).

    NaN when there is no positive voxel.
    """
    from sklearn.metrics import average_precision_score

    s, y = _select(scores, labels, mask)
    if not y.any():
        return math.nan
    return float(average_precision_score(y, s))


def auroc(scores, labels, mask=None) -> float:
    """Area under the ROC curve; NaN when only one class is present."""
    from sklearn.metrics import roc_auc_score

    s, y = _select(scores, labels, mask)
    if y.all() or not y.any():
        return math.nan
    return float(roc_auc_score(y, s))


def dice(pred, target, mask=None) -> float:
    """Dice of two binary maps (``> 0``); 1.0 when both are empty."""
    p, t = _select(_array(pred) > 0, target, mask)
    p = p > 0
    denom = int(p.sum()) + int(t.sum())
    if denom == 0:
        return 1.0
    return 2.0 * int((p & t).sum()) / denom


def best_dice(scores, labels, mask=None, return_threshold: bool = False):
    """The largest Dice of ``scores >= thr`` against ``labels`` over every threshold.

    Exact: every distinct score value is tried (plus "predict nothing").  With
    ``return_threshold`` returns ``(dice, threshold)``; the threshold is the
    score value at which the best Dice is reached (predict ``scores >= threshold``;
    ``inf`` when predicting nothing is best).
    """
    s, y = _select(scores, labels, mask)
    n_pos = int(y.sum())
    if s.size == 0:
        return (1.0, math.inf) if return_threshold else 1.0
    order = np.argsort(-s, kind="mergesort")
    s_sorted = s[order]
    tp = np.cumsum(y[order])
    k = np.arange(1, s.size + 1)
    # the prediction "scores >= v" includes every tie of v: keep the last index of each run of equal values
    last = np.r_[s_sorted[1:] != s_sorted[:-1], True]
    tp, k, v = tp[last], k[last], s_sorted[last]
    d = 2.0 * tp / (k + n_pos)
    best = int(np.argmax(d))
    empty = 1.0 if n_pos == 0 else 0.0
    if empty >= d[best]:
        return (empty, math.inf) if return_threshold else empty
    return (float(d[best]), float(v[best])) if return_threshold else float(d[best])


def evaluate(scores, labels, mask=None) -> dict:
    """AP, AUROC and best Dice (with its threshold) in one dict."""
    bd, thr = best_dice(scores, labels, mask, return_threshold=True)
    return {"ap": average_precision(scores, labels, mask), "auroc": auroc(scores, labels, mask),
            "best_dice": bd, "best_dice_threshold": thr}
