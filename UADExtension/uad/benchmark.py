"""``uad benchmark``: every method and preset with its bundled model on the held-out set.

    uad benchmark -o bench/ [--methods ...] [--contrasts T1 T2 FLAIR] [--presets default paper]
                  [--device cpu] [--quick] [--precision fp32|bf16|fp16] [--channels-last] [--compile]

For each contrast, method and preset: the method's bundled model for that
contrast (reported as *missing* when the zoo has none) runs on every held-out
volume (``uad.heldout``; generated into ``OUT/heldout`` unless ``--heldout DIR``
is given) and on its healthy volumes; the intensity-threshold floor
(``uad.evaluation.IntensityBaseline``, fitted on separate healthy phantoms)
sits beside them.  Scores (``uad.evaluation.evaluate_arrays``, brain voxels):
mean per-volume AP per lesion type, pooled AP, best Dice, Dice at the model's
calibrated threshold, false-positive volume on the healthy volumes at that
threshold.

Cost, measured in the same run: wall seconds per volume (reading + ``detect``),
network evaluations (NFE) per slice, the **pure network time** -- every network
call is counted by forward hooks with its input shape, and each (network,
shape) pair is then timed alone (median of repeats, same batch size; calls made
with autograd on, i.e. Wolleb's classifier gradient, are timed as forward +
backward) -- and the **overhead ratio** wall / network time (everything that is
not the network: preprocessing, perceptual maps, morphology, noise, resampling,
I/O).  Peak memory: the largest resident-set increase sampled during the run
(CPU) or ``torch.cuda.max_memory_allocated`` (CUDA).  The batched pipeline is
also compared with a plain per-slice loop (``batch_size=1``, float32) of the
same method and model on a slab of slices.

Outputs in OUT: ``benchmark.json``, ``benchmark.csv``, ``benchmark.md`` (the
tables), ``speed.csv``, and the plots ``ap_per_lesion.png``,
``ap_vs_seconds.png``, ``healthy_fp.png``.

``--quick``: the quick held-out subset (one volume per lesion type and one
healthy volume per contrast, axial 5 mm), default presets, contrast T2 unless
given, per-slice comparison on 8 slices: 12 CPU-minutes of work, about 6-7 minutes on 2 free CPU
cores with the default ``--jobs`` (min(2, cores) worker processes, one torch thread each).

``--jobs N``: the independent units -- one per (contrast, method, preset) accuracy pass and one per
per-slab speed comparison -- run in N spawned worker processes, costliest first; the rows come back
in their fixed order and equal those of ``--jobs 1`` (every unit is seeded).  ``--max-volumes N``:
the first N held-out volumes of each lesion type and N healthy ones per contrast.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import platform
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from . import UADError
# reduced precision lives in uad.precision (shared with uad detect); re-exported here
from .precision import (PRECISION_CHOICES, PRECISIONS, AutocastNetwork, autocast, autocast_model,  # noqa: F401
                        copy_model, normalise_precision, with_precision)

LESIONS = ("tumour", "stroke", "ms")
#: methods whose batched speed-up over the per-slice loop is the GPU goal (iterative samplers)
ITERATIVE = ("thor", "autoddpm", "anoddpm", "wolleb")
OVERHEAD_LIMIT = 1.3


# ----------------------------------------------------------------------------- measurement helpers
def _clock(dev) -> float:
    """CPU: this process's CPU time (robust to other processes sharing the cores); CUDA: wall time."""
    return time.perf_counter() if isinstance(dev, torch.device) and dev.type == "cuda" else time.process_time()


class NetworkTimer:
    """Counts and times every call of a model's networks with forward hooks.

    Calls are keyed by (role, input shapes, autograd on).  ``in_run_seconds`` is
    the time spent inside the networks during the run (CPU time of this process
    on the CPU, so that other processes on shared cores do not count; wall time
    with a CUDA synchronisation on the GPU).  ``network_seconds()`` times each
    distinct call again alone on the same inputs (same batch size; forward +
    backward for autograd calls) and returns sum(count x time): NFE x the
    measured forward time.
    """

    def __init__(self, model, device="cpu"):
        self.model = model
        self.device = torch.device(device)
        self.counts: dict = {}
        self.examples: dict = {}
        self.in_run_seconds = 0.0
        self._t0: list = []
        self._handles = []

    def __enter__(self):
        for role, net in self.model.networks.items():
            self._handles.append(net.register_forward_pre_hook(self._pre(role), with_kwargs=True))
            self._handles.append(net.register_forward_hook(self._post))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _pre(self, role):
        def hook(module, args, kwargs):
            shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
            shapes += tuple((k, tuple(v.shape)) for k, v in sorted(kwargs.items()) if isinstance(v, torch.Tensor))
            key = (role, shapes, bool(torch.is_grad_enabled()))
            self.counts[key] = self.counts.get(key, 0) + 1
            if key not in self.examples:
                with torch.inference_mode(False):
                    self.examples[key] = (
                        tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args),
                        {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()})
            _sync(self.device)
            self._t0.append(_clock(self.device))
        return hook

    def _post(self, module, args, output):
        _sync(self.device)
        if self._t0:
            self.in_run_seconds += _clock(self.device) - self._t0.pop()

    @property
    def calls(self) -> int:
        return int(sum(self.counts.values()))

    def network_seconds(self, repeats: int = 5) -> tuple[float, list[dict]]:
        total, parts = 0.0, []
        for key, n in self.counts.items():
            role, shapes, grad = key
            net = self.model.networks[role]
            args, kwargs = self.examples[key]
            dev = next(net.parameters()).device

            def call():
                if grad:
                    with torch.inference_mode(False), torch.enable_grad():
                        a0 = args[0].detach().clone().requires_grad_(True)
                        out = net(a0, *args[1:], **kwargs)
                        torch.autograd.grad(out.float().sum(), a0)
                else:
                    with torch.inference_mode():
                        net(*args, **kwargs)
                _sync(dev)

            call()  # warm-up
            ts = []
            for _ in range(max(1, int(repeats))):
                t0 = _clock(dev)
                call()
                ts.append(_clock(dev) - t0)
            t = statistics.median(ts)
            total += n * t
            parts.append({"network": role, "input": str(shapes[0]) if shapes else "", "autograd": grad,
                          "calls": n, "seconds_per_call": t})
        return total, parts


def _sync(dev):
    if isinstance(dev, torch.device) and dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):  # not Linux
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class PeakMemory:
    """Peak memory during a block: the CUDA allocator's peak (``max_memory_allocated`` after a reset), or on
    the CPU the largest resident set size of the process sampled every ``interval`` seconds (absolute: it
    includes the interpreter, torch and the data already loaded)."""

    def __init__(self, device, interval: float = 0.02):
        self.device = torch.device(device)
        self.interval = interval
        self.peak_bytes = 0
        self._stop = threading.Event()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._max = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(self.interval):
            self._max = max(self._max, _rss_bytes())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self._max, _rss_bytes())


# ----------------------------------------------------------------------------- models and presets
def model_for(method: str, contrast: str):
    """The zoo entry serving ``method`` trained on ``contrast`` (on disk), or None (missing)."""
    from .zoo import list_models

    for e in list_models():
        if method in e.methods and (e.contrast or "").upper() == contrast.upper() and e.available:
            return e
    return None


def resolve_presets(method: str, presets) -> list[str]:
    from .pipeline import method_class

    cls = method_class(method)
    out = []
    for p in presets:
        name = cls.default_preset if p == "default" else p
        if name in cls.presets and name not in out:
            out.append(name)
    return out


def prepare_model(entry, device, channels_last: bool = False, compile_: bool = False, precision: str = "fp32"):
    """Load a zoo entry on ``device``; optionally channels-last weights, ``torch.compile`` and autocast."""
    from .zoo import load_model

    m = load_model(entry, device=device)
    for role, net in list(m.networks.items()):
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        if compile_:
            net = torch.compile(net)
        m.networks[role] = net
    return autocast_model(m, precision)


# ----------------------------------------------------------------------------- one method on the set
@dataclass
class CaseRun:
    case: dict
    scores: np.ndarray
    seconds: float
    nfe_per_slice: int
    slices: int
    network_evaluations: int
    threshold: float | None
    threshold_source: str
    peak_mb: float
    clock_seconds: float = 0.0  # CPU time of this process (CPU) / wall (CUDA)
    network_seconds: float | None = None  # NFE x isolated forward time (same clock)
    in_run_network_seconds: float | None = None  # time inside the networks during the run (same clock)
    network_calls: int = 0
    parts: list = field(default_factory=list)


_copy_model = copy_model  # the old name (benchmarks/gpu_bench.py)


def _read_case(row: dict):
    from .imageio import read_image

    return read_image(row["image"]), read_image(row["brain_mask"]), read_image(row["lesion_mask"])


def run_case(row: dict, method: str, model, preset: str | None, device, batch_size: int = 16, seed: int = 0,
             precision: str = "fp32", time_network: bool = True, image=None, brain=None) -> CaseRun:
    from .pipeline import detect

    dev = torch.device(device)
    t0, c0 = time.perf_counter(), _clock(dev)
    if image is None:
        image, brain, _ = _read_case(row)
    model = with_precision(model, precision)
    timer = NetworkTimer(model, dev) if time_network else contextlib.nullcontext()
    with PeakMemory(dev) as mem, timer:
        res = detect(image, method=method, model=model, device=dev, seed=seed, batch_size=batch_size,
                     preset=preset, brain_mask=brain)
        _sync(dev)
    secs = time.perf_counter() - t0
    run = CaseRun(case=row, scores=sitk.GetArrayFromImage(res.anomaly), seconds=secs, clock_seconds=_clock(dev) - c0,
                  nfe_per_slice=int(res.info["nfe_per_slice"]), slices=int(res.info["slices"]),
                  network_evaluations=int(res.info["network_evaluations"]),
                  threshold=res.info["threshold"] if _model_calibrated(res.info["threshold_source"]) else None,
                  threshold_source=res.info["threshold_source"], peak_mb=mem.peak_bytes / 2 ** 20)
    if time_network:
        run.network_seconds, run.parts = timer.network_seconds()
        run.network_calls = timer.calls
        run.in_run_network_seconds = timer.in_run_seconds
    return run


def _model_calibrated(source: str) -> bool:
    """Whether detect's threshold came from the model's calibration (``"model"`` for a legacy value,
    ``"model: calibrated for ..."`` for a per-preset record), not from this volume's percentile."""
    return str(source) == "model" or str(source).startswith("model:")


def _items(runs: list[CaseRun], lesions: dict) -> list[dict]:
    out = []
    for r in runs:
        les, brain = lesions[r.case["case"]]
        out.append({"name": r.case["case"], "scores": r.scores, "lesion": les, "brain": brain,
                    "lesion_type": r.case["lesion"] if r.case["lesion"] != "none" else "none",
                    "voxel_ml": r.case.get("_voxel_ml", 0.0)})
    return out


def _summarise(ev: dict, healthy_items: list[dict], thr: float | None) -> dict:
    row = {lt: (ev["by_lesion_type"].get(lt) or {}).get("mean_ap") for lt in LESIONS}
    row.update({"pooled_ap": ev["pooled"]["ap"], "pooled_auroc": ev["pooled"]["auroc"],
                "best_dice": ev["mean"].get("mean_best_dice"), "pooled_best_dice": ev["pooled"]["best_dice"],
                "dice_calibrated": ev["mean"].get("mean_dice_calibrated"),
                "prevalence": {lt: (ev["by_lesion_type"].get(lt) or {}).get("prevalence") for lt in LESIONS},
                "threshold": thr, "threshold_source": ev["threshold_source"]})
    row["by_lesion"] = {lt: {"n": d.get("n"), "ap": d.get("mean_ap"), "best_dice": d.get("mean_best_dice"),
                             "dice_calibrated": d.get("mean_dice_calibrated"), "prevalence": d.get("prevalence")}
                        for lt, d in ev["by_lesion_type"].items() if lt in LESIONS and d}
    row["n_healthy"] = ev.get("n_healthy_volumes")
    fp_ml = [h["fp_ml"] for h in ev["healthy"] if h.get("fp_ml") is not None]
    fp_fr = [h["fp_fraction"] for h in ev["healthy"]]
    row["healthy_fp_ml"] = float(np.mean(fp_ml)) if fp_ml else None
    row["healthy_fp_percent"] = 100.0 * float(np.mean(fp_fr)) if fp_fr else None
    return row


def evaluate_runs(runs: list[CaseRun], lesions: dict, fpr: float = 0.01) -> dict:
    from .evaluation import evaluate_arrays

    les_runs = [r for r in runs if r.case["lesion"] != "none"]
    hea_runs = [r for r in runs if r.case["lesion"] == "none"]
    thr = next((r.threshold for r in runs if r.threshold is not None), None)
    items, healthy = _items(les_runs, lesions), _items(hea_runs, lesions)
    ev = evaluate_arrays(items, fpr=fpr, threshold=thr, healthy=healthy)
    if thr is None:  # no calibrated model threshold: calibrated on the held-out healthy volumes (said so)
        ev["threshold_source"] = "held-out healthy volumes (the model has no calibrated threshold)"
    return {"summary": _summarise(ev, healthy, ev["threshold"]), "evaluation": ev}


def _slab(image: sitk.Image, brain: sitk.Image, n: int):
    """The ``n`` central axial-ish slices (along the index axis closest to superior-inferior) with brain."""
    d = np.array(image.GetDirection()).reshape(3, 3)
    ax = int(np.argmax(np.abs(d[2, :])))  # index axis (x=0, y=1, z=2) most aligned with S
    b = sitk.GetArrayViewFromImage(brain)  # (z, y, x)
    np_ax = 2 - ax
    occupied = np.flatnonzero(b.any(axis=tuple(a for a in range(3) if a != np_ax)))
    c = int(occupied[len(occupied) // 2])
    lo = max(int(occupied[0]), c - n // 2)
    hi = min(int(occupied[-1]) + 1, lo + n)
    idx = [slice(None)] * 3
    idx[ax] = slice(lo, hi)
    return image[tuple(idx)], brain[tuple(idx)]


def loop_speedup(row: dict, method: str, model, preset: str, device, n_slices: int = 8, batch_size: int = 16,
                 seed: int = 0, loop: bool = True) -> dict:
    """On a slab of ``n_slices`` slices: the batched pipeline (network-time split) and, with ``loop``, the
    plain per-slice loop (batch 1, float32) of the same method and model; seconds per slice and speed-up."""
    image, brain, _ = _read_case(row)
    img, br = _slab(image, brain, max(3, int(n_slices)))
    bs = min(batch_size, max(3, int(n_slices)))
    b = run_case(row, method, model, preset, device, batch_size=bs, seed=seed, time_network=True,
                 image=img, brain=br)
    out = {"slices": b.slices, "batch_size": bs, "nfe_per_slice": b.nfe_per_slice,
           "batched_s_per_slice": b.seconds / max(b.slices, 1),
           "batched_clock_s_per_slice": b.clock_seconds / max(b.slices, 1),
           "network_s_per_slice": (b.network_seconds or 0.0) / max(b.slices, 1),
           "overhead": b.clock_seconds / b.network_seconds if b.network_seconds else None,
           "overhead_in_run": b.clock_seconds / b.in_run_network_seconds if b.in_run_network_seconds else None,
           "calls": b.parts}
    if loop:
        one = run_case(row, method, model, preset, device, batch_size=1, seed=seed, time_network=False,
                       image=img, brain=br)
        out.update({"loop_s_per_slice": one.seconds / max(one.slices, 1),
                    "loop_clock_s_per_slice": one.clock_seconds / max(one.slices, 1),
                    "speedup": one.seconds / max(b.seconds, 1e-9),
                    "speedup_clock": one.clock_seconds / max(b.clock_seconds, 1e-9),
                    "max_abs_difference": float(np.max(np.abs(b.scores - one.scores)))})
    return out


# ----------------------------------------------------------------------------- the benchmark
def _hardware(device) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return f"{torch.cuda.get_device_name(dev)} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPU(s), torch threads {torch.get_num_threads()}"


def _lesion_arrays(rows: list[dict]) -> dict:
    """case -> (lesion mask & brain, brain) arrays; sets each row's ``_voxel_ml``."""
    lesions = {}
    for r in rows:
        _, b, les = _read_case(r)
        bb = sitk.GetArrayFromImage(b) > 0
        lesions[r["case"]] = ((sitk.GetArrayFromImage(les) > 0) & bb, bb)
        r["_voxel_ml"] = float(np.prod(b.GetSpacing())) / 1000.0
    return lesions


def select_rows(rows: list[dict], max_volumes: int | None) -> list[dict]:
    """The first ``max_volumes`` held-out volumes of every (contrast, lesion type), healthy included, in the
    manifest's order (None: all)."""
    if max_volumes is None:
        return list(rows)
    if int(max_volumes) < 1:
        raise UADError(f"--max-volumes must be >= 1, got {max_volumes}")
    seen: dict = {}
    out = []
    for r in rows:
        k = (r["contrast"], r["lesion"])
        seen[k] = seen.get(k, 0) + 1
        if seen[k] <= int(max_volumes):
            out.append(r)
    return out


def _volume_counts(rows: list[dict]) -> dict:
    """{lesion type: volumes, ..., "healthy": volumes} of a contrast's rows."""
    out = {lt: sum(r["lesion"] == lt for r in rows) for lt in LESIONS}
    out["healthy"] = sum(r["lesion"] == "none" for r in rows)
    return out


# one unit of work = one (contrast, method, preset) accuracy pass or one per-slab speed comparison; units are
# independent, so they may run in worker processes (``jobs``); the per-process cache keeps a loaded model for
# the units of the same model that land in the same process
_MODEL_CACHE: dict = {}


def _unit_model(entry, dev, channels_last, compile_):
    key = (entry.id, str(entry.root), str(dev), bool(channels_last), bool(compile_))
    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()  # one model at a time per process (memory)
        _MODEL_CACHE[key] = prepare_model(entry, dev, channels_last, compile_)
    return _MODEL_CACHE[key]


def run_unit(unit: dict) -> dict:
    """Run one unit (``kind`` "accuracy" or "speed") and return ``{"row": ..., "log": [...]}``.  Everything it
    needs is in ``unit`` (rows, entry, settings), so it runs the same in this process or in a worker."""
    from .pipeline import resolve_device

    dev = resolve_device(unit["device"])
    contrast, method, preset, entry = unit["contrast"], unit["method"], unit["preset"], unit["entry"]
    model = _unit_model(entry, dev, unit["channels_last"], unit["compile"])
    rows, seed, batch_size, fpr = unit["rows"], unit["seed"], unit["batch_size"], unit["fpr"]
    if unit["kind"] == "speed":
        healthy_rows = [r for r in rows if r["lesion"] == "none"] or rows
        sp = loop_speedup(healthy_rows[0], method, model, preset, dev, unit["speed_slices"], batch_size, seed,
                          loop=True)
        sp.update({"contrast": contrast, "method": method, "preset": preset})
        return {"row": sp, "log": [
            f"      speed {preset}: {sp['nfe_per_slice']} NFE/slice, batched "
            f"{sp['batched_clock_s_per_slice']:.3f} s/slice (network {sp['network_s_per_slice']:.3f}, "
            f"overhead x{_f(sp['overhead'], 2)}), per-slice loop {sp['loop_clock_s_per_slice']:.3f} "
            f"s/slice: x{sp['speedup_clock']:.2f}; max |difference| {sp['max_abs_difference']:.2e}"]}
    precision, compare_precision = unit["precision"], unit["compare_precision"]
    lesions = _lesion_arrays(rows)
    runs = [run_case(r, method, model, preset, dev, batch_size, seed, precision,
                     time_network=not unit["compile"]) for r in rows]
    ev = evaluate_runs(runs, lesions, fpr)
    sm = ev["summary"]
    wall = float(np.mean([r.seconds for r in runs]))
    clock = float(np.sum([r.clock_seconds for r in runs]))
    net = [r.network_seconds for r in runs if r.network_seconds]
    inrun = [r.in_run_network_seconds for r in runs if r.in_run_network_seconds]
    sm.update({"contrast": contrast, "method": method, "preset": preset, "model": entry.id,
               "status": "ok", "nfe_per_slice": max(r.nfe_per_slice for r in runs),
               "seconds_per_volume": wall, "slices_per_volume": float(np.mean([r.slices for r in runs])),
               "clock": "wall" if dev.type == "cuda" else "process CPU time",
               "clock_seconds_per_volume": clock / len(runs),
               "network_seconds_per_volume": float(np.mean(net)) if net else None,
               "overhead": clock / float(np.sum(net)) if net else None,
               "overhead_in_run": clock / float(np.sum(inrun)) if inrun else None,
               "peak_mb": float(max(r.peak_mb for r in runs)), "precision": precision,
               "volumes": _volume_counts(rows), "default_preset": unit.get("default_preset"),
               "cases": [{"case": r.case["case"], "seconds": r.seconds, "slices": r.slices,
                          "clock_seconds": r.clock_seconds, "network_seconds": r.network_seconds,
                          "in_run_network_seconds": r.in_run_network_seconds, "calls": r.parts}
                         for r in runs]})
    per_case = {x["case"]: x for x in ev["evaluation"]["per_volume"]}
    for c in sm["cases"]:
        c.update({k: per_case.get(c["case"], {}).get(k) for k in ("ap", "best_dice", "dice_calibrated")})
    if compare_precision and compare_precision != precision:
        alt = [run_case(r, method, model, preset, dev, batch_size, seed, compare_precision,
                        time_network=False) for r in rows]
        ev2 = evaluate_runs(alt, lesions, fpr)["summary"]
        sm["compare_precision"] = {"precision": compare_precision, "pooled_ap": ev2["pooled_ap"],
                                   "delta_pooled_ap": ev2["pooled_ap"] - sm["pooled_ap"],
                                   "seconds_per_volume": float(np.mean([r.seconds for r in alt]))}
    return {"row": sm, "log": [_line(sm)]}


def _worker_init() -> None:
    torch.set_num_threads(1)  # one torch thread per worker process: ``jobs`` workers use ``jobs`` cores


def default_jobs(device="cpu") -> int:
    """Worker processes of ``uad benchmark`` by default: min(2, cores) on the CPU, 1 on an accelerator."""
    from .pipeline import available_cores

    return min(2, available_cores()) if torch.device(device).type == "cpu" else 1


def run_units(units: list[dict], jobs: int = 1, log=print) -> list[dict]:
    """The results of ``units`` in their order.  ``jobs`` > 1: that many worker processes (spawned, one torch
    thread each), the costliest units (NFE per slice x volumes) first so that the last one to finish is a
    cheap one.  Every unit is seeded, so the results are those of ``jobs=1``; its CPU-second columns are
    its own process's CPU time."""
    out: list = [None] * len(units)
    if jobs <= 1 or len(units) <= 1:
        try:
            for i, u in enumerate(units):
                out[i] = run_unit(u)
                for line in out[i]["log"]:
                    log(line)
        finally:
            _MODEL_CACHE.clear()  # no model kept alive in this process after the run
        return out
    import concurrent.futures as cf
    import multiprocessing as mp

    order = sorted(range(len(units)), key=lambda i: -units[i].get("cost", 0.0))
    with cf.ProcessPoolExecutor(max_workers=int(jobs), mp_context=mp.get_context("spawn"),
                                initializer=_worker_init) as pool:
        futs = {pool.submit(run_unit, units[i]): i for i in order}
        for k, f in enumerate(cf.as_completed(futs), 1):
            i = futs[f]
            out[i] = f.result()
            u = units[i]
            log(f"  [{k}/{len(units)}] {u['contrast']} {u['method']} {u['preset']} ({u['kind']})")
            for line in out[i]["log"]:
                log(line)
    return out


def run_benchmark(outdir, methods=None, contrasts=None, presets=("default", "paper"), device: str = "cpu",
                  quick: bool = False, heldout_dir=None, n: int = 5, batch_size: int = 16, seed: int = 0,
                  precision: str = "fp32", compare_precision: str | None = None, channels_last: bool = False,
                  compile_: bool = False, speed_slices: int | None = None, fpr: float = 0.01,
                  speed_presets=None, speed_only: bool = False, n_reference: int = 3, log=print,
                  jobs: int | None = None, max_volumes: int | None = None, command: str | None = None) -> dict:
    from .evaluation import IntensityBaseline, healthy_reference
    from .heldout import generate_heldout, load_heldout
    from .methods import available_methods
    from .metrics import threshold_at_fpr
    from .pipeline import method_class, resolve_device

    t_start = time.time()
    if max_volumes is not None and int(max_volumes) < 1:
        raise UADError(f"--max-volumes must be >= 1, got {max_volumes}")
    precision = normalise_precision(precision)
    compare_precision = normalise_precision(compare_precision) if compare_precision else None
    dev = resolve_device(device)
    jobs = default_jobs(dev) if jobs is None else max(1, int(jobs))
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    methods = list(methods or available_methods())
    contrasts = [c.upper() if c.upper() != "FLAIR" else "FLAIR" for c in (contrasts or (["T2"] if quick else
                                                                                       ["T1", "T2", "FLAIR"]))]
    if quick:
        presets = ("default",)
    speed_presets = tuple(speed_presets or (("default",) if quick else ("default", "paper")))
    speed_slices = int(8 if quick else 16) if speed_slices is None else int(speed_slices)
    ho = Path(heldout_dir) if heldout_dir else out / "heldout"
    if heldout_dir is None or not (ho / "heldout.json").is_file():
        n_gen = n if max_volumes is None else min(int(n), int(max_volumes))
        log(f"held-out set -> {ho} ({'quick subset' if quick else f'{n_gen} per lesion type'})")
        generate_heldout(ho, contrasts, n=n_gen, quick=quick,
                         progress=lambda i, k, r: log(f"  [{i}/{k}] {r['case']} {r['orientation']} {r['spacing_mm']}"))
    rows_all = select_rows(load_heldout(ho, contrasts), max_volumes)

    results, speed, missing = [], [], []
    units, slots = [], []  # slots[i]: ("results" | "speed", index) of units[i]
    for contrast in contrasts:
        rows = [r for r in rows_all if r["contrast"] == contrast]
        if not rows:
            log(f"{contrast}: no held-out volumes in {ho}")
            for method in methods:
                if model_for(method, contrast) is None:
                    missing.append({"contrast": contrast, "method": method})
                    st = "missing (no bundled model for this contrast)"
                else:
                    st = f"not run (no held-out {contrast} volumes in {ho})"
                results.append({"contrast": contrast, "method": method, "preset": "-", "model": "-", "status": st})
                log(f"{contrast:5s} {method:10s} {st}")
            continue
        lesions = _lesion_arrays(rows)
        # the intensity floor, fitted and calibrated on separate healthy phantoms
        imgs, masks = healthy_reference(contrast, n=int(n_reference), spacing=2.0)
        base = IntensityBaseline().fit(imgs, masks)
        ref_scores = [sitk.GetArrayFromImage(base.score(i, m))[sitk.GetArrayFromImage(m) > 0]
                      for i, m in zip(imgs, masks)]
        base_thr = threshold_at_fpr(ref_scores, fpr)
        b_runs = []
        for r in rows:
            img, br, _ = _read_case(r)
            t0 = time.perf_counter()
            s = sitk.GetArrayFromImage(base.score(img, br))
            b_runs.append(CaseRun(r, s, time.perf_counter() - t0, 0, 0, 0, base_thr, "model", 0.0))
        ev = evaluate_runs(b_runs, lesions, fpr)
        ev["summary"].update({"contrast": contrast, "method": "intensity-floor", "preset": "-", "model": "-",
                              "status": "ok", "nfe_per_slice": 0, "volumes": _volume_counts(rows),
                              "seconds_per_volume": float(np.mean([r.seconds for r in b_runs]))})
        results.append(ev["summary"])
        log(_line(ev["summary"]))
        del lesions

        for method in methods:
            entry = model_for(method, contrast)
            if entry is None:
                missing.append({"contrast": contrast, "method": method})
                results.append({"contrast": contrast, "method": method, "preset": "-", "model": "-",
                                "status": "missing (no bundled model for this contrast)"})
                log(f"{contrast:5s} {method:10s} MISSING: no bundled {contrast} model")
                continue
            cls = method_class(method)
            base_unit = {"contrast": contrast, "method": method, "entry": entry, "rows": rows, "device": str(dev),
                         "seed": seed, "batch_size": batch_size, "fpr": fpr, "precision": precision,
                         "compare_precision": compare_precision, "channels_last": channels_last,
                         "compile": compile_, "speed_slices": speed_slices,
                         "default_preset": resolve_presets(method, ["default"])[0]}

            try:
                nfe = cls.preset_costs()
            except Exception:  # noqa: BLE001 - only the scheduling order of the units depends on it
                nfe = {}

            def cost(preset, n_slices, nfe=nfe):
                return float(nfe.get(preset, 1)) * n_slices

            for preset in ([] if speed_only else resolve_presets(method, presets)):
                results.append(None)
                units.append(dict(base_unit, kind="accuracy", preset=preset, cost=cost(preset, len(rows) * 40)))
                slots.append(("results", len(results) - 1))
            if speed_slices > 0:
                for preset in resolve_presets(method, speed_presets):
                    speed.append(None)
                    units.append(dict(base_unit, kind="speed", preset=preset, cost=cost(preset, 3 * speed_slices)))
                    slots.append(("speed", len(speed) - 1))
    if units:
        log(f"{len(units)} unit(s) of work in {jobs} process(es)")
    for (where, i), res in zip(slots, run_units(units, jobs, log)):
        (results if where == "results" else speed)[i] = res["row"]

    report = {"date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t_start)),
              "hardware": _hardware(dev), "device": str(dev), "torch": torch.__version__,
              "threads": torch.get_num_threads() if jobs <= 1 else 1, "jobs": jobs, "quick": bool(quick),
              "heldout": str(ho), "max_volumes": max_volumes, "command": command,
              "batch_size": batch_size, "precision": precision, "channels_last": channels_last,
              "compile": compile_, "fpr": fpr, "results": results, "speed": speed, "missing": missing,
              "speed_presets": list(speed_presets), "speed_slices": speed_slices, "speed_only": bool(speed_only),
              "wall_seconds": time.time() - t_start, "load_average": _load_average()}
    report["over_limit"] = [
        f"{r['method']}/{r['preset']} ({r['contrast']}, {'slab' if 'pooled_ap' not in r else 'held-out set'}): "
        f"{_f(r.get('overhead'), 2)} isolated / {_f(r.get('overhead_in_run'), 2)} in-run"
        for r in results + speed
        if max(r.get("overhead") or 0, r.get("overhead_in_run") or 0) > OVERHEAD_LIMIT]
    write_report(report, out)
    return report


def _load_average():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _f(v, nd=3):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def _line(r: dict) -> str:
    aps = " ".join(f"{lt} {_f(r.get(lt))}" for lt in LESIONS)
    extra = ""
    if r.get("network_seconds_per_volume"):
        extra = (f" ({_f(r.get('clock_seconds_per_volume'), 1)} s {r.get('clock')}), network "
                 f"{r['network_seconds_per_volume']:.1f} s, overhead x{_f(r.get('overhead'), 2)} "
                 f"(in-run x{_f(r.get('overhead_in_run'), 2)}), peak {r.get('peak_mb', 0):.0f} MB")
    return (f"{r['contrast']:5s} {r['method']:16s} {r['preset']:6s} AP {aps} | pooled {_f(r.get('pooled_ap'))} "
            f"| best Dice {_f(r.get('best_dice'))} Dice@cal {_f(r.get('dice_calibrated'))} | healthy FP "
            f"{_f(r.get('healthy_fp_ml'), 1)} ml ({_f(r.get('healthy_fp_percent'), 2)} %) | "
            f"NFE/slice {r.get('nfe_per_slice')} | "
            f"{_f(r.get('seconds_per_volume'), 1)} s/vol{extra}")


_COLS = ["contrast", "method", "preset", "model", "status", "tumour", "stroke", "ms", "pooled_ap", "pooled_auroc",
         "best_dice", "dice_calibrated", "healthy_fp_ml", "healthy_fp_percent", "nfe_per_slice", "seconds_per_volume",
         "clock_seconds_per_volume", "network_seconds_per_volume", "overhead", "overhead_in_run", "peak_mb",
         "threshold"]


def write_report(report: dict, out: Path) -> None:
    out = Path(out)
    (out / "benchmark.json").write_text(json.dumps(report, indent=1, default=_json_default))
    with open(out / "benchmark.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=_COLS, extrasaction="ignore")
        w.writeheader()
        for r in report["results"]:
            w.writerow({k: r.get(k) for k in _COLS})
    if report["speed"]:
        with open(out / "speed.csv", "w", newline="") as f:
            cols = ["contrast", "method", "preset", "slices", "batch_size", "nfe_per_slice", "batched_s_per_slice",
                    "batched_clock_s_per_slice", "network_s_per_slice", "overhead", "overhead_in_run",
                    "loop_s_per_slice", "loop_clock_s_per_slice", "speedup", "speedup_clock", "max_abs_difference"]
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            w.writerows(report["speed"])
    (out / "benchmark.md").write_text(markdown(report))
    try:
        plots(report, out)
    except Exception as e:  # noqa: BLE001 - a plotting problem must not lose the tables
        print(f"warning: plots not written ({e})")


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def markdown(report: dict) -> str:
    res = report["results"]
    prev = next((r["prevalence"] for r in res if r.get("prevalence")), {})
    subset = "quick subset" if report["quick"] else "full set"
    if report.get("speed_only"):
        subset += ", speed pass only"
    lines = [f"Held-out phantoms ({subset}), {report['date_utc']}, "
             f"{report['hardware']}, device {report['device']}, batch {report['batch_size']}, "
             f"{report['precision']}; AP = mean per-volume average precision over brain voxels; "
             f"s/volume = wall seconds; compute s = {'wall' if report['device'].startswith('cuda') else 'process CPU'} "
             f"seconds, network s = NFE x isolated forward time at the same batch size on the same clock, overhead = "
             f"compute / network, isolated and with the network time measured inside the run "
             f"(Dice@cal and healthy FP at the model's calibrated threshold; "
             f"prevalence: " + ", ".join(f"{lt} {_f(prev.get(lt), 4)}" for lt in LESIONS) + ").", "",
             "| contrast | method | preset | model | tumour AP | stroke AP | MS AP | pooled AP | best Dice | "
             "Dice@cal | healthy FP % (ml) | NFE/slice | s/volume | compute s | network s | overhead (isolated / in-run) | "
             "peak MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res:
        if r.get("status") != "ok":
            lines.append(f"| {r['contrast']} | {r['method']} | - | - | {r['status']} ||||||||||||")
            continue
        lines.append(f"| {r['contrast']} | {r['method']} | {r['preset']} | {r['model']} | {_f(r.get('tumour'))} | "
                     f"{_f(r.get('stroke'))} | {_f(r.get('ms'))} | {_f(r.get('pooled_ap'))} | "
                     f"{_f(r.get('best_dice'))} | {_f(r.get('dice_calibrated'))} | {_f(r.get('healthy_fp_percent'), 2)} "
                     f"({_f(r.get('healthy_fp_ml'), 1)}) | "
                     f"{r.get('nfe_per_slice')} | {_f(r.get('seconds_per_volume'), 1)} | "
                     f"{_f(r.get('clock_seconds_per_volume'), 1)} | "
                     f"{_f(r.get('network_seconds_per_volume'), 1)} | {_f(r.get('overhead'), 2)} / "
                     f"{_f(r.get('overhead_in_run'), 2)} | "
                     f"{_f(r.get('peak_mb'), 0)} |")
    if report["speed"]:
        clk = "wall" if report["device"].startswith("cuda") else "CPU"
        lines += ["", f"Cost per slice on a slab of {report.get('speed_slices')} slices of a healthy held-out volume "
                      f"({clk} seconds): batched pipeline, its pure network time (NFE x isolated forward time at "
                      f"the same batch size), overhead = batched / network, and a per-slice loop (batch 1, float32) "
                      f"of the same method and model:", "",
                  f"| contrast | method | preset | NFE/slice | batched s/slice | network s/slice | overhead "
                  f"(isolated / in-run) | "
                  f"per-slice loop s/slice | speed-up | max abs difference |", "|---|---|---|---|---|---|---|---|---|---|"]
        for s in report["speed"]:
            lines.append(f"| {s['contrast']} | {s['method']} | {s['preset']} | {s['nfe_per_slice']} | "
                         f"{s['batched_clock_s_per_slice']:.3f} | {s['network_s_per_slice']:.3f} | "
                         f"{_f(s.get('overhead'), 2)} / {_f(s.get('overhead_in_run'), 2)} | "
                         f"{_f(s.get('loop_clock_s_per_slice'))} | "
                         f"x{_f(s.get('speedup_clock'), 2)} | {_f(s.get('max_abs_difference'), 6)} |")
    cmp_rows = [r for r in res if r.get("compare_precision")]
    if cmp_rows:
        lines += ["", "| contrast | method | preset | precision | pooled AP | change vs float32 | s/volume |",
                  "|---|---|---|---|---|---|---|"]
        for r in cmp_rows:
            c = r["compare_precision"]
            lines.append(f"| {r['contrast']} | {r['method']} | {r['preset']} | {c['precision']} | "
                         f"{_f(c['pooled_ap'])} | {c['delta_pooled_ap']:+.4f} | {c['seconds_per_volume']:.1f} |")
    if report.get("over_limit"):
        lines += ["", f"Overhead above {OVERHEAD_LIMIT}: " + "; ".join(report["over_limit"]) + "."]
    return "\n".join(lines) + "\n"


def plots(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in report["results"] if r.get("status") == "ok"]
    contrasts = sorted({r["contrast"] for r in ok})
    # 1. AP per method and lesion type
    fig, axes = plt.subplots(1, len(contrasts), figsize=(6 * len(contrasts), 4), squeeze=False)
    for ax, c in zip(axes[0], contrasts):
        rs = [r for r in ok if r["contrast"] == c]
        x = np.arange(len(rs))
        for i, lt in enumerate(LESIONS):
            ax.bar(x + (i - 1) * 0.27, [r.get(lt) or 0 for r in rs], 0.27, label=lt)
        ax.set_xticks(x, [f"{r['method']}\n{r['preset']}" for r in rs], fontsize=7)
        ax.set_ylabel("mean AP")
        ax.set_title(f"{c}: AP per lesion type")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "ap_per_lesion.png", dpi=110)
    plt.close(fig)
    # 2. AP vs seconds per volume (accuracy-cost frontier)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in ok:
        s = max(r.get("seconds_per_volume") or 1e-3, 1e-3)
        ax.scatter(s, r.get("pooled_ap") or 0, s=30)
        ax.annotate(f"{r['method']}/{r['preset']} {r['contrast']}", (s, r.get("pooled_ap") or 0), fontsize=6)
    ax.set_xscale("log")
    ax.set_xlabel("seconds per volume")
    ax.set_ylabel("pooled AP")
    ax.set_title(f"accuracy against cost ({report['device']})")
    fig.tight_layout()
    fig.savefig(out / "ap_vs_seconds.png", dpi=110)
    plt.close(fig)
    # 3. false-positive volume on healthy volumes
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(ok)), 4))
    ax.bar(np.arange(len(ok)), [r.get("healthy_fp_ml") or 0 for r in ok])
    ax.set_xticks(np.arange(len(ok)), [f"{r['method']}/{r['preset']}\n{r['contrast']}" for r in ok],
                  fontsize=6, rotation=60)
    ax.set_ylabel("flagged healthy brain (ml)")
    ax.set_title("false positives on healthy held-out volumes (calibrated threshold)")
    fig.tight_layout()
    fig.savefig(out / "healthy_fp.png", dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- CLI
def _command_line() -> str | None:
    """This process's ``uad benchmark ...`` command line (None when not started from the command line)."""
    import shlex
    import sys

    argv = sys.argv[1:]
    return "uad " + " ".join(shlex.quote(a) for a in argv) if argv[:1] == ["benchmark"] else None


def _cli(args) -> int:
    rep = run_benchmark(args.output, methods=args.methods, contrasts=args.contrasts,
                        presets=args.presets, device=args.device, quick=args.quick, heldout_dir=args.heldout,
                        n=args.n, batch_size=args.batch_size, seed=args.seed, precision=args.precision,
                        compare_precision=args.compare_precision, channels_last=args.channels_last,
                        compile_=args.compile, speed_slices=args.speed_slices, fpr=args.fpr,
                        speed_presets=args.speed_presets, speed_only=args.speed_only, jobs=args.jobs,
                        max_volumes=args.max_volumes, command=_command_line())
    print()
    print(markdown(rep))
    ov = [r for r in rep["results"] if r.get("overhead")]
    if ov:
        print("overhead (compute / pure network time, isolated / in-run): " + ", ".join(
            f"{r['method']}/{r['preset']} {_f(r['overhead'], 2)}/{_f(r.get('overhead_in_run'), 2)}" for r in ov))
    if rep["over_limit"]:
        print(f"above {OVERHEAD_LIMIT}: " + "; ".join(rep["over_limit"]))
    print(f"wrote {args.output}/benchmark.md, benchmark.csv, benchmark.json and plots "
          f"({rep['wall_seconds']:.0f} s)")
    return 0


def add_cli(subparsers) -> None:
    from .heldout import HELDOUT_CONTRASTS

    p = subparsers.add_parser("benchmark", help="accuracy and cost of every method on the held-out set",
                              description=__doc__.split("\n\n")[2].strip().replace("\n", " "))
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
    p.add_argument("--methods", nargs="+", default=None, help="default: every method")
    p.add_argument("--contrasts", nargs="+", default=None, choices=list(HELDOUT_CONTRASTS),
                   help="default: T1 T2 FLAIR (T2 with --quick)")
    p.add_argument("--presets", nargs="+", default=["default", "paper"],
                   help="preset names; 'default' = each method's default (default: default paper)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto (default cpu)")
    p.add_argument("--quick", action="store_true", help="quick subset, default presets (~10 min on 2 CPU cores)")
    p.add_argument("--heldout", default=None, metavar="DIR", help="an existing held-out folder (uad heldout)")
    p.add_argument("--n", type=int, default=5, help="held-out volumes per lesion type when generating (default 5)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                   help="autocast precision of the networks (default fp32)")
    p.add_argument("--compare-precision", default=None, choices=list(PRECISIONS),
                   help="also run every method at this precision and report the AP change")
    p.add_argument("--channels-last", action="store_true", help="networks in channels-last memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks (no network-time split)")
    p.add_argument("--speed-slices", type=int, default=None,
                   help="slices of the per-slice-loop comparison (default 8 quick, 16 full; 0 = off)")
    p.add_argument("--fpr", type=float, default=0.01, help="healthy FPR for thresholds calibrated here")
    p.add_argument("--speed-presets", nargs="+", default=None,
                   help="presets of the per-slab speed comparison (default: default paper; default with --quick)")
    p.add_argument("--speed-only", action="store_true", help="only the per-slab speed comparison (no accuracy pass)")
    p.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="worker processes for the independent (contrast, method, preset) units, one torch thread "
                        "each (default: min(2, cores) on the CPU, 1 on a GPU; results as with --jobs 1)")
    p.add_argument("--max-volumes", type=int, default=None, metavar="N",
                   help="use only the first N held-out volumes of each lesion type and N healthy volumes per "
                        "contrast (a CPU-sized subset; the table says how many each row used)")
    p.set_defaults(func=_cli)
