"""Thresholds calibrated per method, preset and perceptual backend at a healthy false-positive rate.

A detection threshold only means something for the exact map it was measured
on: the method, its preset (AnoDDPM's paper map is a squared error, its fast
map an absolute one), the perceptual backend of THOR / AutoDDPM (real LPIPS or
the SSIM fallback give maps of other scales) and the false-positive rate wanted
on healthy brains.  Calibration runs the method on held-out *healthy* volumes
(phantoms of ``uad.phantoms`` by default), takes the in-brain anomaly values
after the method's post-processing, and stores the threshold that flags a
given fraction of healthy brain voxels, for a grid of rates (``FPR_GRID``).
The default rate is 1 % (``DEFAULT_FPR``; 5 % -- THOR's and AutoDDPM's own
calibration -- flags about 60 ml of a healthy brain); methods with a minimum
component size (pDDPM) are calibrated on the mask after that filter.

AutoDDPM's stage-1 mask threshold tau is calibrated the same way (its
README's intent: at most ``TAU_FPR`` = 5 % false-positive pixels on healthy
data) for the backend in use, before its final-map threshold.

Manifest structure (one model entry)::

    "calibration": {
      "<method>": {
        "presets": {
          "<preset>": {
            "<backend>": {                    # "lpips-squeeze", "ssim-fallback" or "none"
              "thresholds": {"0.01": 0.21, "0.05": 0.12, ...},   # healthy FPR -> threshold
              "tau": 0.08, "tau_fpr": 0.05,   # AutoDDPM only
              "n_volumes": 2, "n_voxels": 512000, "contrast": "T2", "spacing_mm": 2.0,
              "seeds": [2000000, 2000001], "geometry": "axial",   # "acquired" (+ "acquisitions"), None: given volumes
              "nfe_per_slice": 31, "sha256": "<weights>",
              "postprocess": {...}, "date": "2026-12-01"}}}}}

Old entries (``"calibration": {"<method>": {"threshold": x, "quantile": 0.95,
...}}`` and ``"threshold": {"<method>": x}`` or one number) are still read:
``lookup_threshold`` returns them only as a *legacy* threshold, with a
warning that their preset, backend and rate were not recorded.
"""

from __future__ import annotations

import datetime
import warnings
from typing import Iterable

import numpy as np

#: healthy false-positive rates stored by a calibration (fractions of healthy brain voxels)
FPR_GRID = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
DEFAULT_FPR = 0.01
TAU_FPR = 0.05  # AutoDDPM's stage-1 mask: "at most 5 % false positives" on healthy data (its README)
NO_BACKEND = "none"


def fpr_key(fpr: float) -> str:
    """The manifest key of a rate: 0.01 -> "0.01"."""
    f = float(fpr)
    if not 0 < f < 1:
        raise ValueError(f"the healthy false-positive rate must be in (0, 1), got {fpr}")
    return f"{f:g}"


def _new_format(cal) -> bool:
    return isinstance(cal, dict) and isinstance(cal.get("presets"), dict)


def calibration_record(config: dict, method: str, preset: str, backend: str) -> dict | None:
    """The stored record for (method, preset, backend), or None."""
    cal = config.get("calibration")
    cal = cal.get(method) if isinstance(cal, dict) else None
    if not _new_format(cal):
        return None
    per = cal["presets"].get(preset)
    rec = per.get(backend) if isinstance(per, dict) else None
    return rec if isinstance(rec, dict) else None


def method_version(method: str) -> int:
    """The method's ``calibration_version``: raised when a change of the method changes its maps."""
    try:
        from .methods import get_method_class

        return int(getattr(get_method_class(method), "calibration_version", 1))
    except (KeyError, ValueError, TypeError):
        return 1


def preset_values(method: str, preset: str, params: dict | None = None) -> dict | None:
    """``Method.preset_values`` of ``method`` / ``preset`` (``params`` on top; None for an unknown method)."""
    try:
        from .methods import get_method_class

        return get_method_class(method).preset_values(preset, params)
    except (KeyError, ValueError, TypeError):
        return None


def other_definition(record: dict, method: str | None, preset: str | None, params: dict | None = None) -> bool:
    """True when ``record`` (a calibration record, a benchmark result row or a preset-comparison cell) was
    measured under another definition of ``preset`` (+ ``params``) than the method's today (its
    ``preset_values``); records without them (older ones) count as current."""
    if method is None or preset is None or record.get("preset_values") is None:
        return False
    now = preset_values(method, preset, params)
    return now is not None and record["preset_values"] != now


def normalisation_of(config: dict | None) -> dict:
    """The intensity normalisation a model entry runs with (``uad.preprocess.normalisation_settings``: the
    defaults updated with the entry's ``normalisation``): what calibration records and benchmark rows record,
    since a threshold or an AP measured under one normalisation does not hold under another."""
    from .preprocess import normalisation_settings

    return normalisation_settings((config or {}).get("normalisation"))


def _recorded_otherwise(recorded, config: dict | None, of, key: str) -> bool:
    """True when ``recorded`` (a record's copy of the entry's ``key`` settings) differs from what ``of(config)``
    gives today; an unreadable record is not trusted; False when nothing was recorded (older records)."""
    if not isinstance(recorded, dict):
        return False
    try:
        was = of({key: recorded})
    except (TypeError, ValueError):
        return True
    return was != of(config)


def other_normalisation(recorded: dict | None, config: dict | None) -> bool:
    """True when ``recorded`` (the ``normalisation`` of a calibration record, the ``model_normalisation`` of a
    benchmark row or preset cell) differs from the one the entry ``config`` runs with today (its manifest
    ``normalisation`` was changed since, e.g. ``clip_max``); False when nothing was recorded (older records)."""
    return _recorded_otherwise(recorded, config, normalisation_of, "normalisation")


def preprocessing_of(config: dict | None) -> dict:
    """The preprocessing profile a model entry runs with (``uad.preprocess.profile_settings``: the defaults
    updated with the entry's ``preprocessing``): recorded beside the normalisation, since a map computed in
    template space (registration) is not the map of the scan's own grid."""
    from .preprocess import profile_settings

    return profile_settings((config or {}).get("preprocessing"))


def other_preprocessing(recorded: dict | None, config: dict | None) -> bool:
    """True when ``recorded`` (the ``preprocessing`` of a calibration record, the ``model_preprocessing`` of a
    benchmark row or preset cell) differs from the profile the entry ``config`` runs with today (e.g. its
    manifest ``preprocessing`` now registers skull-stripped inputs too); False when nothing was recorded
    (records from before stop 36, when no bundled entry had a profile of its own)."""
    return _recorded_otherwise(recorded, config, preprocessing_of, "preprocessing")


def other_weights(recorded, shipped) -> bool:
    """A measurement recorded with weights (sha256 ``recorded``) other than those a model ships now (``shipped``);
    False when either is unknown (records from before they recorded their weights).  Hex digests: compared
    without regard to case."""
    return bool(recorded and shipped and str(recorded).lower() != str(shipped).lower())


def other_model(record: dict, config: dict, prefix: str = "") -> str | None:
    """Why ``record`` (a calibration record, a benchmark result row, a preset-comparison cell) measured another
    model than the manifest entry ``config`` describes today: "other weights", "other intensity normalisation"
    or "other preprocessing profile"; None when it measured this one.  A field the record does not have (records
    from before it was recorded) passes its check.  ``prefix``: the record's field names are ``prefix +``
    ``sha256`` / ``normalisation`` / ``preprocessing`` ("" for calibration records, "model_" for rows and cells).
    The one place that says what makes a measurement another model's: a new fingerprint is added here."""
    if other_weights(record.get(prefix + "sha256"), config.get("sha256")):
        return "other weights"
    if other_normalisation(record.get(prefix + "normalisation"), config):
        return "other intensity normalisation"
    if other_preprocessing(record.get(prefix + "preprocessing"), config):
        return "other preprocessing profile"
    return None


def stale(config: dict, record: dict, method: str | None = None, preset: str | None = None) -> bool:
    """True when the record was measured on weights other than the entry's (both sha256 known), under
    another intensity normalisation or preprocessing profile than the entry's (where the record says which), by
    an older version of ``method`` than this one (records without a version count as version 1), or under
    another definition of ``preset``."""
    if other_model(record, config):
        return True
    if method is not None and int(record.get("method_version") or 1) < method_version(method):
        return True
    return other_definition(record, method, preset)


def available(config: dict, method: str) -> list[str]:
    """"preset/backend" pairs calibrated for ``method`` (new format)."""
    cal = (config.get("calibration") or {}).get(method)
    if not _new_format(cal):
        return []
    return [f"{p}/{b}" for p, per in cal["presets"].items() if isinstance(per, dict) for b in per]


def legacy_threshold(config: dict, method: str, preset: str | None = None):
    """The raw old-format ``threshold`` of a manifest entry for ``method`` / ``preset``, or None.

    ``threshold`` is one number, or a dict by method whose values are numbers or dicts by
    preset (``default`` when the preset has none).  The value is returned unconverted: the
    engine (``uad.pipeline.model_threshold``) refuses a bad one, the Slicer side's live
    threshold (``UADExtensionLib.thresholding.calibrated_threshold``) treats a non-finite one as none.
    """
    t = (config or {}).get("threshold")
    if isinstance(t, dict):
        t = t.get(method)
        if isinstance(t, dict):
            t = t.get(preset) if preset in t else t.get("default")
    return t


def _legacy(config: dict, method: str):
    """(value, quantile) of an old-format threshold for ``method``, or None."""
    cal = (config.get("calibration") or {}).get(method)
    q = None
    if isinstance(cal, dict) and "threshold" in cal and not _new_format(cal):
        q = cal.get("quantile")
    t = config.get("threshold")
    if isinstance(t, dict):
        t = t.get(method)
        if isinstance(t, dict):
            return None  # per-preset dicts: read by uad.pipeline.model_threshold
    if t is None:
        return None
    try:
        return float(t), q
    except (TypeError, ValueError):
        return None


def _norm_text(n) -> str:
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in n.items()) \
        if isinstance(n, dict) else str(n)


def _profile_diff(recorded, config) -> str:
    """"key was -> is" for the profile keys in which a record differs from the entry's profile."""
    now = preprocessing_of(config)
    rec = recorded if isinstance(recorded, dict) else {}
    diff = [f"{k} {rec.get(k)!r} -> {now[k]!r}" for k in now if k in rec and rec.get(k) != now[k]]
    return ", ".join(diff) or "unreadable record"


def lookup_threshold(config: dict, method: str, preset: str, backend: str,
                     fpr: float = DEFAULT_FPR) -> tuple[float | None, str, str | None]:
    """(threshold or None, source text, warning or None) for the map in use.

    Exact match (method, preset, backend, rate) -> the calibrated value.  A
    missing one gives None and a warning that says what is calibrated instead
    (the caller then falls back to an uncalibrated percentile); an old-format
    entry without any new record gives its legacy value with a warning.
    """
    key = fpr_key(fpr)
    rec = calibration_record(config, method, preset, backend)
    if rec is not None and other_normalisation(rec.get("normalisation"), config):
        return None, "", (f"the {method}/{preset}/{backend} calibration was measured under another intensity "
                          f"normalisation ({_norm_text(rec.get('normalisation'))}) than the model's "
                          f"({_norm_text(normalisation_of(config))}); recalibrate")
    if rec is not None and other_preprocessing(rec.get("preprocessing"), config):
        return None, "", (f"the {method}/{preset}/{backend} calibration was measured under another preprocessing "
                          f"profile ({_profile_diff(rec.get('preprocessing'), config)}); recalibrate")
    if rec is not None and stale(config, rec):
        return None, "", (f"the {method}/{preset}/{backend} calibration was measured on other weights (sha256 "
                          f"{str(rec.get('sha256'))[:12]}... vs {str(config.get('sha256'))[:12]}...); recalibrate")
    if rec is not None and stale(config, rec, method):
        return None, "", (f"the {method}/{preset}/{backend} calibration was measured with version "
                          f"{int(rec.get('method_version') or 1)} of {method}, whose maps differ from this "
                          f"version's ({method_version(method)}); recalibrate")
    if rec is not None and other_definition(rec, method, preset):
        return None, "", (f"the {method}/{preset}/{backend} calibration was measured under another definition "
                          f"of the {preset} preset ({rec.get('preset_values')}; now {preset_values(method, preset)}); "
                          f"recalibrate")
    if rec is not None:
        thr = (rec.get("thresholds") or {}).get(key)
        if thr is not None:
            n = rec.get("n_volumes")
            where = f"{n} healthy {rec.get('contrast', '')} volume(s)".replace("  ", " ") if n else "healthy volumes"
            if rec.get("spacing_mm"):
                where += f" at {rec['spacing_mm']:g} mm"
            elif rec.get("geometry") == "acquired":
                where += " acquired like clinical scans"
            return (float(thr), f"model: calibrated for {method}/{preset}/{backend} at {100 * float(fpr):g}% "
                                f"healthy FPR ({where})", None)
        have = ", ".join(sorted(rec.get("thresholds") or {}, key=float)) or "none"
        return None, "", (f"model has no {method}/{preset}/{backend} threshold at {100 * float(fpr):g}% healthy "
                          f"FPR (calibrated rates: {have})")
    others = available(config, method)
    if others:
        return None, "", (f"model has no calibration for {method}/{preset}/{backend} (calibrated: "
                          f"{', '.join(others)}); the threshold is NOT calibrated for this map")
    leg = _legacy(config, method)
    if leg is not None:
        value, q = leg
        rate = f"{100 * (1 - float(q)):g}% healthy FPR" if q is not None else "an unrecorded rate"
        return value, "model", (f"legacy calibration of the model for {method} (preset and perceptual backend "
                                f"not recorded, {rate}); recalibrate for {preset}/{backend}")
    return None, "", None


def lookup_tau(config: dict, preset: str, backend: str) -> float | None:
    """AutoDDPM's calibrated stage-1 threshold for (preset, backend), or None."""
    rec = calibration_record(config, "autoddpm", preset, backend)
    if rec is None or rec.get("tau") is None or stale(config, rec, "autoddpm", preset):
        return None
    return float(rec["tau"])


def store(entry: dict, method: str, preset: str, backend: str, record: dict) -> dict:
    """Put ``record`` into ``entry["calibration"]`` (converting an old-format method entry) and
    keep ``entry["threshold"][method][preset]`` (shown by ``uad models``) at the default rate."""
    cal = entry.setdefault("calibration", {})
    cur = cal.get(method)
    if not _new_format(cur):
        cur = {"presets": {}}
        cal[method] = cur
    cur["presets"].setdefault(preset, {})[backend] = record
    thr = entry.get("threshold")
    if not isinstance(thr, dict):
        thr = {}
    per = thr.get(method)
    if not isinstance(per, dict):
        per = {}
    value = (record.get("thresholds") or {}).get(fpr_key(DEFAULT_FPR))
    if value is not None:
        per[preset] = value
    thr[method] = per
    entry["threshold"] = thr
    return entry


def _fpr_after_components(anomalies: list[np.ndarray], brains: list[np.ndarray], thr: float,
                          min_size: int) -> float:
    from .postprocess import threshold_mask

    flagged = total = 0
    for a, b in zip(anomalies, brains):
        m = threshold_mask(a, thr, min_size).astype(bool)
        flagged += int((m & b).sum())
        total += int(b.sum())
    return flagged / max(total, 1)


def thresholds_at(anomalies: list[np.ndarray], brains: list[np.ndarray], fprs: Iterable[float] = FPR_GRID,
                  min_component_size: int = 0) -> dict[str, float]:
    """{rate: threshold} flagging ``rate`` of the healthy brain voxels.

    Without component filtering this is the (1 - rate) quantile of the pooled
    in-brain values.  With it (pDDPM removes components < 7 voxels after
    thresholding) the threshold is lowered by bisection until the fraction
    flagged *after* the filter is the rate.
    """
    vals = np.concatenate([a[b] for a, b in zip(anomalies, brains)]).astype(np.float64)
    out = {}
    for f in fprs:
        q = float(np.quantile(vals, 1.0 - float(f)))
        if int(min_component_size or 0) > 1:
            hi, rate = q, float(f)
            while True:  # a lower bound that flags at least the rate after the filter
                rate = min(1.0, 2.0 * rate)
                lo = float(np.quantile(vals, 1.0 - rate))
                if rate >= 1.0 or _fpr_after_components(anomalies, brains, lo, min_component_size) >= float(f):
                    break
            if _fpr_after_components(anomalies, brains, lo, min_component_size) >= float(f):
                for _ in range(16):
                    mid = 0.5 * (lo + hi)
                    if _fpr_after_components(anomalies, brains, mid, min_component_size) > float(f):
                        lo = mid
                    else:
                        hi = mid
                q = hi
        out[fpr_key(f)] = q
    return out


def healthy_volumes(contrast: str, n_volumes: int, seed: int, spacing: float):
    """(image, brain mask) of ``n_volumes`` healthy phantoms, seeds ``seed, seed+1, ...``."""
    from .phantoms import make_phantom

    for i in range(int(n_volumes)):
        ph = make_phantom(seed + i, contrast=contrast, lesion="none", spacing=spacing)
        yield ph.image, ph.brain_mask


#: First seed of the 2 mm axial healthy calibration phantoms (the calibration range is [2,000,000, 3,000,000)).
AXIAL_SEED = 2_000_000
#: First seed of the healthy phantoms acquired like clinical scans (``geometry="acquired"``): inside the
#: calibration range [2,000,000, 3,000,000), apart from the 2 mm axial ones that start at 2,000,000.
ACQUIRED_SEED = 2_100_000
GEOMETRIES = ("axial", "acquired")


def _check_not_heldout(seed: int, n_volumes: int) -> None:
    from .heldout import HELDOUT_SEEDS

    lo, hi = int(seed), int(seed) + max(int(n_volumes), 1)
    if lo < HELDOUT_SEEDS[1] and hi > HELDOUT_SEEDS[0]:
        raise ValueError(f"calibration seeds {lo}-{hi - 1} overlap the held-out range {HELDOUT_SEEDS}")


def acquired_specs(contrast: str, n_volumes: int, seed: int = ACQUIRED_SEED) -> list:
    """The ``uad.heldout.CaseSpec`` of ``n_volumes`` healthy calibration phantoms acquired like clinical scans.

    The geometries are the held-out set's (``uad.heldout``: 1.5-4 mm slices, axial, sagittal, coronal and
    oblique, LPS and RAS order), cycled with the index, their jitter drawn from the seed; the seeds are the
    calibration's (``seed, seed + 1, ...``), never the held-out set's.
    """
    from .heldout import CaseSpec, _geometry
    from .phantoms import _check_contrast

    c = _check_contrast(contrast)
    _check_not_heldout(seed, n_volumes)
    out = []
    for i in range(int(n_volumes)):
        s = int(seed) + i
        out.append(CaseSpec(f"calibration_{c}_healthy_{s}", c, "none", s, _geometry(s, i, False)))
    return out


def acquired_healthy_volumes(contrast: str, n_volumes: int, seed: int = ACQUIRED_SEED):
    """(image, brain mask) of the phantoms of ``acquired_specs``: 1 mm healthy phantoms resampled onto their
    acquisition (thick slices are the mean of 1 mm sub-slices; skull-stripped, as the held-out set)."""
    return _volumes_of(acquired_specs(contrast, n_volumes, seed))


def _volumes_of(specs):
    from .heldout import make_case

    for spec in specs:
        ph = make_case(spec)
        yield ph.image, ph.brain_mask


def subset_positions(n: int, max_slices: int | None) -> np.ndarray:
    """Positions of ``max_slices`` slices spread evenly over a stack of ``n`` (all of them when None or >= n)."""
    if max_slices is None or int(max_slices) >= n:
        return np.arange(n)
    if int(max_slices) < 1:
        raise ValueError(f"max_slices must be >= 1, got {max_slices}")
    return np.unique(np.round(np.linspace(0, n - 1, int(max_slices) + 2)[1:-1]).astype(int))


def autoddpm_stage1_values(model, preset: str, images, device="cpu", seed: int = 0,
                           batch_size: int = 16, params: dict | None = None,
                           max_slices: int | None = None) -> np.ndarray:
    """AutoDDPM's stage-1 combined mask M over the brain pixels of healthy volumes (pooled); ``max_slices``:
    only that many slices per volume, spread evenly over its brain slices (``subset_positions``)."""
    import torch

    from .methods import build_method
    from .preprocess import preprocess
    from .rng import BatchRNG

    meth = build_method("autoddpm", model, preset, **dict(params or {}, threshold=0.0))
    perceptual, _ = meth._perceptual(torch.device(device))
    vals = []
    for i, (img, brain) in enumerate(images):
        stack = preprocess(img, model.image_size, brain_mask=brain, normalisation=model.normalisation,
                           profile=preprocessing_of(model.config))  # the chain detect() runs, registration included
        pos = subset_positions(len(stack), max_slices)
        with torch.inference_mode():
            for b0 in range(0, len(pos), batch_size):
                sel = pos[b0:b0 + batch_size]
                x = torch.from_numpy(stack.slices[sel][:, None]).to(device)
                mk = torch.from_numpy(stack.masks[sel][:, None]).to(device)
                rng = BatchRNG.for_slices(int(seed) + i, stack.indices[sel].tolist(), device)
                rec = meth.reconstruct(x, rng)
                st = meth.masks(x, rec, mk, perceptual)
                vals.append(st["combined"][mk].float().cpu().numpy())
    return np.concatenate(vals) if vals else np.zeros(0, np.float32)


def calibrate(model, method: str, preset: str | None = None, contrast: str | None = None, n_volumes: int = 2,
              spacing: float = 2.0, fprs: Iterable[float] = FPR_GRID, seed: int | None = None, device="cpu",
              tau_fpr: float = TAU_FPR, volumes=None, log=print, params: dict | None = None,
              max_slices: int | None = None, tau_only: bool = False,
              geometry: str = "axial") -> tuple[str, str, dict]:
    """Calibrate ``method`` with ``preset`` (default: its default preset) on healthy volumes.

    ``volumes``: an iterable of (image, brain mask) pairs; default ``n_volumes``
    healthy phantoms of the model's contrast at ``spacing`` mm, seeds from
    ``seed`` (far from the training seeds).  Returns (preset, backend, record)
    for ``store``.  ``params`` override the preset (the record then says so: ``params``).

    ``max_slices``: only that many slices per volume, spread evenly over its brain slices (for presets that
    cost seconds per slice); the thresholds are then quantiles over the brain voxels of those slices, and the
    record says how many slices and voxels it used (``n_slices``, ``n_voxels``, ``max_slices``).
    ``tau_only`` (AutoDDPM): only the stage-1 tau (no final-map thresholds: ``thresholds`` is empty).
    ``geometry`` (without ``volumes``): ``axial``, phantoms at ``spacing`` mm on the template's axial grid (the
    training geometry); ``acquired``, phantoms acquired like clinical scans (``acquired_specs``: 1.5-4 mm
    slices in every orientation; ``seed`` defaults to ``ACQUIRED_SEED`` there, ``AXIAL_SEED`` otherwise), whose
    thresholds hold the rate on such scans on average -- the share a threshold flags varies with the
    acquisition (for ``disyre-t2-phantom`` 0.06-6 % of healthy brains at its 2 mm axial 1 % threshold,
    ``benchmarks/bench_calibration_geometry.py``).  The acquired geometries are the held-out set's own
    (on other seeds): held-out false-positive rates of a model calibrated so are no longer measured on
    geometry its threshold never saw.  The record says which (``geometry``: ``axial``, ``acquired`` or
    None for given ``volumes``; ``acquisitions``).
    """
    import SimpleITK as sitk

    from .methods import build_method
    from .pipeline import detect, resolve_device

    device = resolve_device(device)  # "auto" -> a torch.device: AutoDDPM's stage 1 and the slab forward need one
    contrast = contrast or model.config.get("contrast") or "T2"
    params = dict(params or {})
    record: dict = {"params": dict(params)} if params else {}
    meth = build_method(method, model, preset, **params)
    preset = meth.preset
    backend = meth.perceptual_backend()
    if geometry not in GEOMETRIES:
        raise ValueError(f"calibration geometry must be one of {GEOMETRIES}, got {geometry!r}")
    acquisitions = None
    if volumes is not None:
        vols = list(volumes)
    elif geometry == "acquired":
        seed = ACQUIRED_SEED if seed is None else int(seed)  # acquired_specs refuses held-out seeds
        specs = acquired_specs(contrast, n_volumes, seed)
        acquisitions = [sp.geometry.describe() for sp in specs]
        vols = list(_volumes_of(specs))
    else:
        seed = AXIAL_SEED if seed is None else int(seed)
        _check_not_heldout(seed, n_volumes)
        vols = list(healthy_volumes(contrast, n_volumes, seed, spacing))
    if method == "autoddpm" and params.get("threshold") is None:
        m_vals = autoddpm_stage1_values(model, preset, vols, device=device, params=params, max_slices=max_slices)
        tau = float(np.quantile(m_vals, 1.0 - float(tau_fpr)))
        params["threshold"] = tau
        record.update({"tau": tau, "tau_fpr": float(tau_fpr), "tau_n_pixels": int(m_vals.size)})
        log(f"  autoddpm/{preset}/{backend}: tau {tau:.4g} ({100 * tau_fpr:g}% of healthy stage-1 pixels)")
    anomalies, brains, n_slices = [], [], 0
    post, nfe = dict(getattr(meth, "postprocess", {}) or {}), int(meth.nfe_per_slice())
    for i, (img, brain) in enumerate([] if tau_only else vols):
        if max_slices is None:
            res = detect(img, method=method, model=model, device=device, seed=i, preset=preset, params=params,
                         brain_mask=brain, mask=False)
            anomalies.append(sitk.GetArrayFromImage(res.anomaly))
            brains.append(sitk.GetArrayFromImage(brain) > 0)
            n_slices += int(res.info.get("slices") or 0)
            post = res.info.get("postprocess") or {}
            nfe = res.info.get("nfe_per_slice")
        else:
            a, b, k = _subset_maps(img, brain, method, model, preset, params, device, i, max_slices)
            anomalies.append(a)
            brains.append(b)
            n_slices += k
    thr = thresholds_at(anomalies, brains, fprs, int(post.get("min_component_size") or 0)) if anomalies else {}
    if max_slices is not None:
        record["max_slices"] = int(max_slices)
    if max_slices is not None or not tau_only:
        record["n_slices"] = None if tau_only else n_slices  # tau only: no final map; tau_n_pixels says what tau used
    record.update({
        "thresholds": thr, "n_volumes": len(vols), "n_voxels": int(sum(b.sum() for b in brains)),
        "contrast": contrast,
        "spacing_mm": float(spacing) if volumes is None and geometry == "axial" else None,
        "geometry": None if volumes is not None else geometry,
        "seeds": [seed + i for i in range(len(vols))] if volumes is None else None,
        "nfe_per_slice": nfe, "postprocess": post, "sha256": model.config.get("sha256"),
        "normalisation": normalisation_of(model.config),
        "preprocessing": preprocessing_of(model.config),
        "method_version": method_version(method), "preset_values": preset_values(method, preset),
        "date": datetime.date.today().isoformat(),
    })
    if acquisitions is not None:
        record["acquisitions"] = acquisitions
    if thr:
        log(f"  {method}/{preset}/{backend}: threshold {thr[fpr_key(DEFAULT_FPR)]:.4g} at 1% healthy FPR, "
            f"{thr[fpr_key(0.05)] if fpr_key(0.05) in thr else float('nan'):.4g} at 5% ({len(vols)} volume(s)"
            + (f", {n_slices} slices" if max_slices is not None else "") + ")")
    return preset, backend, record


def _subset_maps(img, brain, method, model, preset, params, device, seed, max_slices):
    """The anomaly map of ``max_slices`` evenly spread brain slices of one healthy volume (the other slices are
    not computed) as (values' volume, brain mask restricted to those slices, slices computed); canonical order."""
    from .slab import SlabForward
    from .imageio import array_view
    from .pipeline import detect
    from .preprocess import canonical_view, orientation_of

    perm, flip = orientation_of(img)
    br = np.asarray(canonical_view(array_view(brain), perm, flip) > 0)
    kk = np.flatnonzero(br.any(axis=(1, 2)))
    ks = kk[subset_positions(len(kk), max_slices)]
    fwd = SlabForward(seed, ks.tolist(), device)
    res = detect(img, method=method, model=model, device=device, seed=seed, preset=preset, params=params,
                 brain_mask=brain, mask=False, forward=fwd)
    a = np.asarray(canonical_view(array_view(res.anomaly), perm, flip), dtype=np.float32)
    keep = np.zeros(br.shape[0], bool)
    keep[sorted(set(fwd.slices))] = True
    return a, br & keep[:, None, None], len(set(fwd.slices))


def warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)


__all__ = ["FPR_GRID", "DEFAULT_FPR", "TAU_FPR", "NO_BACKEND", "fpr_key", "calibration_record", "stale", "available",
           "normalisation_of", "other_normalisation", "preprocessing_of", "other_preprocessing", "other_weights",
           "other_model",
           "legacy_threshold", "lookup_threshold", "lookup_tau", "store",
           "thresholds_at", "healthy_volumes", "calibrate",
           "AXIAL_SEED", "ACQUIRED_SEED", "GEOMETRIES", "acquired_specs", "acquired_healthy_volumes",
           "autoddpm_stage1_values"]
