#!/usr/bin/env python
"""How a model's calibrated 1 % threshold holds on healthy scans acquired like clinical ones.

A bundled model's threshold is calibrated on healthy phantoms at 2 mm on the template's axial grid (its
training geometry).  This script runs the method on ``--n`` healthy phantoms acquired like clinical scans
(``uad.calibration.acquired_specs``: the held-out set's geometries -- 1.5-4 mm slices, axial, sagittal,
coronal, oblique -- on calibration seeds, never the held-out ones) and, when ``--heldout`` is given, on the
held-out set's healthy volumes of the contrast, and prints per volume the share of brain voxels above the
stored threshold (after the method's component filter, as ``detect``'s mask), then the mean per volume and
pooled, and the threshold that a calibration on the acquired volumes would store (as
``uad.calibration.calibrate(..., geometry="acquired")`` computes it).  A model without a calibrated
threshold for the method and preset is refused.

    python benchmarks/bench_calibration_geometry.py --model disyre-t2-phantom [--method disyre] [--preset paper]
        [--n 10] [--heldout /work/heldout] [--csv out.csv]
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "UADExtension"))


def main(argv=None) -> int:
    from uad.calibration import DEFAULT_FPR, acquired_specs, thresholds_at
    from uad.heldout import load_heldout, make_case
    from uad.imageio import read_image
    from uad.pipeline import detect
    from uad.postprocess import threshold_mask
    from uad.zoo import load_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--method", default="disyre")
    ap.add_argument("--preset", default=None, help="default: the method's default preset")
    ap.add_argument("--n", type=int, default=10, help="acquired healthy phantoms")
    ap.add_argument("--heldout", default=None, help="also the healthy volumes of this held-out folder")
    ap.add_argument("--csv", default=None)
    a = ap.parse_args(argv)
    model = load_model(a.model)
    contrast = model.config.get("contrast") or "T2"

    def run(img, brain, seed):
        r = detect(img, method=a.method, model=model, device="cpu", seed=seed, preset=a.preset, brain_mask=brain)
        b = sitk.GetArrayFromImage(brain) > 0
        return sitk.GetArrayFromImage(r.anomaly), b, r.info

    def cases():  # one volume in memory at a time
        for sp in acquired_specs(contrast, a.n):
            ph = make_case(sp)
            yield "acquired", sp.case, sp.geometry.describe(), ph.image, ph.brain_mask
        for r in load_heldout(a.heldout, [contrast]) if a.heldout else []:
            if r["lesion"] == "none":
                img = read_image(r["image"])
                desc = f"{r['orientation']} {' x '.join(f'{float(s):.2f}' for s in img.GetSpacing())} mm"
                yield "held-out", r["case"], desc, img, read_image(r["brain_mask"])

    rows, maps, brains, thr, info, min_size = [], [], [], None, {}, 0
    print("set,case,geometry,brain_voxels,flagged_percent")
    for i, (kind, case, desc, img, brain) in enumerate(cases()):
        an, b, info = run(img, brain, i)
        if not str(info.get("threshold_source", "")).startswith("model:"):
            raise SystemExit(f"{a.model} has no calibrated {a.method}/{info.get('preset')} threshold "
                             f"({info.get('threshold_source')}): nothing to measure")
        thr, min_size = info["threshold"], int((info.get("postprocess") or {}).get("min_component_size") or 0)
        fp = float(threshold_mask(an, thr, min_size).astype(bool)[b].mean())  # as detect's mask flags
        if kind == "acquired":
            maps.append(an)
            brains.append(b)
        rows.append([kind, case, desc, int(b.sum()), round(100 * fp, 3)])
        print(",".join(str(v) for v in rows[-1]), flush=True)
    if not rows:
        raise SystemExit("no volumes (--n 0 and no --heldout)")
    print(f"\n{a.method}/{info.get('preset')} with {a.model}: stored threshold {thr:.4g} "
          f"({info.get('threshold_source')})")
    for kind in ("acquired", "held-out"):
        fr = [r for r in rows if r[0] == kind]
        if fr:
            pooled = sum(r[3] * r[4] for r in fr) / sum(r[3] for r in fr)
            print(f"  {kind:9s} {len(fr):2d} volumes: flagged {np.mean([r[4] for r in fr]):.2f} % mean per volume "
                  f"(min {min(r[4] for r in fr):.2f}, max {max(r[4] for r in fr):.2f}), {pooled:.2f} % pooled")
    if maps:
        q = thresholds_at(maps, brains, [DEFAULT_FPR], min_size)[f"{DEFAULT_FPR:g}"]
        print(f"  a calibration on the {len(maps)} acquired volumes would store {q:.4g} at 1 % (pooled)")
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["set", "case", "geometry", "brain_voxels", "flagged_percent"])
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
