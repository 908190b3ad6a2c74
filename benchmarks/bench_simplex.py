"""Speed of the torch simplex noise (uad.simplex) against the opensimplex reference.

For a 128 x 128 field with 6 octaves (persistence 0.8, starting feature size 64),
3-D fixed-depth and 2-D variants, prints seconds per field of

* the reference: the octave sum built from ``opensimplex`` (reseeded per field,
  as AnoDDPM's ``Simplex_CLASS.newSeed()`` + ``rand_*_octaves``); opensimplex is
  numba-jitted when numba is importable, pure Python otherwise -- the script says
  which (the JIT is warmed up before timing);
* ``uad.simplex.simplex_noise`` on the CPU, for a batch (default 64 fields) and
  for a single field, and on CUDA when available;

and the speed-ups measured in the same run.  The one-off construction of the
cached sampling operator is reported separately.

    OMP_NUM_THREADS=1 python benchmarks/bench_simplex.py [--size 128] [--batch 64]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import time

import numpy as np
import torch


def reference_field(seed: int, size: int, variant: str, octaves: int, persistence: float, frequency: float,
                    depth: float) -> np.ndarray:
    import opensimplex

    gen = opensimplex.OpenSimplex(seed)
    y = np.arange(size)
    x = np.arange(size)
    out = np.zeros((size, size))
    f, amp = float(frequency), 1.0
    for _ in range(octaves):
        if variant == "2d":
            out += amp * gen.noise2array(x / f, y / f)
        else:
            out += amp * gen.noise3array(x / f, y / f, np.array([depth / f]))[0]
        f /= 2
        amp *= persistence
    return out


def opensimplex_backend() -> str:
    import opensimplex.internals as oi

    return "numba" if hasattr(oi._noise3a, "py_func") else "pure Python/numpy (numba not installed)"


def time_reference(n: int, **kw) -> float:
    reference_field(12345, **kw)  # warm-up (numba JIT)
    t0 = time.perf_counter()
    for i in range(n):
        reference_field(1000 + i, **kw)
    return (time.perf_counter() - t0) / n


def time_torch(batch: int, size: int, variant: str, device: str, repeat: int, **kw) -> tuple[float, float]:
    from uad import simplex
    from uad.rng import BatchRNG

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    simplex._CACHE.clear()
    rng = BatchRNG(range(batch), device)
    t0 = time.perf_counter()
    simplex.simplex_noise(rng, (1, size, size), variant=variant, **kw)  # builds + caches the operator
    sync()
    first = time.perf_counter() - t0
    best = float("inf")
    for r in range(repeat):
        rng = BatchRNG([r * batch + i for i in range(batch)], device)
        sync()
        t0 = time.perf_counter()
        simplex.simplex_noise(rng, (1, size, size), variant=variant, **kw)
        sync()
        best = min(best, time.perf_counter() - t0)
    return best / batch, first


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--octaves", type=int, default=6)
    ap.add_argument("--persistence", type=float, default=0.8)
    ap.add_argument("--frequency", type=float, default=64.0)
    ap.add_argument("--depth", type=float, default=1000.0)
    ap.add_argument("--ref-fields", type=int, default=None,
                    help="reference fields to time (default 20 with numba, 2 without)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--variants", default="3d,2d")
    args = ap.parse_args(argv)

    backend = opensimplex_backend()
    n_ref = args.ref_fields or (20 if backend == "numba" else 2)
    print(f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
          f"opensimplex backend: {backend}")
    print(f"threads: torch {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}, "
          f"NUMBA_NUM_THREADS={os.environ.get('NUMBA_NUM_THREADS', '-')}, "
          f"numba importable: {importlib.util.find_spec('numba') is not None}")
    print(f"field {args.size}x{args.size}, octaves {args.octaves}, persistence {args.persistence}, "
          f"frequency {args.frequency}, depth {args.depth} (3-D)")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if torch.cuda.is_available():
        print(f"cuda: {torch.cuda.get_device_name(0)}")
    kw = dict(octaves=args.octaves, persistence=args.persistence, frequency=args.frequency)
    for variant in args.variants.split(","):
        ref = time_reference(n_ref, size=args.size, variant=variant, depth=args.depth, **kw)
        print(f"\n[{variant}] opensimplex reference ({backend}): {ref * 1e3:10.3f} ms/field  ({n_ref} fields)")
        for dev in devices:
            for batch in (args.batch, 1):
                per, first = time_torch(batch, args.size, variant, dev, args.repeat, depth=args.depth, **kw)
                print(f"[{variant}] torch {dev:4s} batch {batch:3d}:            {per * 1e3:10.3f} ms/field  "
                      f"speed-up x{ref / per:9.1f}   (first call incl. operator build {first:.2f} s)")


if __name__ == "__main__":
    main()
