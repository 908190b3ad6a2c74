#!/usr/bin/env python
"""Every speed figure of issue 11 in one run (called by benchmarks/gpu.sh; runs on the CPU too).

    python benchmarks/gpu_bench.py --device cuda            # one GPU, < 10 min
    python benchmarks/gpu_bench.py --device cpu --quick     # the same code path on the CPU, a few minutes

Prints, for the bundled T2 models:

1. per method (default / fast preset): seconds for a healthy 160-slice volume
   (``--quick``: 12 slices), NFE per slice, pure network time (forward hooks,
   in-run) and overhead ratio, peak memory;
2. THOR, AutoDDPM, AnoDDPM, Wolleb: the batched pipeline against a plain
   per-slice loop (batch 1, float32) of the same method and model, seconds per
   slice and speed-up (the loop runs on a slab of ``--loop-slices`` slices);
3. bf16 (and on CUDA fp16) autocast: pooled AP on a T2 tumour phantom against
   float32, and its seconds;
4. channels-last and ``torch.compile`` (CUDA only, ``--compile``) for the
   fastest iterative method.

Everything it prints is measured in this run; nothing is read from files.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "UADExtension"))

from uad.benchmark import (NetworkTimer, PeakMemory, _clock, _copy_model, _hardware, _slab, _sync,  # noqa: E402
                           autocast_model,
                           model_for, prepare_model)
from uad.heldout import Geometry, acquire  # noqa: E402
from uad.metrics import pr_stats  # noqa: E402
from uad.methods import available_methods  # noqa: E402
from uad.phantoms import make_phantom  # noqa: E402
from uad.pipeline import detect, resolve_device  # noqa: E402

ITERATIVE = ("thor", "autoddpm", "anoddpm", "wolleb")
#: Phantom seeds of this benchmark: outside the held-out range (uad.heldout.HELDOUT_SEEDS) and the training,
#: calibration and evaluation ranges, so a benchmark volume is never a held-out case.
GPU_BENCH_SEED = 7_000_000


def volume_with_slices(n_slices: int, lesion: str = "none", seed: int = GPU_BENCH_SEED, contrast: str = "T2"):
    """A phantom acquired axially with slice spacing chosen so that the brain spans ``n_slices`` slices."""
    ph = make_phantom(seed, contrast=contrast, lesion=lesion, spacing=1.0)
    b = sitk.GetArrayViewFromImage(ph.brain_mask)
    zs = np.flatnonzero(b.any(axis=(1, 2)))
    extent = (zs[-1] - zs[0] + 1) * ph.image.GetSpacing()[2]
    geo = Geometry("axial", float(extent) / n_slices, 1.2, (0.0, 0.0), "LPS")
    img, brain, les = acquire(ph.image, ph.brain_mask, ph.lesion_mask, geo)
    return img, brain, les


def timed_detect(image, brain, method, model, preset, dev, batch_size, precision="float32", network=False):
    """(result, wall seconds, compute seconds, in-run network seconds, peak MB); compute and network time on
    the same clock (CUDA: wall; CPU: this process's CPU time, robust to other processes on the cores)."""
    if precision != "float32":
        model = autocast_model(_copy_model(model), precision)
    timer = NetworkTimer(model, dev) if network else None
    _sync(dev)
    t0, c0 = time.perf_counter(), _clock(dev)
    with PeakMemory(dev) as mem:
        if timer is not None:
            with timer:
                res = detect(image, method=method, model=model, device=dev, batch_size=batch_size, preset=preset,
                             brain_mask=brain, seed=0)
        else:
            res = detect(image, method=method, model=model, device=dev, batch_size=batch_size, preset=preset,
                         brain_mask=brain, seed=0)
        _sync(dev)
    secs, clock = time.perf_counter() - t0, _clock(dev) - c0
    return res, secs, clock, (timer.in_run_seconds if timer is not None else None), mem.peak_bytes / 2 ** 20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="12-slice volumes, 3-slice loop, no compile (CPU check)")
    ap.add_argument("--slices", type=int, default=None, help="slices of the timed volume (default 160; quick 12)")
    ap.add_argument("--loop-slices", type=int, default=None, help="slices of the per-slice loop (default 16; quick 3)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 160 on CUDA, 16 on the CPU")
    ap.add_argument("--methods", nargs="+", default=None)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (CUDA)")
    ap.add_argument("--json", default=None, help="write every figure to this file")
    args = ap.parse_args(argv)

    dev = resolve_device(args.device)
    n_slices = args.slices or (12 if args.quick else 160)
    n_loop = args.loop_slices or (3 if args.quick else 16)
    bs = args.batch_size or (160 if dev.type == "cuda" else 16)
    methods = args.methods or available_methods()
    print(f"python {platform.python_version()}, torch {torch.__version__}, device {dev} ({_hardware(dev)}), "
          f"batch {bs}", flush=True)
    t_all = time.time()
    img, brain, _ = volume_with_slices(n_slices)
    les_img, les_brain, les_mask = volume_with_slices(n_slices, lesion="tumour",
                                                      seed=GPU_BENCH_SEED + 1)
    y = sitk.GetArrayFromImage(les_mask) > 0
    bm = sitk.GetArrayFromImage(les_brain) > 0
    print(f"volumes: healthy {img.GetSize()}, tumour {les_img.GetSize()} "
          f"(prevalence {y[bm].mean():.4f}), built in {time.time() - t_all:.0f} s", flush=True)
    out = {"device": str(dev), "torch": torch.__version__, "slices": n_slices, "batch_size": bs, "methods": {}}

    for method in methods:
        entry = model_for(method, "T2")
        if entry is None:
            print(f"{method}: no bundled T2 model (missing)")
            out["methods"][method] = {"status": "missing"}
            continue
        model = prepare_model(entry, dev)
        slab_img, slab_brain = _slab(img, brain, 3)
        detect(slab_img, method=method, model=model, device=dev, batch_size=bs, brain_mask=slab_brain)  # warm-up
        res, secs, clock, net, peak = timed_detect(img, brain, method, model, None, dev, bs, network=True)
        n = int(res.info["slices"])
        row = {"preset": res.info["preset"], "slices": n, "nfe_per_slice": int(res.info["nfe_per_slice"]),
               "seconds_per_volume": secs, "compute_seconds": clock, "network_seconds": net,
               "overhead": clock / net if net else None, "peak_mb": peak,
               "seconds_per_160_slices": secs * 160.0 / max(n, 1)}
        clk = "wall" if dev.type == "cuda" else "CPU"
        print(f"{method:9s} {row['preset']:6s} {n} slices, {row['nfe_per_slice']} NFE/slice: {secs:7.2f} s/volume "
              f"wall (x160/{n}: {row['seconds_per_160_slices']:.2f} s); {clk} {clock:.2f} s of which network "
              f"{net:.2f} s: overhead x{row['overhead']:.2f}; peak {peak:.0f} MB", flush=True)
        if method in ITERATIVE:
            limg, lbrain = _slab(img, brain, n_loop)
            _, _, loop_secs, _, _ = timed_detect(limg, lbrain, method, model, None, dev, 1)
            n_l = int(np.count_nonzero(sitk.GetArrayViewFromImage(lbrain).any(axis=(1, 2))))
            row["loop_seconds_per_slice"] = loop_secs / max(n_l, 1)
            row["batched_seconds_per_slice"] = clock / max(n, 1)
            row["loop_speedup"] = row["loop_seconds_per_slice"] / row["batched_seconds_per_slice"]
            print(f"          per-slice loop (batch 1, float32, {n_l} slices): {row['loop_seconds_per_slice']:.3f} "
                  f"{clk} s/slice against batched {row['batched_seconds_per_slice']:.4f} s/slice: "
                  f"x{row['loop_speedup']:.1f}", flush=True)
        # reduced precision: AP change on the tumour phantom
        precs = ["float32", "bf16"] + (["fp16"] if dev.type == "cuda" else [])
        aps = {}
        for p in precs:
            r, s, _, _, _ = timed_detect(les_img, les_brain, method, model, None, dev, bs, precision=p)
            aps[p] = {"ap": pr_stats(sitk.GetArrayFromImage(r.anomaly), y, bm)["ap"], "seconds": s}
        row["precision"] = aps
        print("          " + ", ".join(f"{p}: AP {v['ap']:.4f} ({v['seconds']:.2f} s)" for p, v in aps.items())
              + "; change vs float32: " + ", ".join(f"{p} {v['ap'] - aps['float32']['ap']:+.4f}"
                                                    for p, v in aps.items() if p != "float32"), flush=True)
        out["methods"][method] = row

    # channels-last / torch.compile on the fastest iterative method
    for method in ("anoddpm",):
        entry = model_for(method, "T2")
        if entry is None:
            continue
        variants = [("channels-last", dict(channels_last=True))]
        if args.compile and dev.type == "cuda" and not args.quick:
            variants.append(("torch.compile", dict(compile_=True)))
        base = out["methods"].get(method, {}).get("seconds_per_volume")
        for name, kw in variants:
            try:
                model = prepare_model(entry, dev, **kw)
                slab_img, slab_brain = _slab(img, brain, 3)
                detect(slab_img, method=method, model=model, device=dev, batch_size=bs, brain_mask=slab_brain)
                _, secs, _, _, _ = timed_detect(img, brain, method, model, None, dev, bs)
                print(f"{method} {name}: {secs:.2f} s/volume (default layout {base:.2f} s)", flush=True)
                out.setdefault("variants", {})[f"{method} {name}"] = secs
            except Exception as e:  # noqa: BLE001 - report, keep the other figures
                print(f"{method} {name}: failed ({type(e).__name__}: {' '.join(str(e).split())[:200]})")
    out["wall_seconds"] = time.time() - t_all
    print(f"total {out['wall_seconds']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
