"""The overview PNG: the most anomalous axial slices, four panels each.

Columns: input (brain mask used outlined in cyan), restoration, anomaly heat
map over the input, binary mask contour (red) over the input (and the brain
outline).  Rows: the ``n_slices`` axial slices (canonical LPS
order, see ``uad.preprocess``) with the largest in-brain anomaly sum.  Slices
are shown in the radiological convention (anterior up, patient's right on the
left) with their physical aspect ratio.  Uses matplotlib's Agg canvas directly,
so no global backend is changed (safe inside Slicer).
"""

from __future__ import annotations

import os

import numpy as np
import SimpleITK as sitk

from .preprocess import CANONICAL_ORIENTATION, orient_array, orientation_of


def _canonical(img: sitk.Image, permute, flip) -> np.ndarray:
    return orient_array(sitk.GetArrayFromImage(img), permute, flip)


def select_slices(anomaly: np.ndarray, n: int, brain: np.ndarray | None = None) -> list[int]:
    """Axial indices (canonical array axis 0) of the ``n`` slices with the largest anomaly sum, in order."""
    a = np.where(brain, anomaly, 0.0) if brain is not None else anomaly
    sums = a.reshape(a.shape[0], -1).sum(axis=1)
    n = max(1, min(int(n), a.shape[0]))
    top = np.argsort(-sums, kind="mergesort")[:n]
    return sorted(int(i) for i in top)


def write_overview(path: str | os.PathLike, image: sitk.Image, restoration: sitk.Image, anomaly: sitk.Image,
                   mask: sitk.Image, n_slices: int = 3, brain_mask: sitk.Image | None = None,
                   title: str | None = None, threshold: float | None = None) -> list[int]:
    """Write the overview PNG to ``path``; returns the axial slice indices shown (canonical order)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    permute, flip = orientation_of(image)
    img = _canonical(image, permute, flip).astype(np.float32)
    rest = _canonical(restoration, permute, flip).astype(np.float32)
    anom = _canonical(anomaly, permute, flip).astype(np.float32)
    msk = _canonical(mask, permute, flip) > 0
    brain = _canonical(brain_mask, permute, flip) > 0 if brain_mask is not None else None
    sp = np.array(image.GetSpacing())[list(permute)]  # canonical (i, j, k) spacing
    origin_z = np.asarray(sitk.DICOMOrient(_probe(image), CANONICAL_ORIENTATION).GetOrigin())[2]

    ks = select_slices(anom, n_slices, brain)
    ref = img[brain] if brain is not None and brain.any() else img[img > img.min()] if (img > img.min()).any() else img
    vmin, vmax = (float(v) for v in np.percentile(ref, [0.5, 99.5]))
    if vmax <= vmin:
        vmax = vmin + 1.0
    amax = float(anom[ks].max()) if anom[ks].size else 0.0
    if amax <= 0:
        amax = 1.0
    aspect = float(sp[1] / sp[0])  # rows are j, columns are i

    rows = len(ks)
    fig = Figure(figsize=(4 * 3.0, rows * 3.0 + (0.5 if title else 0.0)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 4, squeeze=False)
    for r, k in enumerate(ks):
        z = origin_z + k * sp[2]
        a_in, a_rest, a_an, a_m = img[k], rest[k], anom[k], msk[k]
        panels = axes[r]
        panels[0].imshow(a_in, cmap="gray", vmin=vmin, vmax=vmax, aspect=aspect, interpolation="nearest")
        panels[0].set_title(f"input, axial {k} (z={z:.1f} mm)", fontsize=8)
        panels[1].imshow(a_rest, cmap="gray", vmin=vmin, vmax=vmax, aspect=aspect, interpolation="nearest")
        panels[1].set_title(f"restoration, axial {k}", fontsize=8)
        panels[2].imshow(a_in, cmap="gray", vmin=vmin, vmax=vmax, aspect=aspect, interpolation="nearest")
        heat = np.ma.masked_where(a_an <= 0.05 * amax, a_an)
        him = panels[2].imshow(heat, cmap="inferno", vmin=0.0, vmax=amax, alpha=0.7, aspect=aspect,
                               interpolation="nearest")
        panels[2].set_title(f"anomaly, axial {k} (max {float(a_an.max()):.3g})", fontsize=8)
        fig.colorbar(him, ax=panels[2], fraction=0.046, pad=0.02)
        panels[3].imshow(a_in, cmap="gray", vmin=vmin, vmax=vmax, aspect=aspect, interpolation="nearest")
        if brain is not None and brain[k].any() and not brain[k].all():  # the brain mask used, in cyan
            for p in (panels[0], panels[3]):
                p.contour(brain[k].astype(np.float32), levels=[0.5], colors="cyan", linewidths=0.6)
        if a_m.any() and not a_m.all():
            panels[3].contour(a_m.astype(np.float32), levels=[0.5], colors="red", linewidths=1.0)
        thr_txt = f" > {threshold:.3g}" if threshold is not None else ""
        panels[3].set_title(f"mask{thr_txt}, axial {k} ({int(a_m.sum())} vox)", fontsize=8)
        for ax in panels:
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(os.fspath(path), format="png")
    return ks


def _probe(image: sitk.Image) -> sitk.Image:
    """A geometry-only copy of ``image`` (no voxel data) for DICOMOrient to compute the canonical origin."""
    probe = sitk.Image([int(s) for s in image.GetSize()], sitk.sitkUInt8)
    probe.CopyInformation(image)
    return probe


def overview_title(name: str, info: dict) -> str:
    """The overview's title: input, method (preset), model, seed, precision, perceptual backend and threshold source."""
    backend = info.get("perceptual_backend") or "none"
    src = str(info.get("threshold_source", "")).split(":")[0]
    thr = info.get("threshold")
    thr_txt = f"{thr:.3g}" if isinstance(thr, (int, float)) else "-"
    return (f"{name}: {info.get('method')} ({info.get('preset')}), model {info.get('model')}, seed {info.get('seed')}, "
            f"{info.get('precision') or 'fp32'}, perceptual {backend}, threshold {thr_txt} ({src})")
