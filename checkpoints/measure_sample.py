#!/usr/bin/env python
"""AP on the bundled sample (Resources/SampleData, T2 tumour phantom) of the DDPM-family methods.

    python checkpoints/measure_sample.py MODEL [--methods thor,anoddpm,autoddpm] [--preset fast] [--out FILE]

MODEL: a model id (bundled / $UAD_MODELS_DIR), a training run folder (its model.json + model.safetensors) or a
.safetensors file with its .json entry beside it (uad.training.resolve_init).
The whole sample volume is used, with its brain mask; AP over brain voxels, as in the bundled model cards
(scripts/train_bundled.py: evaluate_on_sample), with the preset named explicitly.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk


def load(spec: str, method: str):
    """A model id, a run folder or a .safetensors file with its .json entry (``uad.training.resolve_init``, as
    ``uad train --init`` and benchmarks/slab_models.py take them; a model id is verified against its sha256)."""
    from uad.training import resolve_init
    from uad.zoo import build_model

    got = resolve_init(spec, method)
    if got["config"] is None:
        raise SystemExit(f"{spec}: no manifest entry beside the weights (give a model id or a run folder)")
    config = dict(got["config"], sha256=got["info"]["sha256"])
    return build_model(config, got["weights"], config.get("id") or Path(spec).name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--methods", default="thor,anoddpm,autoddpm")
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--out")
    a = ap.parse_args(argv)

    from uad.imageio import read_image, sample_paths
    from uad.metrics import average_precision, best_dice
    from uad.pipeline import detect

    sp = sample_paths()
    img, bm = read_image(sp["image"]), read_image(sp["brain_mask"])
    lesion = sitk.GetArrayFromImage(read_image(sp["lesion"])) > 0
    brain = sitk.GetArrayFromImage(bm) > 0
    model = load(a.model, a.methods.split(",")[0])
    out = {"model": a.model, "preset": a.preset, "results": {}}
    for m in a.methods.split(","):
        t0 = time.time()
        res = detect(img, method=m, model=model, device="cpu", seed=0, preset=a.preset, brain_mask=bm)
        dt = time.time() - t0
        amap = sitk.GetArrayFromImage(res.anomaly)
        r = {"ap": float(average_precision(amap, lesion, mask=brain)),
             "best_dice": float(best_dice(amap, lesion, mask=brain)),
             "prevalence": float(lesion[brain].mean()), "seconds": round(dt, 1),
             "nfe_per_slice": res.info.get("nfe_per_slice"), "preset": res.info.get("preset"),
             "perceptual": res.info.get("perceptual") or (res.info.get("extras") or {}).get("perceptual")}
        out["results"][m] = r
        print(f"{a.model} {m} ({a.preset}): AP {r['ap']:.4f} (prevalence {r['prevalence']:.4f}), best Dice "
              f"{r['best_dice']:.3f}, {dt:.0f} s", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
