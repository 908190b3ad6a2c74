#!/usr/bin/env python
"""Does the field's map smoothing help a method against the intensity floor? (README, "Where the targets are
missed, and why")

The diffusion-UAD protocol of Behrendt et al. (pDDPM) smooths every map with a 3-D median filter (5 voxels)
inside the brain before scoring; THOR's, AnoDDPM's and AutoDDPM's papers score the raw map. This runs a method
(default preset, its default model) on held-out lesion volumes and prints the AP over the brain of its map and
of the intensity floor (``uad.evaluation.IntensityBaseline``, fitted on the same healthy reference phantoms as
``uad benchmark``), each raw and after the same median filter (``uad.evaluation.postprocess_volume``): a gain
the filter gives the method but also gives the floor is no gain against the floor.

    python benchmarks/smoothing_vs_floor.py --heldout /work/heldout --method anoddpm --contrast T2 \
        --lesion stroke --n 5 [--model ID] [--preset P] [--sizes 3 5] [--threads 1] [-o FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "UADExtension"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heldout", required=True, help="a 'uad heldout' folder")
    ap.add_argument("--method", required=True)
    ap.add_argument("--model", default=None, help="model id (default: the method's default for the contrast)")
    ap.add_argument("--preset", default=None, help="method preset (default: its default)")
    ap.add_argument("--params", default=None, help="method parameters as JSON (on top of the preset)")
    ap.add_argument("--contrast", default="T2")
    ap.add_argument("--lesion", default="stroke")
    ap.add_argument("--n", type=int, default=5, help="the first N held-out volumes of that lesion type")
    ap.add_argument("--sizes", type=int, nargs="+", default=[3, 5], help="median filter sizes (voxels)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("-o", "--output", default=None, help="write the rows as JSON")
    a = ap.parse_args(argv)

    import torch

    from uad.benchmark import _read_case
    from uad.evaluation import IntensityBaseline, healthy_reference, postprocess_volume
    from uad.heldout import load_heldout
    from uad.metrics import average_precision
    from uad.pipeline import detect
    from uad.zoo import find_model, load_model

    if a.threads:
        torch.set_num_threads(a.threads)
    rows = [r for r in load_heldout(a.heldout, [a.contrast]) if r["lesion"] == a.lesion][: a.n]
    if not rows:
        raise SystemExit(f"no held-out {a.contrast} {a.lesion} volumes in {a.heldout}")
    entry = find_model(a.model, method=a.method, contrast=a.contrast)
    model = load_model(entry, device="cpu")
    imgs, masks = healthy_reference(a.contrast, n=3, spacing=2.0)
    base = IntensityBaseline().fit(imgs, masks)
    out = []
    for r in rows:
        img, bm, les = _read_case(r)
        brain = sitk.GetArrayFromImage(bm) > 0
        lesion = sitk.GetArrayFromImage(les) > 0
        t0 = time.time()
        res = detect(img, method=a.method, model=model, device="cpu", seed=0, brain_mask=bm, preset=a.preset,
                     params=json.loads(a.params) if a.params else None)
        maps = {a.method: sitk.GetArrayFromImage(res.anomaly).astype(np.float32),
                "floor": sitk.GetArrayFromImage(base.score(img, bm)).astype(np.float32)}
        row = {"case": r["case"], "method": a.method, "model": entry.id, "preset": res.info.get("preset"),
               "seconds": round(time.time() - t0, 1)}
        for name, m in maps.items():
            row[f"{name}_raw"] = float(average_precision(m, lesion, mask=brain))
            for k in a.sizes:
                row[f"{name}_median{k}"] = float(average_precision(postprocess_volume(m, brain, median=k), lesion,
                                                                   mask=brain))
        out.append(row)
        print("  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    keys = [k for k in out[0] if k.endswith("_raw") or "_median" in k]
    print(f"mean over {len(out)} {a.contrast} {a.lesion} volume(s), {a.method} ({entry.id}):")
    for k in keys:
        print(f"  {k:24s} {np.mean([o[k] for o in out]):.3f}")
    if a.output:
        Path(a.output).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
