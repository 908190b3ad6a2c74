"""Reading, validating and writing volumes (SimpleITK).

Every problem with an input is reported as one ``uad.InputError`` whose message
is a single line naming the file (when known) and what is wrong, so that the
CLI and the Slicer module can show it as is.
"""

from __future__ import annotations

import hashlib
import os
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import InputError
from .files import apply_umask

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
    if is_nifti(p):
        check_nifti_file(p)
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


class _ImageBuffer:
    """Exposes a SimpleITK image's voxel buffer to numpy and keeps the image alive while it is viewed."""

    def __init__(self, image: sitk.Image):
        self.image = image
        view = sitk.GetArrayViewFromImage(image)
        self.__array_interface__ = view.__array_interface__


def array_view(image: sitk.Image) -> np.ndarray:
    """A read-only numpy view (z, y, x) of ``image``'s voxels, no copy.

    Unlike ``sitk.GetArrayViewFromImage``, the view (and every view taken from it) keeps the image
    alive, so it never points at freed memory; writing to it raises (the image is never modified).
    """
    arr = np.asarray(_ImageBuffer(image))
    arr.flags.writeable = False
    return arr


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
    if arr.dtype.kind == "f":  # slab by slab: no volume-sized temporary
        step = max(1, (1 << 16) // max(1, int(np.prod(arr.shape[1:]))))
        n = sum(int(arr[z:z + step].size - np.count_nonzero(np.isfinite(arr[z:z + step])))
                for z in range(0, arr.shape[0], step))
        if n:
            raise InputError(f"{name}: contains {n} NaN or infinite voxel value(s)")
    lo, hi = arr.min(), arr.max()
    if lo == 0 and hi == 0:
        raise InputError(f"{name}: is empty (all voxels are zero)")
    if lo == hi:
        raise InputError(f"{name}: is constant (every voxel is {float(lo):g}); there is nothing to analyse")
    sp = image.GetSpacing()
    if not all(np.isfinite(s) and s > 0 for s in sp):
        raise InputError(f"{name}: has invalid voxel spacing {tuple(sp)}")
    shear = direction_shear(image.GetDirection())
    if shear > ORTHOGONALITY_TOLERANCE:
        raise InputError(f"{name}: {_shear_text(shear)}")


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


# -- file-level checks (before SimpleITK reads a file) ----------------------------------------------
#: Largest |D^T D - I| entry of a direction matrix still taken as orthogonal (rounding in headers).
ORTHOGONALITY_TOLERANCE = 1e-3
_CHUNK = 1 << 24  # bytes per block when streaming voxel data


def is_nifti(path: str | os.PathLike) -> bool:
    low = Path(path).name.lower()
    return low.endswith(".nii") or low.endswith(".nii.gz")


def direction_shear(direction) -> float:
    """Largest deviation of ``D^T D`` from the identity (0 for a rotation / reflection)."""
    d = np.asarray(direction, float)
    n = int(round(np.sqrt(d.size)))
    d = d.reshape(n, n)
    return float(np.abs(d.T @ d - np.eye(n)).max())


def _shear_text(shear: float) -> str:
    return (f"its direction matrix is sheared (not orthogonal; |D^T D - I| up to {shear:.3g}); results mapped "
            f"back onto such a grid would be misplaced. Resample it onto an orthogonal grid first (for example "
            f"with Slicer's Resample Scalar Volume or SimpleITK's Resample)")


def check_nifti_file(path: str | os.PathLike) -> None:
    """Refuse a NIfTI file whose voxel data is truncated, holds NaN / Inf, or whose sform is sheared.

    ITK reads a truncated ``.nii`` / ``.nii.gz`` as zeros, turns NaN into 0 and silently
    orthogonalises a sheared sform; this reads the header (nibabel, lazily) and streams the
    voxel bytes (gzip-decompressed in blocks, never the whole volume at once).
    """
    import gzip
    import zlib

    import nibabel as nib

    p = Path(path)
    try:
        img = nib.load(str(p))
        hdr = img.header
        shape = tuple(int(x) for x in hdr.get_data_shape())
        dtype = np.dtype(hdr.get_data_dtype())
        offset = int(hdr.get_data_offset())
    except Exception:  # not a NIfTI header nibabel understands: SimpleITK's reader reports it
        return
    if int(hdr.get("sform_code", 0)) > 0:
        shear = direction_shear(_normalised_columns(hdr.get_sform()[:3, :3]))
        if shear > ORTHOGONALITY_TOLERANCE:
            raise InputError(f"{p}: {_shear_text(shear)}")
    need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    check_finite = dtype.kind in "fc"
    opener = gzip.open if p.name.lower().endswith(".gz") else open
    got = 0
    bad = 0
    try:
        with opener(str(p), "rb") as f:
            f.seek(offset)
            rest = b""
            while got < need:
                block = f.read(min(_CHUNK, need - got))
                if not block:
                    break
                got += len(block)
                if check_finite:
                    block = rest + block
                    usable = len(block) - len(block) % dtype.itemsize
                    rest = block[usable:]
                    bad += int((~np.isfinite(np.frombuffer(block[:usable], dtype))).sum())
    except (EOFError, OSError, zlib.error) as e:
        raise InputError(f"{p}: the file is truncated or corrupt ({_one_line(e)[:120]})") from None
    if got < need:
        raise InputError(f"{p}: the file is truncated ({got} of {need} bytes of voxel data present)")
    if bad:
        raise InputError(f"{p}: contains {bad} NaN or infinite voxel value(s)")


def _normalised_columns(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, float)
    norms = np.linalg.norm(m, axis=0)
    norms[norms == 0] = 1.0
    return m / norms


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- plausibility warnings ------------------------------------------------------------------------
MIN_SPACING_MM, MAX_SPACING_MM = 0.1, 10.0
#: Physical extent (mm) along the largest axis expected of a head or brain scan.
HEAD_EXTENT_MM = (100.0, 400.0)


def plausibility_warnings(image: sitk.Image) -> list[str]:
    """Warnings (not errors) for a scan that is unlikely to be a brain MRI: odd spacing, CT-like
    intensities (Hounsfield units), a field of view that is not a head's."""
    out = []
    sp = image.GetSpacing()
    odd = [f"{s:g}" for s in sp if s < MIN_SPACING_MM or s > MAX_SPACING_MM]
    if odd:
        out.append(f"voxel spacing {' x '.join(f'{s:g}' for s in sp)} mm is outside {MIN_SPACING_MM:g}-"
                   f"{MAX_SPACING_MM:g} mm: is the spacing in the header right (mm)?")
    arr = sitk.GetArrayViewFromImage(image)
    step = max(1, int(round((arr.size / 2e6) ** (1 / 3))))  # a subsample of ~2 M voxels is enough
    sub = np.asarray(arr[::step, ::step, ::step], dtype=np.float32)
    lo, p01, hi = float(sub.min()), float(np.percentile(sub, 1)), float(sub.max())
    if p01 <= -500 and lo >= -3100 and hi >= 300:
        out.append(f"intensities from {lo:g} to {hi:g} with many voxels below -500 look like CT (Hounsfield "
                   f"units); the models are for MRI")
    ext = [n * s for n, s in zip(image.GetSize(), sp)]
    big = max(ext)
    if big < HEAD_EXTENT_MM[0] or big > HEAD_EXTENT_MM[1]:
        out.append(f"the field of view ({' x '.join(f'{e:.0f}' for e in ext)} mm) is not that of a head "
                   f"({HEAD_EXTENT_MM[0]:g}-{HEAD_EXTENT_MM[1]:g} mm across)")
    return out


CONTRASTS = ("T1", "T2", "FLAIR", "PD")


def metadata_contrast(image: sitk.Image | None = None, path: str | os.PathLike | None = None) -> str | None:
    """The contrast written in the image's metadata (NIfTI descrip, DICOM series description / sequence
    name), else in the file name (``*_T2_*``, ``*flair*``); None when neither says, or they name several."""
    import re

    texts = []
    if image is not None:
        for key in ("descrip", "0008|103e", "0018|0024", "0018|1030", "ITK_FileNotes"):
            if image.HasMetaDataKey(key):
                texts.append(image.GetMetaData(key))
    if path is not None:
        texts.append(stem(path))
    for text in texts:
        if text.startswith(OUTPUT_MARKER):
            continue
        found = set()
        for tok in re.split(r"[^A-Za-z0-9]+", text.upper()):
            if tok in ("FLAIR", "T2FLAIR", "TIRM"):
                found.add("FLAIR")
            elif tok in ("T1", "T1W", "MPRAGE", "T1CE", "T1GD", "T1C", "SPGR"):
                found.add("T1")
            elif tok in ("T2", "T2W", "TSE"):
                found.add("T2")
            elif tok in ("PD", "PDW"):
                found.add("PD")
        if len(found) == 1:
            return found.pop()
        if len(found) > 1:
            return None
    return None


# -- writing --------------------------------------------------------------------------------------
#: Prefix of the NIfTI ``descrip`` / PNG text marker that says which input a file is the output of.
OUTPUT_MARKER = "uad-output"


def output_marker(kind: str, input_digest: str) -> str:
    """``uad-output <kind> <first 32 hex of the input's sha256>`` (fits NIfTI's 80-character descrip)."""
    return f"{OUTPUT_MARKER} {kind} {input_digest[:32]}"


def read_output_marker(path: str | os.PathLike) -> str | None:
    """The marker of a file this tool wrote (NIfTI descrip or PNG text), None for any other file."""
    p = Path(path)
    try:
        if p.name.lower().endswith(".png"):
            from PIL import Image

            with Image.open(p) as im:
                text = (getattr(im, "text", None) or {}).get(OUTPUT_MARKER)
                return f"{OUTPUT_MARKER} {text}" if text else None
        r = sitk.ImageFileReader()
        r.SetFileName(str(p))
        warn = sitk.ProcessObject.GetGlobalWarningDisplay()
        sitk.ProcessObject.SetGlobalWarningDisplay(False)
        try:
            r.ReadImageInformation()
        finally:
            sitk.ProcessObject.SetGlobalWarningDisplay(warn)
        for key in ("descrip", "ITK_FileNotes"):
            if r.HasMetaDataKey(key) and r.GetMetaData(key).startswith(OUTPUT_MARKER):
                return r.GetMetaData(key).strip()
    except Exception:  # unreadable: certainly not ours
        return None
    return None


def mark_png(path: str | os.PathLike, marker: str) -> None:
    """Store ``marker`` as a PNG text chunk (rewrites the file in place; used on temporaries only)."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text(OUTPUT_MARKER, marker[len(OUTPUT_MARKER):].strip())
    with Image.open(path) as im:
        im.load()
        im.save(path, format="PNG", pnginfo=info)


def _write_error(p: Path, err) -> InputError:
    text = getattr(err, "strerror", None) or _one_line(err).split("Description:")[-1].strip()[:200]
    return InputError(f"{p}: cannot write ({text})")


def write_image(image: sitk.Image, path: str | os.PathLike, compress: bool = True, marker: str | None = None) -> None:
    """Write ``image`` to ``path`` (format from the extension); the folder is created if needed.

    ``marker`` goes into the header (NIfTI ``descrip``) so that a later run recognises the file as
    its own output (``read_output_marker``).
    """
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        had = image.HasMetaDataKey("ITK_FileNotes")
        before = image.GetMetaData("ITK_FileNotes") if had else None
        if marker is not None:  # set on the image itself (a copy would duplicate the voxels), restored below
            image.SetMetaData("ITK_FileNotes", marker)
        try:
            sitk.WriteImage(image, str(p), useCompression=compress)
        finally:
            if marker is not None:
                if had:
                    image.SetMetaData("ITK_FileNotes", before)
                else:
                    image.EraseMetaData("ITK_FileNotes")
    except (RuntimeError, OSError) as e:
        raise _write_error(p, e) from None


def write_image_atomic(image: sitk.Image, path: str | os.PathLike, compress: bool = True,
                       marker: str | None = None) -> None:
    """Write to a temporary file in the same folder, then rename it to ``path`` (mode from the umask)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_like(p)
    try:
        write_image(image, tmp, compress, marker)
        apply_umask(tmp)
        os.replace(tmp, p)
    finally:
        discard_temp(tmp)


# Temporary files in progress: removed on error, and by the signal handler of ``remove_temporaries_on_signal``.
_TEMPS: set = set()
_LOCK = threading.Lock()


def temp_path_like(path: str | os.PathLike) -> Path:
    """A fresh hidden file name next to ``path`` keeping its extension (writers choose the format by it).

    The file is registered as a temporary: ``discard_temp`` removes it (and forgets it), and so
    does a SIGTERM while ``remove_temporaries_on_signal`` is active.
    """
    p = Path(path)
    name = p.name
    suffix = ""
    low = name.lower()
    for suf in sorted(IMAGE_SUFFIXES + (".png", ".json", ".csv"), key=len, reverse=True):
        if low.endswith(suf):
            suffix = name[-len(suf):]
            break
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{stem(name)}.", suffix=".part" + suffix, dir=str(p.parent))
    except OSError as e:
        raise _write_error(p, e) from None
    os.close(fd)
    with _LOCK:
        _TEMPS.add(tmp)
    return Path(tmp)


def discard_temp(tmp: str | os.PathLike) -> None:
    """Remove a temporary file if it still exists (after a rename it does not) and forget it."""
    t = str(tmp)
    with _LOCK:
        _TEMPS.discard(t)
    try:
        os.unlink(t)
    except FileNotFoundError:
        pass
    except OSError:
        pass


def remove_temporaries() -> int:
    """Remove every registered temporary file; returns how many were removed."""
    with _LOCK:
        temps = list(_TEMPS)
        _TEMPS.clear()
    n = 0
    for t in temps:
        try:
            os.unlink(t)
            n += 1
        except OSError:
            pass
    return n


class Terminated(BaseException):
    """Raised in the main thread by the signal handler (SIGTERM / SIGHUP) after temporaries are removed."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextmanager
def remove_temporaries_on_signal(signals=("SIGTERM", "SIGHUP")):
    """While active, SIGTERM / SIGHUP remove every temporary file and raise ``Terminated`` (exit 128 + N).

    Only installed from the main thread (signal handlers cannot be set elsewhere); the previous
    handlers are restored on exit.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {}

    def handler(signum, frame):
        remove_temporaries()
        raise Terminated(signum)

    for name in signals:
        sig = getattr(signal, name, None)
        if sig is not None:
            old[sig] = signal.signal(sig, handler)
    blocked = set()
    if old and hasattr(signal, "pthread_sigmask"):  # a mask inherited from the parent would hold them back
        blocked = set(signal.pthread_sigmask(signal.SIG_UNBLOCK, list(old))) & set(old)
    try:
        yield
    finally:
        if blocked:
            signal.pthread_sigmask(signal.SIG_BLOCK, list(blocked))
        for sig, h in old.items():
            signal.signal(sig, h)


def check_writable(folder: str | os.PathLike, need_bytes: int = 0) -> None:
    """Raise ``InputError`` unless files can be created in ``folder`` (or where it would be created) and
    its file system has ``need_bytes`` free.  Creates nothing that stays (a probe file is removed)."""
    import shutil

    f = Path(folder)
    if f.exists() and not f.is_dir():
        raise InputError(f"{f}: exists and is not a folder")
    probe_dir = f
    while not probe_dir.exists():
        parent = probe_dir.parent
        if parent == probe_dir:
            break
        probe_dir = parent
    if not probe_dir.is_dir():
        raise InputError(f"{f}: cannot create the output folder ({probe_dir} is not a folder)")
    try:
        fd, probe = tempfile.mkstemp(prefix=".uad-write-test.", dir=str(probe_dir))
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        where = "the output folder" if probe_dir == f else f"{probe_dir} (to create the output folder)"
        raise InputError(f"{f}: cannot write into {where}: {e.strerror or e}") from None
    if need_bytes > 0:
        free = shutil.disk_usage(str(probe_dir)).free
        if free < need_bytes:
            raise InputError(f"{f}: not enough free disk space ({free / 2**20:.0f} MiB free, about "
                             f"{need_bytes / 2**20:.0f} MiB needed for the outputs)")


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
