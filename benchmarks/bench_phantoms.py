#!/usr/bin/env python
"""AP / best Dice of every method (with its default bundled model) on a held-out
phantom test set, next to the intensity-threshold baseline.

    python benchmarks/bench_phantoms.py --contrast T2 --n 2 --methods anoddpm thor disyre

Prints one table: per method and lesion type the mean per-volume AP (brain
voxels), the pooled AP, the best Dice, seconds per volume and network
evaluations per slice; the baseline flags voxels whose intensity is rare in
healthy brains (uad.evaluation.IntensityBaseline).  Test phantoms use seeds far
from the training and calibration seeds.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from uad.evaluation import IntensityBaseline, evaluate_baseline, evaluate_method, healthy_reference, phantom_cases
from uad.methods import available_methods


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contrast", default="T2")
    ap.add_argument("--lesions", nargs="+", default=["tumour", "stroke", "ms"])
    ap.add_argument("--n", type=int, default=2, help="volumes per lesion type")
    ap.add_argument("--methods", nargs="+", default=available_methods())
    ap.add_argument("--preset", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--spacing", type=float, default=2.0)
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)

    cases = phantom_cases(args.lesions, args.n, args.contrast, spacing=args.spacing)
    imgs, masks = healthy_reference(args.contrast, spacing=args.spacing)
    results = [evaluate_baseline(cases, IntensityBaseline().fit(imgs, masks))]
    for m in args.methods:
        try:
            results.append(evaluate_method(cases, m, preset=args.preset, device=args.device))
        except Exception as e:  # a method without a model for this contrast is reported, not fatal
            print(f"{m}: skipped ({e})", file=sys.stderr)

    print(f"\nHeld-out {args.contrast} phantoms, {args.n} per lesion type, {args.spacing} mm; AP over brain voxels")
    header = f"{'method':20s}" + "".join(f"{lt + ' AP':>12s}" for lt in args.lesions) + \
        f"{'mean AP':>10s}{'pooled AP':>11s}{'best Dice':>11s}{'s/vol':>8s}{'NFE/slice':>10s}"
    print(header)
    print("-" * len(header))
    for r in results:
        per = {lt: np.mean([c["ap"] for c in r["cases"] if c["lesion_type"] == lt]) for lt in args.lesions}
        print(f"{r['method']:20s}" + "".join(f"{per[lt]:12.3f}" for lt in args.lesions) +
              f"{r['mean_ap']:10.3f}{r['pooled']['ap']:11.3f}{r['mean_best_dice']:11.3f}"
              f"{r.get('seconds_per_volume', 0):8.1f}{str(r.get('nfe_per_slice', '-')):>10s}")
    prev = {lt: np.mean([c["prevalence"] for c in results[0]["cases"] if c["lesion_type"] == lt]) for lt in args.lesions}
    print(f"{'(lesion prevalence)':20s}" + "".join(f"{prev[lt]:12.3f}" for lt in args.lesions))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=float)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
