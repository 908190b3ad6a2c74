"""The held-out phantom test set: unseen seeds, unseen geometry, one command.

    uad heldout OUTDIR [--quick] [--n 5] [--contrasts T1 T2 FLAIR] [--lesions tumour stroke ms]

Per contrast (T1, T2, FLAIR) ``n`` volumes (default 5) of every lesion type
(tumour, stroke, MS-like) and ``n`` healthy volumes, written with
``uad.phantoms.write_phantom`` as ``<case>.nii.gz``, ``<case>_brainmask.nii.gz``
and ``<case>_lesion.nii.gz``, plus a manifest (``heldout.csv`` and
``heldout.json``: case, contrast, lesion, seed, spacing, orientation,
direction, lesion volume, file names).

**Seeds** come from ``HELDOUT_SEEDS`` = [9,000,000, 9,100,000), a range no
training, validation or calibration code uses: the training streams use
``seed + rank * 10,000 + k`` with small seeds (bundled models: seed 0), the
training validation stream adds ``HOLDOUT_SEED_OFFSET`` (1,000,000), the
threshold calibration starts at 2,000,000, ``uad.evaluation.phantom_cases`` at
3,000,000 and ``healthy_reference`` at 4,000,000 (a test asserts that the
ranges are disjoint).  Case ``i`` of lesion ``L`` in contrast ``C`` has seed
``9,000,000 + 10,000 * code(C) + 1,000 * code(L) + i``.  ``uad heldout --validation`` builds the same
set from ``VALIDATION_SEEDS`` (8,500,000 + the same offsets; cases ``validation_...``): a validation set
for choosing settings (a normalisation, a checkpoint) so that the held-out numbers stay a test.

**Geometry** the training never saw: training phantoms are 2 mm isotropic on
the template's axial grid.  Held-out volumes are acquired (resampled from a
1 mm phantom) with in-plane spacing 0.9-1.3 mm and slice thickness 1.5-4 mm
(the slice profile is a box: every thick slice is the mean of 1 mm sub-slices,
so partial-volume blur across the slice is simulated), in axial, coronal,
sagittal and oblique acquisitions (oblique: the slice normal tilted by 8-20
degrees), stored in LPS or RAS voxel order.  The geometry cycles with the case
index (so every lesion type gets every geometry) and its jitter is drawn from
the seed.  Masks are resampled with the same slice profile and thresholded at
0.5; the image is zero outside the resampled brain mask (skull-stripped).

``--quick``: one volume per lesion type and one healthy volume per contrast,
all axial 5 mm acquisitions (the fewest slices), for the quick benchmark.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import SimpleITK as sitk

#: The seed range of the held-out set (half-open).  Nothing else in uad draws phantoms from it.
HELDOUT_SEEDS = (9_000_000, 9_100_000)
#: A validation set built the same way from other seeds (``uad heldout --validation``): for choosing a setting (a
#: normalisation, a checkpoint) without looking at the held-out test set.
VALIDATION_SEEDS = (8_500_000, 8_600_000)
HELDOUT_CONTRASTS = ("T1", "T2", "FLAIR")
HELDOUT_LESIONS = ("tumour", "stroke", "ms")
_CODE_C = {"T1": 1, "T2": 2, "FLAIR": 3}
_CODE_L = {"none": 0, "tumour": 1, "stroke": 2, "ms": 3}
#: Phantom resolution the acquisitions are resampled from (mm, isotropic).
SOURCE_SPACING = 1.0
MANIFEST_CSV = "heldout.csv"
MANIFEST_JSON = "heldout.json"

# (orientation, slice thickness range mm, in-plane spacing range mm, tilt range deg, storage order)
_GEOMETRIES = (
    ("axial", (3.0, 4.0), (0.9, 1.1), (0.0, 0.0), "LPS"),
    ("sagittal", (3.0, 4.0), (0.9, 1.1), (0.0, 0.0), "LPS"),
    ("oblique-axial", (1.5, 2.5), (1.1, 1.3), (8.0, 20.0), "LPS"),
    ("coronal", (2.0, 3.0), (1.0, 1.2), (0.0, 0.0), "RAS"),
    ("axial", (1.5, 2.0), (1.0, 1.3), (0.0, 0.0), "RAS"),
)
_QUICK_GEOMETRY = ("axial", (5.0, 5.0), (1.2, 1.2), (0.0, 0.0), "LPS")


@dataclasses.dataclass(frozen=True)
class Geometry:
    orientation: str  # axial | coronal | sagittal | oblique-axial
    thickness: float  # mm, slice spacing = slice thickness (contiguous slices)
    inplane: float  # mm
    tilt_deg: tuple  # (about the first in-plane axis, about the second), degrees
    order: str  # LPS | RAS voxel order

    @property
    def spacing(self) -> tuple:
        return (self.inplane, self.inplane, self.thickness)

    def direction(self) -> np.ndarray:
        """3 x 3 LPS direction cosines, columns = voxel axes (i, j in-plane; k across slices)."""
        e = np.eye(3)
        base = {"axial": (0, 1, 2), "oblique-axial": (0, 1, 2), "coronal": (0, 2, 1), "sagittal": (1, 2, 0)}
        if self.orientation not in base:
            raise ValueError(f"unknown orientation {self.orientation!r}")
        i, j, k = base[self.orientation]
        d = np.stack([e[i], e[j], e[k]], axis=1)
        if self.orientation == "coronal":
            d[:, 1] = -d[:, 1]  # j runs superior -> inferior, as scanners store coronal slices
        if self.order == "RAS":
            d[:, 0] = -d[:, 0]
            d[:, 1] = -d[:, 1]  # flip both in-plane axes (keeps a right-handed frame)
        a, b = np.deg2rad(self.tilt_deg)
        if a or b:
            # tilt the slice stack about its own in-plane axes
            ca, sa, cb, sb = math.cos(a), math.sin(a), math.cos(b), math.sin(b)
            rx = np.array([[1, 0, 0], [0, ca, -sa], [0, sa, ca]])
            ry = np.array([[cb, 0, sb], [0, 1, 0], [-sb, 0, cb]])
            d = d @ (rx @ ry)
        return d

    def describe(self) -> str:
        tilt = "" if not any(self.tilt_deg) else f", tilt {self.tilt_deg[0]:.1f}/{self.tilt_deg[1]:.1f} deg"
        return (f"{self.orientation} {self.inplane:.2f} x {self.inplane:.2f} x {self.thickness:.2f} mm, "
                f"{self.order} order{tilt}")


@dataclasses.dataclass(frozen=True)
class CaseSpec:
    case: str
    contrast: str
    lesion: str  # none | tumour | stroke | ms
    seed: int
    geometry: Geometry


def seed_range(validation: bool = False) -> tuple:
    """The seed range of the set: ``VALIDATION_SEEDS`` for the validation set, else ``HELDOUT_SEEDS``."""
    return VALIDATION_SEEDS if validation else HELDOUT_SEEDS


def case_seed(contrast: str, lesion: str, index: int, seeds: tuple = HELDOUT_SEEDS) -> int:
    s = seeds[0] + 10_000 * _CODE_C[contrast] + 1_000 * _CODE_L[lesion] + int(index)
    if not (seeds[0] <= s < seeds[1]) or index >= 1000:
        raise ValueError(f"case index {index} is outside the seed range {seeds}")
    return s


def _geometry(seed: int, index: int, quick: bool) -> Geometry:
    orient, th, ip, tilt, order = _QUICK_GEOMETRY if quick else _GEOMETRIES[index % len(_GEOMETRIES)]
    r = np.random.default_rng([seed, 4242])
    thickness = round(float(r.uniform(*th)), 2)
    inplane = round(float(r.uniform(*ip)), 2)
    t = (0.0, 0.0)
    if tilt[1] > 0:
        sign = r.choice([-1.0, 1.0], 2)
        t = (round(float(sign[0] * r.uniform(*tilt)), 1), round(float(sign[1] * r.uniform(0.0, tilt[1] / 2)), 1))
    return Geometry(orient, thickness, inplane, t, order)


def case_specs(contrasts: Iterable[str] = HELDOUT_CONTRASTS, lesions: Iterable[str] = HELDOUT_LESIONS,
               n: int = 5, n_healthy: int | None = None, quick: bool = False,
               validation: bool = False) -> list[CaseSpec]:
    """The cases of the held-out set (``quick``: one per lesion type plus one healthy, axial 5 mm;
    ``validation``: the validation set, ``VALIDATION_SEEDS``, cases named ``validation_...``)."""
    from .phantoms import _check_contrast, _check_lesion

    if quick:
        n, n_healthy = 1, 1
    n = int(n)
    n_healthy = n if n_healthy is None else int(n_healthy)
    if n < 0 or n_healthy < 0 or max(n, n_healthy) > 1000:
        raise ValueError("the number of volumes per type must be in [0, 1000]")
    out = []
    for c in contrasts:
        c = _check_contrast(c)
        for lt in list(lesions) + ["none"]:
            lt = _check_lesion(lt)
            for i in range(n_healthy if lt == "none" else n):
                s = case_seed(c, lt, i, seed_range(validation))
                name = f"{'validation' if validation else 'heldout'}_{c}_{'healthy' if lt == 'none' else lt}_{s}"
                out.append(CaseSpec(name, c, lt, s, _geometry(s, i, quick)))
    return out


# ----------------------------------------------------------------------------- acquisition
def _frame_box(img: sitk.Image, mask: sitk.Image, d: np.ndarray, margin_mm: float = 6.0):
    """(lo, hi) of the brain's bounding box corners in the frame of direction ``d`` (mm)."""
    st = sitk.LabelShapeStatisticsImageFilter()
    st.Execute(mask > 0)
    bb = st.GetBoundingBox(1)  # (x0, y0, z0, sx, sy, sz) index space
    lo_i, hi_i = np.array(bb[:3]), np.array(bb[:3]) + np.array(bb[3:]) - 1
    corners = np.array([[a, b, c] for a in (lo_i[0], hi_i[0]) for b in (lo_i[1], hi_i[1])
                        for c in (lo_i[2], hi_i[2])], np.float64)
    pts = np.array([img.TransformContinuousIndexToPhysicalPoint(tuple(p)) for p in corners])
    q = pts @ d  # coordinates along the new axes
    return q.min(0) - margin_mm, q.max(0) + margin_mm


def acquire(image: sitk.Image, brain: sitk.Image, lesion: sitk.Image, geometry: Geometry):
    """Resample a (fine, isotropic) phantom onto the acquisition ``geometry``.

    Returns (image float32, brain uint8, lesion uint8) on the new grid.  Each thick
    slice is the mean of ``round(thickness)`` (at least 1) equally spaced sub-slices.
    """
    d = geometry.direction()
    lo, hi = _frame_box(image, brain, d)
    sp = np.array(geometry.spacing, np.float64)
    n_sub = max(1, int(round(geometry.thickness / 1.0)))
    fine = geometry.thickness / n_sub
    size = np.floor((hi - lo) / sp).astype(int) + 1
    size_fine = size.copy()
    size_fine[2] = size[2] * n_sub
    lo_fine = lo.copy()
    lo_fine[2] = lo[2] - (n_sub - 1) / 2.0 * fine
    origin = d @ lo_fine
    sp_fine = (sp[0], sp[1], fine)
    dflat = tuple(float(v) for v in d.ravel())

    def res(im, interp):
        f = sitk.ResampleImageFilter()
        f.SetSize([int(v) for v in size_fine])
        f.SetOutputSpacing([float(v) for v in sp_fine])
        f.SetOutputOrigin([float(v) for v in origin])
        f.SetOutputDirection(dflat)
        f.SetInterpolator(interp)
        f.SetDefaultPixelValue(0.0)
        f.SetOutputPixelType(sitk.sitkFloat32)
        a = sitk.GetArrayFromImage(f.Execute(sitk.Cast(im, sitk.sitkFloat32)))  # (k, j, i)
        return a.reshape(int(size[2]), n_sub, a.shape[1], a.shape[2]).mean(1)

    a_img = res(image, sitk.sitkLinear)
    a_brain = res(brain, sitk.sitkLinear) >= 0.5
    a_les = (res(lesion, sitk.sitkLinear) >= 0.5) & a_brain
    a_img = np.where(a_brain, np.maximum(a_img, 0.0), 0.0).astype(np.float32)
    origin_out = d @ lo  # centre of the first thick slice
    out = []
    for a in (a_img, a_brain.astype(np.uint8), a_les.astype(np.uint8)):
        im = sitk.GetImageFromArray(a)
        im.SetSpacing([float(v) for v in sp])
        im.SetOrigin([float(v) for v in origin_out])
        im.SetDirection(dflat)
        out.append(im)
    return tuple(out)


def make_case(spec: CaseSpec):
    """The ``uad.phantoms.Phantom`` of one held-out case on its acquisition grid (meta gains the geometry)."""
    from .phantoms import make_phantom

    ph = make_phantom(spec.seed, contrast=spec.contrast, lesion=spec.lesion, spacing=SOURCE_SPACING)
    img, brain, les = acquire(ph.image, ph.brain_mask, ph.lesion_mask, spec.geometry)
    vox_ml = float(np.prod(spec.geometry.spacing)) / 1000.0
    n_les = int(sitk.GetArrayViewFromImage(les).sum())
    meta = dict(ph.meta)
    meta.update({
        "case": spec.case, "source_spacing_mm": SOURCE_SPACING, "source_lesion_volume_ml": ph.meta.get("lesion_volume_ml"),
        "spacing_mm": [float(v) for v in spec.geometry.spacing], "size": list(img.GetSize()),
        "orientation": spec.geometry.orientation, "storage_order": spec.geometry.order,
        "tilt_deg": list(spec.geometry.tilt_deg), "direction": [round(float(v), 6) for v in img.GetDirection()],
        "brain_voxels": int(sitk.GetArrayViewFromImage(brain).sum()),
        "lesion_voxels": n_les, "lesion_volume_ml": round(n_les * vox_ml, 3),
    })
    return dataclasses.replace(ph, image=img, brain_mask=brain, lesion_mask=les, meta=meta, tissues=None)


_COLUMNS = ["case", "contrast", "lesion", "seed", "spacing_mm", "orientation", "storage_order", "tilt_deg",
            "size", "lesion_voxels", "lesion_ml", "source_lesion_ml", "brain_ml", "image", "brain_mask", "lesion_mask"]


def generate_heldout(outdir: str | os.PathLike, contrasts: Iterable[str] = HELDOUT_CONTRASTS,
                     lesions: Iterable[str] = HELDOUT_LESIONS, n: int = 5, n_healthy: int | None = None,
                     quick: bool = False, progress: Callable[[int, int, dict], None] | None = None,
                     reuse: bool = True, validation: bool = False) -> list[dict]:
    """Write the held-out set into ``outdir`` (see the module docstring); returns the manifest rows.

    With ``reuse``, a case whose three files already exist with the manifest's
    entry is not generated again (the set is deterministic).  Existing files of
    other names are never touched.
    """
    from .phantoms import write_phantom

    out = Path(outdir)
    specs = case_specs(contrasts, lesions, n, n_healthy, quick, validation)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    old = {}
    if reuse and (out / MANIFEST_JSON).is_file():
        try:
            old = {r["case"]: r for r in json.loads((out / MANIFEST_JSON).read_text())["cases"]}
        except (ValueError, KeyError, TypeError):
            old = {}
    rows = []
    for i, spec in enumerate(specs):
        files = {"image": f"{spec.case}.nii.gz", "brain_mask": f"{spec.case}_brainmask.nii.gz",
                 "lesion_mask": f"{spec.case}_lesion.nii.gz"}
        prev = old.get(spec.case)
        if prev is not None and prev.get("seed") == spec.seed and prev.get("orientation") == spec.geometry.orientation \
                and all((out / f).is_file() for f in files.values()):
            row = prev
        else:
            ph = make_case(spec)
            write_phantom(ph, out, spec.case)
            m = ph.meta
            row = {"case": spec.case, "contrast": spec.contrast, "lesion": spec.lesion, "seed": spec.seed,
                   "spacing_mm": "x".join(f"{v:g}" for v in m["spacing_mm"]), "orientation": m["orientation"],
                   "storage_order": m["storage_order"], "tilt_deg": "/".join(f"{v:g}" for v in m["tilt_deg"]),
                   "size": "x".join(str(v) for v in m["size"]), "lesion_voxels": m["lesion_voxels"],
                   "lesion_ml": m["lesion_volume_ml"], "source_lesion_ml": m["source_lesion_volume_ml"],
                   "brain_ml": round(m["brain_voxels"] * float(np.prod(m["spacing_mm"])) / 1000.0, 2),
                   "direction": m["direction"], **files}
        rows.append(row)
        if progress is not None:
            progress(i + 1, len(specs), row)
    with open(out / MANIFEST_CSV, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    info = {"seed_range": list(seed_range(validation)), "validation": bool(validation),
            "source_spacing_mm": SOURCE_SPACING, "quick": bool(quick),
            "n_per_lesion": 1 if quick else int(n), "contrasts": sorted({r["contrast"] for r in rows}),
            "cases": rows}
    (out / MANIFEST_JSON).write_text(json.dumps(info, indent=1))
    return rows


def load_heldout(folder: str | os.PathLike, contrasts: Iterable[str] | None = None) -> list[dict]:
    """Manifest rows of a held-out folder with absolute ``image`` / ``brain_mask`` / ``lesion_mask`` paths."""
    folder = Path(folder)
    p = folder / MANIFEST_JSON
    if not p.is_file():
        raise ValueError(f"{folder} has no {MANIFEST_JSON}; generate the set with 'uad heldout {folder}'")
    rows = json.loads(p.read_text())["cases"]
    want = None if contrasts is None else {c.upper() for c in contrasts}
    out = []
    for r in rows:
        if want is not None and r["contrast"].upper() not in want:
            continue
        r = dict(r)
        for k in ("image", "brain_mask", "lesion_mask"):
            r[k] = str(folder / r[k])
        out.append(r)
    return out


# ----------------------------------------------------------------------------- CLI
def _cli(args) -> int:
    from .phantoms import run_writer

    return run_writer(
        lambda progress: generate_heldout(args.outdir, args.contrasts, args.lesions, n=args.n,
                                          n_healthy=args.n_healthy, quick=args.quick, progress=progress,
                                          validation=args.validation),
        lambda row: (f"{row['case']}: {row['orientation']} {row['spacing_mm']} mm ({row['storage_order']}), "
                     f"lesion {row['lesion_ml']} ml"),
        lambda rows: (f"wrote {len(rows)} {'validation' if args.validation else 'held-out'} volume(s), "
                      f"{MANIFEST_CSV} and {MANIFEST_JSON} to {args.outdir}"))


def add_cli(subparsers) -> None:
    """Register ``uad heldout OUTDIR [--quick] [--n N] [--contrasts ...] [--lesions ...]``."""
    p = subparsers.add_parser(
        "heldout", help="generate the held-out phantom test set (unseen seeds and geometry)",
        description="Generate the held-out test set: per contrast N volumes of each lesion type and N healthy "
                    "volumes, seeds 9,000,000-9,099,999 (never used in training), acquired with 1.5-4 mm slices "
                    "in axial, coronal, sagittal and oblique orientations; writes heldout.csv / heldout.json.")
    p.add_argument("outdir", help="output folder (existing cases of the same set are reused)")
    p.add_argument("--n", type=int, default=5, help="volumes per lesion type and contrast (default 5)")
    p.add_argument("--n-healthy", type=int, default=None, help="healthy volumes per contrast (default: --n)")
    p.add_argument("--contrasts", nargs="+", default=list(HELDOUT_CONTRASTS), help="default: T1 T2 FLAIR")
    p.add_argument("--lesions", nargs="+", default=list(HELDOUT_LESIONS), help="default: tumour stroke ms")
    p.add_argument("--quick", action="store_true",
                   help="one volume per lesion type + one healthy per contrast, axial 5 mm (quick benchmark)")
    p.add_argument("--validation", action="store_true",
                   help="the validation set instead: the same construction from seeds 8,500,000-8,599,999, for "
                        "choosing settings (normalisation, checkpoints) without the held-out test set")
    p.set_defaults(func=_cli)
