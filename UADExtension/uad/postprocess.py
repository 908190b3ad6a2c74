"""Per-slice maps -> volumes on the input's exact grid; method post-processing; thresholding."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .preprocess import SliceStack


def _as_stack_array(x, stack: SliceStack, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float32)
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    n, s = len(stack), stack.image_size
    if a.shape != (n, s, s):
        raise ValueError(f"{name}: expected shape ({n}, {s}, {s}) (or with a channel axis), got {a.shape}")
    return a


def _image_like(arr: np.ndarray, reference: sitk.Image) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(reference)
    return img


def to_volumes(stack: SliceStack, restoration_slices, anomaly_slices) -> tuple[sitk.Image, sitk.Image]:
    """Restoration and anomaly slices -> (restoration, anomaly) float32 images on the input's grid.

    The slices go back through the inverses of the preprocessing steps in
    reverse order (``SliceStack.invert``).  The restoration is de-normalised to
    the input's intensity units inside the brain and equals the input outside
    it and wherever no slice was processed; the anomaly map is zero there.
    """
    rest = np.clip(_as_stack_array(restoration_slices, stack, "restoration"), 0.0, 1.0)
    anom = _as_stack_array(anomaly_slices, stack, "anomaly")
    maps = stack.invert({"restoration": rest, "anomaly": anom, "valid": np.ones_like(anom)})
    use = stack.brain_mask_array() & (maps.pop("valid") > 0.5)
    original = sitk.GetArrayFromImage(stack.reference).astype(np.float32)
    restoration = np.where(use, maps["restoration"], original).astype(np.float32)
    del original
    anomaly = np.where(use, np.maximum(maps["anomaly"], 0.0), 0.0).astype(np.float32)
    return _image_like(restoration, stack.reference), _image_like(anomaly, stack.reference)


def apply_method_postprocess(anomaly_array: np.ndarray, brain_mask_array: np.ndarray,
                             options: dict | None) -> np.ndarray:
    """The volume post-processing a method declares in ``Method.postprocess``.

    Applied to the stacked slices at the model resolution (arrays (N, S, S),
    axis 0 = axial slices), as the methods' papers do:
    ``erode_mask_iterations``: erode the brain mask in each slice (2-D, 3x3 cross)
    that many times and zero the anomaly outside it; ``median_size``: 3-D median
    filter of that size.  ``min_component_size`` concerns the binary mask (see
    ``threshold_mask``) and is ignored here.  Returns a new array.
    """
    from scipy import ndimage

    out = np.asarray(anomaly_array, dtype=np.float32).copy()
    opts = dict(options or {})
    unknown = set(opts) - {"erode_mask_iterations", "median_size", "min_component_size"}
    if unknown:
        raise ValueError(f"unknown post-processing option(s): {', '.join(sorted(unknown))}")
    mask = np.asarray(brain_mask_array, dtype=bool)
    if mask.shape != out.shape:
        raise ValueError(f"anomaly {out.shape} and brain mask {mask.shape} shapes differ")
    it = int(opts.get("erode_mask_iterations") or 0)
    if it > 0:
        struct = np.zeros((1, 3, 3), bool)
        struct[0] = ndimage.generate_binary_structure(2, 1)
        mask = ndimage.binary_erosion(mask, structure=struct, iterations=it)
        out *= mask
    med = int(opts.get("median_size") or 0)
    if med > 1:
        out = ndimage.median_filter(out, size=med, mode="constant", cval=0.0)
        out *= mask
    return out


def threshold_mask(anomaly: sitk.Image | np.ndarray, threshold: float, min_component_size: int = 0):
    """``anomaly > threshold`` as uint8 (an image on the same grid for an image input).

    Connected components (26-connected in 3-D) smaller than
    ``min_component_size`` voxels are removed.
    """
    from scipy import ndimage

    is_img = isinstance(anomaly, sitk.Image)
    arr = sitk.GetArrayViewFromImage(anomaly) if is_img else np.asarray(anomaly)
    m = arr > float(threshold)
    n_min = int(min_component_size or 0)
    if n_min > 1 and m.any():
        lab, n = ndimage.label(m, structure=np.ones((3,) * m.ndim, bool))
        counts = np.bincount(lab.ravel())
        keep = counts >= n_min
        keep[0] = False
        m = keep[lab]
    m = m.astype(np.uint8)
    if not is_img:
        return m
    img = sitk.GetImageFromArray(m)
    img.CopyInformation(anomaly)
    return img
