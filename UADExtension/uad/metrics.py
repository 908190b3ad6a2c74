"""Voxel-level evaluation: average precision, AUROC, Dice, best Dice.

Every function takes numpy arrays or SimpleITK images of the same shape and an
optional ``mask`` (e.g. the brain) restricting the voxels considered.
Labels / masks are binarised with ``> 0``.

``pr_stats`` computes AP, AUROC and the best Dice from one sort of the scores:
the precision-recall curve at every distinct score value gives scikit-learn's
step-wise AP (``sum_k (R_k - R_{k-1}) P_k``) and, in closed form, the best
Dice over all thresholds (Dice = F1 = ``2 TP / (TP + FP + P)``, the maximum over
the curve's points; no threshold loop).  ``threshold_at_fpr`` calibrates a
threshold on healthy scores (the fraction of healthy voxels above it is at most
the target rate).
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


def _flat(scores, labels=None, mask=None):
    """Scores (float32 kept as float32) and labels restricted to ``mask``, flattened."""
    s = _array(scores)
    if not np.issubdtype(s.dtype, np.floating) or s.dtype.itemsize < 4:
        s = s.astype(np.float64)
    y = None if labels is None else _array(labels) > 0
    if y is not None and s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} have different shapes")
    if mask is not None:
        m = _array(mask) > 0
        if m.shape != s.shape:
            raise ValueError(f"mask {m.shape} and scores {s.shape} have different shapes")
        s = s[m]
        y = None if y is None else y[m]
    s = s.ravel()
    if s.size and not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    return s, (None if y is None else y.ravel())


def pr_stats(scores, labels, mask=None) -> dict:
    """AP (step-wise, as scikit-learn), AUROC and best Dice with its threshold, from one sort.

    ``best_dice_threshold``: predict ``scores >= threshold`` to reach ``best_dice``
    (``inf``: predicting nothing is best).  AP and AUROC are NaN when undefined
    (no positive voxel; one class only).  Also returns ``n``, ``positives``.
    """
    s, y = _flat(scores, labels, mask)
    n, n_pos = int(s.size), int(y.sum()) if s.size else 0
    out = {"ap": math.nan, "auroc": math.nan, "best_dice": 1.0 if n_pos == 0 else 0.0,
           "best_dice_threshold": math.inf, "n": n, "positives": n_pos}
    if n == 0:
        return out
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    y_sorted = y[order]
    del order
    last = np.r_[s_sorted[1:] != s_sorted[:-1], True]  # last index of every run of tied scores
    tp = np.cumsum(y_sorted, dtype=np.int64)[last]
    k = np.flatnonzero(last) + 1
    fp = k - tp
    thr = s_sorted[last]
    del s_sorted, y_sorted
    if n_pos > 0:
        precision = tp / k
        recall = tp / n_pos
        out["ap"] = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
        d = 2.0 * tp / (k + n_pos)
        b = int(np.argmax(d))
        if d[b] > 0:
            out["best_dice"], out["best_dice_threshold"] = float(d[b]), float(thr[b])
        n_neg = n - n_pos
        if n_neg > 0:
            tpr = np.r_[0.0, tp / n_pos]
            fpr = np.r_[0.0, fp / n_neg]
            out["auroc"] = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))
    return out


def threshold_at_fpr(healthy_scores, fpr: float = 0.01, mask=None) -> float:
    """The smallest score threshold ``thr`` with ``mean(healthy > thr) <= fpr`` (healthy voxels in ``mask``).

    Predict ``scores > thr`` (as ``uad.postprocess.threshold_mask``).  ``fpr`` in [0, 1).
    """
    if not 0.0 <= float(fpr) < 1.0:
        raise ValueError(f"false-positive rate must be in [0, 1), got {fpr}")
    if isinstance(healthy_scores, (list, tuple)):
        parts = [_flat(h, None, None if mask is None else m)[0] for h, m in
                 zip(healthy_scores, mask if isinstance(mask, (list, tuple)) else [mask] * len(healthy_scores))]
        s = np.concatenate(parts) if parts else np.zeros(0)
    else:
        s = _flat(healthy_scores, None, mask)[0]
    if s.size == 0:
        raise ValueError("no healthy voxels to calibrate the threshold on")
    s = np.sort(s.astype(np.float64))
    allowed = int(math.floor(float(fpr) * s.size + 1e-9))  # voxels allowed above the threshold
    return float(s[s.size - 1 - allowed]) if allowed < s.size else float(s[0]) - 1.0


def dice_at(scores, labels, threshold: float, mask=None) -> float:
    """Dice of ``scores > threshold`` against ``labels`` (1.0 when both are empty)."""
    s, y = _flat(scores, labels, mask)
    p = s > float(threshold)
    denom = int(p.sum()) + int(y.sum())
    return 1.0 if denom == 0 else 2.0 * int((p & y).sum()) / denom
