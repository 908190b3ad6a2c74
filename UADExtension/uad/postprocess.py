"""Per-slice maps -> volumes on the input's exact grid; method post-processing; thresholding."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .imageio import array_view
from .preprocess import SliceStack, canonical_view, label, label_counts, paste_canonical_slices

#: axial slices of the working volume mapped back at a time by the streamed way back (at most; at most
#: 1 % of the volume's slices, so that the chunk's temporaries stay a small part of the volume's memory)
CHUNK_SLICES = 4


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

    Memory: the two output images are allocated once and filled
    ``CHUNK_SLICES`` axial slices at a time (``SliceStack.invert_slices``,
    SimpleITK's in-place paste), so nothing of the volume's size is held
    besides them (with registration, the maps are first brought back onto the
    template's grid, whole, then resampled onto the input a slab at a time);
    a chain that is not ``streamable`` inverts whole volumes, one map at a time.
    """
    rest = np.clip(_as_stack_array(restoration_slices, stack, "restoration"), 0.0, 1.0)
    anom = _as_stack_array(anomaly_slices, stack, "anomaly")
    if stack.streamable:
        return _to_volumes_streamed(stack, rest, anom)
    ref = stack.reference
    use = np.asarray(stack.invert({"valid": np.ones_like(anom)})["valid"] > 0.5)
    use &= stack.brain_mask_array()
    original = sitk.GetArrayViewFromImage(ref)
    restoration = stack.invert({"restoration": rest})["restoration"]
    np.copyto(restoration, original, where=~use, casting="unsafe")
    rest_img = _image_like(restoration, ref)
    del restoration
    anomaly = stack.invert({"anomaly": anom})["anomaly"]
    np.maximum(anomaly, 0.0, out=anomaly)
    anomaly[~use] = 0.0
    return rest_img, _image_like(anomaly, ref)


def _to_volumes_streamed(stack: SliceStack, rest: np.ndarray, anom: np.ndarray) -> tuple[sitk.Image, sitk.Image]:
    ref = stack.reference
    out_r = sitk.Image(ref.GetSize(), sitk.sitkFloat32)
    out_a = sitk.Image(ref.GetSize(), sitk.sitkFloat32)
    out_r.CopyInformation(ref)
    out_a.CopyInformation(ref)
    original = canonical_view(array_view(ref), stack.permute, stack.flip)
    brain = canonical_view(stack.brain_mask_array(), stack.permute, stack.flip)
    prepared = stack.prepare_slices({"restoration": rest, "anomaly": anom, "valid": np.ones_like(anom)})
    K = original.shape[0]
    chunk = max(1, min(CHUNK_SLICES, K // 100))
    for k0 in range(0, K, chunk):
        ks = slice(k0, min(K, k0 + chunk))
        maps = stack.invert_slices(prepared, ks, prepared=True)
        use = brain[ks] & (maps.pop("valid") > 0.5)
        r = np.where(use, maps.pop("restoration"), np.asarray(original[ks], np.float32)).astype(np.float32, copy=False)
        paste_canonical_slices(out_r, r, k0, stack.permute, stack.flip)
        del r
        a = maps.pop("anomaly")
        np.maximum(a, 0.0, out=a)
        a[~use] = 0.0
        paste_canonical_slices(out_a, a.astype(np.float32, copy=False), k0, stack.permute, stack.flip)
    return out_r, out_a


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
    is_img = isinstance(anomaly, sitk.Image)
    arr = sitk.GetArrayViewFromImage(anomaly) if is_img else np.asarray(anomaly)
    n_min = int(min_component_size or 0)
    if is_img and n_min <= 1 and arr.ndim == 3:  # slab by slab into the output image (no full-size temporary)
        img = sitk.Image(anomaly.GetSize(), sitk.sitkUInt8)
        img.CopyInformation(anomaly)
        for z0 in range(0, arr.shape[0], 16):
            chunk = np.greater(arr[z0:z0 + 16], float(threshold)).view(np.uint8)
            img[:, :, z0:z0 + chunk.shape[0]] = sitk.GetImageFromArray(chunk)
        return img
    m = np.greater(arr, float(threshold), out=np.empty(arr.shape, np.uint8), casting="unsafe")
    if n_min > 1 and m.any():
        # label only the bounding box of the flagged voxels (the same components, a fraction of the memory)
        box = []
        for ax in range(m.ndim):
            hit = np.flatnonzero(m.any(axis=tuple(a for a in range(m.ndim) if a != ax)))
            box.append(slice(int(hit[0]), int(hit[-1]) + 1))
        box = tuple(box)
        sub = m[box]
        lab, n = label(sub, structure=np.ones((3,) * m.ndim, bool))
        counts = label_counts(lab, n)
        keep = counts >= n_min
        keep[0] = False
        sub[...] = keep[lab]
        del lab
    if not is_img:
        return m
    img = sitk.GetImageFromArray(m)
    img.CopyInformation(anomaly)
    return img
