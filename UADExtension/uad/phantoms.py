"""Brain MRI phantoms built from the MNI152 2009a template, with lesions and ground truth.

A phantom is a synthetic skull-stripped brain MRI volume: the tissue probability
maps of the MNI152 2009a template that nilearn ships (grey matter, white
matter, and CSF = brain - GM - WM) are warped by a random affine and a smooth
elastic deformation, mixed with random per-tissue intensities of the requested
contrast (partial-volume), multiplied by a smooth bias field and corrupted by
Rician noise.  Lesions (tumour, stroke, multiple sclerosis) are drawn as soft
probability maps in template space, warped with the same transform, blended
into the intensities, and returned as a binary ground-truth mask.

Everything is deterministic for a seed.  The seed drives independent streams
for the anatomy, the lesion and the acquisition, so one seed gives the same
subject for every contrast, and the healthy and lesioned phantoms of one seed
share their anatomy (except for a tumour's mass effect)::

    from uad.phantoms import make_phantom, write_phantom
    ph = make_phantom(7, contrast="T2", lesion="tumour", spacing=2.0)
    write_phantom(ph, "out", "t2_tumour_7")    # out/t2_tumour_7{,_brainmask,_lesion}.nii.gz

Geometry: the output grid has the template's physical extent and orientation
(1 mm: exactly the template's grid; ``spacing=s``: isotropic ``s`` mm voxels
covering the same box).  ITK's physical space is LPS; nibabel affines are RAS.

``TrainingSliceSource`` streams 2-D axial training slices at model resolution
from a rotating pool of phantoms, preprocessed by ``uad.preprocess.preprocess``.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import math
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

CONTRASTS = ("T1", "T2", "FLAIR")
LESIONS = ("none", "tumour", "stroke", "ms")
#: Seeds of held-out phantoms (validation, calibration) are offset by this much.
HOLDOUT_SEED_OFFSET = 1_000_000

_LATTICE_MM = 4.0  # spacing of the coarse lattice on which the smooth fields are computed
_CROP_MARGIN = 6  # template voxels kept around the brain

# Relative tissue intensities per contrast: (low, high) of a uniform draw.
# T1: WM > GM > CSF; T2: CSF > GM > WM; FLAIR: GM >= WM > CSF (fluid suppressed).
_TISSUE = {
    "T1": {"wm": (0.95, 1.05), "gm": (0.62, 0.74), "csf": (0.18, 0.32)},
    "T2": {"wm": (0.38, 0.46), "gm": (0.52, 0.62), "csf": (0.95, 1.05)},
    "FLAIR": {"wm": (0.95, 1.05), "gm": (1.08, 1.22), "csf": (0.12, 0.25)},
}
# Lesion intensities, relative to the same reference as the tissues.
_LESION_INT = {
    "T1": {"oedema": (0.66, 0.78), "solid": (0.48, 0.60), "necrosis": (0.22, 0.34),
           "stroke": (0.45, 0.60), "ms": (0.50, 0.72)},
    "T2": {"oedema": (0.72, 0.85), "solid": (0.56, 0.70), "necrosis": (0.88, 1.00),
           "stroke": (0.70, 0.85), "ms": (0.68, 0.85)},
    "FLAIR": {"oedema": (1.45, 1.80), "solid": (1.20, 1.45), "necrosis": (0.35, 0.60),
              "stroke": (1.45, 1.75), "ms": (1.50, 1.90)},
}
# Head tissues outside the brain (``make_phantom(head=True)``), same reference as _TISSUE.
# Cortical bone is dark in every contrast; marrow (diploe) and fat are bright on T1, intermediate
# on T2 and FLAIR; vitreous humour is fluid (dark T1, bright T2, suppressed on FLAIR).
_HEAD = {
    "T1": {"bone": (0.03, 0.08), "marrow": (0.65, 0.85), "muscle": (0.45, 0.58), "fat": (1.05, 1.25),
           "skin": (0.55, 0.70), "vitreous": (0.10, 0.18), "orbital_fat": (1.05, 1.25)},
    "T2": {"bone": (0.02, 0.06), "marrow": (0.45, 0.60), "muscle": (0.25, 0.35), "fat": (0.70, 0.85),
           "skin": (0.40, 0.55), "vitreous": (1.05, 1.20), "orbital_fat": (0.70, 0.85)},
    "FLAIR": {"bone": (0.02, 0.06), "marrow": (0.60, 0.80), "muscle": (0.45, 0.60), "fat": (0.85, 1.05),
              "skin": (0.55, 0.70), "vitreous": (0.08, 0.15), "orbital_fat": (0.85, 1.05)},
}
# Layers outside the brain, inside out: (tissue, mean thickness mm).  "csf" uses the phantom's CSF level.
_HEAD_LAYERS = (("csf", 2.0), ("bone", 1.5), ("marrow", 2.5), ("bone", 1.5), ("muscle", 1.5), ("fat", 4.0),
                ("skin", 1.5))
# Eyeball centres in MNI RAS mm (x = +-32) and radii: vitreous, orbital fat.
_EYE_RAS = ((32.0, 52.0, -48.0), (-32.0, 52.0, -48.0))
_EYE_RADIUS_MM = 11.0
_ORBIT_RADIUS_MM = 16.0
_CONTRAST_CODE = {"T1": 1, "T2": 2, "FLAIR": 3}
_LESION_CODE = {"none": 0, "tumour": 1, "stroke": 2, "ms": 3}


def _check_contrast(contrast: str) -> str:
    for c in CONTRASTS:
        if str(contrast).upper() == c:
            return c
    raise ValueError(f"unknown contrast {contrast!r}; choose one of {', '.join(CONTRASTS)}")


def _check_lesion(lesion: str | None) -> str:
    name = "none" if lesion is None else str(lesion).lower()
    name = {"tumor": "tumour", "glioma": "tumour", "healthy": "none", "ischemia": "stroke"}.get(name, name)
    if name not in LESIONS:
        raise ValueError(f"unknown lesion {lesion!r}; choose one of {', '.join(LESIONS)}")
    return name


# ----------------------------------------------------------------------------- templates
def nib_to_sitk(img, dtype=np.float32) -> sitk.Image:
    """A nibabel image as a SimpleITK image with the same physical geometry.

    nibabel's affine maps voxel (i, j, k) to RAS millimetres; ITK's physical
    space is LPS, so the first two rows of the affine are negated.
    """
    arr = np.asarray(img.dataobj, dtype=dtype)
    if arr.ndim != 3:
        raise ValueError(f"expected a 3-D image, got shape {arr.shape}")
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(img.affine, dtype=np.float64)
    m = lps[:3, :3]
    spacing = np.linalg.norm(m, axis=0)
    direction = m / spacing
    out = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))
    out.SetSpacing([float(s) for s in spacing])
    out.SetDirection([float(d) for d in direction.ravel()])
    out.SetOrigin([float(o) for o in lps[:3, 3]])
    return out


@dataclass
class _Template:
    affine: np.ndarray  # RAS affine of the template (4x4)
    size: tuple  # (I, J, K) template grid size
    spacing: np.ndarray  # (3,) mm
    direction: np.ndarray  # (3, 3) LPS direction cosines (columns = index axes)
    origin: np.ndarray  # (3,) LPS
    crop0: np.ndarray  # (3,) (i, j, k) template index of the crop's first voxel
    tissues: np.ndarray  # (4, Ck, Cj, Ci) float32: gm, wm, csf, brain (filled mask), cropped
    brain_centre: np.ndarray  # (3,) LPS centroid of the brain mask

    @property
    def crop_shape(self) -> tuple:  # (Ck, Cj, Ci)
        return self.tissues.shape[1:]

    def index_to_lps(self, idx: np.ndarray) -> np.ndarray:
        """Template continuous index (..., 3) in (i, j, k) -> LPS mm (..., 3)."""
        return self.origin + (np.asarray(idx, np.float64) * self.spacing) @ self.direction.T

    def lps_to_index(self, p: np.ndarray) -> np.ndarray:
        return ((np.asarray(p, np.float64) - self.origin) @ self.direction) / self.spacing

    def crop_ras(self):
        """RAS (x, y, z) mm coordinates of the crop's voxel centres, as three broadcastable arrays (k, j, i)."""
        ck, cj, ci = self.crop_shape
        i = np.arange(ci, dtype=np.float64)[None, None, :] + self.crop0[0]
        j = np.arange(cj, dtype=np.float64)[None, :, None] + self.crop0[1]
        k = np.arange(ck, dtype=np.float64)[:, None, None] + self.crop0[2]
        a = self.affine
        return tuple(a[r, 0] * i + a[r, 1] * j + a[r, 2] * k + a[r, 3] for r in range(3))


#: a folder holding nilearn's three MNI152 2009a files (``MNI152_FILES``), read instead of nilearn when set
TEMPLATE_DIR_ENV = "UAD_MNI152_DIR"
MNI152_FILES = {"t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
                "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
                "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"}
MNI152_BRAIN_THRESHOLD = 0.2  # nilearn's load_mni152_brain_mask: the rescaled T1 template above 0.2


@dataclass
class _NiftiArray:
    """The part of a nibabel image the templates use: ``shape``, ``affine`` (RAS), ``dataobj`` (i, j, k)."""

    affine: np.ndarray
    dataobj: np.ndarray

    @property
    def shape(self) -> tuple:
        return tuple(self.dataobj.shape)


def _read_template_file(path) -> _NiftiArray:
    """One template file as nilearn's loaders give it: float32 rescaled to a maximum of 1, RAS affine."""
    img = sitk.ReadImage(str(path))
    spacing = np.asarray(img.GetSpacing(), np.float64)
    direction = np.asarray(img.GetDirection(), np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * spacing
    lps[:3, 3] = img.GetOrigin()
    arr = sitk.GetArrayFromImage(img).transpose(2, 1, 0).astype(np.float32)
    return _NiftiArray(affine=np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps, dataobj=arr / arr.max())


def templates_from_folder(folder) -> dict:
    """nilearn's 1 mm MNI152 2009a templates read from ``folder`` (the files nilearn ships, ``MNI152_FILES``)
    with SimpleITK, processed as nilearn's loaders do (each rescaled to a maximum of 1, float32; the brain
    mask the T1 above 0.2): for machines without nilearn and nibabel (a GPU machine with only wheels carried;
    ``$UAD_MNI152_DIR``)."""
    folder = Path(folder)
    missing = [n for n in MNI152_FILES.values() if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{TEMPLATE_DIR_ENV}={folder}: missing {', '.join(missing)} (copy them from "
                                f"nilearn/datasets/data/ of a nilearn installation)")
    out = {k: _read_template_file(folder / name) for k, name in MNI152_FILES.items()}
    out["brain"] = _NiftiArray(affine=out["t1"].affine,
                               dataobj=(out["t1"].dataobj > MNI152_BRAIN_THRESHOLD).astype(np.int8))
    return out


@functools.lru_cache(maxsize=1)
def _nilearn_templates():
    folder = os.environ.get(TEMPLATE_DIR_ENV, "").strip()
    if folder:
        return templates_from_folder(folder)
    from nilearn import datasets

    return {
        "t1": datasets.load_mni152_template(resolution=1),
        "gm": datasets.load_mni152_gm_template(resolution=1),
        "wm": datasets.load_mni152_wm_template(resolution=1),
        "brain": datasets.load_mni152_brain_mask(resolution=1),
    }


@functools.lru_cache(maxsize=1)
def _template() -> _Template:
    from scipy import ndimage

    imgs = _nilearn_templates()
    aff = np.asarray(imgs["t1"].affine, np.float64)
    for k, v in imgs.items():
        if v.shape != imgs["t1"].shape or not np.allclose(v.affine, aff, atol=1e-4):
            raise RuntimeError(f"nilearn MNI152 template {k!r} is not on the T1 template's grid")
    # arrays in SimpleITK order (k, j, i), cropped to the brain (+ margin) before any arithmetic
    raw = np.asarray(imgs["brain"].dataobj).transpose(2, 1, 0) > 0
    nz = np.argwhere(raw)
    lo = np.maximum(nz.min(0) - _CROP_MARGIN, 0)
    hi = np.minimum(nz.max(0) + _CROP_MARGIN + 1, raw.shape)
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    brain = ndimage.binary_fill_holes(raw[sl])
    gm = np.clip(np.asarray(imgs["gm"].dataobj, np.float32).transpose(2, 1, 0)[sl], 0, 1) * brain
    wm = np.clip(np.asarray(imgs["wm"].dataobj, np.float32).transpose(2, 1, 0)[sl], 0, 1) * brain
    tot = gm + wm
    over = tot > 1.0
    gm[over] /= tot[over]
    wm[over] /= tot[over]
    csf = np.clip(brain.astype(np.float32) - gm - wm, 0.0, 1.0)
    tissues = np.stack([gm, wm, csf, brain.astype(np.float32)]).astype(np.float32)

    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ aff
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing
    t = _Template(affine=aff, size=tuple(int(s) for s in imgs["t1"].shape), spacing=spacing,
                  direction=direction, origin=lps[:3, 3].copy(), crop0=lo[::-1].astype(np.float64),
                  tissues=np.ascontiguousarray(tissues), brain_centre=np.zeros(3))
    centre_idx = nz.mean(0)[::-1]  # (i, j, k)
    t.brain_centre = t.index_to_lps(centre_idx)
    return t


def template_images() -> dict[str, sitk.Image]:
    """The 1 mm MNI152 2009a templates as SimpleITK images: t1, gm, wm, csf, brain (uint8)."""
    imgs = _nilearn_templates()
    out = {k: nib_to_sitk(imgs[k]) for k in ("t1", "gm", "wm")}
    brain = nib_to_sitk(imgs["brain"], dtype=np.uint8)
    out["brain"] = brain
    b = sitk.GetArrayViewFromImage(brain) > 0
    csf = np.clip(b - sitk.GetArrayViewFromImage(out["gm"]) - sitk.GetArrayViewFromImage(out["wm"]), 0, 1)
    c = sitk.GetImageFromArray(csf.astype(np.float32))
    c.CopyInformation(brain)
    out["csf"] = c
    return out


@functools.lru_cache(maxsize=2)
def _template_stack(sigma: tuple):
    """The cropped tissue maps as a torch tensor (1, 4, Ck, Cj, Ci), pre-smoothed by ``sigma`` (k, j, i) voxels."""
    import torch
    from scipy import ndimage

    t = _template()
    arr = t.tissues
    if max(sigma) > 0:
        arr = np.stack([ndimage.gaussian_filter(a, sigma=sigma, mode="constant", truncate=3.0) for a in arr])
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None]


@dataclass
class _Anatomy:
    """Lazily computed helpers for lesion placement, on a 2 mm subgrid of the crop."""

    step: int
    inside_mm: np.ndarray  # distance to the outside of the brain (mm)
    vent_mm: np.ndarray  # distance to the ventricles (mm)
    vent_nearest: np.ndarray  # (3, ...) crop index (k, j, i) of the nearest ventricle voxel
    ras: tuple  # RAS coordinates (x, y, z) on the subgrid (broadcastable)


@functools.lru_cache(maxsize=1)
def _anatomy() -> _Anatomy:
    from scipy import ndimage

    t = _template()
    st = 2
    gm, wm, csf, brain = (a[::st, ::st, ::st] for a in t.tissues)
    x, y, z = (c[::st, ::st, ::st] for c in t.crop_ras())
    x, y, z = np.broadcast_arrays(x, y, z)
    sampling = tuple(float(st * s) for s in t.spacing[::-1])
    inside = ndimage.distance_transform_edt(brain > 0.5, sampling=sampling).astype(np.float32)
    # ventricles: large CSF components in the central region of the template
    region = (np.abs(x) < 30) & (y > -55) & (y < 30) & (z > -5) & (z < 35)
    lab, n = ndimage.label((csf > 0.5) & region)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    keep = np.flatnonzero(sizes * st ** 3 >= 2000)
    vent = np.isin(lab, keep) if keep.size else (csf > 0.5) & region
    dist, nearest = ndimage.distance_transform_edt(~vent, sampling=sampling, return_indices=True)
    return _Anatomy(step=st, inside_mm=inside, vent_mm=dist.astype(np.float32),
                    vent_nearest=(nearest * st).astype(np.int32), ras=(x, y, z))


# ----------------------------------------------------------------------------- phantom
@dataclass
class Phantom:
    """One synthetic volume with its ground truth (all three on the same grid)."""

    image: sitk.Image  # float32
    brain_mask: sitk.Image  # uint8, 1 = brain
    lesion_mask: sitk.Image  # uint8, 1 = lesion (all zero for lesion="none")
    meta: dict = field(default_factory=dict)
    tissues: dict | None = None  # with return_tissues=True: "gm", "wm", "csf" probability images (float32)
    head_mask: sitk.Image | None = None  # with head=True: uint8, 1 = head (brain included)
    # with return_healthy=True: the same subject without its lesion (same anatomy, mass effect, bias field, head),
    # noise-free (float32): the ideal pseudo-healthy restoration
    healthy: sitk.Image | None = None

    @property
    def lesion_voxels(self) -> int:
        return int(self.meta.get("lesion_voxels", 0))

    @property
    def lesion_volume_ml(self) -> float:
        return float(self.meta.get("lesion_volume_ml", 0.0))


def _rotation(angles_deg) -> np.ndarray:
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _smooth_noise(rng: np.random.Generator, shape, sigma, components: int | None = None) -> np.ndarray:
    """Gaussian-smoothed white noise with unit standard deviation (per component)."""
    from scipy import ndimage

    full = shape if components is None else (components,) + tuple(shape)
    w = rng.standard_normal(full)
    if components is None:
        w = ndimage.gaussian_filter(w, sigma, mode="wrap")
        return w / max(float(w.std()), 1e-8)
    out = np.stack([ndimage.gaussian_filter(c, sigma, mode="wrap") for c in w])
    return out / np.maximum(out.reshape(components, -1).std(1), 1e-8)[:, None, None, None]


def _interp_axis(n_lattice: int, mu: np.ndarray):
    """Linear interpolation indices/weights for lattice coordinates ``mu``."""
    i0 = np.clip(np.floor(mu).astype(np.int64), 0, n_lattice - 2)
    w = (mu - i0).astype(np.float32)
    return i0, w


def _upsample(F: np.ndarray, mus) -> np.ndarray:
    """Trilinear interpolation of lattice fields F (Lk, Lj, Li, C) at lattice coordinates mus=(mu_k, mu_j, mu_i)."""
    out = F.astype(np.float32)
    for axis, mu in enumerate(mus):
        i0, w = _interp_axis(out.shape[axis], mu)
        shape = [1] * out.ndim
        shape[axis] = len(w)
        w = w.reshape(shape)
        a = np.take(out, i0, axis=axis)
        b = np.take(out, i0 + 1, axis=axis)
        a *= 1.0 - w
        b *= w
        a += b
        out = a
    return out


def _soft(signed_mm: np.ndarray, edge_mm: float = 1.0) -> np.ndarray:
    """Partial-volume occupancy from a signed distance (positive inside)."""
    return np.clip(0.5 + signed_mm / edge_mm, 0.0, 1.0).astype(np.float32)


def _pick(rng: np.random.Generator, cand: np.ndarray, what: str) -> np.ndarray:
    idx = np.argwhere(cand)
    if len(idx) == 0:
        raise RuntimeError(f"no valid position for a {what}")
    return idx[int(rng.integers(len(idx)))]


def _lesion_box(centre_k_j_i, half_vox, shape):
    lo = np.maximum(np.floor(np.asarray(centre_k_j_i) - half_vox).astype(int), 0)
    hi = np.minimum(np.ceil(np.asarray(centre_k_j_i) + half_vox + 1).astype(int), shape)
    return lo, hi


def _box_offsets_mm(t: _Template, lo, hi, centre_crop_kji):
    """RAS offsets (mm) of the box voxels from a centre, three (k, j, i) arrays (broadcastable)."""
    k = np.arange(lo[0], hi[0], dtype=np.float64)[:, None, None] - centre_crop_kji[0]
    j = np.arange(lo[1], hi[1], dtype=np.float64)[None, :, None] - centre_crop_kji[1]
    i = np.arange(lo[2], hi[2], dtype=np.float64)[None, None, :] - centre_crop_kji[2]
    a = t.affine[:3, :3]
    return tuple(a[r, 0] * i + a[r, 1] * j + a[r, 2] * k for r in range(3))


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.standard_normal(4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def _ellipsoid_radius(offs, rot: np.ndarray, axes) -> np.ndarray:
    """Normalised ellipsoidal radius (1 on the surface) of offsets ``offs`` (RAS mm)."""
    d = [rot[0, c] * offs[0] + rot[1, c] * offs[1] + rot[2, c] * offs[2] for c in range(3)]
    return np.sqrt(sum((dc / a) ** 2 for dc, a in zip(d, axes)))


def _make_tumour(rng: np.random.Generator, t: _Template):
    """Tumour channels (oedema, core, necrosis) in a template box + mass-effect parameters."""
    an = _anatomy()
    gm_t, wm_t, csf_t, brain_t = t.tissues
    r_core = float(rng.uniform(6.0, 13.0))
    r_oed = r_core + float(rng.uniform(3.0, 11.0))
    st = an.step
    x, y, z = an.ras
    wm_s = wm_t[::st, ::st, ::st]
    cand = ((an.inside_mm >= r_core + 6.0) & (wm_s > 0.5) & (np.abs(x) >= r_core + 8.0)
            & (z > -10.0) & (z < 55.0) & (an.vent_mm >= 0.5 * r_core))
    c = _pick(rng, cand, "tumour") * st + rng.integers(0, st, 3)
    axes_core = r_core * rng.uniform(0.85, 1.18, 3)
    axes_oed = r_oed * rng.uniform(0.85, 1.15, 3)
    rot_c, rot_o = _random_rotation(rng), _random_rotation(rng)
    half = int(math.ceil(1.6 * max(axes_oed.max(), axes_core.max()) / float(t.spacing.min()))) + 2
    lo, hi = _lesion_box(c, half, t.crop_shape)
    shape = tuple(hi - lo)
    offs = _box_offsets_mm(t, lo, hi, c)
    n_core = _smooth_noise(rng, shape, 0.3 * r_core)
    n_oed = _smooth_noise(rng, shape, 0.25 * r_oed)
    n_nec = _smooth_noise(rng, shape, 0.3 * r_core)
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    brain = brain_t[sl]
    rho_c = _ellipsoid_radius(offs, rot_c, axes_core)
    core = _soft(r_core * (1.0 + 0.16 * n_core - rho_c)) * brain
    rho_o = _ellipsoid_radius(offs, rot_o, axes_oed)
    tissue_w = np.clip(wm_t[sl] + 0.3 * gm_t[sl], 0.0, 1.0)
    oed = _soft(r_oed * (1.0 + 0.22 * n_oed - rho_o), 2.0) * tissue_w * brain
    oed = np.maximum(oed, core)
    if rng.random() < 0.75:
        r_nec = r_core * float(rng.uniform(0.35, 0.7))
        nec = _soft(r_nec * (1.0 + 0.2 * n_nec) - r_core * rho_c) * core
    else:
        r_nec = 0.0
        nec = np.zeros_like(core)
    push = float(rng.uniform(0.15, 0.3)) * r_core
    centre_idx = np.array([c[2], c[1], c[0]], np.float64) + t.crop0  # (i, j, k) template index
    info = {"core_radius_mm": round(r_core, 2), "oedema_radius_mm": round(r_oed, 2),
            "necrosis_radius_mm": round(r_nec, 2), "mass_effect_mm": round(push, 2),
            "centre_mni_ras": [round(float(v), 1) for v in (t.affine @ np.append(centre_idx, 1.0))[:3]]}
    mass = {"centre_lps": t.index_to_lps(centre_idx), "amplitude": push, "radius": r_oed}
    return np.stack([oed, core, nec]).astype(np.float32), lo, hi, mass, info


def _make_stroke(rng: np.random.Generator, t: _Template):
    gm_t, wm_t, csf_t, brain_t = t.tissues
    h = 1.0 if rng.random() < 0.5 else -1.0
    apex_ras = np.array([h * rng.uniform(12.0, 20.0), rng.uniform(-25.0, 10.0), rng.uniform(6.0, 22.0)])
    u = np.array([h * 1.0, rng.uniform(-0.6, 0.6), rng.uniform(-0.25, 0.7)])
    u /= np.linalg.norm(u)
    theta = math.radians(float(rng.uniform(14.0, 26.0)))
    r_min = float(rng.uniform(6.0, 14.0))
    r_max = float(rng.uniform(60.0, 90.0))
    ainv = np.linalg.inv(t.affine)
    apex_idx = (ainv @ np.append(apex_ras, 1.0))[:3]  # (i, j, k)
    c = apex_idx[::-1] - t.crop0[::-1]  # crop (k, j, i)
    # bounding box of the cone: its axis from the apex to r_max, widened by the cone's largest radius
    r_lat = r_max * math.tan(theta) * 1.3 + 3.0
    ends = np.stack([apex_ras, apex_ras + r_max * u])
    corners = np.array([[x, y, z] for x in (ends[:, 0].min() - r_lat, ends[:, 0].max() + r_lat)
                        for y in (ends[:, 1].min() - r_lat, ends[:, 1].max() + r_lat)
                        for z in (ends[:, 2].min() - r_lat, ends[:, 2].max() + r_lat)])
    cidx = (np.c_[corners, np.ones(8)] @ ainv.T)[:, :3][:, ::-1] - t.crop0[::-1]  # crop (k, j, i)
    lo = np.clip(np.floor(cidx.min(0)).astype(int), 0, t.crop_shape)
    hi = np.clip(np.ceil(cidx.max(0)).astype(int) + 1, 0, t.crop_shape)
    shape = tuple(hi - lo)
    offs = _box_offsets_mm(t, lo, hi, c)
    par = offs[0] * u[0] + offs[1] * u[1] + offs[2] * u[2]
    r2 = offs[0] ** 2 + offs[1] ** 2 + offs[2] ** 2
    perp = np.sqrt(np.maximum(r2 - par ** 2, 0.0))
    n = _smooth_noise(rng, shape, 6.0)
    tan_t = math.tan(theta) * (1.0 + 0.18 * n)
    signed = np.minimum((par * tan_t - perp) * math.cos(theta), np.minimum(par - r_min, r_max - par))
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    tissue_w = np.clip(1.3 * (gm_t[sl] + wm_t[sl]), 0.0, 1.0)
    les = _soft(signed, 1.5) * tissue_w * brain_t[sl]
    info = {"apex_mni_ras": [round(float(v), 1) for v in apex_ras], "direction_ras": [round(float(v), 3) for v in u],
            "half_angle_deg": round(math.degrees(theta), 1), "hemisphere": "right" if h > 0 else "left"}
    return les[None].astype(np.float32), lo, hi, None, info


def _make_ms(rng: np.random.Generator, t: _Template):
    an = _anatomy()
    gm_t, wm_t, csf_t, brain_t = t.tissues
    st = an.step
    x, y, z = an.ras
    wm_s = wm_t[::st, ::st, ::st]
    cand = (wm_s > 0.8) & (an.vent_mm >= 2.0) & (an.vent_mm <= 12.0) & (z > 0.0) & (an.inside_mm > 10.0)
    n_target = int(rng.integers(5, 15))
    centres, shapes = [], []
    for _ in range(200):
        if len(centres) >= n_target:
            break
        p = _pick(rng, cand, "MS lesion")
        c = p * st + rng.integers(0, st, 3)
        long_ax = float(rng.uniform(3.5, 8.0))
        short = rng.uniform(2.0, 4.5, 2)
        gaps = [np.linalg.norm((c - c2) * t.spacing[::-1]) - (long_ax + l2) for c2, (l2, _, _) in zip(centres, shapes)]
        if gaps and min(gaps) < 3.0:  # keep the lesions apart (separate components)
            continue
        # long axis along the outward direction from the nearest ventricle voxel (Dawson's fingers)
        near = an.vent_nearest[(slice(None),) + tuple(p)]
        d_kji = (c - near).astype(np.float64)
        d_idx = d_kji[::-1] * 1.0
        d = t.affine[:3, :3] @ d_idx
        nrm = np.linalg.norm(d)
        d = d / nrm if nrm > 0 else np.array([0.0, 0.0, 1.0])
        e1 = np.cross(d, [0.0, 0.0, 1.0] if abs(d[2]) < 0.9 else [1.0, 0.0, 0.0])
        e1 /= np.linalg.norm(e1)
        e2 = np.cross(d, e1)
        centres.append(c)
        shapes.append((long_ax, np.stack([d, e1, e2], axis=1), short))
    if len(centres) < 2:
        raise RuntimeError("could not place MS lesions")
    cs = np.array(centres)
    half = int(math.ceil(8.0 / float(t.spacing.min())))
    lo = np.maximum(cs.min(0) - half, 0)
    hi = np.minimum(cs.max(0) + half + 1, t.crop_shape)
    les = np.zeros(tuple(hi - lo), np.float32)
    for c, (long_ax, rot, short) in zip(centres, shapes):
        blo, bhi = _lesion_box(c, half, t.crop_shape)
        offs = _box_offsets_mm(t, blo, bhi, c)
        rho = _ellipsoid_radius(offs, rot, (long_ax, short[0], short[1]))
        occ = _soft(min(short) * (1.0 - rho), 0.8)
        sl = tuple(slice(int(a - l), int(b - l)) for a, b, l in zip(blo, bhi, lo))
        np.maximum(les[sl], occ, out=les[sl])
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    les *= np.clip(2.0 * wm_t[sl], 0.0, 1.0) * brain_t[sl]
    info = {"n_lesions": len(centres)}
    return les[None].astype(np.float32), lo, hi, None, info


def _main_component_region(occupancy: np.ndarray) -> np.ndarray:
    """Where a single-mass lesion may be: its largest connected component (>= 0.5), dilated by 2 voxels.

    Removes the few-voxel fragments that the warp and the tissue weighting can leave around the lesion.
    """
    from scipy import ndimage

    core = occupancy >= 0.5
    lab, n = ndimage.label(core)
    if n <= 1:
        return np.ones(occupancy.shape, np.float32)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    keep = lab == int(np.argmax(sizes))
    return ndimage.binary_dilation(keep, iterations=2).astype(np.float32)


def _output_grid(t: _Template, spacing):
    """(size (I, J, K), spacing (3,), origin (3,)) of the output grid."""
    if spacing is None:
        return np.array(t.size), t.spacing.copy(), t.origin.copy()
    s = float(spacing)
    if not s > 0:
        raise ValueError(f"spacing must be > 0 mm, got {spacing}")
    sp = np.full(3, s)
    extent = np.array(t.size) * t.spacing
    size = np.maximum(np.ceil(extent / sp - 1e-6).astype(int), 1)
    origin = t.origin + t.direction @ ((sp - t.spacing) / 2.0)
    return size, sp, origin


def _image(arr: np.ndarray, size, spacing, origin, direction) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(o) for o in origin])
    img.SetDirection([float(d) for d in direction.ravel()])
    return img


def make_phantom(seed: int, contrast: str = "T2", lesion: str = "none", spacing: float | None = None,
                 return_tissues: bool = False, head: bool = False, return_healthy: bool = False) -> Phantom:
    """One phantom (see the module docstring).

    ``seed``: non-negative integer; the same seed and arguments give identical arrays.
    ``contrast``: T1, T2 or FLAIR.  ``lesion``: none, tumour, stroke or ms.
    ``spacing``: output voxel size in mm (isotropic; None = the template's 1 mm grid).
    ``return_tissues``: also return the warped healthy tissue probability maps
    (``Phantom.tissues``: gm, wm, csf; partial-volume ground truth, lesions not removed).
    ``head``: wrap the brain in a head (not skull-stripped): a CSF rim, skull (inner table,
    marrow, outer table), muscle, subcutaneous fat and skin (layer thicknesses modulated by a
    smooth random field), two orbits (vitreous and orbital fat), under the same bias field,
    with Rician noise over the whole field of view (a noisy background).  The brain, its
    mask and the lesion are those of ``head=False``; ``Phantom.head_mask`` is the head.
    ``return_healthy``: also return ``Phantom.healthy``, the same image without the lesion and without
    noise (the anatomy as the lesion's mass effect displaced it): what an ideal restoration would give.
    The other outputs are unchanged by it.
    """
    import torch

    contrast = _check_contrast(contrast)
    lesion = _check_lesion(lesion)
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    t = _template()
    rng_anat = np.random.default_rng([seed, 11])
    rng_les = np.random.default_rng([seed, 23, _LESION_CODE[lesion]])
    rng_con = np.random.default_rng([seed, 37, _CONTRAST_CODE[contrast]])
    rng_noise = np.random.default_rng([seed, 41, _CONTRAST_CODE[contrast]])

    # ---- anatomy: affine + elastic + tissue texture (lattice in template-index units)
    angles = rng_anat.uniform(-6.0, 6.0, 3)
    scale = rng_anat.uniform(0.94, 1.06) * rng_anat.uniform(0.97, 1.03, 3)
    shift = rng_anat.uniform(-4.0, 4.0, 3)
    elastic_mm = float(rng_anat.uniform(1.5, 3.0))
    texture_amp = float(rng_anat.uniform(0.015, 0.035))
    h = _LATTICE_MM / t.spacing  # lattice step in template voxels (i, j, k)
    n_lat = np.ceil((np.array(t.size) + 4 * h) / h).astype(int) + 2  # (i, j, k)
    u0 = -0.5 - 2 * h
    lat_shape = tuple(int(v) for v in n_lat[::-1])  # (k, j, i)
    disp = _smooth_noise(rng_anat, lat_shape, 12.0 / _LATTICE_MM, components=3) * elastic_mm  # (3, k, j, i), LPS mm
    tex = _smooth_noise(rng_anat, lat_shape, 1.0)

    # ---- acquisition: intensities, bias, noise level
    levels = {k: float(rng_con.uniform(*v)) for k, v in _TISSUE[contrast].items()}
    les_levels = {k: float(rng_con.uniform(*v)) for k, v in _LESION_INT[contrast].items()}
    scale_int = float(rng_con.uniform(600.0, 1400.0))
    noise_frac = float(rng_con.uniform(0.015, 0.04))
    bias_strength = float(rng_con.uniform(0.04, 0.12))
    bias_coef = rng_con.standard_normal(9) * bias_strength
    heterogeneity = float(rng_con.uniform(0.08, 0.16))

    # ---- lesion (template space)
    les_ch = None
    mass = None
    les_info: dict = {}
    if lesion == "tumour":
        les_ch, llo, lhi, mass, les_info = _make_tumour(rng_les, t)
    elif lesion == "stroke":
        les_ch, llo, lhi, mass, les_info = _make_stroke(rng_les, t)
    elif lesion == "ms":
        les_ch, llo, lhi, mass, les_info = _make_ms(rng_les, t)

    # ---- lattice: output LPS point -> template index
    ui = [u0[a] + h[a] * np.arange(n_lat[a]) for a in range(3)]  # per axis (i, j, k)
    U = np.stack(np.meshgrid(ui[2], ui[1], ui[0], indexing="ij")[::-1], axis=-1)  # (k, j, i, 3) as (i, j, k)
    P = t.index_to_lps(U)
    Pe = P + np.moveaxis(disp, 0, -1)
    M = _rotation(angles) @ np.diag(scale)
    Q = t.brain_centre + (Pe - t.brain_centre) @ M.T + shift
    if mass is not None:
        d = Q - mass["centre_lps"]
        r = np.sqrt((d ** 2).sum(-1, keepdims=True))
        R = mass["radius"]
        Q = Q - mass["amplitude"] * (d / R) * np.exp(0.5 * (1.0 - (r / R) ** 2))
    Ut = t.lps_to_index(Q) - t.crop0  # crop (i, j, k) continuous index
    ck, cj, ci = t.crop_shape
    dims = np.array([ci, cj, ck], np.float64)
    grid_lat = 2.0 * Ut / (dims - 1.0) - 1.0
    pn = (P - t.brain_centre) / 80.0
    terms = [pn[..., 0], pn[..., 1], pn[..., 2], pn[..., 0] ** 2 - 0.1, pn[..., 1] ** 2 - 0.1, pn[..., 2] ** 2 - 0.1,
             pn[..., 0] * pn[..., 1], pn[..., 0] * pn[..., 2], pn[..., 1] * pn[..., 2]]
    bias = np.exp(sum(c * tm for c, tm in zip(bias_coef, terms)))
    F = np.concatenate([grid_lat, tex[..., None], bias[..., None]], axis=-1)

    # ---- output grid and the box around the brain
    size, sp, origin = _output_grid(t, spacing)
    u_out = [((sp[a] - t.spacing[a]) / 2.0 + np.arange(size[a]) * sp[a]) / t.spacing[a] for a in range(3)]
    mu = [(u_out[a] - u0[a]) / h[a] for a in range(3)]  # lattice coordinates per axis (i, j, k)
    margin = 2.0 * h.max()
    inside = np.all((Ut >= -margin) & (Ut <= dims - 1.0 + margin), axis=-1)  # (k, j, i)
    if not inside.any():
        raise RuntimeError("the deformed brain left the field of view")
    box = []
    for ax_kji in range(3):
        a = 2 - ax_kji
        other = tuple(o for o in range(3) if o != ax_kji)
        idx = np.flatnonzero(inside.any(axis=other))
        sel = np.flatnonzero((mu[a] >= idx[0] - 1) & (mu[a] <= idx[-1] + 1))
        if sel.size == 0:
            raise RuntimeError("the deformed brain left the field of view")
        box.append((int(sel[0]), int(sel[-1]) + 1))
    (k0, k1), (j0, j1), (i0, i1) = box
    dense = _upsample(F, (mu[2][k0:k1], mu[1][j0:j1], mu[0][i0:i1]))  # (Bk, Bj, Bi, 5)
    grid = torch.from_numpy(np.ascontiguousarray(dense[..., :3]))[None]
    tex_d = dense[..., 3]
    bias_d = dense[..., 4]
    del dense

    sigma = tuple(float(math.sqrt(max(sp[a] ** 2 - t.spacing[a] ** 2, 0.0)) / 2.3548 / t.spacing[a])
                  for a in (2, 1, 0))
    sigma = tuple(round(s, 4) for s in sigma)
    src = _template_stack(sigma)
    with torch.no_grad():
        out = torch.nn.functional.grid_sample(src, grid, mode="bilinear", padding_mode="zeros",
                                              align_corners=True)[0].numpy()
    gm, wm, csf, bm = out
    brain = bm >= 0.5
    healthy = gm * levels["gm"] + wm * levels["wm"] + csf * levels["csf"]
    vol = healthy * (1.0 + texture_amp * tex_d)

    lesion_any = None
    lsub = None
    vol_healthy = vol.copy() if return_healthy else None
    if les_ch is not None:
        from scipy import ndimage

        if max(sigma) > 0:
            les_ch = np.stack([ndimage.gaussian_filter(c, sigma=sigma, mode="constant", truncate=3.0) for c in les_ch])
        lo_n = 2.0 * (llo[::-1].astype(np.float64)) / (dims - 1.0) - 1.0  # (i, j, k) normalised
        hi_n = 2.0 * ((lhi[::-1] - 1).astype(np.float64)) / (dims - 1.0) - 1.0
        g = grid[0].numpy()
        inl = np.all((g >= lo_n.astype(np.float32)) & (g <= hi_n.astype(np.float32)), axis=-1)
        if inl.any():
            rng_k = np.flatnonzero(inl.any(axis=(1, 2)))
            rng_j = np.flatnonzero(inl.any(axis=(0, 2)))
            rng_i = np.flatnonzero(inl.any(axis=(0, 1)))
            lsub = (slice(rng_k[0], rng_k[-1] + 1), slice(rng_j[0], rng_j[-1] + 1), slice(rng_i[0], rng_i[-1] + 1))
            gs = g[lsub]
            ldims = (lhi - llo)[::-1].astype(np.float64)  # (i, j, k)
            crop_u = (gs.astype(np.float64) + 1.0) / 2.0 * (dims - 1.0) - llo[::-1]
            gl = (2.0 * crop_u / np.maximum(ldims - 1.0, 1.0) - 1.0).astype(np.float32)
            with torch.no_grad():
                lo_out = torch.nn.functional.grid_sample(torch.from_numpy(np.ascontiguousarray(les_ch))[None],
                                                         torch.from_numpy(gl)[None], mode="bilinear",
                                                         padding_mode="zeros", align_corners=True)[0].numpy()
            lo_out = np.clip(lo_out, 0.0, 1.0) * bm[lsub][None].clip(0, 1)
            if lesion in ("tumour", "stroke"):
                lo_out *= _main_component_region(lo_out.max(0))[None]
            v = vol[lsub]
            tx = tex_d[lsub]
            if lesion == "tumour":
                oed, core, nec = lo_out
                v = (1 - oed) * v + oed * les_levels["oedema"] * (1.0 + 0.4 * heterogeneity * tx)
                v = (1 - core) * v + core * les_levels["solid"] * (1.0 + heterogeneity * tx)
                v = (1 - nec) * v + nec * les_levels["necrosis"] * (1.0 + 0.3 * heterogeneity * tx)
                lesion_any = np.maximum(oed, core)
            else:
                key = "stroke" if lesion == "stroke" else "ms"
                lw = lo_out[0]
                v = (1 - lw) * v + lw * les_levels[key] * (1.0 + 0.4 * heterogeneity * tx)
                lesion_any = lw
            vol[lsub] = v

    vol *= bias_d * scale_int
    if vol_healthy is not None:
        vol_healthy *= bias_d * scale_int
    ref = scale_int * levels["gm"] if contrast != "FLAIR" else scale_int * levels["wm"]
    sigma_n = noise_frac * ref
    K, J, I = int(size[2]), int(size[1]), int(size[0])
    bmask = np.zeros((K, J, I), np.uint8)
    bmask[k0:k1, j0:j1, i0:i1] = brain
    head_info: dict = {}
    hmask = None
    if head:
        rng_head = np.random.default_rng([seed, 43, _CONTRAST_CODE[contrast]])
        full, hmask, head_info = _head(rng_head, t, contrast, levels["csf"], bmask > 0, size, sp, origin,
                                       M, shift, bias_coef)
        full *= scale_int
        if vol_healthy is not None:
            full_healthy = full.copy()
            full_healthy[k0:k1, j0:j1, i0:i1] = np.where(brain, vol_healthy, full[k0:k1, j0:j1, i0:i1])
            vol_healthy = full_healthy
        full[k0:k1, j0:j1, i0:i1] = np.where(brain, vol, full[k0:k1, j0:j1, i0:i1])
        vol, box_sl = full, (slice(None),) * 3
        del full
    else:
        box_sl = (slice(k0, k1), slice(j0, j1), slice(i0, i1))
    n1 = rng_noise.standard_normal(vol.shape, dtype=np.float32)
    n2 = rng_noise.standard_normal(vol.shape, dtype=np.float32)
    n1 *= sigma_n
    n1 += vol
    n2 *= sigma_n
    vol = np.sqrt(n1 * n1 + n2 * n2)
    del n1, n2
    if not head:
        vol[~brain] = 0.0
        if vol_healthy is not None:
            vol_healthy[~brain] = 0.0

    img = np.zeros((K, J, I), np.float32)
    img[box_sl] = vol
    lmask = np.zeros((K, J, I), np.uint8)
    if lesion_any is not None:
        lm = np.zeros(brain.shape, bool)
        lm[lsub] = lesion_any >= 0.5
        lm &= brain
        lmask[k0:k1, j0:j1, i0:i1] = lm
    voxel_ml = float(np.prod(sp)) / 1000.0
    n_les = int(lmask.sum())
    meta = {
        "seed": seed, "contrast": contrast, "lesion": lesion,
        "spacing_mm": [float(s) for s in sp], "size": [int(s) for s in size],
        "tissue_levels": {k: round(v * scale_int, 2) for k, v in levels.items()},
        "lesion_levels": ({k: round(v * scale_int, 2) for k, v in les_levels.items()} if lesion != "none" else {}),
        "noise_sigma": round(sigma_n, 3), "bias_strength": round(bias_strength, 4),
        "rotation_deg": [round(float(a), 3) for a in angles], "scale": [round(float(s), 4) for s in scale],
        "translation_mm": [round(float(s), 3) for s in shift], "elastic_mm": round(elastic_mm, 3),
        "brain_voxels": int(bmask.sum()), "brain_volume_ml": round(int(bmask.sum()) * voxel_ml, 2),
        "lesion_voxels": n_les, "lesion_volume_ml": round(n_les * voxel_ml, 3),
        "lesion_info": les_info,
    }
    direction = t.direction
    tissues = None
    if return_tissues:
        tissues = {}
        for name, arr in (("gm", gm), ("wm", wm), ("csf", csf)):
            full = np.zeros((K, J, I), np.float32)
            full[k0:k1, j0:j1, i0:i1] = np.clip(arr, 0.0, 1.0)
            tissues[name] = _image(full, size, sp, origin, direction)
    if head:
        meta["head"] = head_info
        meta["head_voxels"] = int(hmask.sum())
    ph = Phantom(image=_image(img, size, sp, origin, direction),
                 brain_mask=_image(bmask, size, sp, origin, direction),
                 lesion_mask=_image(lmask, size, sp, origin, direction), meta=meta, tissues=tissues)
    if head:
        ph.head_mask = _image(hmask.astype(np.uint8), size, sp, origin, direction)
    if vol_healthy is not None:
        healthy = np.zeros((K, J, I), np.float32)
        healthy[box_sl] = vol_healthy
        ph.healthy = _image(healthy, size, sp, origin, direction)
    return ph


def _head(rng: np.random.Generator, t: _Template, contrast: str, csf_level: float, brain: np.ndarray, size, sp,
          origin, M: np.ndarray, shift: np.ndarray, bias_coef: np.ndarray):
    """Noiseless relative head intensities outside the brain on the output grid (times the bias field).

    Returns (intensities (K, J, I) float32, head mask bool, info).  Layers follow
    the distance (mm) from the brain's envelope (the brain closed by a 3 mm
    Gaussian), with thicknesses modulated by a smooth random field; the orbits are
    placed at the template's eye positions moved by the phantom's affine.
    """
    from scipy import ndimage

    spz = tuple(float(s) for s in sp[::-1])  # (k, j, i) mm
    levels = {k: float(rng.uniform(*v)) for k, v in _HEAD[contrast].items()}
    levels["csf"] = float(csf_level)
    sm = ndimage.gaussian_filter(brain.astype(np.float32), sigma=[3.0 / s for s in spz])
    env = brain | (sm > 0.3)
    dist = ndimage.distance_transform_edt(~env, sampling=spz).astype(np.float32)
    dist -= 0.5 * min(spz)
    np.maximum(dist, 0.0, out=dist)
    # smooth thickness modulation in [0.7, 1.3]: coarse noise (16 mm) upsampled
    coarse = tuple(max(2, int(math.ceil(n * s / 16.0)) + 1) for n, s in zip(brain.shape, spz))
    mod = ndimage.zoom(rng.uniform(-1.0, 1.0, coarse), [n / c for n, c in zip(brain.shape, coarse)], order=1,
                       grid_mode=True, mode="nearest")[:brain.shape[0], :brain.shape[1], :brain.shape[2]]
    mod = (1.0 + 0.3 * mod).astype(np.float32)
    edge = float(min(spz))

    def s(x):
        return np.clip(0.5 + x / edge, 0.0, 1.0)

    out = np.zeros(brain.shape, np.float32)
    inner = 0.0 * mod
    thickness = {}
    for name, th in _HEAD_LAYERS:
        outer = inner + th * mod
        occ = s(dist - inner) - s(dist - outer) if name != "csf" else 1.0 - s(dist - outer)
        out += occ.astype(np.float32) * levels[name]
        thickness[name] = thickness.get(name, 0.0) + th
        inner = outer
    head = dist < inner
    # orbits: eye centres moved with the phantom's affine (output point P -> template point Q)
    Minv = np.linalg.inv(M)
    K, J, I = brain.shape
    d = t.direction
    ii = np.arange(I, dtype=np.float64)
    jj = np.arange(J, dtype=np.float64)
    kk = np.arange(K, dtype=np.float64)
    eyes = []
    for ras in _EYE_RAS:
        q = np.array([-ras[0], -ras[1], ras[2]])  # template LPS
        p = t.brain_centre + Minv @ (q - shift - t.brain_centre)
        idx = np.linalg.solve(d * np.asarray(sp)[None, :], p - origin)  # (i, j, k) output index
        eyes.append(idx)
        r_box = int(math.ceil((_ORBIT_RADIUS_MM + 2) / min(spz)))
        lo = [max(0, int(idx[a]) - r_box) for a in range(3)]
        hi = [min(n, int(idx[a]) + r_box + 2) for a, n in zip(range(3), (I, J, K))]
        if any(h <= l for l, h in zip(lo, hi)):
            continue
        sl = (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))
        pts = [ii[lo[0]:hi[0]][None, None, :], jj[lo[1]:hi[1]][None, :, None], kk[lo[2]:hi[2]][:, None, None]]
        off = [(pts[a] - idx[a]) * sp[a] for a in range(3)]
        r = np.sqrt(sum(o ** 2 for o in off))
        away = np.clip((dist[sl] - 2.0) / edge, 0.0, 1.0)  # keep 2 mm off the brain
        fat = s(_ORBIT_RADIUS_MM - r) * away
        vit = s(_EYE_RADIUS_MM - r) * away
        cover = s(_ORBIT_RADIUS_MM + 2.0 - r) * away  # skin over the orbit
        region = out[sl]
        region[:] = (1 - cover) * region + cover * levels["skin"]
        region[:] = (1 - fat) * region + fat * levels["orbital_fat"]
        region[:] = (1 - vit) * region + vit * levels["vitreous"]
        head[sl] |= cover > 0.5
    out[brain] = 0.0
    # the phantom's bias field (same polynomial as in the brain), on the output grid
    P = [origin[r] + sum(d[r, a] * (np.arange(n, dtype=np.float64) * sp[a]).reshape(
        [-1 if b == 2 - a else 1 for b in range(3)]) for a, n in zip(range(3), (I, J, K))) for r in range(3)]
    pn = [(P[r] - t.brain_centre[r]) / 80.0 for r in range(3)]
    terms = [pn[0], pn[1], pn[2], pn[0] ** 2 - 0.1, pn[1] ** 2 - 0.1, pn[2] ** 2 - 0.1,
             pn[0] * pn[1], pn[0] * pn[2], pn[1] * pn[2]]
    out *= np.exp(sum(c * tm for c, tm in zip(bias_coef, terms))).astype(np.float32)
    info = {"levels": {k: round(v, 4) for k, v in levels.items()},
            "layer_thickness_mm": {k: round(v, 2) for k, v in thickness.items()},
            "eyes_index": [[round(float(v), 1) for v in e] for e in eyes]}
    return out, head | brain, info


def resample_phantom(ph: Phantom, spacing=(1.0, 1.0, 1.0), rotation_deg=(0.0, 0.0, 0.0),
                     flip=(False, False, False)) -> Phantom:
    """The phantom as another acquisition: voxel size ``spacing`` (x, y, z mm; e.g. 4 mm slices),
    index axes rotated by ``rotation_deg`` (about x, y, z; oblique) and flipped where ``flip``.

    The new grid covers the rotated bounding box of the old one.  Thick voxels
    are simulated by Gaussian smoothing (FWHM = the voxel size) before linear
    resampling; the masks are resampled linearly and thresholded at 0.5.
    """
    img = ph.image
    sp0 = np.array(img.GetSpacing())
    d0 = np.array(img.GetDirection()).reshape(3, 3)
    sp = np.array([float(s) for s in spacing])
    d = _rotation(rotation_deg) @ d0
    for a, f in enumerate(flip):
        if f:
            d[:, a] = -d[:, a]
    size0 = np.array(img.GetSize())
    corners = np.array([[i, j, k] for i in (-0.5, size0[0] - 0.5) for j in (-0.5, size0[1] - 0.5)
                        for k in (-0.5, size0[2] - 0.5)])
    phys = np.array(img.GetOrigin()) + (corners * sp0) @ d0.T
    proj = phys @ d  # coordinates along the new axes
    lo, hi = proj.min(0), proj.max(0)
    size = np.maximum(np.ceil((hi - lo) / sp - 1e-6).astype(int), 1)
    origin = d @ (lo + sp / 2.0)
    ref = sitk.Image([int(v) for v in size], sitk.sitkUInt8)
    ref.SetSpacing([float(v) for v in sp])
    ref.SetOrigin([float(v) for v in origin])
    ref.SetDirection([float(v) for v in d.ravel()])
    sig_new = np.sqrt(np.maximum(sp ** 2 - sp0.min() ** 2, 0.0)) / 2.3548
    overlap = np.abs(d0.T @ d)  # (old axis, new axis)
    sig_old = (overlap * sig_new[None, :]).max(1)

    def acquire(im):
        if im is None:
            return None
        src = sitk.Cast(im, sitk.sitkFloat32)
        if sig_old.max() > 0:
            src = sitk.SmoothingRecursiveGaussian(src, [float(max(s, 1e-3)) for s in sig_old])
        return sitk.Resample(src, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)

    out_img = acquire(img)

    def mask(m):
        if m is None:
            return None
        r = sitk.Resample(sitk.Cast(m, sitk.sitkFloat32), ref, sitk.Transform(), sitk.sitkLinear, 0.0,
                          sitk.sitkFloat32)
        return sitk.Cast(r > 0.5, sitk.sitkUInt8)

    meta = dict(ph.meta, resampled={"spacing_mm": sp.tolist(), "rotation_deg": list(rotation_deg),
                                    "flip": [bool(f) for f in flip]})
    out = Phantom(image=out_img, brain_mask=mask(ph.brain_mask), lesion_mask=mask(ph.lesion_mask), meta=meta)
    out.head_mask = mask(ph.head_mask)
    out.healthy = acquire(ph.healthy)  # acquired the same way (None if the phantom has none)
    return out


# ----------------------------------------------------------------------------- files
def write_phantom(ph: Phantom, outdir: str | os.PathLike, stem: str, image_dtype: str = "float32") -> dict:
    """Write ``<stem>.nii.gz``, ``<stem>_brainmask.nii.gz`` and ``<stem>_lesion.nii.gz``; returns their paths.

    ``image_dtype``: "float32" (exact) or "int16" (rounded; smaller files).
    """
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    img = ph.image
    if image_dtype == "int16":
        a = np.clip(np.rint(sitk.GetArrayViewFromImage(img)), -32768, 32767).astype(np.int16)
        img = sitk.GetImageFromArray(a)
        img.CopyInformation(ph.image)
    elif image_dtype != "float32":
        raise ValueError(f"image_dtype must be 'float32' or 'int16', got {image_dtype!r}")
    paths = {"image": out / f"{stem}.nii.gz", "brain_mask": out / f"{stem}_brainmask.nii.gz",
             "lesion": out / f"{stem}_lesion.nii.gz"}
    sitk.WriteImage(img, str(paths["image"]), True)
    sitk.WriteImage(ph.brain_mask, str(paths["brain_mask"]), True)
    sitk.WriteImage(ph.lesion_mask, str(paths["lesion"]), True)
    return paths


def generate_cohort(outdir: str | os.PathLike, n: int, contrast: str = "T2", lesion: str = "none", seed: int = 0,
                    spacing: float | None = None, progress: Callable[[int, int, dict], None] | None = None,
                    image_dtype: str = "float32", head: bool = False) -> list[dict]:
    """Write ``n`` phantoms (seeds ``seed`` .. ``seed + n - 1``) and ``cohort.csv`` into ``outdir``.

    Returns one dict per phantom: stem, seed, contrast, lesion, lesion_voxels,
    lesion_ml and the three paths (image, brain_mask, lesion_mask); ``cohort.csv``
    has the same columns with the paths relative to ``outdir``.  Stems are
    ``phantom_<contrast>_<lesion>_<seed:06d>``.  ``progress(i, n, row)`` is called
    after each volume.  ``head=True``: head phantoms (not skull-stripped; stems
    ``phantom_head_<contrast>_<lesion>_<seed:06d>``), the brain mask stays the truth.
    """
    contrast = _check_contrast(contrast)
    lesion = _check_lesion(lesion)
    n = int(n)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        s = int(seed) + i
        ph = make_phantom(s, contrast=contrast, lesion=lesion, spacing=spacing, head=head)
        stem = f"phantom_{'head_' if head else ''}{contrast}_{lesion}_{s:06d}"
        paths = write_phantom(ph, out, stem, image_dtype=image_dtype)
        row = {"stem": stem, "seed": s, "contrast": contrast, "lesion": lesion,
               "lesion_voxels": ph.lesion_voxels, "lesion_ml": ph.lesion_volume_ml,
               "image": str(paths["image"]), "brain_mask": str(paths["brain_mask"]),
               "lesion_mask": str(paths["lesion"])}
        rows.append(row)
        if progress is not None:
            progress(i + 1, n, row)
    cols = ["stem", "seed", "contrast", "lesion", "lesion_voxels", "lesion_ml", "image", "brain_mask", "lesion_mask"]
    with open(out / "cohort.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({**r, **{k: os.path.relpath(r[k], out) for k in ("image", "brain_mask", "lesion_mask")}})
    return rows


def run_writer(generate, describe, done) -> int:
    """The command-line shape of the phantom writers (``uad phantoms``, ``uad heldout``):
    ``generate(progress)`` is called with a ``progress(i, n, row)`` that prints
    "[i/n] <describe(row)>, <elapsed> s" per volume; a ``ValueError`` / ``OSError`` /
    ``RuntimeError`` becomes one "error: ..." line and exit status 2; on success
    ``done(result)`` is printed and the status is 0."""
    import time

    t0 = time.time()

    def report(i, n, row):
        print(f"[{i}/{n}] {describe(row)}, {time.time() - t0:.1f} s", flush=True)

    try:
        result = generate(report)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {' '.join(str(e).split())}")
        return 2
    print(done(result))
    return 0


def _cli_phantoms(args) -> int:
    return run_writer(
        lambda progress: generate_cohort(args.outdir, args.n, contrast=args.contrast, lesion=args.lesion,
                                         seed=args.seed, spacing=args.spacing, progress=progress,
                                         image_dtype=args.dtype, head=args.head),
        lambda row: (f"{row['stem']}: seed {row['seed']}, lesion {row['lesion_ml']:.2f} ml "
                     f"({row['lesion_voxels']} voxels)"),
        lambda _: f"wrote {args.n} phantom(s) and cohort.csv to {args.outdir}")


def _contrast_arg(text: str) -> str:
    import argparse

    try:
        return _check_contrast(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _lesion_arg(text: str) -> str:
    import argparse

    try:
        return _check_lesion(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_cli(subparsers) -> None:
    """Register ``uad phantoms OUTDIR --n N --contrast C --lesion L --seed S [--spacing MM]``."""
    p = subparsers.add_parser("phantoms", help="generate MNI152-based brain MRI phantoms with lesions",
                              description="Generate healthy or lesioned brain MRI phantoms (MNI152 2009a tissue "
                                          "maps, random warp, intensities, bias field, Rician noise) with brain and "
                                          "lesion masks, plus cohort.csv.")
    p.add_argument("outdir", help="output folder")
    p.add_argument("--n", type=int, default=1, help="number of volumes (default 1)")
    p.add_argument("--contrast", default="T2", type=_contrast_arg, metavar="{T1,T2,FLAIR}",
                   help="T1, T2 or FLAIR (default T2)")
    p.add_argument("--lesion", default="none", type=_lesion_arg, metavar="{none,tumour,stroke,ms}",
                   help="none, tumour, stroke or ms (default none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first volume; volume i uses seed + i")
    p.add_argument("--spacing", type=float, default=None,
                   help="isotropic voxel size in mm (default: the 1 mm template grid)")
    p.add_argument("--dtype", choices=("float32", "int16"), default="float32", help="image voxel type on disk")
    p.add_argument("--head", action="store_true",
                   help="head phantoms (not skull-stripped): CSF rim, skull, scalp and fat, orbits, noisy "
                        "background; the brain mask is the ground truth")
    p.set_defaults(func=_cli_phantoms)


# ----------------------------------------------------------------------------- training stream
def thick_slice_profile(arr: np.ndarray, axis: int, thickness: float, offset: float = 0.0,
                        sub_samples: int = 8) -> np.ndarray:
    """``arr`` as if acquired with thick slices along ``axis`` and resampled back onto its own grid.

    ``thickness`` (in voxels of ``arr``, >= 1) is the slice thickness = slice spacing of the
    simulated acquisition; its first slice is centred at index ``offset``.  Each thick slice is
    the mean over its width (a box slice profile, ``sub_samples`` linearly interpolated samples)
    and the result is the linear interpolation between slice centres (clamped at both ends) --
    what inference sees when a thick-slice scan is resampled onto the model's grid.  A
    thickness of 1 with offset 0 returns ``arr`` (as float32).
    """
    a = np.moveaxis(np.asarray(arr, np.float32), axis, 0)
    n = a.shape[0]
    u = float(thickness)
    if not u >= 1.0:
        raise ValueError(f"thickness must be >= 1 voxel, got {thickness}")

    def at(pos: np.ndarray) -> np.ndarray:  # linear interpolation along the axis, clamped
        p = np.clip(pos, 0.0, n - 1.0)
        i0 = np.minimum(np.floor(p).astype(int), max(n - 2, 0))
        w = (p - i0).reshape((-1,) + (1,) * (a.ndim - 1)).astype(np.float32)
        i1 = np.minimum(i0 + 1, n - 1)
        return a[i0] * (1.0 - w) + a[i1] * w

    o = float(offset) % u
    centres = o + u * np.arange(-1 if o > 0 else 0, int(np.ceil((n - 1 - o) / u)) + 2)  # index 0 to n-1 bracketed
    k = max(1, int(sub_samples)) if u > 1.0 else 1
    sub = ((np.arange(k) + 0.5) / k - 0.5) * u if u > 1.0 else np.zeros(1)
    thick = np.mean([at(centres + d) for d in sub], axis=0)  # (m, ...)
    q = (np.arange(n) - centres[0]) / u  # position in thick-slice units
    j0 = np.clip(np.floor(q).astype(int), 0, len(centres) - 2)
    w = np.clip(q - j0, 0.0, 1.0).reshape((-1,) + (1,) * (a.ndim - 1)).astype(np.float32)
    out = thick[j0] * (1.0 - w) + thick[j0 + 1] * w
    return np.ascontiguousarray(np.moveaxis(out.astype(np.float32), 0, axis))


#: Thick-slice augmentation of the training phantoms: the axis (numpy order z, y, x) of the simulated
#: thick slices is axial, coronal or sagittal with these probabilities.
THICK_SLICE_AXES = ((0, 0.5), (1, 0.25), (2, 0.25))


def thick_slice_draw(seed: int, fraction: float, thickness_mm=(3.0, 6.0)):
    """Whether, and how, the training phantom of ``seed`` is acquired with thick slices.

    Returns None (not augmented; probability 1 - ``fraction``) or ``(axis, thickness_mm, offset)``,
    a deterministic function of the seed (a paired healthy twin gets the lesion phantom's draw).
    """
    if not fraction > 0:
        return None
    r = np.random.default_rng([int(seed), 778])
    if r.random() >= float(fraction):
        return None
    axes, p = zip(*THICK_SLICE_AXES)
    axis = int(r.choice(axes, p=p))
    lo, hi = float(thickness_mm[0]), float(thickness_mm[1])
    t = float(r.uniform(lo, hi))
    return axis, t, float(r.uniform(0.0, 1.0))


#: Skull-stripping-error augmentation: the smooth random field that moves the brain mask's boundary has
#: this correlation length (mm, the sigma of the Gaussian that smooths white noise into it).
STRIP_ERROR_SCALE_MM = 15.0


def strip_error_draw(seed: int, fraction: float, amplitude_mm=(2.0, 6.0)):
    """Whether, and how far, the training phantom of ``seed`` is skull-stripped with an imperfect mask.

    Returns None (stripped with its true brain mask; probability 1 - ``fraction``) or the largest
    displacement (mm, ~ U(``amplitude_mm``)) of the mask's boundary, a deterministic function of the
    seed (a paired healthy twin gets the lesion phantom's draw, as with ``thick_slice_draw``).
    """
    if not fraction > 0:
        return None
    r = np.random.default_rng([int(seed), 779])
    if r.random() >= float(fraction):
        return None
    return float(r.uniform(float(amplitude_mm[0]), float(amplitude_mm[1])))


def perturbed_brain_mask(brain: np.ndarray, spacing_zyx, amplitude_mm: float, seed: int,
                         scale_mm: float = STRIP_ERROR_SCALE_MM) -> np.ndarray:
    """``brain`` (bool, (z, y, x)) with its boundary moved out and in by a smooth random field.

    The field is white noise (seeded by ``seed``) smoothed by a Gaussian of ``scale_mm``, scaled to a standard
    deviation of ``amplitude_mm`` / 2 and clipped to +-``amplitude_mm``; a voxel is in the new mask when its
    signed distance to the brain's boundary (mm from the voxel's centre to the surface half a voxel beyond the
    outermost brain voxels; negative inside) is below the field there.  Where the field is positive the mask
    takes in the tissue outside the brain (the CSF rim, the inner table of the skull), where it is negative it
    leaves out the brain's surface: the errors of a skull stripper or a registered template mask, which the
    models meet on clinical scans.  ``amplitude_mm`` 0 returns ``brain``.
    """
    from scipy import ndimage

    brain = np.asarray(brain, bool)
    if not amplitude_mm > 0 or not brain.any():
        return brain.copy()
    sp = tuple(float(v) for v in spacing_zyx)
    half = 0.5 * min(sp)
    signed = np.where(brain, half - ndimage.distance_transform_edt(brain, sampling=sp),
                      ndimage.distance_transform_edt(~brain, sampling=sp) - half)
    rng = np.random.default_rng([int(seed), 780])
    field = ndimage.gaussian_filter(rng.standard_normal(brain.shape), sigma=[float(scale_mm) / v for v in sp],
                                    mode="wrap")
    field *= 0.5 * float(amplitude_mm) / max(float(field.std()), 1e-12)
    np.clip(field, -float(amplitude_mm), float(amplitude_mm), out=field)
    return signed < field


def auto_phantom_spacing(image_size: int) -> float:
    """Phantom voxel size (mm) used for a model resolution: about one model pixel, within [1, 2] mm."""
    return float(min(2.0, max(1.0, round(2.0 * 190.0 / float(image_size)) / 2.0)))


def _with_arrays(ph: Phantom, meta: dict, image: np.ndarray, brain: np.ndarray, lesion: np.ndarray | None) -> Phantom:
    """``ph`` with new image (float32), brain mask and lesion mask (bool; cut to the brain) arrays on its grid,
    ``meta`` updated with the lesion's size."""
    out = {}
    arrays = [("image", np.asarray(image, np.float32)), ("brain_mask", brain.astype(np.uint8))]
    if ph.lesion_mask is not None and lesion is not None:
        les = (lesion & brain).astype(np.uint8)
        arrays.append(("lesion_mask", les))
        meta["lesion_voxels"] = int(les.sum())
        meta["lesion_volume_ml"] = round(int(les.sum()) * float(np.prod(ph.image.GetSpacing())) / 1000.0, 3)
    for name, arr in arrays:
        im = sitk.GetImageFromArray(arr)
        im.CopyInformation(getattr(ph, name))
        out[name] = im
    return dataclasses.replace(ph, meta=meta, **out)


def _augmentation_share(name: str, fraction, mm) -> tuple[float, tuple[float, float]]:
    """A validated (fraction of the phantoms, (low, high) mm) of one of ``TrainingSliceSource``'s augmentations."""
    if not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"{name}_fraction must be in [0, 1], got {fraction}")
    if len(mm) != 2 or not 0.0 < float(mm[0]) <= float(mm[1]):
        raise ValueError(f"{name}_mm must be (low, high) mm with 0 < low <= high, got {mm}")
    return float(fraction), (float(mm[0]), float(mm[1]))


@dataclass
class _PoolEntry:
    seed: int
    lesion: str
    slices: np.ndarray  # (n, S, S) float32 in [0, 1]
    masks: np.ndarray  # (n, S, S) bool
    lesions: np.ndarray  # (n, S, S) bool, lesion at model resolution
    labels: np.ndarray  # (n,) int64


class TrainingSliceSource:
    """A stream of 2-D axial training slices from a rotating pool of phantoms.

    The pool holds ``pool_size`` preprocessed phantom volumes (phantom seeds
    ``seed, seed + 1, ...``; with ``holdout=True`` offset by
    ``HOLDOUT_SEED_OFFSET``).  Every ``refresh_every`` batches the oldest volume
    is replaced by the next phantom (prepared in a background thread when
    ``prefetch``).  Volumes go through ``uad.preprocess.preprocess`` with their
    brain masks; slices whose brain area is below ``min_brain_fraction`` of the
    volume's largest slice are not drawn.  With ``lesion`` set and
    ``lesion_fraction`` > 0, that fraction of the volumes (decided per phantom
    seed) carries the lesion ("any" draws tumour, stroke or ms per volume).
    A slice's label is 1 when its lesion map at model resolution (the lesion
    mask preprocessed on the same geometry) has a pixel >= 0.5 inside the brain.

    ``paired=True`` (weakly supervised training): every lesion phantom comes with
    its **healthy twin** -- the same seed without the lesion, i.e. the same
    anatomy, contrast, bias field and noise -- whose slices join the pool with
    label 0.  Then a lesion slice and a healthy slice exist at every position of
    every anatomy, and only the lesion tells the classes apart: without twins
    the image label is also predicted by where a slice lies (lesions sit in the
    large central slices), a shortcut a classifier learns instead of the
    lesion, so that its gradient (Wolleb's guidance) does not point at it.
    """

    def __init__(self, contrast: str = "T2", image_size: int = 64, seed: int = 0, pool_size: int = 8,
                 refresh_every: int = 50, lesion: str = "none", lesion_fraction: float = 0.0, holdout: bool = False,
                 spacing: float | None = None, normalisation: dict | None = None, min_brain_fraction: float = 0.2,
                 flip_probability: float = 0.5, prefetch: bool = True, paired: bool = False,
                 thick_fraction: float = 0.0, thick_mm=(3.0, 6.0), strip_fraction: float = 0.0,
                 strip_mm=(2.0, 6.0)):
        self.contrast = _check_contrast(contrast)
        self.thick_fraction, self.thick_mm = _augmentation_share("thick", thick_fraction, thick_mm)
        self.strip_fraction, self.strip_mm = _augmentation_share("strip", strip_fraction, strip_mm)
        self.paired = bool(paired)
        self.lesion = "any" if str(lesion).lower() == "any" else _check_lesion(lesion)
        if not 0.0 <= float(lesion_fraction) <= 1.0:
            raise ValueError(f"lesion_fraction must be in [0, 1], got {lesion_fraction}")
        if int(pool_size) < 1:
            raise ValueError(f"pool_size must be >= 1, got {pool_size}")
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.pool_size = int(pool_size)
        self.refresh_every = max(1, int(refresh_every))
        self.lesion_fraction = float(lesion_fraction)
        self.holdout = bool(holdout)
        self.spacing = float(spacing) if spacing is not None else auto_phantom_spacing(self.image_size)
        self.normalisation = dict(normalisation or {})
        self.min_brain_fraction = float(min_brain_fraction)
        self.flip_probability = float(flip_probability)
        self.prefetch = bool(prefetch)
        self.pool: list[_PoolEntry] = []
        self._next = 0  # index of the next phantom in the seed sequence
        self._batches = 0
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._lock = threading.Lock()

    # -- phantoms
    @property
    def base_seed(self) -> int:
        return self.seed + (HOLDOUT_SEED_OFFSET if self.holdout else 0)

    def phantom_spec(self, k: int) -> tuple[int, str]:
        """(phantom seed, lesion kind) of the k-th phantom of the stream."""
        s = self.base_seed + int(k)
        kind = "none"
        if self.lesion != "none" and self.lesion_fraction > 0:
            r = np.random.default_rng([s, 777])
            if r.random() < self.lesion_fraction:
                kind = self.lesion if self.lesion != "any" else ("tumour", "stroke", "ms")[int(r.integers(3))]
        return s, kind

    def _build(self, k: int) -> _PoolEntry:
        s, kind = self.phantom_spec(k)
        entry = self._build_one(s, kind)
        if self.paired and kind != "none":
            twin = self._build_one(s, "none")
            entry = _PoolEntry(seed=s, lesion=kind,
                               slices=np.concatenate([entry.slices, twin.slices]),
                               masks=np.concatenate([entry.masks, twin.masks]),
                               lesions=np.concatenate([entry.lesions, twin.lesions]),
                               labels=np.concatenate([entry.labels, twin.labels]))
        return entry

    def _build_one(self, s: int, kind: str) -> _PoolEntry:
        from .preprocess import preprocess

        strip = strip_error_draw(s, self.strip_fraction, self.strip_mm)
        ph = make_phantom(s, contrast=self.contrast, lesion=kind, spacing=self.spacing, head=strip is not None)
        ph = self._thick(ph, s)
        if strip is not None:
            ph = self._strip(ph, s, strip)
        stack = preprocess(ph.image, self.image_size, brain_mask=ph.brain_mask,
                           normalisation=self.normalisation or None)
        n = len(stack)
        lesions = np.zeros((n, self.image_size, self.image_size), bool)
        if ph.lesion_voxels > 0:
            lf = sitk.Cast(ph.lesion_mask, sitk.sitkFloat32)
            norm = dict(self.normalisation)
            norm.update({"lower": 0.0, "upper": 100.0, "clip": True})
            ls = preprocess(lf, self.image_size, brain_mask=ph.brain_mask, normalisation=norm)
            if not np.array_equal(ls.indices, stack.indices):
                raise RuntimeError("lesion and image slice stacks differ")
            lesions = (ls.denormalise(ls.slices) >= 0.5) & stack.masks
        area = stack.masks.reshape(n, -1).sum(1)
        keep = area >= max(1.0, self.min_brain_fraction * float(area.max()))
        labels = lesions[keep].reshape(int(keep.sum()), -1).any(1).astype(np.int64)
        return _PoolEntry(seed=s, lesion=kind, slices=np.ascontiguousarray(stack.slices[keep], np.float32),
                          masks=np.ascontiguousarray(stack.masks[keep]), lesions=np.ascontiguousarray(lesions[keep]),
                          labels=labels)

    def _thick(self, ph: Phantom, s: int) -> Phantom:
        """The phantom of seed ``s`` acquired with thick slices when ``thick_slice_draw`` says so.

        Image, brain and lesion masks go through ``thick_slice_profile`` on the phantom's
        (isotropic) grid; the masks are thresholded at 0.5 and the image zeroed outside the
        new brain mask, as a thick-slice scan resampled onto the model's grid (a head phantom
        keeps its head: ``_strip`` strips it).
        """
        draw = thick_slice_draw(s, self.thick_fraction, self.thick_mm)
        if draw is None:
            return ph
        axis, t_mm, frac = draw
        u = max(1.0, t_mm / float(ph.image.GetSpacing()[2 - axis]))

        def thick(im: sitk.Image) -> np.ndarray:
            return thick_slice_profile(sitk.GetArrayViewFromImage(im), axis, u, frac * u)

        brain = thick(ph.brain_mask) >= 0.5
        img = np.maximum(thick(ph.image), 0.0)
        img = img if ph.head_mask is not None else np.where(brain, img, 0.0)
        les = None if ph.lesion_mask is None else thick(ph.lesion_mask) >= 0.5
        return _with_arrays(ph, dict(ph.meta, thick_slices={"axis_zyx": axis, "thickness_mm": round(t_mm, 3)}),
                            img, brain, les)

    def _strip(self, ph: Phantom, s: int, amplitude_mm: float) -> Phantom:
        """The head phantom ``ph`` of seed ``s`` skull-stripped with its brain mask perturbed by up to
        ``amplitude_mm`` (``perturbed_brain_mask``): the image is zeroed outside the perturbed mask, which
        becomes the phantom's brain mask (what preprocessing normalises over and masks the input with, as
        inference does with a stripper's mask); the lesion is cut to it."""
        brain = sitk.GetArrayViewFromImage(ph.brain_mask) > 0
        mask = perturbed_brain_mask(brain, ph.image.GetSpacing()[::-1], amplitude_mm, s)
        img = np.where(mask, sitk.GetArrayViewFromImage(ph.image), 0.0)
        les = None if ph.lesion_mask is None else sitk.GetArrayViewFromImage(ph.lesion_mask) > 0
        meta = dict(ph.meta, strip_error={"amplitude_mm": round(amplitude_mm, 3),
                                          "added_voxels": int((mask & ~brain).sum()),
                                          "removed_voxels": int((brain & ~mask).sum())})
        return dataclasses.replace(_with_arrays(ph, meta, img, mask, les), head_mask=None)

    def _submit_next(self) -> None:
        if not self.prefetch:
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="uad-phantoms")
        self._pending = self._executor.submit(self._build, self._next)

    def _take_next(self) -> _PoolEntry:
        if self._pending is not None:
            entry = self._pending.result()
            self._pending = None
        else:
            entry = self._build(self._next)
        self._next += 1
        return entry

    def fill(self) -> "TrainingSliceSource":
        """Build the pool now (otherwise done by the first ``sample_batch``)."""
        with self._lock:
            while len(self.pool) < self.pool_size:
                self.pool.append(self._take_next())
            if self.prefetch and self._pending is None:
                self._submit_next()
        return self

    def refresh(self) -> None:
        """Replace the oldest pool volume by the next phantom of the stream."""
        with self._lock:
            if not self.pool:
                return
            self.pool.pop(0)
            self.pool.append(self._take_next())
            self._submit_next()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
            self._pending = None

    def __del__(self):  # pragma: no cover - best effort
        try:
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
        except Exception:
            pass

    def describe(self) -> str:
        """One line on the stream: its seeds, pool, twins and thick-slice share."""
        extra = ", each lesion phantom with its healthy twin" if self.paired else ""
        if self.thick_fraction > 0:
            lo, hi = self.thick_mm
            extra += f", {self.thick_fraction:.0%} acquired with {lo:g}-{hi:g} mm thick slices"
        if self.strip_fraction > 0:
            lo, hi = self.strip_mm
            extra += f", {self.strip_fraction:.0%} skull-stripped with masks off by up to {lo:g}-{hi:g} mm"
        return f"phantom seeds {self.base_seed}, {self.base_seed + 1}, ... (pool of {self.pool_size}){extra}"

    @property
    def seeds(self) -> list[int]:
        return [e.seed for e in self.pool]

    # -- sampling
    def sample_batch(self, batch_size: int, generator: np.random.Generator, return_lesions: bool = False):
        """``(x (B,1,S,S) float in [0,1], mask (B,1,S,S) bool, labels (B,) long)``.

        ``return_lesions=True`` appends the lesion masks at model resolution (B,1,S,S) bool.
        """
        import torch

        if not self.pool:
            self.fill()
        elif self._batches > 0 and self._batches % self.refresh_every == 0:
            self.refresh()
        self._batches += 1
        b = int(batch_size)
        vols = generator.integers(0, len(self.pool), b)
        x = np.empty((b, self.image_size, self.image_size), np.float32)
        m = np.empty((b, self.image_size, self.image_size), bool)
        les = np.empty((b, self.image_size, self.image_size), bool)
        y = np.empty(b, np.int64)
        for n, v in enumerate(vols):
            e = self.pool[int(v)]
            s = int(generator.integers(0, len(e.slices)))
            x[n], m[n], les[n], y[n] = e.slices[s], e.masks[s], e.lesions[s], e.labels[s]
        flip = generator.random(b) < self.flip_probability
        x[flip] = x[flip][..., ::-1]
        m[flip] = m[flip][..., ::-1]
        les[flip] = les[flip][..., ::-1]
        out = (torch.from_numpy(x)[:, None], torch.from_numpy(m)[:, None], torch.from_numpy(y))
        if return_lesions:
            out = out + (torch.from_numpy(les)[:, None],)
        return out
