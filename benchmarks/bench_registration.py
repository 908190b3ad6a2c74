"""The chain's affine registration to MNI152 computed at 1 mm or at 2 mm: agreement, time, memory.

For each contrast, a head phantom (seed 200, ``--base-mm`` grid) in four acquisitions of the same
physical head (as generated, oblique, 4 mm slices flipped, 4 mm slices oblique; the acquisitions of
``bench_skullstrip.py``) is registered by the preprocessing chain's ``Register`` step (the true brain
mask given, N4 off) with the transform computed on the template at 1 mm (levels 4 / 2 / 1 mm, the
former default) and at 2 mm (levels 4 / 2 mm, ``uad.registration.REGISTRATION_MM``).  The
acquisitions show the same head in the same physical space, so a correct registration gives each the
same transform: per setting it prints the displacement of the template's brain voxels between each
acquisition's transform and the one of the phantom as generated (mean / max mm), the displacement
between the 1 mm and the 2 mm transform of the same acquisition, and the seconds of the registration.
Then, in a fresh process per setting, the peak memory the registration adds (resident set, MB) for
the 2 mm T1 head, and whether the 2 mm transform is bit-identical with 1 and with 2 ITK threads.

    python benchmarks/bench_registration.py [--contrasts T1,T2,FLAIR] [--base-mm 2] [--csv out.csv] [--memory-only]

The memory is the resident peak above the resident set before the registration (Linux: the peak is
reset through ``/proc/self/clear_refs``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import SimpleITK as sitk

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "UADExtension"))

SETTINGS = {  # REGISTRATION_MM, AFFINE_DEFAULTS overrides
    "1mm": (1.0, {"iterations": (200, 100, 50), "shrink": (4, 2, 1), "smoothing_mm": (4.0, 2.0, 1.0)}),
    "2mm": (2.0, {"iterations": (200, 100), "shrink": (2, 1), "smoothing_mm": (4.0, 2.0)}),
}


def _use(setting: str) -> None:
    from uad import registration

    mm, over = SETTINGS[setting]
    registration.REGISTRATION_MM = mm
    registration.AFFINE_DEFAULTS.update(over)


def _register(image: sitk.Image, brain: sitk.Image):
    """The chain's Register step on ``image`` with its brain mask given; (affine transform, seconds)."""
    from uad.preprocess import preprocess

    t0 = time.perf_counter()
    st = preprocess(image, 64, brain_mask=brain, profile={"registration": "mni152"}, bias_correction=False)
    sec = time.perf_counter() - t0
    step = [s for s in st.steps if s.name == "register"][0]
    return step.transform, sec


def _brain_points(every: int = 40) -> np.ndarray:
    from uad.registration import mni152

    t1, brain = mni152(None)
    idx = np.argwhere(sitk.GetArrayFromImage(brain) > 0)[::every][:, ::-1]
    return np.array([t1.TransformContinuousIndexToPhysicalPoint([float(v) for v in p]) for p in idx])


def _moved(tx: sitk.Transform, pts: np.ndarray) -> np.ndarray:
    return np.array([tx.TransformPoint(tuple(float(v) for v in p)) for p in pts])


def child(a) -> int:
    """One registration in a fresh process: peak memory it adds, the transform's parameters."""
    if a.threads:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(a.threads))
    _use(a.setting)
    image, brain = sitk.ReadImage(a.image), sitk.ReadImage(a.brain)
    from uad.registration import mni152
    mni152(None), mni152(2.0)  # the templates (loaded once per process, cached) are not the registration's
    sys.path.insert(0, HERE)
    from bench_memory import peak_rss_bytes, reset_peak_rss, rss_bytes

    if not reset_peak_rss():
        raise SystemExit("bench_registration --memory-only needs Linux's /proc/self/clear_refs")
    base = rss_bytes()
    tx, sec = _register(image, brain)
    peak = peak_rss_bytes()
    print(json.dumps({"added_mb": round((peak - base) / 2.0 ** 20, 1), "seconds": round(sec, 1),
                      "params": list(tx.GetParameters()) + list(tx.GetFixedParameters())}))
    return 0


def _child(setting, image, brain, threads=None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--setting", setting, "--image", image,
           "--brain", brain] + (["--threads", str(threads)] if threads else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contrasts", default="T1,T2,FLAIR")
    ap.add_argument("--base-mm", type=float, default=2.0)
    ap.add_argument("--csv", default=None)
    ap.add_argument("--memory-only", action="store_true", help="only the memory and thread checks")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--setting", default="2mm", help=argparse.SUPPRESS)
    ap.add_argument("--image", help=argparse.SUPPRESS)
    ap.add_argument("--brain", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return child(a)
    sys.path.insert(0, HERE)
    from bench_skullstrip import ACQ

    from uad.phantoms import make_phantom, resample_phantom

    pts = None if a.memory_only else _brain_points()
    cols = ["contrast", "acquisition", "setting", "seconds", "vs_axial_mean_mm", "vs_axial_max_mm",
            "vs_1mm_mean_mm", "vs_1mm_max_mm"]
    print(",".join(cols), flush=True)
    rows = []
    for c in ([] if a.memory_only else [x.strip() for x in a.contrasts.split(",") if x.strip()]):
        base = make_phantom(200, c, "tumour", spacing=a.base_mm, head=True)
        acqs = {"axial": base}
        for k in ("1mm_oblique", "4mm_flipped", "4mm_oblique"):
            kw = dict(ACQ[k])
            kw["spacing"] = tuple(max(a.base_mm, s) for s in kw["spacing"])
            acqs[k.replace("1mm", f"{a.base_mm:g}mm")] = resample_phantom(base, **kw)
        moved = {}
        for setting in SETTINGS:
            _use(setting)
            for name, ph in acqs.items():
                tx, sec = _register(ph.image, ph.brain_mask)
                moved[setting, name] = _moved(tx, pts)
                d_ax = np.linalg.norm(moved[setting, name] - moved[setting, "axial"], axis=1)
                row = [c, name, setting, f"{sec:.1f}", f"{d_ax.mean():.3f}", f"{d_ax.max():.3f}", "", ""]
                if setting != "1mm":
                    d1 = np.linalg.norm(moved[setting, name] - moved["1mm", name], axis=1)
                    row[6:8] = [f"{d1.mean():.3f}", f"{d1.max():.3f}"]
                rows.append(row)
                print(",".join(row), flush=True)
        _use("2mm")
    if a.csv and rows:
        with open(a.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(cols)
            w.writerows(rows)
    # memory and thread independence, each in a fresh process
    ph = make_phantom(200, "T1", "tumour", spacing=a.base_mm, head=True)
    with tempfile.TemporaryDirectory() as tmp:
        im, br = os.path.join(tmp, "head.nii.gz"), os.path.join(tmp, "brain.nii.gz")
        sitk.WriteImage(ph.image, im)
        sitk.WriteImage(ph.brain_mask, br)
        for setting in SETTINGS:
            r = _child(setting, im, br)
            print(f"memory, T1 head {a.base_mm:g} mm, registration at {setting}: +{r['added_mb']} MB resident "
                  f"peak, {r['seconds']} s", flush=True)
        p1, p2 = _child("2mm", im, br, threads=1)["params"], _child("2mm", im, br, threads=2)["params"]
        print(f"2 mm transform with 1 and with 2 ITK threads: {'bit-identical' if p1 == p2 else 'DIFFERENT'} "
              f"(max parameter difference {max(abs(x - y) for x, y in zip(p1, p2)):.3g})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
