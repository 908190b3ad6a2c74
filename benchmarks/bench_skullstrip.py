"""Skull stripping and the skull-stripped detector on head phantoms.

For each contrast (T1, T2, FLAIR) and acquisition (1 mm isotropic and 4 mm
slices; axes flipped, or oblique by 15/10 degrees) a head phantom
(``make_phantom(head=True)``) is stripped by deepbet and by the registration
mask; the brain-mask Dice against the phantom's true brain mask, the seconds,
and the detector's verdict are printed as one CSV row each.

    python benchmarks/bench_skullstrip.py [--seeds 1] [--methods deepbet,registration] [--csv out.csv]

With ``--detect``: instead, ``uad.pipeline.detect`` (automatic skull-stripped detection,
N4, skull stripping; ``--method`` (default ``disyre``) with the bundled model of
each contrast in ``--contrasts``, preset ``--preset`` (default ``fast``)) on head
phantoms with a tumour (``--base-mm`` grid, default 2 mm) in each acquisition:
AP over the whole head, the intensity floor (AP of the image intensity within
the true brain mask), the ideal restorer's AP over the whole head (the residual |image - the same head without
its lesion and noise|, ``make_phantom(return_healthy=True)``: what a perfect pseudo-healthy restoration would
score; a restoration-based method cannot expect more), the fraction of non-brain head voxels flagged, the
brain-mask Dice, and the agreement in physical space with the phantom as generated
(acquisition ``axial``, run first): the correlation of the anomaly maps within the
true brain after resampling the acquisition's map onto the axial grid (linear).  A contrast without a bundled model for the method gets one
``missing`` row (and a failing case an ``error`` row) instead of stopping the run:

    python benchmarks/bench_skullstrip.py --detect --contrasts T1,T2,FLAIR --base-mm 2 [--deoblique]
        [--registration profile|none|auto|mni152]
"""

from __future__ import annotations

import argparse
import csv
import sys
import time

import numpy as np
import SimpleITK as sitk

ACQ = {
    "1mm_flipped": dict(spacing=(1.0, 1.0, 1.0), rotation_deg=(0.0, 0.0, 0.0), flip=(True, False, True)),
    "1mm_oblique": dict(spacing=(1.0, 1.0, 1.0), rotation_deg=(15.0, 0.0, 10.0), flip=(False, False, False)),
    "4mm_flipped": dict(spacing=(1.0, 1.0, 4.0), rotation_deg=(0.0, 0.0, 0.0), flip=(True, True, False)),
    "4mm_oblique": dict(spacing=(1.0, 1.0, 4.0), rotation_deg=(15.0, 0.0, 10.0), flip=(False, False, False)),
}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2.0 * (a & b).sum() / max(1, a.sum() + b.sum()))


def main(argv=None) -> int:
    from uad.phantoms import make_phantom, resample_phantom
    from uad.preprocess import detect_skull_stripped
    from uad.skullstrip import deepbet_mask, registration_mask

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--contrasts", default="T1,T2,FLAIR")
    ap.add_argument("--acq", default=",".join(ACQ))
    ap.add_argument("--methods", default="deepbet,registration")
    ap.add_argument("--csv", default=None)
    ap.add_argument("--detect", action="store_true")
    ap.add_argument("--base-mm", type=float, default=None)
    ap.add_argument("--method", default="disyre", help="--detect: the method (its bundled model per contrast)")
    ap.add_argument("--preset", default="fast", help="--detect: the method's preset")
    ap.add_argument("--deoblique", action="store_true",
                    help="--detect: preprocessing profile deoblique (oblique inputs resampled onto the LPS axes)")
    ap.add_argument("--registration", choices=("profile", "none", "auto", "mni152"), default="profile",
                    help="--detect: preprocessing profile registration (profile: the model's own; auto: MNI152 "
                         "registration for inputs that are not skull-stripped)")
    a = ap.parse_args(argv)
    if a.detect:
        return detect_part(a)
    rows = []
    w = csv.writer(sys.stdout)
    cols = ["seed", "contrast", "acquisition", "method", "dice", "seconds", "detected_stripped"]
    w.writerow(cols)
    for seed in range(a.seeds):
        for c in a.contrasts.split(","):
            base = make_phantom(100 + seed, c, "tumour", spacing=None, head=True)
            for acq in a.acq.split(","):
                ph = resample_phantom(base, **ACQ[acq])
                truth = sitk.GetArrayFromImage(ph.brain_mask) > 0
                arr = sitk.GetArrayFromImage(ph.image)
                stripped, _ = detect_skull_stripped(arr, ph.image.GetSpacing())
                for m in a.methods.split(","):
                    t0 = time.perf_counter()
                    mask = deepbet_mask(ph.image) if m == "deepbet" else registration_mask(ph.image)
                    row = [seed, c, acq, m, round(dice(mask, truth), 4), round(time.perf_counter() - t0, 1),
                           stripped]
                    w.writerow(row)
                    sys.stdout.flush()
                    rows.append(row)
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            cw = csv.writer(f)
            cw.writerow(cols)
            cw.writerows(rows)
    # summary: mean Dice per contrast and method
    print("\nmean Dice per contrast and method:")
    for c in a.contrasts.split(","):
        for m in a.methods.split(","):
            v = [r[4] for r in rows if r[1] == c and r[3] == m]
            print(f"  {c:6s} {m:13s} mean {np.mean(v):.4f}  min {np.min(v):.4f}  (n={len(v)})")
    return 0


def model_for(method: str, contrast: str):
    """The id of a bundled model (on disk) serving ``method`` for ``contrast``, or None."""
    from uad.zoo import list_models

    for e in list_models():
        if method in e.methods and (e.contrast or "").upper() == contrast.upper() and e.available:
            return e.id
    return None


def map_agreement(anomaly: sitk.Image, brain: sitk.Image, ref: sitk.Image, ref_brain: sitk.Image,
                  ref_map: np.ndarray) -> float:
    """Correlation of ``anomaly`` (resampled onto ``ref``'s grid, linear) with ``ref_map`` within both true brains."""
    on_ref = sitk.GetArrayFromImage(sitk.Resample(anomaly, ref, sitk.Transform(), sitk.sitkLinear, 0.0,
                                                  sitk.sitkFloat32))
    both = sitk.GetArrayFromImage(ref_brain) > 0
    both &= sitk.GetArrayFromImage(sitk.Resample(brain, ref_brain, sitk.Transform(), sitk.sitkNearestNeighbor)) > 0
    return float(np.corrcoef(on_ref[both], ref_map[both])[0, 1])


def detect_part(a) -> int:
    from uad.metrics import average_precision
    from uad.phantoms import make_phantom, resample_phantom
    from uad.pipeline import detect

    base_mm = a.base_mm or 2.0
    cols = ["seed", "contrast", "acquisition", "model", "ap_head", "intensity_floor", "ideal_restorer_ap",
            "non_brain_flagged",
            "brain_dice", "map_corr_vs_axial", "seconds", "status"]
    print(",".join(cols))
    rows = []

    def emit(row):
        rows.append(row)
        print(",".join(str(v) for v in row), flush=True)

    for c in [x.strip() for x in a.contrasts.split(",") if x.strip()]:
        model = model_for(a.method, c)
        if model is None:
            emit(["", c, "", "", "", "", "", "", "", "", "", f"missing: no bundled {a.method} model for {c}"])
            continue
        for seed in range(a.seeds):
            base = make_phantom(200 + seed, c, "tumour", spacing=base_mm, head=True, return_healthy=True)
            axial_map = None  # the anomaly map of the phantom as generated (the first row)
            for acq in ["axial"] + [x for x in a.acq.split(",") if x and x != "axial"]:
                if acq == "axial":
                    ph = base
                else:
                    kw = dict(ACQ[acq])
                    kw["spacing"] = tuple(max(base_mm, s) for s in kw["spacing"])
                    ph = resample_phantom(base, **kw)
                t0 = time.perf_counter()
                try:
                    prep = {"deoblique": True} if a.deoblique else {}
                    if a.registration != "profile":
                        prep["registration"] = None if a.registration == "none" else a.registration
                    kw = {"preprocessing": prep} if prep else {}
                    r = detect(ph.image, method=a.method, model=model, device="cpu", preset=a.preset, contrast=c, **kw)
                except Exception as e:  # noqa: BLE001 - reported as a row, the other cases go on
                    emit([seed, c, acq, model, "", "", "", "", "", "", round(time.perf_counter() - t0, 1),
                          "error: " + " ".join(str(e).split())[:160].replace(",", ";")])
                    continue
                sec = time.perf_counter() - t0
                b, h = sitk.GetArrayFromImage(ph.brain_mask) > 0, sitk.GetArrayFromImage(ph.head_mask) > 0
                les = sitk.GetArrayFromImage(ph.lesion_mask) > 0
                an, img = sitk.GetArrayFromImage(r.anomaly), sitk.GetArrayFromImage(ph.image)
                m = sitk.GetArrayFromImage(r.mask) > 0
                bm = sitk.GetArrayFromImage(r.brain_mask) > 0
                corr = ""
                if acq == "axial":
                    axial_map, corr = an, "1.0000"
                elif axial_map is not None:
                    corr = f"{map_agreement(r.anomaly, ph.brain_mask, base.image, base.brain_mask, axial_map):.4f}"
                res = np.abs(img.astype(np.float64) - sitk.GetArrayFromImage(ph.healthy))  # the ideal restorer's
                ideal = f"{average_precision(res[h], les[h]):.4f}"
                emit([seed, c, acq, model, f"{average_precision(an[h], les[h]):.4f}",
                      f"{average_precision(img[b], les[b]):.4f}", ideal, f"{m[h & ~b].mean():.4f}",
                      f"{dice(bm, b):.4f}", corr, f"{sec:.1f}", "ok"])
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            cw = csv.writer(f)
            cw.writerow(cols)
            cw.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
