"""Peak memory of ``uad.pipeline.detect`` per input voxel, beyond the input volume itself.

Builds a synthetic skull-stripped "brain" volume of the given shape in memory (float32 or int16), a
tiny random-weight model (the network's memory does not grow with the volume), runs ``detect``
once, and reports, in bytes per input voxel:

* ``rss``: the process's peak resident set during ``detect`` minus its resident set just before
  (input volume and model loaded, a warm-up ``detect`` on a small volume done so that lazy imports
  and torch's first-call allocations are not counted, free allocator pages given back with glibc's
  ``malloc_trim`` and allocations above 1 MiB mapped on their own (``mallopt``) so that freed
  memory is not retained and reused unseen): every allocation, numpy's, ITK's (the
  results are SimpleITK images) and torch's.  The peak is the kernel's high-water mark
  (``VmHWM``), reset just before ``detect`` through ``/proc/self/clear_refs``; where that is not
  possible, ``ru_maxrss`` of the process (then run it in a fresh process);
* ``tracemalloc``: the peak of the allocations Python's tracemalloc sees during ``detect``: numpy
  arrays (the working memory), not SimpleITK's buffers (the four results, 10 bytes a voxel, and
  ITK's own temporaries), so the real peak is at least this plus the results;

and the largest traced allocation sites.

    OMP_NUM_THREADS=1 python benchmarks/bench_memory.py --shape 400 512 512     # z y x

``--head T1|T2|FLAIR --spacing X Y Z``: instead of the ellipsoid, a head phantom (``make_phantom(head=True)``,
1 mm) resampled to that voxel size, the unprocessed-scan path (N4, skull stripping, MNI152 registration):

    OMP_NUM_THREADS=1 python benchmarks/bench_memory.py --head T1 --spacing 0.5 0.5 0.5
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "UADExtension"))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    """The resident high-water mark since the last ``reset_peak_rss`` (VmHWM), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def map_large_allocations(threshold: int = 1 << 20) -> bool:
    """Tell glibc's allocator to map every allocation above ``threshold`` bytes on its own (``mallopt``
    M_MMAP_THRESHOLD, which also stops its dynamic raising up to 32 MiB): freed arrays go back to the
    system at once, so the resident peak is that of the live arrays, at any volume size."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, int(threshold)))  # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError):
        return False


def release_free_memory() -> None:
    """Give the allocator's free pages back to the system (glibc ``malloc_trim``), so that memory freed
    before the measurement (the input's construction, the warm-up) is not silently reused by it."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Reset the kernel's resident high-water mark of this process (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


#: field of view (x, y, z) in mm of the synthetic volume: the ellipsoid is a brain-sized ~1.6 l (144 x 170 x 128 mm), so that
#: detect takes it as skull-stripped whatever the shape (the default chain: no N4, no skull stripper)
FOV_MM = (180.0, 200.0, 150.0)


def make_input(shape, dtype: str, seed: int = 0, spacing=None):
    """An ellipsoid 'brain' with smooth texture and a bright lesion, zero outside; spacing: ``FOV_MM`` / shape."""
    import SimpleITK as sitk

    nz, ny, nx = shape
    z, y, x = np.ogrid[-1:1:nz * 1j, -1:1:ny * 1j, -1:1:nx * 1j]
    r2 = (z / 0.85) ** 2 + (y / 0.85) ** 2 + (x / 0.8) ** 2
    img = np.zeros(shape, np.float32)
    inside = r2 <= 1
    img[inside] = 400.0
    img += (np.cos(6 * np.sqrt(r2)) * 100.0).astype(np.float32) * inside
    les = ((z - 0.2) ** 2 + (y + 0.3) ** 2 + (x - 0.3) ** 2) < 0.02
    img[les & inside] = 900.0
    arr = img if dtype == "float32" else np.rint(img).astype(np.int16)
    im = sitk.GetImageFromArray(arr)
    im.SetSpacing(tuple(float(v) for v in spacing) if spacing is not None else
                  tuple(f / n for f, n in zip(FOV_MM, (nx, ny, nz))))
    del img, arr, inside, les, r2
    return im


def make_head(contrast: str, spacing, seed: int = 0):
    """A head phantom (not skull-stripped) with a tumour, resampled to ``spacing`` (x, y, z mm)."""
    from uad.phantoms import make_phantom, resample_phantom

    ph = make_phantom(seed, contrast, "tumour", head=True)
    return resample_phantom(ph, spacing=tuple(float(v) for v in spacing)).image


def tiny_model(image_size: int):
    import torch

    from uad.networks import tiny_unet_config
    from uad.zoo import build_model

    torch.manual_seed(0)
    cfg = {"methods": ["anoddpm"], "image_size": image_size, "intensity_range": [-1.0, 1.0], "noise": "gaussian",
           "schedule": {"num_train_timesteps": 1000, "schedule": "linear_beta", "beta_start": 1e-4,
                        "beta_end": 2e-2, "prediction_type": "epsilon", "clip_sample": True},
           "networks": {"denoiser": tiny_unet_config((8, 16, 16))}, "normalisation": {}, "threshold": None}
    return build_model(cfg, model_id="bench-tiny")


def no_network(method, x, mask, rng):
    """A stand-in for the method call (``detect(..., forward=)``): restoration = input, anomaly = |x - 0.5|
    in the brain.  Without the network, what is measured is the volume chain alone."""
    from types import SimpleNamespace

    return SimpleNamespace(restoration=x, anomaly=(x - 0.5).abs() * mask, nfe=0)


def measure(shape, dtype="float32", image_size=32, trace=True, top=8, warmup=True, network=True,
            batch_size=64, spacing=None, head=None) -> dict:
    """Run detect once; returns the measurements (see the module docstring).  ``network=False``: the method
    call is replaced by ``no_network`` (the memory of the preprocessing chain and the way back alone)."""
    import warnings

    import SimpleITK as sitk

    from uad.pipeline import detect

    mapped = map_large_allocations()
    model = tiny_model(image_size)
    params = {"level": 10, "steps": 2, "sampler": "ddim"}
    warnings.filterwarnings("ignore", message=".*no calibrated threshold.*")
    if warmup:  # lazy imports, torch's first-call allocations, numpy's caches: not the volume's memory
        detect(make_input((24, 48, 40), dtype), model=model, device="cpu", params=params, batch_size=batch_size,
               forward=None if network else no_network)
    if head:
        image = make_head(head, spacing or (1.0, 1.0, 1.0))
        if dtype == "int16":
            image = sitk.Cast(sitk.Round(image), sitk.sitkInt16)
        shape = tuple(int(v) for v in image.GetSize()[::-1])
    else:
        image = make_input(shape, dtype, spacing=spacing)
    n = int(np.prod(shape))
    release_free_memory()
    base = rss_bytes()
    hwm_reset = reset_peak_rss()
    if trace:
        tracemalloc.start()
    t0 = time.perf_counter()
    res = detect(image, model=model, device="cpu", params=params, batch_size=batch_size,
                 forward=None if network else no_network, contrast=head)
    secs = time.perf_counter() - t0
    out = {"input": f"head phantom ({head})" if head else "ellipsoid", "shape_zyx": list(shape), "dtype": dtype, "voxels": n, "seconds": round(secs, 1), "network": network,
           "spacing_xyz_mm": [round(v, 4) for v in image.GetSpacing()],
           "skull_stripped": res.info["preprocess"]["skull_stripped"],
           "steps": [st["step"] for st in res.info["preprocess"]["steps"]],
           "input_bytes_per_voxel": sitk.GetArrayViewFromImage(image).itemsize,
           "rss_peak_source": ("VmHWM reset before detect" if hwm_reset else "ru_maxrss of the process")
           + (", allocations > 1 MiB mapped alone" if mapped else "")}
    if trace:
        cur, peak = tracemalloc.get_traced_memory()
        snap = tracemalloc.take_snapshot()
        tracemalloc.stop()
        out["tracemalloc_peak_bytes_per_voxel"] = round(peak / n, 2)
        out["tracemalloc_top_live"] = [f"{s.size / n:.2f} B/vox {s.traceback[0]}"
                                       for s in snap.statistics("lineno")[:top]]
    out["rss_peak_minus_base_bytes_per_voxel"] = round((peak_rss_bytes() - base) / n, 2)
    out["results_bytes_per_voxel"] = round(sum(sitk.GetArrayViewFromImage(im).nbytes for im in
                                               (res.restoration, res.anomaly, res.mask, res.brain_mask)) / n, 2)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[300, 384, 384], metavar=("Z", "Y", "X"))
    ap.add_argument("--dtype", choices=("float32", "int16"), default="float32")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--no-trace", action="store_true", help="RSS only (tracemalloc slows numpy down a little)")
    ap.add_argument("--no-network", action="store_true",
                    help="replace the method call by a stand-in: the chain's memory alone")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"),
                    help="voxel size in mm (default: FOV_MM / shape, a brain; e.g. 1 1 1.2 at 256 x 256 x 128 makes "
                         "the ellipsoid a head-sized volume: the unprocessed-scan path, N4 and a skull stripper)")
    ap.add_argument("--head", choices=("T1", "T2", "FLAIR"), default=None,
                    help="a head phantom of this contrast at --spacing (default 1 mm) instead of the ellipsoid")
    args = ap.parse_args(argv)
    r = measure(tuple(args.shape), args.dtype, args.image_size, trace=not args.no_trace,
                network=not args.no_network, batch_size=args.batch_size, spacing=args.spacing, head=args.head)
    print(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
