"""Run a method on some slices of a volume only (the slab of the preset comparison, the slice subset of
calibration): a ``detect(..., forward=)`` seam, with the CPU / wall clocks it counts.  Light on purpose:
the calibration that ``uad.pipeline`` reaches imports it, the benchmark does too."""

from __future__ import annotations

import time

import torch


def _clock(dev) -> float:
    """CPU: this process's CPU time (robust to other processes sharing the cores); CUDA: wall time."""
    return time.perf_counter() if isinstance(dev, torch.device) and dev.type == "cuda" else time.process_time()


def _sync(dev):
    if isinstance(dev, torch.device) and dev.type == "cuda":
        torch.cuda.synchronize(dev)


class SlabForward:
    """``detect(..., forward=)`` seam that runs the method only on the slices of a slab (the items of a batch
    whose per-slice generator belongs to a slab slice); the others get restoration = input, anomaly 0.  Counts
    the slices computed, their network evaluations and the CPU time (wall on CUDA) of the method calls."""

    def __init__(self, seed: int, ks, device):
        from .rng import slice_seed

        self.by_seed = {slice_seed(int(seed), int(k)): int(k) for k in ks}
        self.device = torch.device(device)
        self.slices: list[int] = []
        self.nfe_per_slice = 0
        self.network_evaluations = 0
        self.clock_seconds = 0.0
        self.wall_seconds = 0.0

    def __call__(self, meth, x, mk, rng):
        from .methods.base import MethodOutput

        sel = [i for i, s in enumerate(rng.seeds) if s in self.by_seed]
        rest = x.clone()
        anom = torch.zeros_like(x)
        if not sel:
            return MethodOutput(restoration=rest, anomaly=anom, nfe=0)
        idx = torch.tensor(sel, device=x.device)
        _sync(self.device)
        c0, w0 = _clock(self.device), time.perf_counter()
        out = meth(x[idx], mk[idx], rng.subset(sel))
        _sync(self.device)
        self.clock_seconds += _clock(self.device) - c0
        self.wall_seconds += time.perf_counter() - w0
        rest[idx] = out.restoration.to(rest.dtype)
        anom[idx] = out.anomaly.to(anom.dtype)
        self.slices += [self.by_seed[rng.seeds[i]] for i in sel]
        self.nfe_per_slice = max(self.nfe_per_slice, int(out.nfe))
        self.network_evaluations += int(out.nfe) * len(sel)
        return MethodOutput(restoration=rest, anomaly=anom, nfe=int(out.nfe))
