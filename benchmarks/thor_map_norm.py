#!/usr/bin/env python
"""THOR's anomaly map over whole volumes: its masks max-normalised per slice (the paper), raw, or per volume.

    python benchmarks/thor_map_norm.py --heldout /work/heldout --model ddpm-t2-simplex \
        --cases heldout_T2_tumour_9021000 heldout_T2_stroke_9022000 [--preset stochastic] [-o FILE]

THOR runs once per held-out volume with ``map_norm="none"`` (the saved masks are the raw ones; the
per-slice normalisation still forms the region map of the harmonization, so the chain is the same for all
three maps); the three final maps are then formed from the same masks: the harmonic mean over the saved
steps of the masks divided by their per-slice maximum (``slice``: what THOR's ``paper`` preset outputs), of
the raw masks (``raw``: the ``stochastic`` preset since stop 32), and of the masks divided by their maximum
over the whole volume at each step (``volume``: the compai-lab code normalised over the batch). Prints the
AP and best Dice over the brain voxels per case and map and their means per lesion type.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "UADExtension"))

MAPS = ("slice", "raw", "volume")


def harmonic(m: np.ndarray) -> np.ndarray:
    """Harmonic mean over axis 0: THOR's ``harmonic_mean`` (0 wherever one value is 0)."""
    import torch

    from uad.methods.thor import harmonic_mean

    return harmonic_mean(torch.from_numpy(m), 0).numpy()


def three_maps(masks: np.ndarray) -> dict:
    """(steps, slices, H, W) raw masks -> the slice / raw / volume maps (slices, H, W), clipped as THOR does."""
    per_slice = masks / (masks.max(axis=(2, 3), keepdims=True) + 1e-8)
    per_volume = masks / (masks.max(axis=(1, 2, 3), keepdims=True) + 1e-8)
    out = {"slice": harmonic(np.clip(per_slice, 0, 1)), "raw": harmonic(masks),
           "volume": harmonic(np.clip(per_volume, 0, 1))}
    return {k: np.clip(v, 0.0, 0.999).astype(np.float32) for k, v in out.items()}


def run_case(case: str, heldout: Path, model, preset: str, seed: int = 0) -> dict:
    import SimpleITK as sitk

    import uad.postprocess as post
    from uad.metrics import pr_stats
    from uad.pipeline import detect

    masks, slice_masks, captured = [], [], {}

    def forward(meth, x, mk, rng):
        out = meth(x, mk, rng)
        masks.append(out.extras["maps"][:, :, 0].double().cpu().numpy())  # (steps, B, H, W), raw
        slice_masks.append(mk[:, 0].cpu().numpy() > 0)
        return out

    to_volumes = post.to_volumes

    def keep_stack(stack, rest, anom):  # the slice stack, to bring the other maps back onto the input's grid
        captured["stack"], captured["rest"] = stack, rest
        return to_volumes(stack, rest, anom)

    image = sitk.ReadImage(str(heldout / f"{case}.nii.gz"))
    brain = sitk.ReadImage(str(heldout / f"{case}_brainmask.nii.gz"))
    t0 = time.time()
    post.to_volumes = keep_stack
    try:
        detect(image, method="thor", model=model, device="cpu", seed=seed, preset=preset,
               params={"map_norm": "none"}, brain_mask=brain, mask=False, skull_stripped=True, forward=forward)
    finally:
        post.to_volumes = to_volumes
    raw = np.concatenate(masks, axis=1)
    inside = np.concatenate(slice_masks, axis=0)
    b = sitk.GetArrayFromImage(brain) > 0
    lesion_file = heldout / f"{case}_lesion.nii.gz"
    lesion = (sitk.GetArrayFromImage(sitk.ReadImage(str(lesion_file))) > 0) & b if lesion_file.is_file() else None
    row = {"case": case, "seconds": round(time.time() - t0, 1)}
    for name, amap in three_maps(raw).items():
        _, vol = to_volumes(captured["stack"], captured["rest"], np.where(inside, amap, 0.0).astype(np.float32))
        a = sitk.GetArrayFromImage(vol).astype(np.float64)
        if lesion is None or not lesion.any():
            row[name] = {"p99_brain": float(np.percentile(a[b], 99))}
        else:
            st = pr_stats(a, lesion, b)
            row[name] = {"ap": float(st["ap"]), "best_dice": float(st["best_dice"])}
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--heldout", required=True, type=Path)
    ap.add_argument("--model", required=True, help="a model id serving thor")
    ap.add_argument("--cases", nargs="+", required=True, help="held-out case names (heldout.json)")
    ap.add_argument("--preset", default="stochastic")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--output", type=Path, default=None, help="JSON with every case")
    a = ap.parse_args(argv)
    from uad.zoo import find_model, load_model

    model = load_model(find_model(a.model))
    rows = []
    for case in a.cases:
        r = run_case(case, a.heldout, model, a.preset, a.seed)
        rows.append(r)
        print(case, " ".join(f"{k} AP {r[k]['ap']:.3f}" if "ap" in r[k] else f"{k} p99 {r[k]['p99_brain']:.4f}"
                              for k in MAPS), f"({r['seconds']:.0f} s)", flush=True)
    for lt in sorted({c.split("_")[2] for c in a.cases if len(c.split("_")) > 3}):
        sel = [r for r in rows if r["case"].split("_")[2] == lt and "ap" in r["slice"]]
        if sel:
            print(f"mean {lt} ({len(sel)}):", " ".join(f"{k} {np.mean([r[k]['ap'] for r in sel]):.3f}" for k in MAPS))
    if a.output:
        a.output.write_text(json.dumps({"model": a.model, "preset": a.preset, "cases": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
