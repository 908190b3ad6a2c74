#!/usr/bin/env python
"""Calibrate expensive presets of bundled models on a subset of healthy slices (issue 7, points 1 and 6).

    python benchmarks/bench_presets.py calibrate --id ddpm-t2-ema --methods thor,anoddpm,autoddpm --preset paper
        [--volumes 2] [--max-slices 12] [--tau-only] [--dry-run]

A paper preset of the DDPM family costs 4-17 CPU seconds per slice, so whole healthy volumes are out of reach
on a CPU: ``uad.calibration.calibrate(..., max_slices=N)`` runs the method on N slices per healthy phantom,
spread evenly over its brain slices (seeds 2,000,000+, 2 mm, as every bundled calibration), and the record says
how many slices and voxels it used (``n_slices``, ``n_voxels``, ``max_slices``).  ``--tau-only`` (AutoDDPM):
only the stage-1 mask threshold tau.  Each record is written into models/manifest.json (the entry's
``calibration``) as soon as it is measured, and the model card's threshold table is rewritten from it at the
end.  The paired paper-against-default comparison itself is ``uad benchmark --compare-presets`` (see the
README, "Benchmarks").
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "UADExtension"))
sys.path.insert(0, str(ROOT / "scripts"))


def calibrate_subset(a) -> int:
    from uad.calibration import calibrate, store
    from uad.zoo import load_model

    from train_bundled import update_card_thresholds, update_entry_in_place
    from uad.zoo import find_model, verify

    e = find_model(a.id)
    verify(e)
    model = load_model(e, device="cpu")
    for m in a.methods.split(","):
        t0 = time.time()
        c0 = time.process_time()
        preset, backend, rec = calibrate(model, m, a.preset, contrast=e.data.get("contrast"), n_volumes=a.volumes,
                                         spacing=2.0, device="cpu", max_slices=a.max_slices, tau_only=a.tau_only)
        rec["seconds"] = round(time.time() - t0, 1)
        rec["cpu_seconds"] = round(time.process_time() - c0, 1)
        if a.dry_run:
            print(f"{a.id}: {m}/{preset}/{backend}: {rec}")
            continue
        update_entry_in_place(a.id, lambda entry: store(entry, m, preset, backend, rec))
        what = (f"tau only, {rec.get('tau_n_pixels')} stage-1 pixels" if a.tau_only else
                f"{rec.get('n_slices')} slices, {rec['n_voxels']} voxels")
        print(f"stored {a.id}: {m}/{preset}/{backend} ({what}, {rec['cpu_seconds']:.0f} CPU s)", flush=True)
    card = ROOT / "models" / a.id / "README.md"
    if not a.dry_run and card.is_file():  # the card's threshold table follows the manifest, as calibrate_bundled's
        update_card_thresholds(dict(find_model(a.id).data), card)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("calibrate", help="calibrate a preset on a subset of healthy slices")
    c.add_argument("--id", required=True, help="bundled model id (models/manifest.json)")
    c.add_argument("--methods", required=True, help="comma-separated methods")
    c.add_argument("--preset", default="paper")
    c.add_argument("--volumes", type=int, default=2, help="healthy phantoms (default 2)")
    c.add_argument("--max-slices", type=int, default=12, help="slices per phantom (default 12)")
    c.add_argument("--tau-only", action="store_true", help="AutoDDPM: only the stage-1 tau")
    c.add_argument("--dry-run", action="store_true", help="print the records, write nothing")
    a = p.parse_args(argv)
    return calibrate_subset(a)


if __name__ == "__main__":
    sys.exit(main())
