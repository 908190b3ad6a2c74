"""Skull stripping: the brain mask of an unprocessed head scan.

Two strippers, chosen per contrast by ``STRIPPER_BY_CONTRAST`` (measured on head
phantoms by ``benchmarks/bench_skullstrip.py``; see the README):

* ``deepbet``: the deepbet network (Fisch et al. 2024, MIT licence; PyPI package
  ``deepbet``, TorchScript weights inside the wheel, runs offline).  The scan is
  resampled to ``DEEPBET_VOXEL_MM`` isotropic voxels in RAS order (deepbet's
  input convention; thick slices would otherwise be squashed), deepbet's
  probability is thresholded at 0.5, its largest component kept and its holes
  filled, and the mask is brought back onto the scan's grid.
* ``registration``: the MNI152 brain mask carried onto the scan by an affine
  plus a B-spline SimpleITK registration (Mattes mutual information) of the
  template to the scan.

Both work on any orientation and spacing: they take a SimpleITK image and
return a bool array in its voxel order (k, j, i).
"""

from __future__ import annotations

import functools

import numpy as np
import SimpleITK as sitk

from . import UADError

METHODS = ("deepbet", "registration")
#: The skull stripper used per contrast (unknown contrast: deepbet).  Chosen by brain-mask Dice on
#: head phantoms (benchmarks/bench_skullstrip.py, numbers in the README): deepbet is best on T1 and
#: FLAIR; on T2 it over-segments (it keeps the bright CSF rim), where the registration mask is better.
STRIPPER_BY_CONTRAST = {"T1": "deepbet", "T2": "registration", "FLAIR": "deepbet"}
DEEPBET_VOXEL_MM = 1.0


def choose_method(contrast: str | None, method: str | None = None) -> str:
    if method is not None:
        m = str(method).lower()
        if m not in METHODS:
            raise UADError(f"unknown skull stripper {method!r}; choose one of {', '.join(METHODS)}")
        return m
    return STRIPPER_BY_CONTRAST.get(str(contrast or "").upper(), "deepbet")


def brain_mask(image: sitk.Image, contrast: str | None = None, method: str | None = None,
               device=None) -> tuple[np.ndarray, str]:
    """(bool brain mask in ``image``'s voxel order (k, j, i), "skull strip (<method>)")."""
    m = choose_method(contrast, method)
    if m == "deepbet":
        mask = deepbet_mask(image, device=device)
    else:
        mask = registration_mask(image)
    return mask, f"skull strip ({m})"


def _axial_axis(image: sitk.Image) -> int:
    """The array axis (of ``image``'s (k, j, i) voxel order) closest to the patient's inferior-superior axis."""
    d = np.asarray(image.GetDirection(), float).reshape(3, 3)
    return 2 - int(np.argmax(np.abs(d[2, :])))


def _cleanup(mask: np.ndarray, axial_axis: int = 0) -> np.ndarray:
    """Largest 3-D component, holes filled per axial slice (array axis ``axial_axis``) and closed cavities.

    Worked on the mask's bounding box (a brain fills about a third of a head scan's box) with 16-bit labels
    where they fit: the working arrays of a fine head scan stay a few bytes per voxel.
    """
    from scipy import ndimage

    from .preprocess import fill_holes_per_slice, largest_component

    if not mask.any():
        return mask
    box = []
    for ax in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    box = tuple(box)
    sub = ndimage.binary_fill_holes(largest_component(mask[box]))
    view = np.moveaxis(sub, axial_axis, 0)
    fill_holes_per_slice(view, out=view)
    out = np.zeros(mask.shape, bool)
    out[box] = sub
    return out


def _iso_grid(image: sitk.Image, voxel_mm: float):
    """The ``Grid`` in RAS voxel order (DICOMOrient 'RAS') with ``voxel_mm`` isotropic voxels over ``image``'s box."""
    from .preprocess import orientation_of, oriented_grid

    return oriented_grid(image, *orientation_of(image, "RAS")).respaced(float(voxel_mm), fit=False)


@functools.lru_cache(maxsize=2)
def _deepbet(no_gpu: bool):
    try:
        from deepbet import BrainExtraction
    except ImportError as e:  # pragma: no cover - a dependency of uad
        raise UADError(f"skull stripping needs the 'deepbet' package ({e}); pip install deepbet") from None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load deprecation inside deepbet
        return BrainExtraction(no_gpu=no_gpu)


def deepbet_mask(image: sitk.Image, device=None, threshold: float = 0.5) -> np.ndarray:
    """deepbet's brain mask of ``image`` (bool, its voxel order)."""
    import torch

    from .preprocess import Grid

    no_gpu = not (device is not None and str(device).startswith("cuda") and torch.cuda.is_available())
    bet = _deepbet(no_gpu)
    g = _iso_grid(image, DEEPBET_VOXEL_MM)
    # from the scan's own voxels, any pixel type: no whole-scan copy; (i, j, k), RAS order
    x = np.ascontiguousarray(g.resample(image, sitk.Transform(), default=float(sitk.GetArrayViewFromImage(
        image).min())).transpose(2, 1, 0))
    with torch.no_grad():
        prob = bet.run_model(x)
    m = prob > threshold
    if not m.any():
        return np.zeros(sitk.GetArrayViewFromImage(image).shape, bool)
    m = bet.postprocess(m, 0)
    back = g.image(np.ascontiguousarray(m.transpose(2, 1, 0)).astype(np.uint8))
    del m, prob, x
    return _cleanup(Grid.of(image).resample_mask(back), _axial_axis(image))


#: Registration-based stripper settings (affine then B-spline, template -> scan).
REGISTRATION_MASK_OPTIONS = {"affine_iterations": (100, 60, 30), "bspline_iterations": 20, "mesh_mm": 50.0,
                             "voxel_mm": 2.0}


def registration_mask(image: sitk.Image, options: dict | None = None) -> np.ndarray:
    """The MNI152 brain mask carried onto ``image`` (affine + B-spline, MI; template moving, scan fixed)."""
    from .preprocess import Grid
    from .registration import mni152, register_affine, register_deformable

    o = dict(REGISTRATION_MASK_OPTIONS, **(options or {}))
    t1, brain = mni152(float(o["voxel_mm"]))
    g = _iso_grid(image, float(o["voxel_mm"]))
    fixed = g.image(g.resample(image, sitk.Transform()))
    head = sitk.OtsuThreshold(fixed, 0, 1, 200)
    its = tuple(o["affine_iterations"])
    aff, _ = register_affine(fixed, t1, iterations=its, shrink=(4, 2, 1)[:len(its)],
                             smoothing_mm=(4.0, 2.0, 1.0)[:len(its)], fixed_mask=head)
    tx = register_deformable(fixed, t1, aff, mesh_mm=float(o["mesh_mm"]), iterations=int(o["bspline_iterations"]),
                             fixed_mask=head)
    return _cleanup(Grid.of(image).resample_mask(brain, tx), _axial_axis(image))
