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
from .calibration import (normalisation_of, other_definition, other_model, other_weights, preprocessing_of,
                          preset_values)
# reduced precision lives in uad.precision (shared with uad detect); re-exported here
from .precision import (PRECISION_CHOICES, PRECISIONS, AutocastNetwork, autocast, autocast_model,  # noqa: F401
                        copy_model, normalise_precision, with_precision)
from .slab import SlabForward as _SlabForward, _clock, _sync  # noqa: F401 (re-exported)

LESIONS = ("tumour", "stroke", "ms")
#: methods whose batched speed-up over the per-slice loop is the GPU goal (iterative samplers)
ITERATIVE = ("thor", "autoddpm", "anoddpm", "wolleb")
OVERHEAD_LIMIT = 1.3


# ----------------------------------------------------------------------------- measurement helpers
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
    """The zoo entry serving ``method`` trained on ``contrast`` (on disk), or None (missing): the first in manifest
    order, which is the one a re-bundle placed there (``rebundle.py new --before``), measured or not.  ``uad
    detect``'s default model (``uad.zoo.find_model``) is instead the best measured one, so a benchmark of newly
    bundled weights is what decides whether they become the default."""
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
               "model_sha256": entry.data.get("sha256"),  # which weights: tables drop rows of replaced ones
               "model_normalisation": normalisation_of(entry.data),  # and rows of another normalisation
               "model_preprocessing": preprocessing_of(entry.data),  # or preprocessing profile
               "preset_values": preset_values(method, preset),  # which definition of the preset: tables mark older ones
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
    _exit_with_parent()


def _exit_with_parent() -> None:
    """In a spawned worker: exit as soon as the parent process is gone.  Killing ``uad benchmark`` (SIGTERM,
    SIGKILL) used to leave its workers computing their units for up to an hour, holding the cores (found in
    stop 34); a daemon thread waits on the parent's sentinel (``multiprocessing.parent_process``, any OS)."""
    import multiprocessing as mp
    import os
    import threading

    parent = mp.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()  # returns when the parent has exited
        os._exit(1)

    threading.Thread(target=watch, name="uad-exit-with-parent", daemon=True).start()


def default_jobs(device="cpu") -> int:
    """Worker processes of ``uad benchmark`` by default: min(2, cores) on the CPU, 1 on an accelerator."""
    from .pipeline import available_cores

    return min(2, available_cores()) if torch.device(device).type == "cpu" else 1


def run_units(units: list[dict], jobs: int = 1, log=print, on_done=None) -> list[dict]:
    """The results of ``units`` in their order.  ``jobs`` > 1: that many worker processes (spawned, one torch
    thread each), the costliest units (NFE per slice x volumes) first so that the last one to finish is a
    cheap one.  Every unit is seeded, so the results are those of ``jobs=1``; its CPU-second columns are
    its own process's CPU time.  ``on_done(i, result)`` is called as each unit finishes (e.g. to write a
    partial report, so that an interrupted run keeps what it measured)."""
    out: list = [None] * len(units)
    if jobs <= 1 or len(units) <= 1:
        try:
            for i, u in enumerate(units):
                out[i] = run_unit(u)
                for line in out[i]["log"]:
                    log(line)
                if on_done is not None:
                    on_done(i, out[i])
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
            if on_done is not None:
                on_done(i, out[i])
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

    def make_report(done: int) -> dict:
        res, spd = [r for r in results if r is not None], [r for r in speed if r is not None]
        report = {"date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t_start)),
                  "hardware": _hardware(dev), "device": str(dev), "torch": torch.__version__,
                  "threads": torch.get_num_threads() if jobs <= 1 else 1, "jobs": jobs, "quick": bool(quick),
                  "heldout": str(ho), "max_volumes": max_volumes, "command": command,
                  "batch_size": batch_size, "precision": precision, "channels_last": channels_last,
                  "compile": compile_, "fpr": fpr, "results": res, "speed": spd, "missing": missing,
                  "speed_presets": list(speed_presets), "speed_slices": speed_slices, "speed_only": bool(speed_only),
                  "wall_seconds": time.time() - t_start, "load_average": _load_average()}
        if done < len(units):  # an interrupted run's report: the units measured so far
            report["partial"] = {"units_done": int(done), "units": len(units)}
        report["over_limit"] = [
            f"{r['method']}/{r['preset']} ({r['contrast']}, {'slab' if 'pooled_ap' not in r else 'held-out set'}): "
            f"{_f(r.get('overhead'), 2)} isolated / {_f(r.get('overhead_in_run'), 2)} in-run"
            for r in res + spd
            if max(r.get("overhead") or 0, r.get("overhead_in_run") or 0) > OVERHEAD_LIMIT]
        return report

    finished = 0

    def unit_done(k: int, res: dict) -> None:
        nonlocal finished
        where, i = slots[k]
        (results if where == "results" else speed)[i] = res["row"]
        finished += 1
        if finished < len(units):
            write_report(make_report(finished), out)

    run_units(units, jobs, log, on_done=unit_done)
    report = make_report(len(units))
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
    if report.get("partial"):
        subset += (f", PARTIAL: {report['partial']['units_done']} of {report['partial']['units']} units "
                   f"measured so far")
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


def _cli_compare(args) -> int:
    rep = compare_presets(args.output, methods=args.methods or ITERATIVE, contrasts=args.contrasts or ("T2", "FLAIR"),
                          settings=args.compare_presets, heldout_dir=args.heldout, lesions=args.lesions,
                          max_volumes=args.max_volumes if args.max_volumes is not None else 2, slab=args.lesion_slab,
                          margin=args.slab_margin, seed=args.seed, batch_size=args.batch_size, device=args.device,
                          limits=_limits(args.volume_limits), reuse_only=args.reuse_only, command=_command_line())
    print()
    print(presets_markdown(rep))
    print(f"wrote {args.output}/presets.md, presets.csv, presets.json ({rep['wall_seconds']:.0f} s)")
    return 0


def _limits(items) -> dict:
    out = {}
    for item in items or []:
        k, eq, v = str(item).partition("=")
        try:
            n = int(v)
        except ValueError:
            n = -1
        if not eq or not k.strip() or n < 1:
            raise UADError(f"--volume-limits expects KEY=N (KEY a method, a contrast or CONTRAST/METHOD; N >= 1), "
                           f"got {item!r}")
        out[k.strip()] = n
    return out


def _cli(args) -> int:
    if args.compare_presets:
        return _cli_compare(args)
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
    p.add_argument("--compare-presets", nargs="+", default=None, metavar="SETTING",
                   help="paired preset comparison on lesion slabs instead of the benchmark: settings PRESET or "
                        "PRESET:KEY=VALUE,... ('default' = each method's default), the first is the reference, e.g. "
                        "'paper default'; needs --heldout; methods default thor anoddpm autoddpm wolleb, contrasts "
                        "T2 FLAIR, --max-volumes 2; writes presets.md/.csv/.json")
    p.add_argument("--lesion-slab", type=int, default=8, metavar="K",
                   help="--compare-presets: the K consecutive slices with the most lesion voxels (default 8)")
    p.add_argument("--slab-margin", type=int, default=None, metavar="M",
                   help="--compare-presets: slices computed on each side of the slab, not scored (default: what "
                        "the method's 3-D post-processing reads, 0 for most methods)")
    p.add_argument("--lesions", nargs="+", default=["tumour", "stroke"], choices=list(LESIONS),
                   help="--compare-presets: lesion types (default tumour stroke)")
    p.add_argument("--reuse-only", action="store_true",
                   help="--compare-presets: only re-summarise the cells already in OUT/presets.json (no computing)")
    p.add_argument("--volume-limits", nargs="+", default=None, metavar="KEY=N",
                   help="--compare-presets: at most N volumes per lesion type for a method, a contrast or "
                        "CONTRAST/METHOD (e.g. wolleb=1 FLAIR=1), below --max-volumes")
    p.set_defaults(func=_cli)


# ----------------------------------------------------------------------------- paired preset comparison
# ``uad benchmark --compare-presets paper default --lesion-slab K``: issue 7, point 6 (the default preset of a
# method keeps at least 90 % of its paper preset's AP).  A paper preset costs 250-1,500 network evaluations per
# slice, so on a CPU both settings run on the same few slices of each lesion volume: the K consecutive slices
# (in the method's slicing: the canonical axial slices of the preprocessing chain) with the most lesion voxels,
# plus a margin for 3-D post-processing.  Preprocessing is that of the whole volume (the normalisation and the
# field of view do not change); slices outside the slab are not computed; every slice has its own generator
# (``uad.rng``), so a slab slice's map equals the one a whole-volume run computes.  AP is taken over the brain
# voxels of exactly the K slab slices.

PRESET_RULE = 0.9  # issue 7: a cheaper default must keep at least 90 % of the paper preset's AP


def parse_setting(spec: str) -> tuple[str | None, str, dict]:
    """``"paper"`` -> (None, "paper", {}); ``"fast:steps=40,sampler=ddim"`` -> (None, "fast", {"steps": 40, ...});
    ``"anoddpm/fast:steps=55"`` -> ("anoddpm", "fast", {"steps": 55}): a setting of that method only.
    ``default`` stays a name (each method's default preset, resolved per method)."""
    from .cli import parse_value

    head, _, rest = str(spec).partition(":")
    only, slash, name = head.partition("/")
    if not slash:
        only, name = None, head
    only = only.strip().lower() if only else None
    name = name.strip()
    if not name:
        raise UADError(f"--compare-presets: empty preset in {spec!r} (use PRESET or PRESET:KEY=VALUE,...)")
    params = {}
    for item in [x for x in rest.split(",") if x.strip()]:
        k, eq, v = item.partition("=")
        if not eq or not k.strip():
            raise UADError(f"--compare-presets: expected KEY=VALUE after {name}:, got {item!r}")
        params[k.strip().replace("-", "_")] = parse_value(v.strip())
    return only, name, params


def setting_label(preset: str, params: dict) -> str:
    return preset + ("" if not params else ":" + ",".join(f"{k}={v}" for k, v in params.items()))


def densest_window(counts, k: int) -> tuple[int, int]:
    """(lo, hi): the ``k`` consecutive positions of ``counts`` with the largest sum (the first such window);
    the whole range when it has at most ``k`` positions."""
    c = np.asarray(counts, dtype=np.int64)
    n, k = len(c), int(k)
    if k < 1:
        raise UADError(f"--lesion-slab must be >= 1, got {k}")
    if n <= k:
        return 0, n
    cs = np.concatenate([[0], np.cumsum(c)])
    sums = cs[k:] - cs[:-k]
    lo = int(np.argmax(sums))
    return lo, lo + k


def lesion_slab(image: sitk.Image, lesion: sitk.Image, brain: sitk.Image, k: int, margin: int = 0) -> dict:
    """The slab of a lesion volume in the method's slicing: canonical (LPS) axial slices, as
    ``uad.preprocess.Reorient`` orders them.  Returns the orientation, the lesion voxels per canonical slice
    (within the brain), the K-slice window ``slab`` (lo, hi) with the most lesion voxels and the slices
    ``run`` = slab +- margin that are computed."""
    from .imageio import array_view
    from .preprocess import canonical_view, orientation_of

    permute, flip = orientation_of(image)
    les = canonical_view(array_view(lesion), permute, flip) > 0
    br = canonical_view(array_view(brain), permute, flip) > 0
    counts = (les & br).sum(axis=(1, 2))
    if not counts.any():
        raise UADError("the lesion mask has no voxel inside the brain mask: no lesion slab")
    lo, hi = densest_window(counts, k)
    m = max(0, int(margin))
    return {"permute": permute, "flip": flip, "counts": counts, "slab": (lo, hi),
            "run": (max(0, lo - m), min(len(counts), hi + m)), "brain_slices": np.flatnonzero(br.any(axis=(1, 2)))}


def _postprocess_margin(meth) -> int:
    """Slices on each side of the slab that a method's 3-D post-processing reads (its median filter)."""
    med = int((getattr(meth, "postprocess", None) or {}).get("median_size") or 0)
    return med // 2 if med > 1 else 0


def run_slab_case(row: dict, method: str, model, preset: str, params: dict | None, device, k: int,
                  margin: int | None = None, seed: int = 0, batch_size: int = 16) -> dict:
    """Both ends of one comparison cell: ``method`` with ``preset`` (+ ``params``) on the lesion slab of one
    held-out volume.  Returns AP over the brain voxels of the K slab slices, the slab, NFE, seconds per slice."""
    from .metrics import pr_stats
    from .pipeline import build, detect, preprocessing_profile
    from .preprocess import canonical_view

    dev = torch.device(device)
    image, brain, lesion = _read_case(row)
    if preprocessing_profile(model).get("registration") == "mni152":
        raise UADError(f"model {model.id}: the lesion-slab comparison needs a chain without registration "
                       f"(slices of the input, not of a template)")
    # held-out volumes are skull-stripped: said so, a profile with registration "auto" does not register them
    meth = build(method, model, preset, params)
    m = _postprocess_margin(meth) if margin is None else int(margin)
    slab = lesion_slab(image, lesion, brain, k, m)
    brain_k = set(int(x) for x in slab["brain_slices"])
    ks = [int(x) for x in range(*slab["run"]) if int(x) in brain_k]  # the stack holds the slices with brain
    fwd = _SlabForward(seed, ks, dev)
    t0 = time.perf_counter()
    res = detect(image, method=method, model=model, device=dev, seed=seed, batch_size=batch_size, preset=preset,
                 params=params, brain_mask=brain, mask=False, forward=fwd, skull_stripped=True)
    wall = time.perf_counter() - t0
    lo, hi = slab["slab"]
    perm, flip = slab["permute"], slab["flip"]
    from .imageio import array_view

    score = np.asarray(canonical_view(array_view(res.anomaly), perm, flip)[lo:hi], dtype=np.float64)
    br = canonical_view(array_view(brain), perm, flip)[lo:hi] > 0
    les = (canonical_view(array_view(lesion), perm, flip)[lo:hi] > 0) & br
    computed = sorted(set(fwd.slices))
    st = pr_stats(score, les, br)
    n = max(len(computed), 1)
    return {"case": row["case"], "contrast": row["contrast"], "lesion": row["lesion"], "method": method,
            "preset": meth.preset, "params": dict(params or {}), "setting": setting_label(meth.preset, params or {}),
            "model": model.id, "model_sha256": model.config.get("sha256"),
            "model_normalisation": normalisation_of(model.config),
            "model_preprocessing": preprocessing_of(model.config),
            "seed": int(seed), "slab": [int(lo), int(hi)], "run_slices": [int(x) for x in slab["run"]],
            "slices_computed": len(computed), "slab_slices": int(hi - lo),
            "slab_lesion_voxels": int(les.sum()), "lesion_voxels": int(slab["counts"].sum()),
            "slab_brain_voxels": int(br.sum()), "prevalence": float(les.sum() / max(int(br.sum()), 1)),
            "ap": float(st["ap"]), "auroc": st.get("auroc"), "best_dice": st.get("best_dice"),
            "nfe_per_slice": int(fwd.nfe_per_slice), "network_evaluations": int(fwd.network_evaluations),
            "clock": "wall" if dev.type == "cuda" else "process CPU time",
            "seconds_per_slice": fwd.clock_seconds / n, "wall_seconds_per_slice": fwd.wall_seconds / n,
            "detect_wall_seconds": wall, "perceptual_backend": res.info.get("perceptual_backend"),
            "slices_match": computed == ks}


def _cell_id(case: str, method: str, model: str, setting: str, seed: int, k, margin) -> tuple:
    """What makes an earlier cell reusable: the volume, method, model, setting, seed, K and margin asked for."""
    return (case, method, model, setting, int(seed), k, margin)


def _cell_key(c: dict) -> tuple:
    """``_cell_id`` of a measured cell."""
    return _cell_id(c["case"], c["method"], c["model"], c["setting"], c["seed"], c.get("k"), c.get("margin_arg"))


def summarise_presets(cells: list[dict], rule: float = PRESET_RULE) -> list[dict]:
    """Per (method, contrast, lesion type) and per (method, contrast, "all") and per (method, "all", "all"):
    mean AP of every setting over the volumes measured with *every* setting (paired), the ratio to the
    reference setting (role "reference": the paper preset), NFE and seconds per slice, and the verdict against ``rule``."""
    out = []
    methods = list(dict.fromkeys(c["method"] for c in cells))
    for method in methods:
        mc = [c for c in cells if c["method"] == method]
        ref_label = next((c["setting"] for c in mc if c["role"] == "reference"), None)
        settings = list(dict.fromkeys(c["setting"] for c in mc))
        groups = []
        for contrast in dict.fromkeys(c["contrast"] for c in mc):
            for lt in dict.fromkeys(c["lesion"] for c in mc if c["contrast"] == contrast):
                groups.append((contrast, lt))
            groups.append((contrast, "all"))
        if len({c["contrast"] for c in mc}) > 1:
            groups.append(("all", "all"))
        for contrast, lt in groups:
            g = [c for c in mc if contrast in ("all", c["contrast"]) and lt in ("all", c["lesion"])]
            by_case: dict = {}
            for c in g:
                by_case.setdefault(c["case"], {})[c["setting"]] = c
            paired = [cs for cs in by_case.values() if all(s in cs for s in settings)]
            if not paired or ref_label is None:
                continue
            row = {"method": method, "contrast": contrast, "lesion": lt, "n": len(paired),
                   "model": ", ".join(sorted({c["model"] for cs in paired for c in cs.values()})),
                   "reference": ref_label, "settings": {}}
            ref_ap = float(np.mean([cs[ref_label]["ap"] for cs in paired]))
            for s in settings:
                aps = [cs[s]["ap"] for cs in paired]
                ap = float(np.mean(aps))
                per_ratio = [cs[s]["ap"] / cs[ref_label]["ap"] for cs in paired if cs[ref_label]["ap"] > 0]
                any_c = paired[0][s]
                row["settings"][s] = {
                    "preset": any_c["preset"], "params": any_c["params"], "role": any_c["role"],
                    "ap": ap, "ratio": ap / ref_ap if ref_ap > 0 else None,
                    "per_volume_ratio_min": min(per_ratio) if per_ratio else None,
                    "per_volume_ratio_max": max(per_ratio) if per_ratio else None,
                    "nfe_per_slice": max(cs[s]["nfe_per_slice"] for cs in paired),
                    "seconds_per_slice": float(np.mean([cs[s]["seconds_per_slice"] for cs in paired])),
                    "prevalence": float(np.mean([cs[s]["prevalence"] for cs in paired])),
                    "keeps": None if ref_ap <= 0 or s == ref_label else bool(ap >= rule * ref_ap)}
            out.append(row)
    return out


def compare_presets(outdir, methods=("thor", "anoddpm", "autoddpm", "wolleb"), contrasts=("T2", "FLAIR"),
                    settings=("paper", "default"), heldout_dir=None, lesions=("tumour", "stroke"),
                    max_volumes: int | None = 2, slab: int = 8, margin: int | None = None, seed: int = 0,
                    batch_size: int = 16, device: str = "cpu", command: str | None = None, resume: bool = True,
                    limits: dict | None = None, reuse_only: bool = False, log=print) -> dict:
    """The paired preset comparison (see the section comment above): for every held-out lesion volume of
    ``lesions`` and ``contrasts`` (the first ``max_volumes`` of each type), every method with its bundled model
    for the contrast runs every setting on the same slab with the same seed.  The first setting is the
    reference (the paper preset); "default" is each method's default preset.  Writes ``presets.json``,
    ``presets.csv`` (one row per volume and setting) and ``presets.md`` into ``outdir`` after every cell, so an
    interrupted run keeps what it measured; ``resume`` reuses the cells of an earlier report in ``outdir`` that
    have the same case, method, model, setting, seed and slab.  ``limits`` {key: n}: fewer volumes per lesion
    type for some cells, key a method, a contrast or "CONTRAST/METHOD" (the smallest matching limit applies).
    ``reuse_only``: only the cells of the earlier report (re-summarised with this code's default presets); the
    others are left out and the report says it is partial."""
    from .heldout import load_heldout
    from .pipeline import method_class, resolve_device

    if heldout_dir is None or not (Path(heldout_dir) / "heldout.json").is_file():
        raise UADError("--compare-presets needs --heldout DIR (a 'uad heldout' folder with heldout.json)")
    if len(settings) < 2 or parse_setting(settings[0])[0] is not None:
        raise UADError("--compare-presets needs at least two settings, the first (the reference, for every "
                       "method) without a METHOD/ prefix, e.g. paper default anoddpm/fast:steps=55")
    specs = [parse_setting(s) for s in settings]
    dev = resolve_device(device)
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    rows_all = select_rows(load_heldout(Path(heldout_dir), list(contrasts)), max_volumes)
    rows_all = [r for r in rows_all if r["lesion"] in lesions]
    old = {}
    if resume and (out / "presets.json").is_file():
        try:
            prev = json.loads((out / "presets.json").read_text())
            for c in prev.get("cells", []) + prev.get("other_cells", []):
                # when it was measured: cells before this field carry the date of the report they came from
                c.setdefault("measured_utc", f"by {prev.get('date_utc', '?')}")
                old.setdefault(_cell_key(c), []).append(c)
        except (ValueError, KeyError, TypeError):
            old = {}

    def measured_otherwise(c, entry, method, preset, params):
        """Why an earlier cell cannot stand for ``entry`` / ``preset`` today (other weights, intensity
        normalisation, preprocessing profile or preset definition; cells from before a field was recorded pass
        that check), else None."""
        why = other_model(c, entry.data, "model_")
        if why:
            return why
        if other_definition(c, method, preset, params):
            return "other preset definition"
        return None

    def reusable(key, entry, method, preset, params):
        """The first earlier cell of ``key`` that still stands for ``entry`` and this preset, else None."""
        return next((c for c in old.get(key, []) if measured_otherwise(c, entry, method, preset, params) is None),
                    None)

    def superseded(c, entry, method, preset, params):
        """Why an earlier cell of a planned key is not the one reused."""
        return (measured_otherwise(c, entry, method, preset, params)
                or "measured twice (same weights and preset; the reused copy is in cells)")

    plan, missing = [], []
    for contrast in contrasts:
        for method in methods:
            entry = model_for(method, contrast)
            if entry is None:
                missing.append({"contrast": contrast, "method": method})
                log(f"{contrast:5s} {method:10s} MISSING: no bundled {contrast} model")
                continue
            cls = method_class(method)
            resolved = []
            for i, (only, name, params) in enumerate(specs):
                if only is not None and only != method:
                    continue
                preset = resolve_presets(method, [name])
                if not preset:
                    raise UADError(f"{method} has no preset {name!r} (presets: {', '.join(cls.presets)})")
                label = setting_label(preset[0], params)
                if label not in [x[2] for x in resolved]:
                    resolved.append((preset[0], params, label, "reference" if i == 0 else
                                     ("default" if name == "default" else "candidate")))
            plan.append((contrast, method, entry, resolved))
    # volume-major order: every method and setting on the first volume of each type before the second, so an
    # interrupted run has complete pairs
    order = []
    n_max = max([sum(r["contrast"] == c and r["lesion"] == lt for r in rows_all) for c in contrasts
                 for lt in lesions] or [0])
    for vi in range(n_max):
        for contrast, method, entry, resolved in plan:
            for lt in lesions:
                rs = [r for r in rows_all if r["contrast"] == contrast and r["lesion"] == lt]
                keys = (method, contrast.upper(), f"{contrast.upper()}/{method}")
                n_here = min([int(v) for k, v in (limits or {}).items() if str(k).upper() in
                              {x.upper() for x in keys}] or [len(rs)])
                if vi < min(len(rs), n_here):
                    for preset, params, label, role in resolved:
                        order.append((rs[vi], method, entry, preset, params, label, role))
    cells: list = []
    report = {"date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t_start)), "hardware": _hardware(dev),
              "device": str(dev), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "command": command, "heldout": str(heldout_dir), "methods": list(methods), "contrasts": list(contrasts),
              "lesions": list(lesions), "settings": list(settings), "max_volumes": max_volumes, "slab": int(slab),
              "margin": margin, "limits": dict(limits or {}), "seed": int(seed), "batch_size": int(batch_size), "rule": PRESET_RULE,
              "missing": missing, "planned_cells": len(order), "cells": cells, "summary": []}
    planned = {_cell_id(r["case"], m, e.id, lab, seed, int(slab), margin) for r, m, e, _, _, lab, _ in order}
    # cells of an earlier report that this run does not plan: kept (not summarised) so that no measurement is lost
    # (and cells of weights a model no longer ships: superseded, kept as measured)
    report["other_cells"] = [c for k, cs in old.items() for c in cs if k not in planned]
    # cells of the earlier report that this run plans but has not reached yet: written beside every intermediate
    # report (in other_cells, as they were), so that an interrupted run loses none of them
    pending = {k: old[k] for k in planned if k in old}
    model_cache: dict = {}
    for i, (row, method, entry, preset, params, label, role) in enumerate(order, 1):
        if entry.id not in model_cache:
            model_cache.clear()
            model_cache[entry.id] = prepare_model(entry, dev)
        model = model_cache[entry.id]
        key = _cell_id(row["case"], method, entry.id, label, seed, int(slab), margin)
        pending.pop(key, None)
        cached = reusable(key, entry, method, preset, params)
        stale = [c for c in old.get(key, []) if c is not cached]
        if stale:  # measured with other weights, another definition of the preset, or twice: not reused, kept beside
            report["other_cells"] += [dict(c, superseded=superseded(c, entry, method, preset,
                                                                    params)) for c in stale]
        if cached is None and reuse_only:
            log(f"  [{i}/{len(order)}] {row['case']} {method} {label}: not in the earlier report, left out")
            continue
        if cached is not None:
            cell = dict(cached, role=role, reused=True)
            log(f"  [{i}/{len(order)}] {row['case']} {method} {label}: reused AP {cell['ap']:.4f}")
        else:
            cell = run_slab_case(row, method, model, preset, params, dev, slab, margin, seed, batch_size)
            cell.update({"role": role, "reused": False, "k": int(slab), "margin_arg": margin,
                         "preset_values": preset_values(method, preset, params),
                         "load_average": _load_average(),
                         "measured_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                         "hardware": report["hardware"]})
            log(f"  [{i}/{len(order)}] {row['case']} {method} {label}: AP {cell['ap']:.4f} on slices "
                f"{cell['slab'][0]}-{cell['slab'][1] - 1} (prevalence {cell['prevalence']:.3f}), "
                f"{cell['nfe_per_slice']} NFE/slice, {cell['seconds_per_slice']:.2f} s/slice")
        cells.append(cell)
        report["summary"] = summarise_presets(cells)
        report["wall_seconds"] = time.time() - t_start
        report["load_average"] = _load_average()
        unreached = [c for cs in pending.values() for c in cs]
        write_presets_report(dict(report, other_cells=report["other_cells"] + unreached), out)
    model_cache.clear()
    return report


_PRESET_COLS = ["case", "contrast", "lesion", "method", "model", "setting", "role", "preset", "seed", "slab",
                "slab_slices", "slices_computed", "slab_lesion_voxels", "lesion_voxels", "slab_brain_voxels",
                "prevalence", "ap", "auroc", "best_dice", "nfe_per_slice", "seconds_per_slice",
                "wall_seconds_per_slice", "perceptual_backend", "load_average"]


def write_presets_report(report: dict, out: Path) -> None:
    out = Path(out)
    _write_text(out / "presets.json", json.dumps(report, indent=1, default=_json_default))
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=_PRESET_COLS, extrasaction="ignore")
    w.writeheader()
    for c in report["cells"]:
        w.writerow({k: c.get(k) for k in _PRESET_COLS})
    _write_text(out / "presets.csv", buf.getvalue())
    _write_text(out / "presets.md", presets_markdown(report))


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text)
    os.replace(tmp, path)


def presets_header(report: dict) -> str:
    clk = "wall" if str(report.get("device", "cpu")).startswith("cuda") else "process CPU"
    cmd = report.get("command") or "command not recorded"
    la = report.get("load_average")
    return (f"Paired preset comparison, {report.get('date_utc', '?')}, {report.get('hardware', '?')}, device "
            f"{report.get('device', '?')}, batch {report.get('batch_size', '?')}, seed {report.get('seed', 0)}, with "
            f"`{cmd}`" + (f" (load average at the end {la[0]:.2f} / {la[1]:.2f} / {la[2]:.2f})" if la else "")
            + f". Every setting runs on the same slices of each held-out lesion volume: the "
            f"{report.get('slab')} consecutive canonical axial slices (the method's slicing) with the most lesion "
            f"voxels; AP = average precision over the brain voxels of exactly those slices, averaged over the "
            f"volumes (n) measured with every setting; ratio = AP / AP of the reference "
            f"({report['settings'][0]}); s/slice = {clk} seconds of the method call per slice; keeps >= 90 % = "
            f"ratio >= {report.get('rule', PRESET_RULE):g} (issue 7, point 6)." + _reused_note(report))


def _reused_note(report: dict) -> str:
    """Which cells an earlier run measured (resumed reports): their dates, so the header does not claim them."""
    cells = report.get("cells") or []
    old = [c for c in cells if c.get("reused")]
    if not old:
        return ""
    groups = sorted({(c.get("model"), c.get("contrast")) for c in old}, key=str)
    dates = sorted({str(c.get("measured_utc", "?")).replace("by ", "") for c in old})
    return (f" {len(old)} of the {len(cells)} cells ({', '.join(f'{m} {ct}' for m, ct in groups)}) were measured "
            f"by an earlier run (by {dates[-1]}, on its machine: compare their s/slice with care) and reused.")


def presets_table(summary: list[dict]) -> str:
    """Markdown table of ``summarise_presets`` rows."""
    lines = ["| method | contrast | lesion | n | setting | NFE/slice | s/slice | AP | ratio | per-volume ratio | "
             "keeps >= 90 % |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary:
        for s, d in r["settings"].items():
            tag = {"reference": " (reference)", "default": " (default)"}.get(d["role"], "")
            pv = "-" if d["per_volume_ratio_min"] is None or d["role"] == "reference" else \
                f"{d['per_volume_ratio_min']:.2f}-{d['per_volume_ratio_max']:.2f}"
            keeps = "-" if d["keeps"] is None else ("yes" if d["keeps"] else "**no**")
            lines.append(f"| {r['method']} | {r['contrast']} | {r['lesion']} | {r['n']} | {s}{tag} | "
                         f"{d['nfe_per_slice']} | {d['seconds_per_slice']:.2f} | {d['ap']:.3f} | "
                         f"{_f(d['ratio'], 2)} | {pv} | {keeps} |")
    return "\n".join(lines)


def preset_verdicts(summary: list[dict]) -> list[str]:
    """One sentence per (method, contrast) over all its lesion types (and per method over every contrast)."""
    out = []
    for top in [r for r in summary if r["lesion"] == "all"]:
        ref = top["settings"][top["reference"]]
        parts = []
        for s, d in top["settings"].items():
            if d["role"] == "reference" or d["ratio"] is None:
                continue
            tag = " (the default)" if d["role"] == "default" else ""
            parts.append(f"{s}{tag}, {d['nfe_per_slice']} NFE/slice, keeps {100 * d['ratio']:.0f} % of the paper AP "
                         f"({d['ap']:.3f} vs {ref['ap']:.3f}): "
                         + ("within the 10 % rule" if d["keeps"] else "loses more than 10 %"))
        where = "T2 and FLAIR" if top["contrast"] == "all" else top["contrast"]
        out.append(f"- **{top['method']}** ({where}, {top['n']} lesion volume(s); {top['reference']} "
                   f"{ref['nfe_per_slice']} NFE/slice, {ref['seconds_per_slice']:.2f} s/slice): " + "; ".join(parts)
                   + ".")
    return out


PRESET_BEGIN = "<!-- preset-table:begin -->"
PRESET_END = "<!-- preset-table:end -->"
PRESET_HEADING = "## Paper preset against the default preset"


def presets_block(report: dict, model_id: str | None = None, lesion_rows: bool = True) -> str:
    """The text between the preset-table markers: header, table and verdicts (``model_id``: only the rows
    measured with that model; its contrasts' rows, not the across-contrast ones; ``lesion_rows=False``: only
    the rows over all lesion types, per contrast and across contrasts)."""
    rows = report["summary"] if model_id is None else [r for r in report["summary"] if r["model"] == model_id]
    if not lesion_rows:
        rows = [r for r in rows if r["lesion"] == "all"]
    head = presets_header(report)
    if not rows:
        return f"\n{head}\n\nNo paired preset measurement of this model in that run.\n"
    text = f"\n{head}\n\n{presets_table(rows)}\n"
    v = preset_verdicts(rows)
    if v:
        text += "\nAgainst the 10 % rule (issue 7, point 6):\n\n" + "\n".join(v) + "\n"
    if report.get("planned_cells") and len(report["cells"]) < report["planned_cells"]:
        text += f"\nPartial run: {len(report['cells'])} of {report['planned_cells']} cells measured.\n"
    return text


def replace_preset_section(text: str, content: str, heading: str | None = PRESET_HEADING) -> str:
    """``text`` with the part between the preset-table marker lines replaced by ``content`` (appended with
    ``heading`` when the file has no markers; unbalanced or repeated markers: ``ValueError``)."""
    from .heldout_table import replace_marked

    return replace_marked(text, content, heading, begin=PRESET_BEGIN, end=PRESET_END)


def load_presets_report(path) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "presets.json"
    if not p.is_file():
        raise ValueError(f"{p} does not exist (give a 'uad benchmark --compare-presets -o DIR' folder or its "
                         f"presets.json)")
    try:
        rep = json.loads(p.read_text())
    except ValueError as e:
        raise ValueError(f"{p} is not valid JSON ({e})") from None
    if not isinstance(rep, dict) or not isinstance(rep.get("summary"), list) or not rep.get("settings"):
        raise ValueError(f"{p} is not a preset-comparison report (no 'summary' / 'settings')")
    return rep


def update_preset_cards(report: dict, models_dir, readme=None) -> list[tuple[str, str]]:
    """Write the preset section into the card of every model of ``models_dir/manifest.json`` that serves a
    compared method (measured or not: an unmeasured one says so) and, with ``readme``, the README's marked
    section (which must exist).  Every file is checked before any is written; atomic, idempotent."""
    from .heldout_table import _marker_lines, _write_atomic, card_path, manifest_entries

    entries = manifest_entries(models_dir)
    methods = set(report.get("methods") or [r["method"] for r in report["summary"]])
    plan, log, replaced = [], [], []
    for e in entries:
        mid = e.get("id")
        if not methods & set(e.get("methods") or []):
            continue
        path = card_path(models_dir, e)
        if path is None:
            log.append((mid, "no card inside the models folder: skipped"))
            continue
        text = path.read_text()
        ran = {c.get("model_sha256") for c in report["cells"] if c.get("model") == mid}
        if not ran and _marker_lines(text, PRESET_BEGIN) and any(
                c.get("model") == mid for c in report.get("other_cells") or []):
            # measured by an earlier run only (e.g. no longer the contrast's default model): its section stays
            log.append((mid, f"{path}: unchanged (only cells of earlier runs; their section is kept)"))
            continue
        if ran and all(other_weights(x, e.get("sha256")) for x in ran):  # the model was re-bundled since
            content = (f"\n{presets_header(report)}\n\nThat run measured weights this model no longer ships "
                       f"(sha256 {', '.join(sorted(str(x)[:12] for x in ran))}...); the bundled weights "
                       f"({str(e.get('sha256'))[:12]}...) have not been compared preset against preset.\n")
            replaced.append(mid)
        else:
            content = presets_block(report, mid)
        plan.append((mid, path, text, replace_preset_section(text, content)))
    if readme is not None:
        rp = Path(readme)
        text = rp.read_text()
        if not _marker_lines(text, PRESET_BEGIN):
            raise ValueError(f"{rp} has no {PRESET_BEGIN} ... {PRESET_END} section")
        content = presets_block(report, lesion_rows=False)
        if replaced:
            content += (f"\nRe-bundled since this run (its rows measured the former weights): "
                        f"{', '.join(f'`{m}`' for m in replaced)}.\n")
        plan.append(("README", rp, text, replace_preset_section(text, content, None)))
    for mid, path, old, new in plan:
        if new != old:
            _write_atomic(path, new)
        log.append((mid, f"{path}: {'updated' if new != old else 'unchanged (same table)'}"))
    return log


def presets_markdown(report: dict) -> str:
    lines = [presets_header(report), "", presets_table(report["summary"]), ""]
    v = preset_verdicts(report["summary"])
    if v:
        lines += ["Verdicts:", ""] + v + [""]
    if report.get("missing"):
        lines += ["Missing (no bundled model): " + ", ".join(f"{m['method']} {m['contrast']}"
                                                           for m in report["missing"]) + ".", ""]
    done = len(report["cells"])
    if done < report.get("planned_cells", done):
        lines += [f"Partial: {done} of {report['planned_cells']} cells measured.", ""]
    lines += ["| case | method | setting | slab | lesion voxels in slab / volume | prevalence | AP | NFE/slice | "
              "s/slice |", "|---|---|---|---|---|---|---|---|---|"]
    for c in report["cells"]:
        lines.append(f"| {c['case']} | {c['method']} | {c['setting']} | {c['slab'][0]}-{c['slab'][1] - 1} | "
                     f"{c['slab_lesion_voxels']} / {c['lesion_voxels']} | {c['prevalence']:.3f} | {c['ap']:.4f} | "
                     f"{c['nfe_per_slice']} | {c['seconds_per_slice']:.2f} |")
    return "\n".join(lines) + "\n"
