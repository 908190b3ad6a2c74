"""Volume -> stack of normalised axial slices at the model resolution.

Conventions
-----------
* Orientation: the volume is reoriented with ``sitk.DICOMOrient(image, "LPS")``
  (``CANONICAL_ORIENTATION``): index i runs right -> left, j anterior ->
  posterior, k inferior -> superior, direction ~ identity.  A slice as a numpy
  array ``slices[n]`` is indexed ``[row = j, column = i]``, so shown with
  ``imshow`` it is in the radiological convention (anterior up, the patient's
  right on the viewer's left).  Oblique volumes get the closest such order
  (the voxel grid itself is never rotated).
* Brain mask: given (any 3-D volume on the same physical space, > 0 = brain),
  or computed for skull-stripped input (threshold at ``mask_threshold`` x a
  robust maximum above the background level, largest 3-D connected component,
  holes filled per axial slice, which also fills closed 3-D cavities).
* Field of view: the in-plane bounding box of the brain over the whole volume,
  enlarged by ``margin`` on each side and made square in physical units; the
  same box for every slice.  It is resampled to ``image_size`` x
  ``image_size`` isotropic pixels (Gaussian anti-aliasing before downsampling,
  linear interpolation); slices are never interpolated across z.
* Intensities: brain percentiles, ``lower`` (1) -> 0 and ``upper`` (99) -> 1,
  clipped to [0, 1], zero outside the brain mask.

``normalisation`` (the model config's dict) may set ``lower``, ``upper``
(percentiles), ``clip`` (bool), ``margin`` (fraction of the brain box added
per side) and ``mask_threshold`` (fraction of the robust maximum used by the
automatic brain mask).  Other keys are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from . import InputError
from .imageio import validate, validate_mask

CANONICAL_ORIENTATION = "LPS"

DEFAULT_NORMALISATION = {
    "lower": 1.0,  # brain percentile mapped to 0
    "upper": 99.0,  # brain percentile mapped to 1
    "clip": True,
    "margin": 0.05,  # fraction of the brain bounding box added on each side
    "mask_threshold": 0.05,  # automatic brain mask: fraction of the robust maximum
}


def normalisation_settings(normalisation: dict | None = None) -> dict:
    """The defaults updated with the known keys of ``normalisation``."""
    s = dict(DEFAULT_NORMALISATION)
    for k, v in (normalisation or {}).items():
        if k in s and v is not None:
            s[k] = type(DEFAULT_NORMALISATION[k])(v)
    if not 0 <= s["lower"] < s["upper"] <= 100:
        raise ValueError(f"normalisation percentiles must satisfy 0 <= lower < upper <= 100, "
                         f"got {s['lower']}, {s['upper']}")
    if s["margin"] < 0:
        raise ValueError("normalisation margin must be >= 0")
    return s


# -- orientation --------------------------------------------------------------------------------
def orientation_of(image: sitk.Image) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """(permute order, flip axes) that DICOMOrient applies to reach ``CANONICAL_ORIENTATION``.

    Both in SimpleITK index order (x, y, z): the oriented image is the input with
    its axes permuted by ``permute`` and then flipped where ``flip`` is true.
    """
    f = sitk.DICOMOrientImageFilter()
    f.SetDesiredCoordinateOrientation(CANONICAL_ORIENTATION)
    # The permutation depends only on the direction: run it on a 1-voxel image with that direction.
    probe = sitk.Image([1, 1, 1], sitk.sitkUInt8)
    probe.SetDirection(image.GetDirection())
    f.Execute(probe)
    return tuple(int(p) for p in f.GetPermuteOrder()), tuple(bool(b) for b in f.GetFlipAxes())


def orient_array(arr: np.ndarray, permute, flip) -> np.ndarray:
    """Input array (z, y, x) -> canonical array (k, j, i), as DICOMOrient does to the image."""
    a = arr.transpose(2, 1, 0).transpose(tuple(permute))
    for ax, fl in enumerate(flip):
        if fl:
            a = np.flip(a, ax)
    return np.ascontiguousarray(a.transpose(2, 1, 0))


def unorient_array(arr: np.ndarray, permute, flip) -> np.ndarray:
    """Inverse of ``orient_array``: canonical (k, j, i) -> the input's (z, y, x) voxel order."""
    a = arr.transpose(2, 1, 0)
    for ax, fl in enumerate(flip):
        if fl:
            a = np.flip(a, ax)
    a = a.transpose(tuple(int(i) for i in np.argsort(permute)))
    return np.ascontiguousarray(a.transpose(2, 1, 0))


# -- brain mask ---------------------------------------------------------------------------------
def compute_brain_mask(arr: np.ndarray, threshold_fraction: float = 0.05) -> np.ndarray:
    """Brain mask of a skull-stripped volume (array k, j, i); see the module docstring."""
    from scipy import ndimage

    a = np.asarray(arr, dtype=np.float32)
    base = float(a.min())
    above = a[a > base]
    if above.size == 0:
        return np.zeros(a.shape, bool)
    robust_max = float(np.percentile(above, 99.0))
    thr = base + threshold_fraction * (robust_max - base)
    fg = a > thr
    lab, n = ndimage.label(fg)
    if n == 0:
        return np.zeros(a.shape, bool)
    counts = np.bincount(lab.ravel())
    counts[0] = 0
    mask = lab == int(np.argmax(counts))
    return fill_holes_per_slice(mask)


def fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """Fill the holes of every axial slice (axis 0) of a 3-D mask (this also fills closed 3-D cavities)."""
    from scipy import ndimage

    struct = np.zeros((3, 3, 3), bool)
    struct[1] = ndimage.generate_binary_structure(2, 1)  # in-plane 4-connectivity, nothing through z
    lab, n = ndimage.label(~mask, structure=struct)
    if n == 0:
        return mask.copy()
    outside = np.zeros(n + 1, bool)
    for border in (lab[:, 0, :], lab[:, -1, :], lab[:, :, 0], lab[:, :, -1]):
        outside[np.unique(border)] = True
    outside[0] = True  # label 0 = mask voxels
    return mask | ~outside[lab]
    return mask


def _mask_on_grid(mask: sitk.Image, image: sitk.Image) -> np.ndarray:
    """The mask as a bool array in the image's voxel order (resampled if its grid differs)."""
    validate_mask(mask, image)
    same = (mask.GetSize() == image.GetSize()
            and np.allclose(mask.GetSpacing(), image.GetSpacing(), rtol=1e-4, atol=1e-5)
            and np.allclose(mask.GetOrigin(), image.GetOrigin(), rtol=0, atol=1e-3 * min(image.GetSpacing()))
            and np.allclose(mask.GetDirection(), image.GetDirection(), atol=1e-4))
    if not same:
        ref = sitk.Image(image.GetSize(), sitk.sitkUInt8)
        ref.CopyInformation(image)
        m = sitk.Cast(sitk.GetImageFromArray((sitk.GetArrayViewFromImage(mask) > 0).astype(np.uint8)), sitk.sitkUInt8)
        m.CopyInformation(mask)
        mask = sitk.Resample(m, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    out = sitk.GetArrayFromImage(mask) > 0
    if not out.any():
        raise InputError("brain mask: does not overlap the image")
    return out


# -- the stack ----------------------------------------------------------------------------------
@dataclass
class SliceStack:
    """Normalised axial slices and everything needed to map results back to the input grid."""

    slices: np.ndarray  # (N, S, S) float32 in [0, 1], zero outside the brain
    masks: np.ndarray  # (N, S, S) bool, brain at model resolution
    indices: np.ndarray  # (N,) axial index k of each slice in the canonical volume
    image_size: int
    reference: sitk.Image  # the input image (its grid is the output grid; never modified)
    oriented_reference: sitk.Image  # geometry of the canonical (LPS) volume (1 component, no voxel data kept)
    permute: tuple  # DICOMOrient permute order (x, y, z)
    flip: tuple  # DICOMOrient flip axes
    brain: np.ndarray  # (K, J, I) bool brain mask of the canonical volume at the input resolution
    center: tuple  # (cj, ci) centre of the field of view, canonical index units
    step: tuple  # (dj, di) input voxels per model pixel along j and i
    fov_mm: float  # side of the square field of view
    lower: float  # input intensity mapped to 0
    upper: float  # input intensity mapped to 1
    settings: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(len(self.indices))

    @property
    def oriented_shape(self) -> tuple:
        return self.brain.shape

    def denormalise(self, x01: np.ndarray) -> np.ndarray:
        return (self.lower + np.asarray(x01, np.float32) * (self.upper - self.lower)).astype(np.float32)

    def brain_mask_array(self) -> np.ndarray:
        """Brain mask (bool) in the input's voxel order (z, y, x)."""
        return unorient_array(self.brain, self.permute, self.flip)

    def brain_mask_image(self) -> sitk.Image:
        """Brain mask as a uint8 image on the input's grid."""
        img = sitk.GetImageFromArray(self.brain_mask_array().astype(np.uint8))
        img.CopyInformation(self.reference)
        return img


def _resample_inplane(stack: np.ndarray, center, step, size: int, order: int = 1) -> np.ndarray:
    """(N, J, I) canonical slices -> (N, S, S): output pixel (v, u) samples j = cj + (v - c) dj, i = ci + (u - c) di."""
    from scipy import ndimage

    c = (size - 1) / 2.0
    (cj, ci), (dj, di) = center, step
    out = ndimage.affine_transform(
        stack, np.array([1.0, dj, di]), offset=np.array([0.0, cj - c * dj, ci - c * di]),
        output_shape=(stack.shape[0], size, size), order=order, mode="constant", cval=0.0, prefilter=False)
    return out.astype(np.float32)


def preprocess(image: sitk.Image, image_size: int, brain_mask: sitk.Image | None = None,
               normalisation: dict | None = None) -> SliceStack:
    """Volume -> ``SliceStack`` (see the module docstring for every convention)."""
    from scipy import ndimage

    validate(image)
    size = int(image_size)
    if size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    s = normalisation_settings(normalisation)
    info: dict = {"orientation": CANONICAL_ORIENTATION, "warnings": []}

    permute, flip = orientation_of(image)
    oriented = sitk.DICOMOrient(image, CANONICAL_ORIENTATION)
    arr = sitk.GetArrayFromImage(oriented).astype(np.float32, copy=False)  # (K, J, I)
    geom = sitk.Image([1, 1, 1], sitk.sitkUInt8)
    geom.SetSpacing(oriented.GetSpacing())
    geom.SetOrigin(oriented.GetOrigin())
    geom.SetDirection(oriented.GetDirection())
    sx, sy, _ = oriented.GetSpacing()
    del oriented

    if brain_mask is not None:
        brain = orient_array(_mask_on_grid(brain_mask, image), permute, flip)
        info["brain_mask"] = "given"
    else:
        brain = compute_brain_mask(arr, s["mask_threshold"])
        info["brain_mask"] = "automatic"
        if not brain.any():
            raise InputError("input image: no brain found by the automatic brain mask; pass a brain mask")
        frac = float(brain.mean())
        if frac > 0.6:
            info["warnings"].append(f"the automatic brain mask covers {100 * frac:.0f}% of the volume; "
                                    f"is the input skull-stripped? Pass a brain mask otherwise")

    vals = arr[brain]
    lo, hi = (float(v) for v in np.percentile(vals, [s["lower"], s["upper"]]))
    if hi <= lo:
        hi = float(vals.max())
    if hi <= lo:
        raise InputError("input image: the intensities inside the brain mask are constant")

    indices = np.flatnonzero(brain.any(axis=(1, 2)))
    rows = np.flatnonzero(brain.any(axis=(0, 2)))
    cols = np.flatnonzero(brain.any(axis=(0, 1)))
    j0, j1, i0, i1 = rows[0], rows[-1], cols[0], cols[-1]
    ext = max((j1 - j0 + 1) * sy, (i1 - i0 + 1) * sx)
    fov = ext * (1.0 + 2.0 * s["margin"])
    pixel = fov / size
    center = ((j0 + j1) / 2.0, (i0 + i1) / 2.0)
    step = (pixel / sy, pixel / sx)

    sub = arr[indices]
    bsub = brain[indices]
    norm = (sub - lo) / (hi - lo)
    if s["clip"]:
        norm = np.clip(norm, 0.0, 1.0)
    norm = np.where(bsub, norm, 0.0).astype(np.float32)
    sig = tuple(max(0.0, (st - 1.0) / 2.0) for st in step)
    if max(sig) > 0:
        norm = ndimage.gaussian_filter(norm, sigma=(0.0, sig[0], sig[1]), mode="constant", cval=0.0)
    slices = _resample_inplane(norm, center, step, size)
    masks = _resample_inplane(bsub.astype(np.float32), center, step, size) > 0.5
    if s["clip"]:
        np.clip(slices, 0.0, 1.0, out=slices)
    slices *= masks

    info.update({"n_slices": int(len(indices)), "fov_mm": float(fov), "pixel_mm": float(pixel),
                 "lower": lo, "upper": hi, "permute": list(permute), "flip": list(flip)})
    return SliceStack(slices=slices, masks=masks, indices=indices.astype(np.int64), image_size=size,
                      reference=image, oriented_reference=geom, permute=permute, flip=flip, brain=brain,
                      center=center, step=step, fov_mm=float(fov), lower=lo, upper=hi, settings=s, info=info)
