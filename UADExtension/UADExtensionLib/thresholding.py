"""Live threshold: the anomaly segment re-made from the existing heatmap, no inference.

Three ways to give the threshold (``THRESHOLD_MODES``):

- ``"calibrated"``: the model's calibrated threshold for the method and preset (manifest
  ``threshold``), the one a run uses by default;
- ``"fpr"`` (healthy false-positive rate): the score that flags the given fraction of
  *healthy* brain voxels, read from the model's calibration on healthy volumes
  (manifest ``calibration[method]``: a ``quantiles`` table ``{"0.99": score, ...}``, or the
  single ``quantile`` / ``threshold`` pair the bundled models carry);
- ``"value"``: the score itself.

``rethreshold`` applies a threshold to a result's heatmap node: the same
``uad.postprocess.threshold_mask`` (with the method's connected-component filter) a run
uses, so ``process(threshold=t)`` and ``rethreshold(..., t)`` give the same segment.
"""

from __future__ import annotations

import math

import numpy as np

THRESHOLD_MODES = ("calibrated", "fpr", "value")
MODE_TITLES = {"calibrated": "calibrated (model)", "fpr": "healthy false-positive rate", "value": "value"}
ATTR_PREFIX = "UAD."


def _method_entry(table, method: str, preset: str | None):
    if isinstance(table, dict) and method in table:
        t = table[method]
        if isinstance(t, dict) and preset is not None and preset in t and not isinstance(t.get(preset), (int, float)):
            t = t[preset]
        return t
    return table


#: The healthy false-positive rate of "calibrated" (``uad.calibration.DEFAULT_FPR``, the engine's default).
DEFAULT_FPR_KEY = "0.01"


def calibration_record(entry: dict, method: str, preset: str | None, backend: str | None) -> dict | None:
    """The engine's per-preset, per-backend record (``calibration[method]["presets"][preset][backend]``,
    see ``uad.calibration``) of a run's method / preset / perceptual backend; None for older entries.
    Without a backend, the preset's only record (if it has exactly one)."""
    if backend is not None:
        from uad import calibration  # numpy only: no torch needed

        return calibration.calibration_record(entry or {}, method, preset, backend)
    cal = ((entry or {}).get("calibration") or {}).get(method) or {}
    presets = cal.get("presets") if isinstance(cal, dict) else None
    if not isinstance(presets, dict) or preset is None:
        return None
    by_backend = presets.get(preset)
    if not isinstance(by_backend, dict):
        return None
    recs = [r for r in by_backend.values() if isinstance(r, dict)]
    return recs[0] if len(recs) == 1 else None


def outdated(entry: dict, rec: dict) -> bool:
    """Whether a calibration record was measured on other weights or under another intensity normalisation or
    preprocessing profile than the entry's today (``uad.calibration.stale`` without a method, which needs no
    torch): the engine refuses such a record, and so does the live threshold (no fall-back to the entry's older
    ``threshold`` either)."""
    from uad import calibration  # numpy only: no torch needed

    return calibration.stale(entry or {}, rec)


def calibrated_threshold(entry: dict, method: str, preset: str | None = None,
                         backend: str | None = None) -> float | None:
    """The manifest entry's calibrated threshold for ``method`` / ``preset`` (None if it has none).

    Same rules as ``uad.pipeline.model_threshold``: one number, or a dict by method whose
    values are numbers or dicts by preset (with ``default``).
    """
    rec = calibration_record(entry, method, preset, backend)
    if rec is not None:
        if outdated(entry, rec):
            return None
        v = (rec.get("thresholds") or {}).get(DEFAULT_FPR_KEY)
        return float(v) if v is not None and math.isfinite(float(v)) else None
    from uad.calibration import legacy_threshold  # numpy only: no torch needed

    t = legacy_threshold(entry, method, preset)
    if t is None:
        return None
    t = float(t)
    return t if math.isfinite(t) else None


def healthy_quantiles(entry: dict, method: str, preset: str | None = None,
                      backend: str | None = None) -> list[tuple[float, float]]:
    """[(quantile, score), ...] sorted by quantile, from the entry's healthy calibration of ``method``
    (the run's preset / backend record where the entry has per-preset records)."""
    rec = calibration_record(entry, method, preset, backend)
    if rec is not None and outdated(entry, rec):
        return []
    if rec is not None:
        cal = {"quantiles": {1.0 - float(k): v for k, v in (rec.get("thresholds") or {}).items()}}
    else:
        cal = ((entry or {}).get("calibration") or {}).get(method) or {}
    pairs: list[tuple[float, float]] = []
    table = cal.get("quantiles")
    if isinstance(table, dict):
        pairs += [(float(q), float(v)) for q, v in table.items()]
    elif isinstance(table, (list, tuple)):
        pairs += [(float(q), float(v)) for q, v in table]
    if cal.get("quantile") is not None and cal.get("threshold") is not None:
        pairs.append((float(cal["quantile"]), float(cal["threshold"])))
    out: dict[float, float] = {}
    for q, v in pairs:
        if 0.0 < q < 1.0 and math.isfinite(v):
            out[q] = v
    return sorted(out.items())


def threshold_for_fpr(entry: dict, method: str, fpr: float, preset: str | None = None,
                      backend: str | None = None) -> float:
    """Score flagging a fraction ``fpr`` of healthy brain voxels (interpolated in the calibration table).

    Raises ``ValueError`` (one clear line) when the model has no healthy calibration, or when
    ``fpr`` lies outside the calibrated quantiles (no extrapolation).
    """
    fpr = float(fpr)
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"the healthy false-positive rate must be between 0 and 1, got {fpr:g}")
    table = healthy_quantiles(entry, method, preset, backend)
    if not table:
        raise ValueError(f"model {entry.get('id', '?')} has no healthy calibration for {method}; "
                         "give a threshold value instead")
    q = 1.0 - fpr
    qs = np.array([p[0] for p in table])
    vs = np.array([p[1] for p in table])
    if len(table) == 1 or q < qs[0] - 1e-12 or q > qs[-1] + 1e-12:
        if any(abs(q - a) <= 1e-9 for a in qs):
            return float(vs[int(np.argmin(np.abs(qs - q)))])
        rates = ", ".join(f"{100 * (1 - a):.4g} %" for a in qs)
        raise ValueError(f"model {entry.get('id', '?')} is calibrated for a healthy false-positive rate of "
                         f"{rates} only for {method}; {100 * fpr:.4g} % needs a calibration table")
    return float(np.interp(q, qs, vs))


def fpr_for_threshold(entry: dict, method: str, threshold: float, preset: str | None = None,
                      backend: str | None = None) -> float | None:
    """Inverse of ``threshold_for_fpr`` inside the table (None outside it or without a table of >= 2 rows)."""
    table = healthy_quantiles(entry, method, preset, backend)
    if len(table) < 2:
        if len(table) == 1 and abs(table[0][1] - float(threshold)) <= 1e-12 * max(1.0, abs(threshold)):
            return 1.0 - table[0][0]
        return None
    qs = np.array([p[0] for p in table])
    vs = np.array([p[1] for p in table])
    if not np.all(np.diff(vs) > 0) or not vs[0] <= threshold <= vs[-1]:
        return None
    return float(1.0 - np.interp(float(threshold), vs, qs))


def resolve_threshold(mode: str, value: float | None, entry: dict | None, method: str,
                      preset: str | None = None, backend: str | None = None) -> float:
    """The score threshold for a GUI mode: ``value`` is the rate for "fpr", the score for "value"."""
    if mode not in THRESHOLD_MODES:
        raise ValueError(f"unknown threshold mode {mode!r}; use one of {', '.join(THRESHOLD_MODES)}")
    if mode == "value":
        if value is None or not math.isfinite(float(value)):
            raise ValueError("give a threshold value")
        return float(value)
    if entry is None:
        raise ValueError("no model entry: the calibrated threshold is unknown")
    if mode == "calibrated":
        t = calibrated_threshold(entry, method, preset, backend)
        if t is None:
            raise ValueError(f"model {entry.get('id', '?')} has no calibrated threshold for {method}")
        return t
    return threshold_for_fpr(entry, method, float(value), preset, backend)


def display_lower(threshold: float) -> float:
    """Scores below this are transparent in the heatmap (as ``logic.heat_display_range``)."""
    return 0.5 * float(threshold) if threshold > 0 else 0.0


def rethreshold(logic, heatmapNode, threshold: float) -> int:
    """Make the result's segment ``heatmap > threshold`` (component filter as in the run); voxel count."""
    import slicer.util

    from uad.postprocess import threshold_mask

    scene = logic.scene
    if heatmapNode is None or heatmapNode.GetAttribute(ATTR_PREFIX + "role") != "anomaly":
        raise ValueError("not an anomaly heatmap made by this module")
    seg = scene.GetNodeByID(heatmapNode.GetAttribute(ATTR_PREFIX + "segmentationNodeID") or "")
    segmentId = heatmapNode.GetAttribute(ATTR_PREFIX + "segmentID") or ""
    if seg is None or seg.GetSegmentation().GetSegment(segmentId) is None:
        raise ValueError(f"the segmentation of heatmap {heatmapNode.GetName()!r} is gone; run the detection again")
    threshold = float(threshold)
    if not math.isfinite(threshold):
        raise ValueError("the threshold must be a finite number")
    min_size = int(heatmapNode.GetAttribute(ATTR_PREFIX + "minComponentSize") or 0)
    anomaly = np.asarray(slicer.util.arrayFromVolume(heatmapNode))
    mask = threshold_mask(anomaly, threshold, min_size)
    logic.importMaskIntoSegment(seg, segmentId, mask, heatmapNode)
    display = heatmapNode.GetDisplayNode()
    if display is not None:
        display.SetThreshold(display_lower(threshold), display.GetUpperThreshold())
    text = repr(threshold)
    for node in (heatmapNode, seg):
        node.SetAttribute(ATTR_PREFIX + "threshold", text)
        node.SetAttribute(ATTR_PREFIX + "thresholdSource", "live")
    return int(mask.sum())
