#!/usr/bin/env python
"""Write the bundled sample case: one T2 phantom with a tumour (Resources/SampleData/).

    python scripts/make_sample.py                 # the shipped sample (seed 8, 1.5 mm, int16)
    python scripts/make_sample.py --seed 5 --spacing 2 --outdir /tmp/sample

Files: sample_T2_tumour.nii.gz (image, int16 rounded), sample_T2_tumour_lesion.nii.gz
(ground-truth lesion mask, uint8) and sample_T2_tumour_brainmask.nii.gz (brain mask,
uint8), plus README.md describing them and the exact command that made them.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from uad.phantoms import make_phantom, write_phantom

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "Resources" / "SampleData"
STEM = "sample_T2_tumour"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=8, help="phantom seed (default 8: a right-hemisphere tumour)")
    p.add_argument("--spacing", type=float, default=1.5, help="isotropic voxel size in mm (default 1.5)")
    p.add_argument("--dtype", choices=("int16", "float32"), default="int16", help="image voxel type on disk")
    p.add_argument("--outdir", default=str(DEFAULT_OUT), help="output folder (default Resources/SampleData)")
    args = p.parse_args(argv)

    ph = make_phantom(args.seed, contrast="T2", lesion="tumour", spacing=args.spacing)
    paths = write_phantom(ph, args.outdir, STEM, image_dtype=args.dtype)
    meta = ph.meta
    info = meta["lesion_info"]
    img = sitk.GetArrayFromImage(ph.image)
    brain = sitk.GetArrayFromImage(ph.brain_mask) > 0
    les = sitk.GetArrayFromImage(ph.lesion_mask) > 0
    sizes = {k: Path(v).stat().st_size for k, v in paths.items()}
    total = sum(sizes.values())
    try:
        rel = Path(args.outdir).resolve().relative_to(ROOT)
        outarg = [] if Path(args.outdir).resolve() == DEFAULT_OUT.resolve() else ["--outdir", str(rel)]
    except ValueError:
        outarg = ["--outdir", str(args.outdir)]
    cmd = " ".join(["python", "scripts/make_sample.py", "--seed", str(args.seed), "--spacing", f"{args.spacing:g}",
                    "--dtype", args.dtype] + [shlex.quote(a) for a in outarg])
    grid = "x".join(str(s) for s in meta["size"])
    lines = [
        "# Sample data",
        "",
        "One synthetic T2-weighted brain MRI with a tumour, and its ground truth, made by",
        "`uad.phantoms.make_phantom` from the MNI152 2009a template shipped with nilearn",
        "(tissue probability maps warped by a random affine + elastic deformation, random T2 tissue",
        "intensities with partial-volume mixing, smooth bias field, Rician noise, skull-stripped).",
        "It is not a patient image; it is the sample case the extension ships",
        "(`uad.imageio.sample_paths()` finds it).",
        "",
        "| file | content |",
        "|---|---|",
        f"| `{Path(paths['image']).name}` | T2 image, {args.dtype}, {grid} voxels of {args.spacing:g} mm "
        f"(the template's field of view, LPS), background 0 outside the brain |",
        f"| `{Path(paths['lesion']).name}` | ground-truth lesion mask (uint8, 1 = tumour: oedema + core) |",
        f"| `{Path(paths['brain_mask']).name}` | brain mask (uint8, 1 = brain) |",
        "",
        f"* Seed {meta['seed']}, contrast T2, lesion tumour, spacing {args.spacing:g} mm.",
        f"* Brain: {meta['brain_volume_ml']:.0f} ml ({int(brain.sum())} voxels).",
        f"* Tumour (lesion mask): {meta['lesion_volume_ml']:.1f} ml ({meta['lesion_voxels']} voxels); core radius "
        f"{info['core_radius_mm']} mm, oedema radius {info['oedema_radius_mm']} mm, necrosis radius "
        f"{info['necrosis_radius_mm']} mm, centre near MNI (RAS) {tuple(info['centre_mni_ras'])} mm "
        f"({'right' if info['centre_mni_ras'][0] > 0 else 'left'} hemisphere).",
        f"* Mean intensity: lesion {float(img[les].mean()):.0f}, healthy brain {float(img[brain & ~les].mean()):.0f}.",
        f"* Size on disk: {total} bytes in all.",
        "",
        "Made with (from the repository root, in the project's environment):",
        "",
        "```",
        cmd,
        "```",
        "",
        "The phantom is deterministic for a seed on a given software stack (numpy, SciPy,",
        "PyTorch, nilearn versions), so the command above reproduces these files.",
        "",
    ]
    readme = Path(args.outdir) / "README.md"
    readme.write_text("\n".join(lines))
    for k, v in paths.items():
        print(f"{v}: {sizes[k]} bytes")
    print(f"tumour {meta['lesion_volume_ml']:.2f} ml, total {total} bytes; wrote {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
