#!/usr/bin/env python
"""Which weights detect better: several models of one method on the same held-out lesion slabs.

    python benchmarks/slab_models.py --heldout /work/heldout --method wolleb \
        --models wolleb-t2-paired checkpoints/wolleb-t2-twins --contrast T2 --lesions stroke tumour --n 5

Each model (a model id, a training run folder or a .safetensors file with its ``.json`` entry beside it, as
``uad train --init`` takes them) runs the method with one preset (default: the method's default for that
model) on the K consecutive canonical slices with the most lesion voxels of the first N held-out volumes per
lesion type: the cells of ``uad benchmark --compare-presets`` (``uad.benchmark.run_slab_case``), with the
weights varying instead of the preset. Prints the AP over the brain voxels of each slab and the mean per
model and lesion type; ``-o FILE`` keeps every cell as JSON. A run's checkpoints are compared in minutes
instead of the hour a whole held-out benchmark takes; the held-out benchmark is still what a bundled model's
card reports.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "UADExtension"))


def load(spec: str, method: str):
    from uad.training import resolve_init
    from uad.zoo import build_model

    got = resolve_init(spec, method)
    if got["config"] is None:
        raise SystemExit(f"{spec}: no manifest entry beside the weights (give a model id or a run folder)")
    config = dict(got["config"], sha256=got["info"]["sha256"])
    name = spec if not Path(spec).exists() else f"{got['info']['model']}@{Path(spec).name}"
    return build_model(config, got["weights"], name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heldout", required=True, help="a 'uad heldout' folder")
    ap.add_argument("--method", required=True)
    ap.add_argument("--models", nargs="+", required=True)
    ap.add_argument("--preset", default="default")
    ap.add_argument("--params", default=None, help='JSON object of method parameters, e.g. \'{"steps": 20}\'')
    ap.add_argument("--contrast", default="T2")
    ap.add_argument("--lesions", nargs="+", default=["stroke", "tumour"])
    ap.add_argument("--n", type=int, default=5, help="held-out volumes per lesion type (the first N)")
    ap.add_argument("--slab", type=int, default=10, help="K slices per slab")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("-o", "--output", default=None)
    a = ap.parse_args(argv)

    import torch

    from uad.benchmark import run_slab_case
    from uad.heldout import load_heldout
    from uad.pipeline import method_class

    if a.threads:
        torch.set_num_threads(a.threads)
    rows = [r for r in load_heldout(Path(a.heldout), [a.contrast])]
    sel = [r for lt in a.lesions for r in [x for x in rows if x["lesion"] == lt][: a.n]]
    if not sel:
        raise SystemExit(f"no held-out {a.contrast} volumes of {a.lesions} in {a.heldout}")
    cls = method_class(a.method)
    params = json.loads(a.params) if a.params else None
    cells = []
    for spec in a.models:
        model = load(spec, a.method)
        preset = cls.default_preset_for(model) if a.preset == "default" else a.preset
        for r in sel:
            t0 = time.time()
            c = run_slab_case(r, a.method, model, preset, params, "cpu", a.slab, seed=a.seed)
            c["wall_seconds"] = round(time.time() - t0, 1)
            cells.append(c)
            print(f"{model.id:40s} {c['preset']:12s} {r['case']:30s} AP {c['ap']:.3f} (prevalence "
                  f"{c['prevalence']:.3f}) {c['wall_seconds']:.0f} s", flush=True)
            if a.output:
                Path(a.output).write_text(json.dumps(cells, indent=1) + "\n")
    print()
    print("| model | sha256 | " + " | ".join(f"{lt} AP (n)" for lt in a.lesions) + " |")
    print("|---|---|" + "---|" * len(a.lesions))
    for mid in dict.fromkeys(c["model"] for c in cells):
        mine = [c for c in cells if c["model"] == mid]
        vals = [[c["ap"] for c in mine if c["lesion"] == lt] for lt in a.lesions]
        print(f"| {mid} | {str(mine[0]['model_sha256'])[:12]} | "
              + " | ".join(f"{np.mean(v):.3f} ({len(v)})" if v else "-" for v in vals) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
