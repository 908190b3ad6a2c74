"""The best method as default: guess the contrast of a scan, pick the best measured method for it.

``guess_contrast(image, brain_mask=None)``
    The documented rule, on the brain voxels (the given mask, or the automatic
    mask of skull-stripped input):

    1. three intensity classes by k-means on the in-brain intensities (1st-99th
       percentile, clipped);
    2. **CSF** is the smaller of the darkest and the brightest class (CSF is
       the least voluminous of CSF, grey and white matter);
    3. CSF bright -> **T2**;
    4. CSF dark: grey matter is the intensity mode of the tissue voxels (brighter
       than 0.6 x the brain median) 3-8 mm below the brain surface (the cortex),
       white matter the mode of those deeper than 15 mm.  GM / WM below
       ``GM_WM_SPLIT`` = 0.85 -> WM > GM -> **T1**; otherwise GM >= WM ->
       **FLAIR** (the split is below 1 because partial volume with the dark
       sulcal CSF lowers the cortical band: FLAIR phantoms measure 0.94-1.05,
       T1 phantoms 0.63-0.72).

    Returns ``ContrastGuess(contrast, confidence, reason)``; the confidence
    (0..1) is the smaller of the margins the rule relies on (relative volume
    difference of the two extreme classes; for CSF-dark scans also the
    distance of the GM/WM ratio from the split), each scaled to 1 at a clear
    margin (30 % and 0.08).  Below ``UNSURE`` a ``UserWarning``
    says so and suggests ``--contrast``.

``best_method(contrast, models=None)``
    For a contrast, the (method, model id, preset) whose bundled model
    measured the highest mean AP on the held-out set, read from the manifest's
    ``evaluation`` measurements (never hard-coded): each model entry's
    ``evaluation.heldout`` (per method: ``ap`` per lesion type or ``mean_ap``,
    ``preset``, ``n_per_type`` and the ``run``; written from ``uad benchmark``
    reports by ``scripts/update_cards.py --models``) if present, else its ``evaluation.phantoms.results``
    (per-lesion-type AP of the default presets).  The intensity baseline rows
    are skipped.  Raises ``ModelError`` when no model of that contrast has
    measurements.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from . import ModelError

CONTRASTS = ("T1", "T2", "FLAIR")
UNSURE = 0.35  # confidence below which the guess warns
_VOLUME_MARGIN = 0.3  # relative volume difference of the extreme classes that counts as clear
RIM_MM = (3.0, 8.0)  # tissue voxels this deep (mm from the brain surface) stand for cortical grey matter
DEEP_MM = 15.0  # and at least this deep for white matter
TISSUE_FRACTION = 0.6  # tissue = brighter than this fraction of the brain median (CSF-dark scans)
GM_WM_SPLIT = 0.85  # GM/WM mode ratio: below -> WM > GM (T1); above -> GM >= WM (FLAIR)
_RATIO_MARGIN = 0.08  # distance of the ratio from the split that counts as clear


@dataclass
class ContrastGuess:
    contrast: str
    confidence: float
    reason: str

    def __iter__(self):  # contrast, confidence, reason = guess_contrast(...)
        return iter((self.contrast, self.confidence, self.reason))


def _kmeans_1d(v: np.ndarray, k: int = 3, iters: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Sorted centres and labels (0 = darkest) of a 1-D k-means (quantile initialisation)."""
    centres = np.quantile(v, (np.arange(k) + 0.5) / k)
    labels = np.zeros(v.shape, int)
    for _ in range(iters):
        labels = np.abs(v[:, None] - centres[None, :]).argmin(1)
        new = np.array([v[labels == j].mean() if np.any(labels == j) else centres[j] for j in range(k)])
        if np.allclose(new, centres):
            break
        centres = new
    order = np.argsort(centres)
    remap = np.empty(k, int)
    remap[order] = np.arange(k)
    return centres[order], remap[labels]


def _mode(values: np.ndarray, lo: float, hi: float, bins: int = 80) -> float:
    """Histogram mode (Gaussian-smoothed, 80 bins over [lo, hi])."""
    from scipy import ndimage

    h, edges = np.histogram(values, bins=bins, range=(lo, hi))
    h = ndimage.gaussian_filter1d(h.astype(float), 2.0)
    i = int(h.argmax())
    return 0.5 * float(edges[i] + edges[i + 1])


def guess_contrast(image: sitk.Image, brain_mask: sitk.Image | None = None) -> ContrastGuess:
    """Guess T1 / T2 / FLAIR from the image (rule in the module doc)."""
    from scipy import ndimage

    from .preprocess import _mask_on_grid, compute_brain_mask

    arr = sitk.GetArrayFromImage(image).astype(np.float32)
    if arr.ndim != 3:
        raise ValueError("guess_contrast needs a 3-D scalar volume")
    brain = _mask_on_grid(brain_mask, image) if brain_mask is not None else compute_brain_mask(arr)
    brain = np.asarray(brain, bool)
    if brain.sum() < 1000:
        raise ValueError("guess_contrast: fewer than 1000 brain voxels; give a brain mask")
    sx, sy, sz = image.GetSpacing()
    depth = ndimage.distance_transform_edt(brain, sampling=(sz, sy, sx))
    v = arr[brain]
    lo, hi = np.percentile(v, [1, 99])
    v = np.clip(v, lo, hi)
    rs = np.random.default_rng(0)
    if v.size > 200_000:
        sel = rs.choice(v.size, 200_000, replace=False)
        v = v[sel]
    centres, labels = _kmeans_1d(v)
    n = np.bincount(labels, minlength=3).astype(float)
    vol_margin = abs(n[0] - n[2]) / max(n[0] + n[2], 1.0)
    csf = 0 if n[0] < n[2] else 2
    share = 100.0 * n / n.sum()
    if csf == 2:
        contrast = "T2"
        conf = min(1.0, vol_margin / _VOLUME_MARGIN)
        reason = (f"CSF bright: the brightest intensity class is the smaller extreme one "
                  f"({share[2]:.0f}% of brain voxels vs {share[0]:.0f}% for the darkest)")
    else:
        # grey vs white matter: the histogram mode of the cortical band (mostly GM) against the mode of
        # the deep tissue (mostly WM); modes, not means, so that lesions and partial volume hardly move them
        dfull = depth[brain]
        vfull = arr[brain]
        tissue = vfull > TISSUE_FRACTION * float(np.median(vfull))
        rim = tissue & (dfull > RIM_MM[0]) & (dfull <= RIM_MM[1])
        deep = tissue & (dfull >= DEEP_MM)
        if rim.sum() < 50 or deep.sum() < 50:
            raise ValueError("guess_contrast: the brain is too small or thin to tell grey from white matter")
        tlo, thi = np.percentile(vfull[tissue], [1, 99])
        i_gm, i_wm = _mode(vfull[rim], tlo, thi), _mode(vfull[deep], tlo, thi)
        ratio = i_gm / max(i_wm, 1e-12)
        conf = min(1.0, vol_margin / _VOLUME_MARGIN, abs(ratio - GM_WM_SPLIT) / _RATIO_MARGIN)
        base = (f"CSF dark: the darkest intensity class is the smaller extreme one ({share[0]:.0f}% of brain "
                f"voxels vs {share[2]:.0f}% for the brightest); cortical grey matter / deep white matter "
                f"intensity {ratio:.2f}")
        if ratio < GM_WM_SPLIT:
            contrast = "T1"
            reason = base + f" (< {GM_WM_SPLIT:g}): WM > GM"
        else:
            contrast = "FLAIR"
            reason = base + f" (>= {GM_WM_SPLIT:g}): GM >= WM"
    conf = float(max(0.0, conf))
    if conf < UNSURE:
        warnings.warn(f"the contrast guess ({contrast}) is unsure (confidence {conf:.2f}): {reason}; "
                      f"pass --contrast T1|T2|FLAIR", UserWarning, stacklevel=2)
    return ContrastGuess(contrast, conf, reason)


@dataclass
class MethodChoice:
    method: str
    model: str
    preset: str | None
    reason: str
    score: float

    def __iter__(self):  # method, model, preset, reason = best_method(...)
        return iter((self.method, self.model, self.preset, self.reason))


def resolve_contrast(given, image, path=None, brain_mask=None) -> tuple[str | None, str, str]:
    """A scan's contrast as ``uad detect`` resolves it (once per case, for the default method, the default
    model of a given method and the model-mismatch warning): (contrast or None, where it comes from, the
    text printed with the default method).  ``given`` (``--contrast``), else the image metadata / file
    name (``path``: a file or Slicer node name), else ``guess_contrast`` (with the brain mask when one is
    given; "unsure" when it warns).  When the guess fails: (None, "", its one-line reason)."""
    from .imageio import metadata_contrast

    if given:
        c = str(given).upper()
        return c, "--contrast", f"{c} (given)"
    c = metadata_contrast(image, path)
    if c:
        c = str(c).upper()
        return c, "metadata / file name", f"{c} (metadata / file name)"
    try:
        c, text = _guessed(image, brain_mask)
    except Exception as e:  # noqa: BLE001 - a guess that fails is no guess
        return None, "", " ".join(str(e).split())
    return c.upper(), "guessed from the intensities", text


def _guessed(image, brain_mask=None) -> tuple[str, str]:
    """(contrast, text) of ``guess_contrast``; the text says "unsure" when the guess warned."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g = guess_contrast(image, brain_mask)
    text = f"{g.contrast} (guessed, confidence {g.confidence:.2f}: {g.reason})"
    if caught:
        text += " -- warning: unsure, pass --contrast to override"
    return str(g.contrast), text


# How much a measurement counts when models are compared: the whole held-out set, then its quick subset (one
# volume per lesion type), then the 2-volume phantom measurements of the training script.
TIER_HELDOUT, TIER_QUICK, TIER_PHANTOMS = 2, 1, 0


def _measurements(entry) -> list[tuple[str, str | None, float, str, int]]:
    """(method, preset, mean AP, where, tier) measured for a manifest entry (tier: ``TIER_*``)."""
    data = entry.data if hasattr(entry, "data") else entry
    ev = data.get("evaluation") or {}
    out = []
    held = ev.get("heldout")
    if isinstance(held, dict) and held:
        n = held.get("n_per_type")
        for m, r in (held.get("results") or held).items():
            if not isinstance(r, dict) or m.startswith("intensity") or m not in (data.get("methods") or [m]):
                continue
            if "mean_ap" in r:
                ap = float(r["mean_ap"])
            else:
                aps = [float(v) for k, v in r.items() if k in ("tumour", "stroke", "ms") and v is not None]
                if not aps:
                    continue
                ap = float(np.mean(aps))
            k = r.get("n_per_type", n)
            run = r.get("run") if isinstance(r.get("run"), dict) else {}
            quick = run.get("subset") == "quick"
            sub = "quick subset of the held-out set" if quick else "held-out set"
            out.append((m, r.get("preset"), ap, f"{sub}{f' ({k} per lesion type)' if k else ''}"
                        + (f", {run['date_utc']}" if run.get("date_utc") else ""),
                        TIER_QUICK if quick else TIER_HELDOUT))
        if out:
            return out
    ph = ev.get("phantoms")
    if isinstance(ph, dict):
        n = ph.get("n_per_type")
        for m, r in (ph.get("results") or {}).items():
            if m.startswith("intensity") or m not in (data.get("methods") or [m]):
                continue
            aps = [float(r[k]) for k in ("tumour", "stroke", "ms") if isinstance(r.get(k), (int, float))]
            if aps:
                out.append((m, r.get("preset"), float(np.mean(aps)),
                            f"held-out phantoms{f' ({n} per lesion type)' if n else ''}", TIER_PHANTOMS))
    return out


def measured_rank(entry, method: str) -> tuple[int, float] | None:
    """(tier, best mean AP) measured for ``method`` with ``entry``, or None: the key that compares models.

    A model measured on the whole held-out set ranks above one measured only on its quick subset, and both
    above one measured only on the training script's phantoms, whatever the APs: different test sets give
    numbers that cannot be compared."""
    ranks = [(tier, ap) for m, _, ap, _, tier in _measurements(entry) if m == method]
    return max(ranks) if ranks else None


def best_method(contrast: str, models=None) -> MethodChoice:
    """The best measured (method, model, preset) for ``contrast`` (module doc)."""
    from .zoo import list_models

    c = str(contrast).upper()
    if c not in CONTRASTS:
        raise ValueError(f"unknown contrast {contrast!r}; choose one of {', '.join(CONTRASTS)}")
    entries = list(models) if models is not None else list_models()
    best = None
    for e in entries:
        data = e.data if hasattr(e, "data") else e
        if str(data.get("contrast") or "").upper() != c:
            continue
        if hasattr(e, "available") and not e.available:
            continue
        for method, preset, ap, where, tier in _measurements(e):
            if best is None or (tier, ap) > best[0]:
                best = ((tier, ap), method, preset, where, data.get("id"))
    if best is None:
        raise ModelError(f"no model for contrast {c} has held-out measurements in its manifest entry; "
                         f"give --method (and --model)")
    (_, ap), method, preset, where, mid = best
    reason = (f"best mean AP ({ap:.3f}, tumour/stroke/MS) of the {c} models on the {where}, "
              f"measured with model {mid}" + (f", preset {preset}" if preset else ""))
    return MethodChoice(method, mid, preset, reason, ap)


__all__ = ["CONTRASTS", "UNSURE", "ContrastGuess", "MethodChoice", "guess_contrast", "best_method",
           "measured_rank"]


def default_choice(image: sitk.Image | None = None, contrast: str | None = None, model: str | None = None,
                   brain_mask: sitk.Image | None = None) -> tuple[MethodChoice, str]:
    """What ``uad detect`` runs when no method is given: (choice, contrast text).

    The contrast is ``contrast`` or ``guess_contrast(image)``; the method the
    best measured for it (``best_method``; among ``model``'s methods when a
    model id is given).  Without any measurement for that contrast: the first
    installed model of that contrast (else the first installed model) and the
    first method it serves, said so in the reason.
    """
    from .zoo import find_model, list_models

    if contrast:
        c = str(contrast).upper()
        if c not in CONTRASTS:
            raise ValueError(f"unknown contrast {contrast!r}; choose one of {', '.join(CONTRASTS)}")
        ctext = f"{c} (given)"
    else:
        c, ctext = _guessed(image, brain_mask)
    entries = [find_model(model)] if model else list_models()
    try:
        return best_method(c, entries), ctext
    except ModelError:
        pass
    usable = [e for e in entries if model or e.available]
    same = [e for e in usable if str(e.data.get("contrast") or "").upper() == c]
    pick = (same or usable)
    if not pick or not pick[0].methods:
        raise ModelError(f"no installed model to run for contrast {c}; give --method and --model")
    e = pick[0]
    return (MethodChoice(e.methods[0], e.id, None,
                         f"no held-out measurements for {c} models; the first installed "
                         f"{'model of that contrast' if same else 'model'} ({e.id}) and the first method it "
                         f"serves", float("nan")), ctext)


__all__ += ["default_choice"]
