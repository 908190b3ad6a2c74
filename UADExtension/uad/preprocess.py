"""Volume -> stack of normalised axial slices at the model resolution, and the way back.

Preprocessing is a chain of small invertible steps (the pattern of MONAI's
invertible transforms).  Each step is one class: ``forward(work)`` changes the
working volume and records what it did; ``inverse(maps)`` maps per-slice results
back through it.  ``SliceStack.invert`` replays the inverses in reverse order, so
the way back onto the input's exact grid is written once::

    Reorient -> BrainMask -> [Register | Deoblique] -> [BiasCorrection] -> Normalise -> SelectSlices -> InPlane

Conventions
-----------
* Orientation (``Reorient``): ``sitk.DICOMOrient(image, "LPS")``
  (``CANONICAL_ORIENTATION``): index i runs right -> left, j anterior ->
  posterior, k inferior -> superior, direction ~ identity.  A slice as a numpy
  array ``slices[n]`` is indexed ``[row = j, column = i]``, so shown with
  ``imshow`` it is in the radiological convention (anterior up, the patient's
  right on the viewer's left).  Oblique volumes get the closest such order
  (the voxel grid itself is never rotated unless the profile registers).
* Skull-stripped or not (``detect_skull_stripped``): an input is taken as
  skull-stripped when at least 90% of the voxels outside its foreground
  component lie at the image minimum (within 1% of the foreground's 99th
  percentile: a masked background; raw scans have a noisy one) and the foreground is at most 2900 ml (a brain, not a
  head).  ``skull_stripped=True/False`` overrides the detector.
* Bias field (``BiasCorrection``): SimpleITK N4 on a shrunk copy, fitted to the
  brain mask, after the registration (so on the template's grid, one domain
  whatever the acquisition: fields fitted on each acquisition's own head and
  box differed enough to change the maps); the full-resolution field divides
  the volume; its inverse multiplies the restoration back.  The skull stripper
  and the registration see the uncorrected scan (deepbet was trained on raw
  scans; mutual information is robust to a smooth bias).
* Brain mask (``BrainMask``): given (any 3-D volume on the same physical space,
  > 0 = brain); or, for skull-stripped input or ``skull_strip: false``, the
  foreground (threshold at ``mask_threshold`` x a robust maximum above the
  background level, largest 3-D connected component, holes filled per axial
  slice); or, for a head, the skull stripper of ``uad.skullstrip``.
* Registration (``Register``, profile ``registration: "mni152"``, or ``"auto"``: only for an
  input that is not skull-stripped, i.e. a head scan in its own space and orientation): rigid + affine
  (Mattes mutual information) of the brain to nilearn's MNI152 2009 template;
  the working volume becomes the template grid (``spacing_mm``, default 1 mm).  ``info["registration"]``
  says whether it ran and why.
  Without it, profile ``deoblique: true`` (``Deoblique``) resamples an oblique volume onto
  the axis-aligned LPS grid (same spacing) so that the slices are axial in physical space.
* Intensities (``Normalise``): percentiles of the brain (``brain-percentile``) or
  of the whole volume (``image-percentile``), ``lower`` (1) -> 0 and ``upper``
  (99) -> 1, clipped to [0, ``clip_max``] (default 1; above 1 keeps hyperintensities such as
  FLAIR lesions, which lie above the brain's 99th percentile); zero outside the brain when the model input is
  skull-stripped.
* Slices (``SelectSlices``): the axial slices that contain brain, optionally only
  the fraction ``slice_range`` = [lo, hi] of the brain's axial extent; others get
  anomaly 0 and the input as restoration.
* Field of view (``InPlane``): ``square: "crop"``: the in-plane bounding box of the
  brain over the whole volume, enlarged by ``margin`` on each side and made square
  in physical units; ``"pad"``: the whole slice, padded to square with
  ``pad_value`` (``"min"`` = the image minimum).  The same box for every slice,
  resampled to ``image_size`` x ``image_size`` isotropic pixels (Gaussian
  anti-aliasing before downsampling, linear interpolation); slices are never
  interpolated across z.

Memory: the input is read through a read-only canonical view (no copy), voxel-wise steps are
applied a few slices at a time when ``InPlane`` resamples them, the skull stripper and the
registration resample the input itself (no whole-volume copy), and ``postprocess.to_volumes``
fills the output images a few slices at a time (``SliceStack.invert_slices``,
``paste_canonical_slices``; with registration the maps come back onto the template's grid whole,
then onto the input a slab at a time): beyond the input, the default chain holds little more than
its results (``benchmarks/bench_memory.py``).

``normalisation`` (the model config's dict) may set ``lower``, ``upper``
(percentiles), ``clip`` (bool), ``clip_max`` (upper end of the clipped range, >= 1), ``margin`` (fraction of the brain box added
per side) and ``mask_threshold`` (fraction of the robust maximum used by the
automatic brain mask).  Other keys are ignored.  ``profile`` (the manifest's
``preprocessing`` dict, see ``DEFAULT_PROFILE``) chooses the optional steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from . import InputError
from .imageio import array_view, validate, validate_mask

CANONICAL_ORIENTATION = "LPS"

DEFAULT_NORMALISATION = {
    "lower": 1.0,  # brain percentile mapped to 0
    "upper": 99.0,  # brain percentile mapped to 1
    "clip": True,
    "clip_max": 1.0,  # with clip: normalised intensities clipped to [0, clip_max] (> 1 keeps hyperintensities)
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
    if not (np.isfinite(s["clip_max"]) and s["clip_max"] >= 1.0):
        raise ValueError(f"normalisation clip_max must be a finite number >= 1, got {s['clip_max']}")
    return s


# -- orientation --------------------------------------------------------------------------------
def orientation_of(image: sitk.Image, orientation: str = CANONICAL_ORIENTATION
                   ) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """(permute order, flip axes) that DICOMOrient applies to reach ``orientation`` (default canonical).

    Both in SimpleITK index order (x, y, z): the oriented image is the input with
    its axes permuted by ``permute`` and then flipped where ``flip`` is true.
    """
    f = sitk.DICOMOrientImageFilter()
    f.SetDesiredCoordinateOrientation(orientation)
    # The permutation depends only on the direction: run it on a 1-voxel image with that direction.
    probe = sitk.Image([1, 1, 1], sitk.sitkUInt8)
    probe.SetDirection(image.GetDirection())
    f.Execute(probe)
    return tuple(int(p) for p in f.GetPermuteOrder()), tuple(bool(b) for b in f.GetFlipAxes())


def canonical_view(arr: np.ndarray, permute, flip) -> np.ndarray:
    """Input array (z, y, x) -> canonical (k, j, i), as DICOMOrient does to the image: a (strided) view, no copy."""
    a = arr.transpose(2, 1, 0).transpose(tuple(permute))
    for ax, fl in enumerate(flip):
        if fl:
            a = np.flip(a, ax)
    return a.transpose(2, 1, 0)


def input_view(arr: np.ndarray, permute, flip) -> np.ndarray:
    """Inverse of ``canonical_view``: canonical (k, j, i) -> the input's (z, y, x) voxel order, a view."""
    a = arr.transpose(2, 1, 0)
    for ax, fl in enumerate(flip):
        if fl:
            a = np.flip(a, ax)
    a = a.transpose(tuple(int(i) for i in np.argsort(permute)))
    return a.transpose(2, 1, 0)


def orient_array(arr: np.ndarray, permute, flip) -> np.ndarray:
    """Input array (z, y, x) -> canonical array (k, j, i), as DICOMOrient does to the image (a contiguous copy)."""
    return np.ascontiguousarray(canonical_view(arr, permute, flip))


def unorient_array(arr: np.ndarray, permute, flip) -> np.ndarray:
    """Inverse of ``orient_array``: canonical (k, j, i) -> the input's (z, y, x) voxel order (a contiguous copy)."""
    return np.ascontiguousarray(input_view(arr, permute, flip))


def paste_canonical_slices(image: sitk.Image, chunk: np.ndarray, k0: int, permute, flip) -> None:
    """Write canonical slices ``k0 : k0 + len(chunk)`` (array (n, J, I)) into ``image`` (the input's grid) in place.

    The canonical axial axis k is one axis of the input (possibly reversed), so the chunk is one slab of
    the input grid: it is arranged in the input's voxel order and pasted (SimpleITK's in-place paste;
    the output image is never copied).
    """
    n = int(chunk.shape[0])
    size = image.GetSize()  # (x, y, z)
    sitk_axis = int(permute[2])  # the input's SimpleITK axis that becomes canonical k
    depth = int(size[sitk_axis])
    start = depth - (k0 + n) if flip[2] else k0
    slab_shape = list(size[::-1])
    slab_shape[2 - sitk_axis] = n
    slab = np.empty(slab_shape, dtype=chunk.dtype)
    canonical_view(slab, permute, flip)[...] = chunk
    region = [slice(None)] * 3
    region[sitk_axis] = slice(start, start + n)
    piece = sitk.GetImageFromArray(slab)
    if piece.GetPixelID() != image.GetPixelID():
        piece = sitk.Cast(piece, image.GetPixelID())
    image[tuple(region)] = piece


# -- brain mask ---------------------------------------------------------------------------------
def compute_brain_mask(arr: np.ndarray, threshold_fraction: float = 0.05) -> np.ndarray:
    """Brain mask of a skull-stripped volume (array k, j, i); see the module docstring."""
    a = np.asarray(arr)  # any dtype, possibly a read-only strided view of the input: never copied whole
    base = float(a.min())
    above = np.asarray(a[a > base], np.float32)  # the only copy: the voxels above the background
    if above.size == 0:
        return np.zeros(a.shape, bool)
    robust_max = float(np.percentile(above, 99.0, overwrite_input=True))
    del above
    thr = base + threshold_fraction * (robust_max - base)
    mask = largest_component(a > thr)
    if not mask.any():
        return mask
    return fill_holes_per_slice(mask, out=mask)


def label(mask: np.ndarray, structure=None) -> tuple[np.ndarray, int]:
    """``scipy.ndimage.label`` into uint16 labels when they fit (2 bytes a voxel), else int32."""
    from scipy import ndimage

    try:
        return ndimage.label(mask, structure=structure, output=np.uint16)
    except RuntimeError:  # more than 65535 components
        return ndimage.label(mask, structure=structure)


def largest_component(fg: np.ndarray) -> np.ndarray:
    """The largest connected component (6-connected) of a bool volume; all False when there is none."""
    lab, n = label(fg)
    del fg
    if n == 0:
        return np.zeros(lab.shape, bool)
    counts = label_counts(lab, n)
    counts[0] = 0
    return lab == int(np.argmax(counts))


def label_counts(lab: np.ndarray, n: int) -> np.ndarray:
    """Voxels per label 0..n (``np.bincount``, one axial slab at a time: it converts its input to int64)."""
    counts = np.zeros(n + 1, np.int64)
    step = max(1, (1 << 16) // max(1, int(np.prod(lab.shape[1:]))))
    for k0 in range(0, lab.shape[0], step):
        counts += np.bincount(lab[k0:k0 + step].ravel(), minlength=n + 1)
    return counts


def fill_holes_per_slice(mask: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Fill the holes of every axial slice (axis 0) of a 3-D mask (this also fills closed 3-D cavities).

    One slice at a time (in-plane 4-connectivity, nothing through z); ``out`` may be ``mask`` itself.
    """
    from scipy import ndimage

    if out is None:
        out = np.array(mask, dtype=bool, copy=True)
    struct = ndimage.generate_binary_structure(2, 1)
    for k in range(mask.shape[0]):
        lab, n = ndimage.label(~mask[k], structure=struct)
        if n == 0:
            continue
        outside = np.zeros(n + 1, bool)
        for border in (lab[0, :], lab[-1, :], lab[:, 0], lab[:, -1]):
            outside[np.unique(border)] = True
        outside[0] = True  # label 0 = mask voxels
        out[k] |= ~outside[lab]
    return out


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
    out = sitk.GetArrayViewFromImage(mask) > 0
    if not out.any():
        raise InputError("brain mask: does not overlap the image")
    return out



# -- the preprocessing profile --------------------------------------------------------------------
#: A model's ``preprocessing`` manifest entry; absent keys take these values (the bundled models: trained
#: on skull-stripped phantoms in MNI152 space; a head scan, i.e. an input that is not skull-stripped, is
#: registered to that space, a skull-stripped input is taken as it is).
DEFAULT_PROFILE = {
    "registration": "auto",  # None | "mni152" | "auto" (mni152 for an input that is not skull-stripped)
    "deoblique": False,  # True: an oblique input is resampled onto the axis-aligned LPS grid (without registration)
    "spacing_mm": None,  # None | mm: resampling of the template space (with registration; None = 1 mm)
    "skull_strip": "auto",  # "auto" | True | False: mask the model input (auto: strip a head first)
    "bias_correction": "auto",  # "auto" | True | False: N4 (auto = on for inputs not skull-stripped)
    "square": "crop",  # "crop" (brain box) | "pad" (whole slice padded to square)
    "pad_value": "min",  # "min" | number (input units)
    "intensity": "brain-percentile",  # "brain-percentile" | "image-percentile"
    "slice_range": None,  # None | [lo, hi] fractions of the brain's axial extent
}


def _tri(value, key: str):
    if isinstance(value, str) and value.lower() == "auto":
        return "auto"
    if isinstance(value, bool):
        return value
    raise ValueError(f"preprocessing {key} must be \"auto\", true or false, got {value!r}")


def profile_settings(profile: dict | None = None) -> dict:
    """``DEFAULT_PROFILE`` updated with ``profile`` (a model's ``preprocessing`` entry), validated.

    Unknown keys and wrong values raise ``ValueError`` (a misspelt key must not be ignored silently).
    """
    p = dict(DEFAULT_PROFILE)
    if profile is None:
        return p
    if not isinstance(profile, dict):
        raise ValueError(f"preprocessing must be a dict, got {type(profile).__name__}")
    unknown = sorted(set(profile) - set(DEFAULT_PROFILE))
    if unknown:
        raise ValueError(f"unknown preprocessing key(s): {', '.join(unknown)} "
                         f"(known: {', '.join(DEFAULT_PROFILE)})")
    p.update(profile)
    reg = p["registration"]
    if reg is not None and (not isinstance(reg, str) or reg.lower() not in ("mni152", "auto")):
        raise ValueError(f"preprocessing registration must be null, \"mni152\" or \"auto\", got {reg!r}")
    p["registration"] = None if reg is None else reg.lower()
    if p["spacing_mm"] is not None:
        if isinstance(p["spacing_mm"], bool) or not isinstance(p["spacing_mm"], (int, float)) \
                or not 0.1 <= float(p["spacing_mm"]) <= 10.0:
            raise ValueError(f"preprocessing spacing_mm must be null or a number in [0.1, 10], "
                             f"got {p['spacing_mm']!r}")
        p["spacing_mm"] = float(p["spacing_mm"])
    p["skull_strip"] = _tri(p["skull_strip"], "skull_strip")
    if not isinstance(p["deoblique"], bool):
        raise ValueError(f"preprocessing deoblique must be true or false, got {p['deoblique']!r}")
    p["bias_correction"] = _tri(p["bias_correction"], "bias_correction")
    if p["square"] not in ("crop", "pad"):
        raise ValueError(f"preprocessing square must be \"crop\" or \"pad\", got {p['square']!r}")
    pv = p["pad_value"]
    if not (pv == "min" or (isinstance(pv, (int, float)) and not isinstance(pv, bool) and np.isfinite(pv))):
        raise ValueError(f"preprocessing pad_value must be \"min\" or a number, got {pv!r}")
    if p["intensity"] not in ("brain-percentile", "image-percentile"):
        raise ValueError(f"preprocessing intensity must be \"brain-percentile\" or \"image-percentile\", "
                         f"got {p['intensity']!r}")
    sr = p["slice_range"]
    if sr is not None:
        ok = isinstance(sr, (list, tuple)) and len(sr) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in sr)
        if not ok or not 0.0 <= float(sr[0]) < float(sr[1]) <= 1.0:
            raise ValueError(f"preprocessing slice_range must be null or [lo, hi] with 0 <= lo < hi <= 1, "
                             f"got {sr!r}")
        p["slice_range"] = [float(sr[0]), float(sr[1])]
    return p


# -- skull-stripped or not ------------------------------------------------------------------------
STRIPPED_BACKGROUND_FRACTION = 0.9  # outside the foreground, this fraction at the minimum
STRIPPED_TOLERANCE = 0.01  # "at the minimum": within this fraction of the foreground's 99th percentile
STRIPPED_MAX_VOLUME_ML = 2900.0  # a brain mask (the MNI152 one: ~2300 ml with CSF) is below; a head above


def detect_skull_stripped(arr: np.ndarray, spacing, mask_threshold: float = 0.05,
                          foreground: np.ndarray | None = None) -> tuple[bool, dict]:
    """(skull-stripped?, evidence) for a volume array (k, j, i) with ``spacing`` (x, y, z) mm.

    Skull-stripped when at least ``STRIPPED_BACKGROUND_FRACTION`` of the voxels
    outside the foreground component lie at the image minimum (within
    ``STRIPPED_TOLERANCE`` of the foreground's 99th percentile: a masked-out
    background, also after resampling; a raw scan's background is noise) and
    the foreground is at most ``STRIPPED_MAX_VOLUME_ML``.  ``foreground``: the
    ``compute_brain_mask(arr, mask_threshold)`` already computed (not recomputed).
    """
    a = np.asarray(arr)
    fg = compute_brain_mask(a, mask_threshold) if foreground is None else foreground
    base = float(a.min())
    n_fg = int(np.count_nonzero(fg))
    n_bg = int(fg.size) - n_fg
    tol = STRIPPED_TOLERANCE * (float(np.percentile(np.asarray(a[fg], np.float32), 99.0, overwrite_input=True))
                                - base) if n_fg else 0.0
    if n_bg:
        low = a <= base + tol
        at_min = (int(np.count_nonzero(low)) - int(np.count_nonzero(low & fg))) / n_bg
        del low
    else:
        at_min = 1.0
    vol_ml = float(n_fg) * float(np.prod(spacing)) / 1000.0
    stripped = at_min >= STRIPPED_BACKGROUND_FRACTION and vol_ml <= STRIPPED_MAX_VOLUME_ML
    return bool(stripped), {"background_at_minimum": round(at_min, 4), "foreground_ml": round(vol_ml, 1)}


# -- working state and grids ------------------------------------------------------------------------
@dataclass
class Grid:
    """A 3-D voxel grid (SimpleITK conventions: size and spacing in (x, y, z))."""

    size: tuple
    spacing: tuple
    origin: tuple
    direction: tuple

    @classmethod
    def of(cls, img: sitk.Image) -> "Grid":
        return cls(tuple(int(s) for s in img.GetSize()), tuple(img.GetSpacing()), tuple(img.GetOrigin()),
                   tuple(img.GetDirection()))

    def slab(self, ks: slice) -> "Grid":
        """The axial slices ``ks`` (k0:k1 of the last index axis) of this grid as a grid of their own."""
        k0, k1, _ = ks.indices(int(self.size[2]))
        d = np.asarray(self.direction, float).reshape(3, 3)
        origin = np.asarray(self.origin, float) + d[:, 2] * float(self.spacing[2]) * k0
        return Grid((int(self.size[0]), int(self.size[1]), max(0, k1 - k0)), tuple(self.spacing),
                    tuple(float(v) for v in origin), tuple(self.direction))

    def respaced(self, spacing, fit: bool = True) -> "Grid":
        """The same box (the outer faces of the voxels) on the same axes with voxels of about ``spacing``
        ((x, y, z) or one number): ``round(extent / spacing)`` voxels per axis (at least one); ``fit``: the
        spacing made ``extent / size``, so that the box is exactly this grid's, else ``spacing`` as given
        (the far faces then move by less than half a voxel)."""
        d = np.asarray(self.direction, float).reshape(3, 3)
        own = np.asarray(self.spacing, float)
        extent = np.asarray(self.size, float) * own
        sp = np.broadcast_to(np.asarray(spacing, float), (3,)).astype(float)
        size = np.maximum(np.round(extent / sp).astype(int), 1)
        if fit:
            sp = extent / size
        corner = np.asarray(self.origin, float) - d @ (own / 2.0)
        return Grid(tuple(int(v) for v in size), tuple(float(v) for v in sp),
                    tuple(float(v) for v in corner + d @ (sp / 2.0)), tuple(self.direction))

    def image(self, arr: np.ndarray) -> sitk.Image:
        img = sitk.GetImageFromArray(np.asarray(arr))
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(self.direction)
        return img

    def probe(self) -> sitk.Image:
        """A 1-voxel image with this grid's geometry (no voxel data)."""
        g = sitk.Image([1, 1, 1], sitk.sitkUInt8)
        g.SetSpacing(self.spacing)
        g.SetOrigin(self.origin)
        g.SetDirection(self.direction)
        return g

    def _resampler(self, transform, interpolator, default: float, pixel) -> sitk.ResampleImageFilter:
        f = sitk.ResampleImageFilter()
        f.SetSize([int(s) for s in self.size])
        f.SetOutputSpacing(self.spacing)
        f.SetOutputOrigin(self.origin)
        f.SetOutputDirection(self.direction)
        f.SetTransform(transform if transform is not None else sitk.Transform())
        f.SetInterpolator(interpolator)
        f.SetDefaultPixelValue(float(default))
        f.SetOutputPixelType(pixel)
        return f

    def resample(self, img: sitk.Image, transform: sitk.Transform, interpolator=sitk.sitkLinear,
                 default: float = 0.0) -> np.ndarray:
        """``img`` sampled on this grid at ``transform(point)`` -> float32 array (k, j, i)."""
        return sitk.GetArrayFromImage(self._resampler(transform, interpolator, default, sitk.sitkFloat32).Execute(img))

    def resample_mask(self, mask: sitk.Image, transform: sitk.Transform | None = None) -> np.ndarray:
        """A 0/1 mask image sampled on this grid at ``transform(point)`` (linear, kept above one half) -> bool
        array (k, j, i).  The one way masks change grids (the chain's resampling steps and the skull
        strippers): interpolated as 0/255 into 8-bit voxels, one byte a voxel of this grid, not the four of
        a float image."""
        up = sitk.Cast(mask, sitk.sitkUInt8) * 255
        out = self._resampler(transform, sitk.sitkLinear, 0.0, sitk.sitkUInt8).Execute(up)
        del up
        return sitk.GetArrayViewFromImage(out) > 127


@dataclass
class _Work:
    """What flows through the forward chain.

    Memory: ``arr`` starts as a read-only view of the input's voxels in canonical order (no copy);
    a step that changes every voxel of the 3-D volume (N4, registration) makes a float32 working
    copy, voxel-wise steps (``Normalise``) are queued in ``voxelwise`` and ``SelectSlices`` only
    records ``selected``: ``read`` applies them to a few slices at a time, when ``InPlane``
    resamples them, so the normalised volume is never held whole.
    """

    image: sitk.Image  # the input (never modified)
    arr: np.ndarray | None = None  # working voxels (K, J, I) (a read-only view of the input until a 3-D step)
    grid: Grid | None = None  # grid of the working volume (3-D steps)
    brain: np.ndarray | None = None  # bool, same shape as arr
    permute: tuple = (0, 1, 2)
    flip: tuple = (False, False, False)
    stripped: bool | None = None  # the input is skull-stripped (detected or told)
    mask_input: bool = True  # zero the model input outside the brain
    cval: float = 0.0  # normalised value outside the image (padding)
    box: tuple | None = None  # (j0, j1, i0, i1) brain box of the working volume
    foreground: np.ndarray | None = None  # compute_brain_mask(arr, mask_threshold) when already computed
    voxelwise: list = field(default_factory=list)  # queued voxel-wise functions f(slices, brain) -> slices
    pristine: bool = False  # ``arr`` is still the canonical view of the input's voxels (no 3-D step changed them)
    brain_image: sitk.Image | None = None  # the brain mask on the input's grid (uint8), once known
    selected: np.ndarray | None = None  # axial slices kept (SelectSlices); None = all
    slices: np.ndarray | None = None  # (N, S, S) model-resolution slices (InPlane)
    masks: np.ndarray | None = None  # (N, S, S) bool brain at model resolution (InPlane)
    info: dict = field(default_factory=dict)

    def read(self, ks) -> np.ndarray:
        """Float32 working voxels of the axial slices ``ks`` (indices or a slice), queued voxel-wise steps applied."""
        a = np.asarray(self.arr[ks], np.float32)
        if self.voxelwise:
            b = self.brain[ks]
            for fn in self.voxelwise:
                a = fn(a, b)
        return a

    def current_image(self) -> sitk.Image:
        arr = self.read(slice(None)) if self.voxelwise else self.arr
        return self.grid.image(arr)

    def source_image(self) -> sitk.Image:
        """The working volume as a SimpleITK image for resampling (same physical space): the input itself,
        without a copy, while no step has changed its voxels; else ``current_image()``."""
        return self.image if self.pristine and not self.voxelwise else self.current_image()

    def source_brain(self) -> sitk.Image:
        """The brain as a uint8 SimpleITK image for resampling: the input grid's mask while the working grid is
        the input's (no copy), else a copy of ``brain`` on the working grid."""
        if self.pristine and self.brain_image is not None:
            return self.brain_image
        return self.grid.image(np.ascontiguousarray(self.brain, np.uint8))


# -- the steps --------------------------------------------------------------------------------------
INTENSITY_MAPS = ("restoration",)  # maps in image intensity units; the others are scores or masks


class Step:
    """One invertible preprocessing step: ``forward(work)`` records what it did, ``inverse(maps)`` undoes it.

    ``maps`` is a dict name -> array on the step's output grid (``restoration``
    in intensity units, ``anomaly`` a score, ``valid`` 1 where results exist);
    ``inverse`` returns them on the step's input grid.
    """

    name = "step"
    #: the inverse acts on each axial slice of the working volume alone (``inverse(maps, ks)`` can map a
    #: few slices at a time); ``to_volumes`` then streams the way back slice by slice
    slicewise = True

    def forward(self, w: _Work) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def inverse(self, maps: dict, ks: slice | None = None) -> dict:
        """``maps`` on this step's output grid -> its input grid; ``ks``: the axial slices of the working
        volume the maps cover (None: all of them)."""
        return maps

    def record(self) -> dict:
        return {"step": self.name}


def oriented_grid(image: sitk.Image, permute, flip) -> Grid:
    """The grid of ``sitk.DICOMOrient(image, orientation)`` for ``(permute, flip) = orientation_of(image,
    orientation)`` (axes permuted, then flipped), computed from the geometry alone (DICOMOrient would copy
    the voxels)."""
    size, sp = image.GetSize(), image.GetSpacing()
    d = np.asarray(image.GetDirection(), float).reshape(3, 3)
    corner = [int(size[p]) - 1 if fl else 0 for p, fl in zip(permute, flip)]
    index = [0, 0, 0]
    for ax, p in enumerate(permute):
        index[p] = corner[ax]
    origin = image.TransformIndexToPhysicalPoint(index)
    cols = [d[:, p] * (-1.0 if fl else 1.0) for p, fl in zip(permute, flip)]
    direction = tuple(float(v) for v in np.stack(cols, axis=1).ravel())
    return Grid(tuple(int(size[p]) for p in permute), tuple(float(sp[p]) for p in permute), tuple(origin), direction)


class Reorient(Step):
    """Input voxel order -> canonical LPS (a permutation and flips of the axes, no interpolation)."""

    name = "reorient"

    def forward(self, w: _Work) -> None:
        self.permute, self.flip = orientation_of(w.image)
        w.grid = oriented_grid(w.image, self.permute, self.flip)  # what DICOMOrient gives, without the voxels
        # the voxels: a read-only view of the input in canonical order (DICOMOrient's permutation and flips)
        w.arr = canonical_view(array_view(w.image), self.permute, self.flip)
        w.pristine = True
        w.permute, w.flip = self.permute, self.flip

    def inverse(self, maps: dict, ks: slice | None = None) -> dict:
        return {k: unorient_array(v, self.permute, self.flip) for k, v in maps.items()}

    def record(self) -> dict:
        return {"step": self.name, "orientation": CANONICAL_ORIENTATION, "permute": list(self.permute),
                "flip": list(self.flip)}


class BiasCorrection(Step):
    """N4 bias-field correction (SimpleITK): the volume is divided by the field, the restoration multiplied back."""

    name = "bias_correction"

    def __init__(self, iterations=(20, 20, 10), voxel_mm: float = 8.0):
        self.iterations = tuple(int(i) for i in iterations)
        self.voxel_mm = float(voxel_mm)

    def forward(self, w: _Work) -> None:
        self.field = n4_bias_field(w.current_image(), self.iterations, self.voxel_mm, mask=w.brain)
        w.arr = np.divide(w.arr, self.field, dtype=np.float32)  # the float32 working copy
        w.pristine = False
        self.range = (float(self.field.min()), float(self.field.max()))

    def inverse(self, maps: dict, ks: slice | None = None) -> dict:
        out = dict(maps)
        f = self.field if ks is None else self.field[ks]
        for k in INTENSITY_MAPS:
            if k in out:
                out[k] = (out[k] * f).astype(np.float32)
        return out

    def record(self) -> dict:
        return {"step": self.name, "method": "N4", "iterations": list(self.iterations),
                "field_range": [round(v, 4) for v in self.range]}


def n4_bias_field(image: sitk.Image, iterations=(20, 20, 10), voxel_mm: float = 8.0,
                  mask: np.ndarray | None = None) -> np.ndarray:
    """The N4 bias field of ``image`` (float32 array (k, j, i), > 0), estimated on a ~``voxel_mm`` copy.

    ``mask`` (bool, ``image``'s voxel order): the voxels the field is fitted to (the brain); None: Otsu's
    foreground of the shrunk copy.  The field is evaluated at full resolution.
    """
    img = sitk.Cast(image, sitk.sitkFloat32)
    arr = sitk.GetArrayViewFromImage(img)
    lo = float(arr.min())
    if lo <= 0:  # N4 needs positive intensities
        img = img - lo + 1e-3 * max(float(arr.max()) - lo, 1e-6)
    shrink = [max(1, int(round(voxel_mm / s))) for s in img.GetSpacing()]
    shrink = [min(f, max(1, n // 8)) for f, n in zip(shrink, img.GetSize())]
    small = sitk.Shrink(img, shrink)
    fit = None
    if mask is not None:
        m = sitk.GetImageFromArray(np.ascontiguousarray(mask, np.uint8))
        m.CopyInformation(img)
        fit = sitk.Shrink(m, shrink)  # the same subsampling as the image's
        del m
    if fit is None or not sitk.GetArrayViewFromImage(fit).any():
        fit = sitk.OtsuThreshold(small, 0, 1, 200)
    f = sitk.N4BiasFieldCorrectionImageFilter()
    f.SetMaximumNumberOfIterations([int(i) for i in iterations])
    f.Execute(small, fit)
    log_field = sitk.Cast(f.GetLogBiasFieldAsImage(img), sitk.sitkFloat32)
    del img, small, fit
    return np.exp(sitk.GetArrayViewFromImage(log_field))  # a new float32 array; the log field is then freed


#: With a skull stripper's mask, anomalies closer than this to the mask's boundary are zeroed: the
#: stripper's boundary is uncertain to about a voxel, and what lies just outside the brain (CSF
#: rim, bone) looks anomalous to a model of brain tissue.
STRIP_MARGIN_MM = 3.0


def deeper_than(mask: np.ndarray, depth_mm: float, sampling) -> np.ndarray:
    """``distance_transform_edt(mask, sampling) > depth_mm``, computed on slabs of axial slices.

    A voxel's distance decides the result only up to ``depth_mm``, and the nearest background voxel
    within that distance lies within ``ceil(depth_mm / sampling[0])`` slices, so slabs overlapping by
    that many slices give the whole-volume answer exactly, without its float64 distances and
    feature-transform arrays (~20 bytes a voxel).
    """
    from scipy import ndimage

    K = mask.shape[0]
    m = int(np.ceil(depth_mm / float(sampling[0]))) + 1
    out = np.zeros(mask.shape, bool)
    step = max(8, 4 * m)
    for k0 in range(0, K, step):
        k1 = min(K, k0 + step)
        a0, a1 = max(0, k0 - m), min(K, k1 + m)
        if mask[a0:a1].all():  # no background within reach: every voxel is deeper
            out[k0:k1] = True
            continue
        d = ndimage.distance_transform_edt(mask[a0:a1], sampling=sampling)
        out[k0:k1] = d[k0 - a0:k1 - a0] > depth_mm
        del d
    return out


class BrainMask(Step):
    """The brain mask of the working volume: given, the foreground of a skull-stripped input, or a skull stripper.

    Its inverse zeroes the anomaly within ``STRIP_MARGIN_MM`` of the boundary of a
    skull stripper's mask (other maps unchanged); the brain mask on the input
    grid is applied once, when the maps are composed with the input
    (``postprocess.to_volumes``).
    """

    name = "brain_mask"

    def __init__(self, given: sitk.Image | None = None, strip: bool = False, method: str | None = None,
                 contrast: str | None = None, mask_threshold: float = 0.05, device=None):
        self.given = given
        self.strip = bool(strip)
        self.method = method
        self.contrast = contrast
        self.mask_threshold = float(mask_threshold)
        self.device = device
        self.source = None

    def forward(self, w: _Work) -> None:
        if self.given is not None:
            brain = orient_array(_mask_on_grid(self.given, w.image), w.permute, w.flip)
            self.source = "given"
        elif self.strip:
            from .skullstrip import brain_mask as strip

            src = w.source_image()  # the input itself (no copy) while unchanged: its mask is in its voxel order
            brain, self.source = strip(src, contrast=self.contrast, method=self.method, device=self.device)
            if src is w.image:
                brain = orient_array(brain, w.permute, w.flip)
            del src
            if not brain.any():
                raise InputError("input image: the skull stripper found no brain; pass a brain mask")
        else:
            fg = w.foreground if w.foreground is not None and w.foreground.shape == w.arr.shape else None
            brain = compute_brain_mask(w.arr, self.mask_threshold) if fg is None else fg
            self.source = "automatic"
            if not brain.any():
                raise InputError("input image: no brain found by the automatic brain mask; pass a brain mask")
        w.foreground = None
        # the brain mask on the input grid (uint8, one of the results); the working mask becomes a view of it
        img = sitk.GetImageFromArray(np.ascontiguousarray(input_view(brain, w.permute, w.flip)).view(np.uint8))
        img.CopyInformation(w.image)
        del brain
        w.brain_image = img
        w.brain = canonical_view(array_view(img).view(bool), w.permute, w.flip)
        self.brain = w.brain
        self.margin = self.source.startswith("skull strip") and STRIP_MARGIN_MM > 0
        self.sampling = tuple(w.grid.spacing[::-1])
        self._packed = None
        if self.margin:  # computed now (the EDT's temporaries are not wanted beside the results later)
            self.compute_core()
        self.voxels = int(np.count_nonzero(w.brain))
        self.volume_ml = float(self.voxels) * float(np.prod(w.grid.spacing)) / 1000.0
        self.fraction = float(self.voxels / w.brain.size)

    def compute_core(self) -> None:
        """The brain deeper than ``STRIP_MARGIN_MM`` (``deeper_than``, exact), kept as bits along the last axis
        (an eighth of a byte a voxel)."""
        self._packed = np.packbits(deeper_than(self.brain, STRIP_MARGIN_MM, self.sampling), axis=-1)

    def core(self, ks: slice | None = None) -> np.ndarray | None:
        """The brain deeper than ``STRIP_MARGIN_MM`` (bool, axial slices ``ks``; None: all), unpacked from its
        bits when asked; None when no margin applies."""
        if self._packed is None:
            return None
        p = self._packed if ks is None else self._packed[ks]
        return np.unpackbits(p, axis=-1, count=self.brain.shape[-1]).view(bool)

    def inverse(self, maps: dict, ks: slice | None = None) -> dict:
        if not self.margin or "anomaly" not in maps:
            return maps
        out = dict(maps)
        out["anomaly"] = np.where(self.core(ks), out["anomaly"], 0.0).astype(np.float32)
        return out

    def record(self) -> dict:
        r = {"step": self.name, "source": self.source, "voxels": self.voxels, "volume_ml": round(self.volume_ml, 1)}
        if self.margin:
            r["boundary_margin_mm"] = STRIP_MARGIN_MM
        return r


class _Resampling(Step):
    """A step that resamples the whole working volume (and the brain) onto another grid, linearly:
    ``transform`` maps points of the new grid to the grid the step received; the inverse resamples maps back
    with the inverse transform (linear, zero outside).  ``Register`` and ``Deoblique``."""

    slicewise = False  # a 3-D resampling

    def _resample_onto(self, w: _Work, target: Grid, transform: sitk.Transform) -> None:
        self.source, self.target = w.grid, target
        self.inv = transform.GetInverse()
        src = w.source_image()  # the input itself while unchanged: resampled without a whole-volume copy
        w.arr = target.resample(src, transform, default=float(w.arr.min()))
        del src
        w.brain = target.resample_mask(w.source_brain(), transform)
        w.grid = target
        w.pristine = False

    def inverse(self, maps: dict, ks: slice | None = None) -> dict:
        """``maps`` on the whole target grid -> the source grid, or only its axial slices ``ks`` (the slices of
        the grid the step *received*: a resampling's output slices do not map onto input slices, so ``ks``
        here selects what is computed on the way back, and ``maps`` are always whole)."""
        grid = self.source if ks is None else self.source.slab(ks)
        return {k: grid.resample(v if isinstance(v, sitk.Image) else self.target.image(np.ascontiguousarray(
            v, np.float32)), self.inv) for k, v in maps.items()}


class Register(_Resampling):
    """Rigid + affine registration (mutual information) of the brain to the MNI152 2009 template.

    The working volume becomes the template's grid in the canonical (LPS) voxel order; the inverse resamples maps back
    onto the grid the step received (linear interpolation, zero outside).
    """

    name = "register"

    def __init__(self, spacing_mm: float | None = None, options: dict | None = None):
        from .registration import REGISTRATION_MM

        self.spacing_mm = spacing_mm
        self.registered_at_mm = max(float(REGISTRATION_MM), float(spacing_mm or 1.0))
        self.options = dict(options or {})

    def forward(self, w: _Work) -> None:
        from . import registration

        # the transform is computed on the template at REGISTRATION_MM (or the model's coarser template grid) and
        # applied on the model's template grid
        fixed, _ = registration.mni152(self.registered_at_mm)
        moving = self._moving(w, max(float(v) for v in fixed.GetSpacing()))
        self.transform, self.metric = registration.register_affine(fixed, moving, **self.options)
        del moving, fixed
        grid, _ = registration.mni152(self.spacing_mm)
        # the template's grid in the canonical orientation (its own voxel order is RAS-like, i.e. mirrored
        # left-right and front-back against the canonical LPS slices the models were trained on)
        self._resample_onto(w, oriented_grid(grid, *orientation_of(grid)), self.transform)
        if not w.brain.any():
            raise InputError("registration to MNI152 moved the brain out of the template's field of view")

    @staticmethod
    def _moving(w: _Work, spacing_mm: float) -> sitk.Image:
        """The brain (the working volume masked by the brain mask) on the working grid's axes with voxels no
        finer than the template's (``spacing_mm``), covering the same box: what the registration moves.
        The template's resolution is all the metric samples; finer voxels would only cost memory (the
        registration's pyramid keeps smoothed copies of the moving image at every level)."""
        coarse = w.grid.respaced(np.maximum(np.asarray(w.grid.spacing, float), float(spacing_mm)))
        ident = sitk.Transform()
        arr = coarse.resample(w.source_image(), ident)
        arr *= coarse.resample_mask(w.source_brain(), ident)
        return coarse.image(arr)

    def record(self) -> dict:
        t = self.transform
        return {"step": self.name, "template": "MNI152 2009 (nilearn)", "metric": round(float(self.metric), 5),
                "registered_at_mm": self.registered_at_mm, "spacing_mm": list(self.target.spacing),
                "matrix": [round(v, 5) for v in t.GetMatrix()],
                "translation": [round(v, 3) for v in t.GetTranslation()]}


#: ``Deoblique`` acts when the canonical grid's axes are rotated by more than this from the LPS axes.
DEOBLIQUE_MIN_DEG = 0.5


#: Slices at least this thick (mm) stacked left-right or anterior-posterior get ``acquisition_warnings``.
THICK_NON_AXIAL_MM = 3.0


def acquisition_warnings(image: sitk.Image) -> list[str]:
    """A warning for thick sagittal or coronal slices.

    The networks restore axial slices; in a sagittal (coronal) acquisition with thick slices each axial
    slice has the slice thickness as its effective resolution left-right (anterior-posterior), whatever
    grid it is resampled to, and the outermost slices average the brain's surface over that thickness.
    Measured with ``benchmarks/bench_calibration_geometry.py`` (DISYRE, T2, its calibrated 1 % threshold):
    healthy phantoms acquired sagittally with 3.4-3.7 mm slices had 0.45 / 1.47 / 6.08 % of the brain
    flagged, axially with 3.3-3.8 mm 0.29-0.63 %.  Coronal slices are warned by analogy (the measured
    coronal phantoms were 2.1-2.6 mm: 0.06-1.05 %).  Not covered: oblique-axial stacks (slice normal within
    45 degrees of superior-inferior), which measured 0.85-2.36 % at 2.0-2.4 mm -- their slices are
    axial-like and the excess has no single cause the geometry shows -- slices thinner than
    ``THICK_NON_AXIAL_MM`` and near-isotropic voxels.
    """
    sp = np.asarray(image.GetSpacing(), float)
    k = int(np.argmax(sp))
    if sp[k] < THICK_NON_AXIAL_MM or sp[k] < 1.5 * float(sp.min()):
        return []
    axis = np.asarray(image.GetDirection(), float).reshape(3, 3)[:, k]  # LPS direction of the slice normal
    if abs(axis[2]) >= np.cos(np.radians(45.0)):
        return []
    plane = "sagittal" if abs(axis[0]) >= abs(axis[1]) else "coronal"
    across = "left-right" if plane == "sagittal" else "anterior-posterior"
    return [f"{plane} slices {sp[k]:.1f} mm thick: the networks restore axial slices, whose effective "
            f"resolution {across} is then {sp[k]:.1f} mm; on healthy T2 phantoms acquired sagittally with "
            f"3.4-3.7 mm slices DISYRE's 1 % threshold flagged 0.5-6.1 % of the brain (axial 3.3-3.8 mm: "
            f"0.3-0.6 %); an axial or 3-D acquisition of the same patient is more reliable"]


def oblique_angle_deg(direction) -> float:
    """Rotation angle (degrees) between a canonical grid's direction matrix and the LPS axes (identity)."""
    d = np.asarray(direction, float).reshape(3, 3)
    return float(np.degrees(np.arccos(np.clip((np.trace(d) - 1.0) / 2.0, -1.0, 1.0))))


class Deoblique(_Resampling):
    """An oblique volume resampled onto the axis-aligned LPS grid (same spacing, covering the same box).

    The axial slices then lie in the patient's (scanner's) axial plane whatever the acquisition's
    obliquity, as the model's training slices do; the inverse resamples the maps back onto the
    canonical grid the step received (linear, zero outside).  Profile key ``deoblique`` (off by
    default); skipped with registration (which resamples onto the template) and below
    ``DEOBLIQUE_MIN_DEG``.
    """

    name = "deoblique"

    def forward(self, w: _Work) -> None:
        self.angle_deg = oblique_angle_deg(w.grid.direction)
        d = np.asarray(w.grid.direction, float).reshape(3, 3)
        size = np.asarray(w.grid.size, float)
        sp = np.asarray(w.grid.spacing, float)
        corners = np.array([[i, j, k] for i in (-0.5, size[0] - 0.5) for j in (-0.5, size[1] - 0.5)
                            for k in (-0.5, size[2] - 0.5)])
        phys = np.asarray(w.grid.origin) + (corners * sp) @ d.T
        lo, hi = phys.min(0), phys.max(0)
        n = np.maximum(np.ceil((hi - lo) / sp - 1e-6).astype(int), 1)
        target = Grid(tuple(int(v) for v in n), tuple(float(v) for v in sp),
                      tuple(float(v) for v in lo + sp / 2.0), tuple(float(v) for v in np.eye(3).ravel()))
        self._resample_onto(w, target, sitk.Transform())  # same physical space: the identity

    def record(self) -> dict:
        return {"step": self.name, "angle_deg": round(self.angle_deg, 3), "spacing_mm": list(self.target.spacing),
                "size": list(self.target.size)}


class Normalise(Step):
    """Percentiles ``lower`` -> 0 and ``upper`` -> 1 (of the brain or of the whole volume), clipped."""

    name = "normalise"

    def __init__(self, lower: float, upper: float, clip: bool = True, reference: str = "brain-percentile",
                 pad_value="min", clip_max: float = 1.0):
        self.lower_pct, self.upper_pct, self.clip = float(lower), float(upper), bool(clip)
        self.clip_max = float(clip_max)
        self.reference = reference
        self.pad_value = pad_value

    def forward(self, w: _Work) -> None:
        # one float32 copy of the reference voxels (partially sorted in place by the percentile)
        if self.reference == "brain-percentile":
            vals = np.asarray(w.arr[w.brain], np.float32)
        else:
            vals = np.array(w.arr, np.float32).ravel()
        lo, hi = (float(v) for v in np.percentile(vals, [self.lower_pct, self.upper_pct], overwrite_input=True))
        if hi <= lo:
            hi = float(vals.max())
        del vals
        if hi <= lo:
            raise InputError("input image: the intensities inside the brain mask are constant")
        self.lo, self.hi = lo, hi
        pad = float(w.arr.min()) if self.pad_value == "min" else float(self.pad_value)
        w.cval = float((pad - lo) / (hi - lo))
        if self.clip:
            w.cval = float(np.clip(w.cval, 0.0, self.clip_max))
        self.mask_input = bool(w.mask_input)
        if self.mask_input:
            w.cval = 0.0
        w.voxelwise.append(self.apply)  # applied slice by slice when the slices are read (``_Work.read``)

    def apply(self, arr: np.ndarray, brain: np.ndarray) -> np.ndarray:
        """The normalisation of float32 voxels ``arr`` (any shape; ``brain`` the same shape), in place when it can."""
        arr = np.subtract(arr, self.lo, out=arr if arr.flags.writeable else None)
        arr /= (self.hi - self.lo)
        if self.clip:
            np.clip(arr, 0.0, self.clip_max, out=arr)
        if self.mask_input:
            arr[~brain] = 0.0
        return arr

    def inverse(self, maps: dict, ks: slice | None = None) -> dict:
        out = dict(maps)
        for k in INTENSITY_MAPS:
            if k in out:
                out[k] = (self.lo + np.asarray(out[k], np.float32) * (self.hi - self.lo)).astype(np.float32)
        return out

    def record(self) -> dict:
        return {"step": self.name, "reference": self.reference, "percentiles": [self.lower_pct, self.upper_pct],
                "clip_max": self.clip_max if self.clip else None,
                "lower": self.lo, "upper": self.hi}


class SelectSlices(Step):
    """Keep the axial slices with brain (optionally only ``slice_range`` of the brain's axial extent)."""

    name = "select_slices"

    def __init__(self, slice_range=None):
        self.slice_range = slice_range

    def forward(self, w: _Work) -> None:
        b = w.brain
        rows = np.flatnonzero(b.any(axis=(0, 2)))
        cols = np.flatnonzero(b.any(axis=(0, 1)))
        w.box = (int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1]))
        kk = np.flatnonzero(b.any(axis=(1, 2)))
        self.brain_slices = int(len(kk))
        if self.slice_range is not None:
            k0, k1 = float(kk[0]), float(kk[-1])
            lo = k0 + self.slice_range[0] * (k1 - k0)
            hi = k0 + self.slice_range[1] * (k1 - k0)
            sel = kk[(kk >= lo - 1e-6) & (kk <= hi + 1e-6)]
            if sel.size == 0:
                sel = kk[[int(np.argmin(np.abs(kk - (lo + hi) / 2.0)))]]
            kk = sel
        self.indices = kk.astype(np.int64)
        self.depth = int(b.shape[0])
        w.selected = self.indices  # the slices are read from the volume when InPlane resamples them

    def positions(self, ks: slice | None = None) -> np.ndarray:
        """Positions in the stack of the selected slices that lie in the axial range ``ks``."""
        if ks is None:
            return np.arange(len(self.indices))
        k0, k1, _ = ks.indices(self.depth)
        return np.flatnonzero((self.indices >= k0) & (self.indices < k1))

    def inverse(self, maps: dict, ks: slice | None = None) -> dict:
        """Stack maps -> axial slices (zero where no slice was processed).  With ``ks``, ``maps`` hold only
        the stack positions ``positions(ks)`` and the result covers the slices ``ks``."""
        k0, k1, _ = (slice(None) if ks is None else ks).indices(self.depth)
        pos = self.positions(ks)
        out = {}
        for k, v in maps.items():
            vol = np.zeros((k1 - k0,) + tuple(v.shape[1:]), np.float32)
            vol[self.indices[pos] - k0] = v
            out[k] = vol
        return out

    def record(self) -> dict:
        return {"step": self.name, "slices": int(len(self.indices)), "brain_slices": self.brain_slices,
                "slice_range": self.slice_range}


class InPlane(Step):
    """Square field of view (crop to the brain box, or pad the whole slice) resampled to S x S pixels."""

    name = "in_plane"
    chunk = 8  # slices resampled at a time (at most; at most 2 % of the slices)

    def __init__(self, size: int, square: str = "crop", margin: float = 0.05, clip: bool = True,
                 clip_max: float = 1.0):
        self.size, self.square, self.margin, self.clip = int(size), square, float(margin), bool(clip)
        self.clip_max = float(clip_max)

    def forward(self, w: _Work) -> None:
        from scipy import ndimage

        sx, sy, _ = w.grid.spacing
        _, J, I = w.arr.shape
        if self.square == "crop":
            j0, j1, i0, i1 = w.box
            ext = max((j1 - j0 + 1) * sy, (i1 - i0 + 1) * sx)
            fov = ext * (1.0 + 2.0 * self.margin)
            center = ((j0 + j1) / 2.0, (i0 + i1) / 2.0)
        else:
            fov = max(J * sy, I * sx)
            center = ((J - 1) / 2.0, (I - 1) / 2.0)
        pixel = fov / self.size
        step = (pixel / sy, pixel / sx)
        self.shape_in = (J, I)
        self.center, self.step, self.fov_mm, self.pixel_mm = center, step, float(fov), float(pixel)
        sig = tuple(max(0.0, (st - 1.0) / 2.0) for st in step)
        kk = w.selected if w.selected is not None else np.arange(w.arr.shape[0])
        slices = np.empty((len(kk), self.size, self.size), np.float32)
        masks = np.empty((len(kk), self.size, self.size), bool)
        # a few slices at a time (every operation is in-plane, so the result is the same as at once)
        per = max(1, min(self.chunk, len(kk) // 50))
        for n0 in range(0, len(kk), per):
            ks = kk[n0:n0 + per]
            norm = w.read(ks)
            if max(sig) > 0:
                norm = ndimage.gaussian_filter(norm, sigma=(0.0, sig[0], sig[1]), mode="constant", cval=w.cval)
            slices[n0:n0 + len(ks)] = _resample_inplane(norm, center, step, self.size, cval=w.cval)
            masks[n0:n0 + len(ks)] = _resample_inplane(w.brain[ks].astype(np.float32), center, step,
                                                       self.size) > 0.5
            del norm
        if self.clip:
            np.clip(slices, 0.0, self.clip_max, out=slices)
        if w.mask_input:
            slices *= masks
        w.slices, w.masks = slices, masks

    def inverse(self, maps: dict, ks: slice | None = None) -> dict:
        from scipy import ndimage

        J, I = self.shape_in
        c = (self.size - 1) / 2.0
        (cj, ci), (dj, di) = self.center, self.step
        out = {}
        for k, v in maps.items():
            v = np.asarray(v, np.float32)
            if v.shape[0] == 0:
                out[k] = np.zeros((0, J, I), np.float32)
                continue
            if k == "valid" and v.min() == 1.0 == v.max():  # the footprint, the same for every slice: once
                if getattr(self, "_footprint", None) is None:
                    self._footprint = self.inverse({"footprint": np.ones((1, self.size, self.size), np.float32)})[
                        "footprint"]
                out[k] = np.broadcast_to(self._footprint, (v.shape[0], J, I))
                continue
            out[k] = ndimage.affine_transform(
                v, np.array([1.0, 1.0 / dj, 1.0 / di]), offset=np.array([0.0, c - cj / dj, c - ci / di]),
                output_shape=(v.shape[0], J, I), order=1, mode="constant", cval=0.0, prefilter=False)
        return out

    def record(self) -> dict:
        return {"step": self.name, "square": self.square, "fov_mm": round(self.fov_mm, 3),
                "pixel_mm": round(self.pixel_mm, 4), "image_size": self.size}


# -- the stack ----------------------------------------------------------------------------------
@dataclass
class SliceStack:
    """Normalised axial slices and the recorded steps that map results back to the input grid."""

    slices: np.ndarray  # (N, S, S) float32 in [0, 1] (zero outside the brain when the input is masked)
    masks: np.ndarray  # (N, S, S) bool, brain at model resolution
    indices: np.ndarray  # (N,) axial index k of each slice in the working (canonical or template) volume
    image_size: int
    reference: sitk.Image  # the input image (its grid is the output grid; never modified)
    oriented_reference: sitk.Image  # geometry of the working volume (1 voxel, no voxel data kept)
    permute: tuple  # DICOMOrient permute order (x, y, z)
    flip: tuple  # DICOMOrient flip axes
    brain: np.ndarray  # (K, J, I) bool brain mask of the working volume (a view of input_brain when not registered)
    center: tuple  # (cj, ci) centre of the field of view, working-volume index units
    step: tuple  # (dj, di) working voxels per model pixel along j and i
    fov_mm: float  # side of the square field of view
    lower: float  # intensity mapped to 0
    upper: float  # intensity mapped to 1
    settings: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    steps: list = field(default_factory=list)  # the recorded Step objects, in forward order
    input_brain: np.ndarray | None = None  # bool brain mask in the input's voxel order (z, y, x), read-only
    profile: dict = field(default_factory=dict)
    brain_image: sitk.Image | None = None  # uint8 brain mask on the input's grid (input_brain is a view of it)

    def __len__(self) -> int:
        return int(len(self.indices))

    @property
    def oriented_shape(self) -> tuple:
        return self.brain.shape

    def denormalise(self, x01: np.ndarray) -> np.ndarray:
        return (self.lower + np.asarray(x01, np.float32) * (self.upper - self.lower)).astype(np.float32)

    def invert(self, maps: dict) -> dict:
        """Per-slice maps (N, S, S) -> arrays in the input's voxel order (z, y, x): every inverse, in reverse."""
        out = dict(maps)
        for st in reversed(self.steps):
            out = st.inverse(out)
        return out

    def _resampling_steps(self) -> list:
        """Indices of the chain's 3-D resampling steps (registration or deoblique: at most one)."""
        return [i for i, st in enumerate(self.steps) if not st.slicewise]

    def _resampling_index(self) -> int | None:
        """Index of the chain's 3-D resampling step, None without one."""
        idx = self._resampling_steps()
        return idx[0] if idx else None

    @property
    def streamable(self) -> bool:
        """The way back can be computed a few axial slices of the input at a time (``invert_slices``): the chain
        starts with the reorientation and has at most one 3-D resampling step, all steps before it slice-wise."""
        return bool(self.steps) and self.steps[0].name == "reorient" and len(self._resampling_steps()) <= 1

    def prepare_slices(self, maps: dict) -> dict:
        """What ``invert_slices(..., prepared=True)`` takes: with a 3-D resampling step (registration), the maps
        brought back through every step after it, whole (on its grid: the template's, small); else ``maps``."""
        r = self._resampling_index()
        if r is None:
            return maps
        out = {}
        for name, v in maps.items():  # one map at a time: the steps' temporaries are those of one volume
            one = {name: v}
            for st in reversed(self.steps[r + 1:]):
                one = st.inverse(one)
            # as an image on the resampling step's grid, made once (its inverse resamples it slab after slab)
            out[name] = self.steps[r].target.image(np.ascontiguousarray(one.pop(name), np.float32))
        return out

    def invert_slices(self, maps: dict, ks: slice, prepared: bool = False) -> dict:
        """Per-slice maps (N, S, S) -> the canonical axial slices ``ks`` (k0:k1) of the working volume, through
        every inverse but the reorientation's (``paste_canonical_slices`` writes them onto the input grid).

        Needs ``streamable``; the memory used is that of the slices ``ks`` (and, with registration, of the maps on
        the template's grid: ``prepare_slices``, computed once when ``prepared``), not of the volume.
        """
        if not self.streamable:
            raise ValueError("the chain has more than one 3-D step: invert whole volumes with invert()")
        r = self._resampling_index()
        if r is not None:
            out = maps if prepared else self.prepare_slices(maps)
            out = self.steps[r].inverse(out, ks)  # onto the slices ks of the grid before the resampling
            for st in reversed(self.steps[1:r]):
                out = st.inverse(out, ks)
            return out
        sel = next(st for st in self.steps if isinstance(st, SelectSlices))
        pos = sel.positions(ks)
        out = {k: v[pos] for k, v in maps.items()}
        for st in reversed(self.steps[1:]):
            out = st.inverse(out, ks if self.steps.index(st) <= self.steps.index(sel) else None)
        return out

    def brain_mask_array(self) -> np.ndarray:
        """Brain mask (bool, read-only) in the input's voxel order (z, y, x)."""
        return self.input_brain

    def brain_mask_image(self) -> sitk.Image:
        """Brain mask as a uint8 image on the input's grid (the one ``brain_mask_array`` views)."""
        if self.brain_image is None:
            img = sitk.GetImageFromArray(np.ascontiguousarray(self.brain_mask_array(), np.uint8))
            img.CopyInformation(self.reference)
            self.brain_image = img
        return self.brain_image


def _resample_inplane(stack: np.ndarray, center, step, size: int, order: int = 1, cval: float = 0.0) -> np.ndarray:
    """(N, J, I) canonical slices -> (N, S, S): output pixel (v, u) samples j = cj + (v - c) dj, i = ci + (u - c) di."""
    from scipy import ndimage

    c = (size - 1) / 2.0
    (cj, ci), (dj, di) = center, step
    out = ndimage.affine_transform(
        stack, np.array([1.0, dj, di]), offset=np.array([0.0, cj - c * dj, ci - c * di]),
        output_shape=(stack.shape[0], size, size), order=order, mode="constant", cval=float(cval), prefilter=False)
    return out.astype(np.float32)


def _yes_no_auto(value, name: str):
    if value is None:
        return "auto"
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ("auto",):
        return "auto"
    if v in ("yes", "true", "1", "y"):
        return True
    if v in ("no", "false", "0", "n"):
        return False
    raise ValueError(f"{name} must be auto, yes or no, got {value!r}")


def preprocess(image: sitk.Image, image_size: int, brain_mask: sitk.Image | None = None,
               normalisation: dict | None = None, profile: dict | None = None, skull_stripped="auto",
               contrast: str | None = None, strip_method: str | None = None, bias_correction=None,
               registration_options: dict | None = None, device=None) -> SliceStack:
    """Volume -> ``SliceStack`` (see the module docstring for every convention).

    ``profile``: the model's ``preprocessing`` entry (``DEFAULT_PROFILE`` for absent keys).
    ``skull_stripped``: "auto" (detect), True or False: whether the input is skull-stripped.
    ``contrast``: the scan's contrast (chooses the skull stripper; see ``uad.skullstrip``).
    ``strip_method``: force a skull stripper ("deepbet" or "registration").
    ``bias_correction``: None (the profile's), True or False: N4 switch.
    ``registration_options``: keyword arguments of ``uad.registration.register_affine``.
    """
    validate(image)
    size = int(image_size)
    if size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    s = normalisation_settings(normalisation)
    prof = profile_settings(profile)
    told = _yes_no_auto(skull_stripped, "skull_stripped")
    w = _Work(image=image)
    info: dict = {"orientation": CANONICAL_ORIENTATION, "warnings": acquisition_warnings(image),
                  "profile": dict(prof)}
    steps: list = []

    def run(st: Step):
        st.forward(w)
        steps.append(st)

    run(Reorient())
    # skull-stripped or not: told, or detected (a given brain mask is taken as the truth about the brain)
    if told == "auto":
        w.foreground = compute_brain_mask(w.arr, s["mask_threshold"])  # reused as the automatic brain mask
        stripped, evidence = detect_skull_stripped(w.arr, w.grid.spacing, s["mask_threshold"], w.foreground)
        info["skull_stripped"] = {"value": stripped, "source": "detected", **evidence}
    else:
        stripped = bool(told)
        info["skull_stripped"] = {"value": stripped, "source": "told"}
    w.stripped = stripped
    n4 = prof["bias_correction"] if bias_correction is None else bool(bias_correction)
    if n4 == "auto":
        n4 = not stripped
    strip = brain_mask is None and (prof["skull_strip"] is True or not stripped)
    if strip or brain_mask is not None:
        w.foreground = None  # not the brain mask: free it
    run(BrainMask(given=brain_mask, strip=strip, method=strip_method, contrast=contrast,
                  mask_threshold=s["mask_threshold"], device=device))
    brain_image = w.brain_image
    input_brain = array_view(brain_image).view(bool)
    if steps[-1].source == "automatic" and steps[-1].fraction > 0.6:
        info["warnings"].append(f"the automatic brain mask covers {100 * steps[-1].fraction:.0f}% of the volume; "
                                f"is the input skull-stripped? Pass a brain mask otherwise")
    w.mask_input = prof["skull_strip"] is not False
    register = prof["registration"] == "mni152" or (prof["registration"] == "auto" and not stripped)
    info["registration"] = {"value": "mni152" if register else None, "profile": prof["registration"]}
    if prof["registration"] == "auto":
        info["registration"]["reason"] = ("the input is not skull-stripped (a head scan)" if register
                                          else "the input is skull-stripped")
    elif prof["registration"] == "mni152":
        info["registration"]["reason"] = "the model's profile registers every input to its training space"
    if register:
        run(Register(prof["spacing_mm"], registration_options))
    elif prof["deoblique"] and oblique_angle_deg(w.grid.direction) > DEOBLIQUE_MIN_DEG:
        run(Deoblique())
    if n4:  # after the brain mask (fitted to the brain alone) and the registration (on the template's grid,
        # the same domain whatever the acquisition's orientation and slice thickness)
        run(BiasCorrection())
    full_brain = w.brain
    geom = w.grid.probe()
    run(Normalise(s["lower"], s["upper"], s["clip"], prof["intensity"], prof["pad_value"], s["clip_max"]))
    run(SelectSlices(prof["slice_range"]))
    run(InPlane(size, prof["square"], s["margin"], s["clip"], s["clip_max"]))
    norm_step, sel_step, ip = steps[-3], steps[-2], steps[-1]
    info.update({"n_slices": int(len(sel_step.indices)), "fov_mm": ip.fov_mm, "pixel_mm": ip.pixel_mm,
                 "lower": norm_step.lo, "upper": norm_step.hi, "permute": list(w.permute), "flip": list(w.flip),
                 "brain_mask": steps[[st.name for st in steps].index("brain_mask")].source,
                 "steps": [st.record() for st in steps]})
    return SliceStack(slices=w.slices, masks=w.masks, indices=sel_step.indices, image_size=size, reference=image,
                      oriented_reference=geom, permute=w.permute, flip=w.flip, brain=full_brain,
                      center=ip.center, step=ip.step, fov_mm=ip.fov_mm, lower=norm_step.lo, upper=norm_step.hi,
                      settings=s, info=info, steps=steps, input_brain=input_brain, profile=prof,
                      brain_image=brain_image)
