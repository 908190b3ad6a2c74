"""Reading, validating and writing volumes (SimpleITK).

Every problem with an input is reported as one ``uad.InputError`` whose message
is a single line naming the file (when known) and what is wrong, so that the
CLI and the Slicer module can show it as is.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import InputError

#: Fewest voxels a volume may have along any axis (a thinner volume is a slice or a slab).
MIN_SLICES = 3

#: File-name endings recognised when deriving an output stem (longest first).
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".hdr", ".img", ".img.gz",
                  ".vtk", ".mnc", ".mgz", ".mgh", ".dcm", ".tif", ".tiff", ".gz")

SAMPLE_FILES = {
    "image": "sample_T2_tumour.nii.gz",
    "lesion": "sample_T2_tumour_lesion.nii.gz",
    "brain_mask": "sample_T2_tumour_brainmask.nii.gz",
}


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def stem(path: str | os.PathLike) -> str:
    """File name without its image extension(s): ``/a/t2.nii.gz`` -> ``t2``."""
    name = Path(path).name
    low = name.lower()
    for suf in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if low.endswith(suf) and len(name) > len(suf):
            return name[: -len(suf)]
    return name


def read_image(path: str | os.PathLike) -> sitk.Image:
    """Read any volume SimpleITK reads (NIfTI, NRRD, MHA, ...).

    A missing file, a folder or a file that is not an image raises ``InputError``.
    A 4-D image whose last axis has length 1 is returned as 3-D.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    if p.is_dir():
        raise InputError(f"{p}: is a folder, not an image file")
    if p.stat().st_size == 0:
        raise InputError(f"{p}: the file is empty")
    warn = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        img = sitk.ReadImage(str(p))
    except RuntimeError as e:
        msg = str(e)
        if "Unable to determine ImageIO reader" in msg or "Could not create IO object" in msg:
            why = "not an image format SimpleITK can read"
        else:
            why = "not a readable image (corrupt or truncated file?)"
        raise InputError(f"{p}: {why}") from None
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warn)
    if img.GetDimension() == 4 and img.GetSize()[3] == 1:
        size = list(img.GetSize())
        size[3] = 0
        img = sitk.Extract(img, size, [0, 0, 0, 0])
    return img


def validate(image: sitk.Image, name: str = "input image", min_slices: int = MIN_SLICES) -> None:
    """Raise ``InputError`` (one line) unless ``image`` is a usable 3-D scalar volume.

    Rejected: 2-D images, 4-D series, multi-component (RGB / vector / series)
    pixels, complex pixels, empty volumes (zero size or all zero), constant
    volumes, NaN / infinite values and volumes with fewer than ``min_slices``
    voxels along an axis.
    """
    if not isinstance(image, sitk.Image):
        raise InputError(f"{name}: expected a SimpleITK image, got {type(image).__name__}")
    dim = image.GetDimension()
    size = image.GetSize()
    size_txt = "x".join(str(s) for s in size)
    if dim == 2:
        raise InputError(f"{name}: is a 2-D image ({size_txt}); a 3-D volume is needed")
    if dim == 4:
        raise InputError(f"{name}: is a 4-D series ({size_txt}); a single 3-D volume is needed "
                         f"(extract one time point first)")
    if dim != 3:
        raise InputError(f"{name}: has {dim} dimensions; a 3-D volume is needed")
    ncomp = image.GetNumberOfComponentsPerPixel()
    if ncomp > 1:
        raise InputError(f"{name}: has {ncomp} components per voxel (RGB, vector or series); "
                         f"a scalar 3-D volume is needed")
    if "complex" in image.GetPixelIDTypeAsString().lower():
        raise InputError(f"{name}: has complex voxels; a real-valued volume is needed")
    if min(size) == 0:
        raise InputError(f"{name}: is empty (size {size_txt})")
    if min(size) < min_slices:
        axis = "xyz"[int(np.argmin(size))]
        raise InputError(f"{name}: has only {min(size)} slice(s) along {axis} (size {size_txt}); "
                         f"a 3-D volume with at least {min_slices} is needed")
    arr = sitk.GetArrayViewFromImage(image)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        n = int((~np.isfinite(arr)).sum())
        raise InputError(f"{name}: contains {n} NaN or infinite voxel value(s)")
    lo, hi = arr.min(), arr.max()
    if lo == 0 and hi == 0:
        raise InputError(f"{name}: is empty (all voxels are zero)")
    if lo == hi:
        raise InputError(f"{name}: is constant (every voxel is {float(lo):g}); there is nothing to analyse")
    sp = image.GetSpacing()
    if not all(np.isfinite(s) and s > 0 for s in sp):
        raise InputError(f"{name}: has invalid voxel spacing {tuple(sp)}")


def validate_mask(mask: sitk.Image, image: sitk.Image, name: str = "brain mask") -> None:
    """A brain mask must be a 3-D scalar volume covering the image and not be empty."""
    if not isinstance(mask, sitk.Image):
        raise InputError(f"{name}: expected a SimpleITK image, got {type(mask).__name__}")
    if mask.GetDimension() != 3 or mask.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{name}: must be a scalar 3-D volume "
                         f"(got {mask.GetDimension()}-D, {mask.GetNumberOfComponentsPerPixel()} component(s))")
    arr = sitk.GetArrayViewFromImage(mask)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InputError(f"{name}: contains NaN or infinite values")
    if not (arr > 0).any():
        raise InputError(f"{name}: is empty (no voxel > 0)")


def write_image(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> None:
    """Write ``image`` to ``path`` (format from the extension); the folder is created if needed."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        sitk.WriteImage(image, str(p), useCompression=compress)
    except RuntimeError as e:
        raise InputError(f"{p}: cannot write ({_one_line(e).split('Description:')[-1].strip()[:200]})") from None


def write_image_atomic(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> None:
    """Write to a temporary file in the same folder, then rename it to ``path``."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_like(p)
    try:
        write_image(image, tmp, compress)
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()


def temp_path_like(path: str | os.PathLike) -> Path:
    """A fresh hidden file name next to ``path`` keeping its extension (writers choose the format by it)."""
    p = Path(path)
    name = p.name
    suffix = ""
    low = name.lower()
    for suf in sorted(IMAGE_SUFFIXES + (".png", ".json", ".csv"), key=len, reverse=True):
        if low.endswith(suf):
            suffix = name[-len(suf):]
            break
    fd, tmp = tempfile.mkstemp(prefix=f".{stem(name)}.", suffix=".part" + suffix, dir=str(p.parent))
    os.close(fd)
    return Path(tmp)


def _sample_dirs() -> list[Path]:
    here = Path(__file__).resolve()
    dirs = []
    env = os.environ.get("UAD_SAMPLE_DIR")
    if env:
        dirs.append(Path(env))
    # repository: <repo>/UADExtension/uad -> <repo>/Resources/SampleData
    # installed Slicer extension: <module dir>/uad -> <module dir>/Resources/SampleData
    dirs += [here.parents[2] / "Resources" / "SampleData", here.parents[1] / "Resources" / "SampleData"]
    return dirs


def sample_paths() -> dict[str, Path]:
    """The bundled sample: ``{"image", "lesion", "brain_mask"}`` -> file paths.

    Raises ``InputError`` when the sample image cannot be found; ``lesion`` and
    ``brain_mask`` are left out when their files are missing.
    """
    for d in _sample_dirs():
        if (d / SAMPLE_FILES["image"]).is_file():
            return {k: d / f for k, f in SAMPLE_FILES.items() if (d / f).is_file()}
    looked = ", ".join(str(d) for d in _sample_dirs())
    raise InputError(f"the bundled sample {SAMPLE_FILES['image']} was not found (looked in {looked})")
