"""Evaluation on labelled cases: per-case and pooled AP / AUROC / best Dice, and the
intensity-threshold baseline every model must beat.

The field reports both pooled and per-volume numbers (see the evaluation notes
in docs); both are computed here, over brain voxels only (background excluded,
so a method gets no credit for the empty space around the head).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from .metrics import auroc, average_precision, best_dice


@dataclass
class Case:
    name: str
    image: sitk.Image
    lesion: sitk.Image
    brain_mask: sitk.Image
    lesion_type: str = ""


def _normalise(arr: np.ndarray, brain: np.ndarray, lower: float = 1.0, upper: float = 99.0) -> np.ndarray:
    lo, hi = np.percentile(arr[brain], [lower, upper])
    return np.clip((arr - lo) / max(hi - lo, 1e-6), 0, 1)


class IntensityBaseline:
    """Flag voxels whose (brain-normalised) intensity is rare in healthy brains.

    ``fit`` builds a histogram of normalised intensities over the brain voxels
    of healthy volumes; the score of a voxel is -log of the healthy density at
    its intensity.  Hyper- and hypo-intense lesions both score high where their
    intensity is uncommon in healthy tissue; a lesion as bright as CSF in T2
    does not — which is exactly why a learned model of healthy anatomy is needed.
    """

    def __init__(self, bins: int = 64):
        self.bins = bins
        self.log_density: np.ndarray | None = None

    def fit(self, images: list[sitk.Image], brain_masks: list[sitk.Image]) -> "IntensityBaseline":
        hist = np.zeros(self.bins)
        for img, bm in zip(images, brain_masks):
            a = sitk.GetArrayFromImage(img).astype(np.float32)
            b = sitk.GetArrayFromImage(bm) > 0
            v = _normalise(a, b)[b]
            hist += np.histogram(v, bins=self.bins, range=(0, 1))[0]
        p = (hist + 1.0) / (hist.sum() + self.bins)
        self.log_density = np.log(p)
        return self

    def score(self, image: sitk.Image, brain_mask: sitk.Image) -> sitk.Image:
        if self.log_density is None:
            raise RuntimeError("IntensityBaseline.fit must be called first")
        a = sitk.GetArrayFromImage(image).astype(np.float32)
        b = sitk.GetArrayFromImage(brain_mask) > 0
        idx = np.clip((_normalise(a, b) * self.bins).astype(int), 0, self.bins - 1)
        s = np.where(b, -self.log_density[idx], 0.0).astype(np.float32)
        out = sitk.GetImageFromArray(s)
        out.CopyInformation(image)
        return out


def score_case(anomaly: sitk.Image, case: Case) -> dict:
    a = sitk.GetArrayFromImage(anomaly)
    y = sitk.GetArrayFromImage(case.lesion) > 0
    b = sitk.GetArrayFromImage(case.brain_mask) > 0
    return {"case": case.name, "lesion_type": case.lesion_type, "ap": average_precision(a, y, mask=b),
            "auroc": auroc(a, y, mask=b), "best_dice": best_dice(a, y, mask=b),
            "prevalence": float(y[b].mean())}


def pooled(anomalies: list[sitk.Image], cases: list[Case]) -> dict:
    """AP / best Dice over the brain voxels of all cases pooled (per-case maps scaled as they are)."""
    a = np.concatenate([sitk.GetArrayFromImage(x)[sitk.GetArrayFromImage(c.brain_mask) > 0] for x, c in zip(anomalies, cases)])
    y = np.concatenate([(sitk.GetArrayFromImage(c.lesion) > 0)[sitk.GetArrayFromImage(c.brain_mask) > 0] for c in cases])
    return {"ap": average_precision(a, y), "best_dice": best_dice(a, y), "prevalence": float(y.mean())}


def evaluate_method(cases: list[Case], method: str, model=None, preset: str | None = None, device: str = "auto",
                    seed: int = 0, params: dict | None = None) -> dict:
    """Run ``method`` on every case; per-case scores, their mean, pooled scores, seconds per volume."""
    from .pipeline import detect

    rows, maps, secs, nfe = [], [], [], None
    for c in cases:
        t0 = time.time()
        res = detect(c.image, method=method, model=model, device=device, seed=seed, preset=preset, params=params,
                     brain_mask=c.brain_mask)
        secs.append(time.time() - t0)
        nfe = res.info.get("nfe_per_slice")
        maps.append(res.anomaly)
        rows.append(score_case(res.anomaly, c))
    return {"method": method, "cases": rows, "mean_ap": float(np.mean([r["ap"] for r in rows])),
            "mean_best_dice": float(np.mean([r["best_dice"] for r in rows])), "pooled": pooled(maps, cases),
            "seconds_per_volume": float(np.mean(secs)), "nfe_per_slice": nfe}


def evaluate_baseline(cases: list[Case], baseline: IntensityBaseline) -> dict:
    maps = [baseline.score(c.image, c.brain_mask) for c in cases]
    rows = [score_case(m, c) for m, c in zip(maps, cases)]
    return {"method": "intensity-baseline", "cases": rows, "mean_ap": float(np.mean([r["ap"] for r in rows])),
            "mean_best_dice": float(np.mean([r["best_dice"] for r in rows])), "pooled": pooled(maps, cases)}


def phantom_cases(lesion_types=("tumour", "stroke", "ms"), n_per_type: int = 2, contrast: str = "T2",
                  seed: int = 3_000_000, spacing: float | None = 2.0) -> list[Case]:
    """A held-out labelled test set of phantoms (seeds far from training and calibration seeds)."""
    from .phantoms import make_phantom

    cases = []
    for li, lt in enumerate(lesion_types):
        for i in range(n_per_type):
            s = seed + 1000 * li + i
            ph = make_phantom(s, contrast=contrast, lesion=lt, spacing=spacing)
            cases.append(Case(f"{contrast}-{lt}-{s}", ph.image, ph.lesion_mask, ph.brain_mask, lt))
    return cases


def healthy_reference(contrast: str = "T2", n: int = 3, seed: int = 4_000_000, spacing: float | None = 2.0):
    from .phantoms import make_phantom

    phs = [make_phantom(seed + i, contrast=contrast, lesion="none", spacing=spacing) for i in range(n)]
    return [p.image for p in phs], [p.brain_mask for p in phs]
