"""Why DISYRE stays below the intensity floor on some FLAIR head phantoms (issue 8).

For each seed, a FLAIR head phantom with a tumour (2 mm, as generated) goes through ``detect`` twice:
with the bundled DISYRE FLAIR model (the default), and with a stand-in method that returns its
input slice as the anomaly map (the image's own intensity carried through the same chain:
registration, N4, normalisation, the model's 64-pixel slices and back).  Printed per seed: the
intensity floor the issue asks for (the raw image within the true brain mask), the stand-in's AP
over the head, DISYRE's AP over the head, and where DISYRE's errors lie at the threshold that flags
as many voxels as the lesion has: the distance of its false positives to the lesion and the depth
of its missed voxels inside it (voxels; 10th / 50th / 90th percentile).

    python benchmarks/why_flair_head.py [--seeds 200,201,202]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "UADExtension"))


def main(argv=None) -> int:
    from scipy import ndimage

    from uad.methods.base import MethodOutput
    from uad.metrics import average_precision
    from uad.phantoms import make_phantom
    from uad.pipeline import detect

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="200,201,202")
    a = ap.parse_args(argv)

    def arr(img):
        return sitk.GetArrayFromImage(img)

    def identity(method, x, mask, rng):  # the input slice as the map
        return MethodOutput(restoration=x, anomaly=x * mask, nfe=0)

    for seed in [int(s) for s in a.seeds.split(",") if s.strip()]:
        ph = make_phantom(seed, "FLAIR", "tumour", spacing=2.0, head=True)
        head, brain, les = arr(ph.head_mask) > 0, arr(ph.brain_mask) > 0, arr(ph.lesion_mask) > 0
        floor = average_precision(arr(ph.image)[brain], les[brain])
        kw = dict(method="disyre", model="disyre-flair-phantom", device="cpu", contrast="FLAIR")
        stand_in = arr(detect(ph.image, forward=identity, mask=False, **kw).anomaly)
        m = arr(detect(ph.image, mask=False, **kw).anomaly)
        thr = np.sort(m[head])[::-1][int(les.sum()) - 1]
        fp, fn = (m >= thr) & head & ~les, les & (m < thr)
        dist, depth = ndimage.distance_transform_edt(~les), ndimage.distance_transform_edt(les)

        def pct(v):
            return " / ".join(f"{x:.2f}" for x in np.percentile(v, [10, 50, 90])) if v.size else "-"

        print(f"seed {seed}: lesion {int(les.sum())} voxels; floor (raw intensity, true brain) {floor:.4f}; "
              f"intensity through the chain {average_precision(stand_in[head], les[head]):.4f}; "
              f"DISYRE {average_precision(m[head], les[head]):.4f}; at the lesion's prevalence: "
              f"{int(fp.sum())} false positives at {pct(dist[fp])} voxels from the lesion, "
              f"{int(fn.sum())} missed at depth {pct(depth[fn])}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
