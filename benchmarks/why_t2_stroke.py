#!/usr/bin/env python
"""Why the DDPM family misses T2 strokes (README, "Where the targets are missed, and why").

On the first held-out T2 stroke volume, THOR (default preset, ``ddpm-t2-ema``): the input and
|input - restoration| in the lesion, in non-lesion brain voxels as bright as the lesion (CSF), and in the
rest of the brain, relative to the brain's 99th percentile; the mean anomaly in each; the AP of the map and
of the intensity over the brain and within the bright voxels only.

    python benchmarks/why_t2_stroke.py [HELDOUT_DIR]   (default /work/heldout, made by ``uad heldout``)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "UADExtension"))


def main(argv=None) -> int:
    from uad.heldout import load_heldout
    from uad.metrics import average_precision
    from uad.pipeline import detect

    argv = sys.argv[1:] if argv is None else argv
    heldout = Path(argv[0] if argv else "/work/heldout")
    row = next(r for r in load_heldout(heldout, ["T2"]) if r["lesion"] == "stroke")
    img, bm = sitk.ReadImage(str(row["image"])), sitk.ReadImage(str(row["brain_mask"]))
    les = sitk.GetArrayFromImage(sitk.ReadImage(str(row["lesion_mask"]))) > 0
    brain = sitk.GetArrayFromImage(bm) > 0
    x = sitk.GetArrayFromImage(img).astype(np.float64)
    res = detect(img, method="thor", model="ddpm-t2-ema", device="cpu", brain_mask=bm, mask=False)
    rest = sitk.GetArrayFromImage(res.restoration).astype(np.float64)
    an = sitk.GetArrayFromImage(res.anomaly)
    p99 = np.percentile(x[brain], 99)
    bright = brain & ~les & (x >= np.percentile(x[les], 25))  # non-lesion voxels as bright as the lesion
    print(f"{row['case']}: lesion voxels {les.sum()}, bright non-lesion voxels {bright.sum()}")
    for name, m in (("lesion", les), ("bright non-lesion (CSF)", bright), ("rest of the brain", brain & ~les & ~bright)):
        print(f"{name:25s} input/p99 {x[m].mean() / p99:.3f}  |input - restoration|/p99 "
              f"{np.abs(x[m] - rest[m]).mean() / p99:.3f}  anomaly mean {an[m].mean():.4f}")
    sel = les | bright
    print(f"AP over the brain: map {average_precision(an[brain], les[brain]):.3f}, intensity "
          f"{average_precision(x[brain], les[brain]):.3f}; within the bright voxels: map "
          f"{average_precision(an[sel], les[sel]):.3f}, intensity {average_precision(x[sel], les[sel]):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
