"""detect(): one volume in, restoration / anomaly map / binary mask out, on the input's grid.

    import SimpleITK as sitk
    from uad.pipeline import detect
    result = detect(sitk.ReadImage("t2.nii.gz"), method="anoddpm", preset="fast", seed=0)
    result.anomaly, result.mask, result.info["threshold_source"]

The pipeline never knows which method runs: it preprocesses the volume into
axial slices, feeds them to the method in batches with one random generator
per slice (so results do not depend on the batch size), and maps the results
back to the input's grid.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import SimpleITK as sitk

from . import Cancelled, ModelError, UADError
from .imageio import validate, validate_mask

#: Percentile of the in-brain anomaly values used as threshold when neither the
#: caller nor the model gives one (uncalibrated).
FALLBACK_PERCENTILE = 99.0


@dataclass
class DetectionResult:
    restoration: sitk.Image  # float32, input intensity units, input grid
    anomaly: sitk.Image  # float32 >= 0, zero outside the brain, input grid
    mask: sitk.Image  # uint8, anomaly > threshold, input grid
    info: dict = field(default_factory=dict)
    brain_mask: sitk.Image | None = None  # uint8 brain mask used, input grid


def resolve_device(device: str | None = "auto"):
    """``"auto"`` -> cuda, else mps, else cpu; an explicit device must be available (``UADError`` otherwise)."""
    import torch

    name = (str(device) if device is not None else "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UADError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UADError(f"device {device!r} was requested but CUDA is not available "
                           f"(torch {torch.__version__}); use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UADError(f"device {device!r} was requested but only {torch.cuda.device_count()} "
                           f"CUDA device(s) exist")
        return dev
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UADError(f"device {device!r} was requested but Apple MPS is not available; "
                           f"use --device cpu or auto")
        return dev
    raise UADError(f"unsupported device {device!r}; use auto, cpu, cuda, cuda:N or mps")


def resolve_model(model, method: str, device):
    """A ``uad.zoo.Model`` (moved to ``device``) from a Model, a model id or None (the method's default)."""
    from .zoo import Model, ModelEntry, load_model

    if isinstance(model, Model):
        m = model.to(device)
    elif model is None or isinstance(model, (str, ModelEntry)):
        m = load_model(model, method=method, device=device)
    else:
        raise ModelError(f"model must be a uad.zoo.Model, a model id or None, got {type(model).__name__}")
    served = m.config.get("methods")
    if served and method not in served:
        raise ModelError(f"model {m.id} does not serve method {method!r} (it serves: {', '.join(served)})")
    return m


def method_class(method: str):
    """The Method class of ``method``; an unknown name raises ``UADError``."""
    from .methods import get_method_class

    try:
        return get_method_class(method)
    except ValueError as e:
        raise UADError(str(e)) from None


def build(method: str, model, preset: str | None = None, params: dict | None = None):
    """The method object; a wrong method name, preset or parameter raises ``UADError`` (one line)."""
    from .methods import build_method

    method_class(method)
    try:
        return build_method(method, model, preset, **dict(params or {}))
    except (ValueError, TypeError) as e:
        raise UADError(" ".join(str(e).split())) from None


def model_threshold(model, method: str, preset: str | None) -> float | None:
    """The model's calibrated threshold for ``method`` / ``preset``.

    The manifest's ``threshold`` is either one number, or a dict keyed by method
    whose values are numbers or dicts keyed by preset.
    """
    t = model.config.get("threshold")
    if isinstance(t, dict):
        t = t.get(method)
        if isinstance(t, dict):
            t = t.get(preset) if preset in t else t.get("default")
    if t is None:
        return None
    try:
        return float(t)
    except (TypeError, ValueError):
        raise ModelError(f"model {model.id}: invalid threshold {t!r} in its manifest") from None


def _default_fpr() -> float:
    from .calibration import DEFAULT_FPR

    return DEFAULT_FPR


def select_threshold(model, method: str, meth, threshold: float | None, fpr: float | None,
                     anomaly: sitk.Image, brain: np.ndarray) -> tuple[float, str, list[str]]:
    """(threshold, source, warnings): explicit > calibrated for (method, preset, backend, fpr) >
    legacy model threshold (warned) > (1 - fpr) percentile of this volume (warned, uncalibrated)."""
    import warnings as _warnings

    from .calibration import fpr_key, lookup_threshold

    rate = float(fpr if fpr is not None else _default_fpr())
    fpr_key(rate)  # validates
    notes: list[str] = []
    tau_source = getattr(meth, "tau_source", "")
    if tau_source.startswith("uncalibrated"):
        notes.append(f"{method}: stage-1 tau {tau_source} (no calibration for {meth.preset}/"
                     f"{meth.perceptual_backend()})")
    if threshold is not None:
        return float(threshold), "explicit", notes
    backend = meth.perceptual_backend()
    thr, source, warn = lookup_threshold(model.config, method, meth.preset, backend, rate)
    if thr is None and warn is None and model_threshold(model, method, meth.preset) is not None:
        thr, source = model_threshold(model, method, meth.preset), "model"
    if warn:
        notes.append(warn)
    if thr is None:
        pct = 100.0 * (1.0 - rate)
        vals = sitk.GetArrayViewFromImage(anomaly)[brain]
        thr = float(np.percentile(vals, pct)) if vals.size else 0.0
        source = f"fallback: {pct:g}th percentile of the in-brain anomaly (uncalibrated)"
        fall = f"; falling back to the {pct:g}th percentile of this volume (uncalibrated)"
        if warn:
            notes[-1] = warn + fall
        else:
            notes.append(f"model {model.id} has no calibrated threshold for {method}/{meth.preset}/{backend}" + fall)
    for n in notes:
        _warnings.warn(n, UserWarning, stacklevel=3)
    return thr, source, notes


def method_key(method: str) -> str:
    return str(method).lower().replace("-", "_")


def detect(image: sitk.Image, method: str = "anoddpm", model=None, device="auto", seed: int = 0,
           batch_size: int = 16, preset: str | None = None, params: dict | None = None,
           threshold: float | None = None, brain_mask: sitk.Image | None = None,
           progress: Callable[[int, int], None] | None = None,
           cancel: Callable[[], bool] | None = None, fpr: float | None = None) -> DetectionResult:
    """Run anomaly detection on a 3-D volume.

    ``model``: a ``uad.zoo.Model``, a model id, or None for the method's default
    model.  ``params`` override the ``preset`` of the method.  ``progress(done,
    total)`` is called after every batch of slices; when ``cancel()`` returns
    true, ``uad.Cancelled`` is raised before the next batch.  The threshold of
    the binary mask is ``threshold`` if given, else the model's threshold
    calibrated for this method, preset and perceptual backend at the healthy
    false-positive rate ``fpr`` (default 1 % of healthy brain voxels; see
    ``uad.calibration``), else -- with a warning -- the (1 - fpr) percentile of
    this volume's in-brain anomaly values (``info["threshold_source"]`` says
    which; ``info["warnings"]`` lists the warnings, ``info["perceptual_backend"]``
    the backend of the map).  The input image is not modified.
    """
    import torch

    from .postprocess import apply_method_postprocess, threshold_mask, to_volumes
    from .preprocess import preprocess
    from .rng import BatchRNG

    t0 = time.perf_counter()
    validate(image)
    if brain_mask is not None:
        validate_mask(brain_mask, image)
    if int(batch_size) < 1:
        raise UADError(f"batch size must be >= 1, got {batch_size}")
    batch_size = int(batch_size)
    name = method_key(method)
    method_class(name)
    dev = resolve_device(device)
    m = resolve_model(model, name, dev)
    meth = build(name, m, preset, params)

    def check_cancel():
        if cancel is not None and cancel():
            raise Cancelled("cancelled")

    check_cancel()
    try:
        stack = preprocess(image, m.image_size, brain_mask=brain_mask, normalisation=m.normalisation)
    except ValueError as e:  # the model's image_size / normalisation settings
        raise ModelError(f"model {m.id}: {' '.join(str(e).split())}") from None
    n = len(stack)
    rest = np.zeros_like(stack.slices)
    anom = np.zeros_like(stack.slices)
    nfe_per_slice = 0
    total_nfe = 0
    with torch.inference_mode():
        for b0 in range(0, n, batch_size):
            check_cancel()
            b1 = min(n, b0 + batch_size)
            x = torch.from_numpy(stack.slices[b0:b1, None]).to(dev)
            mk = torch.from_numpy(stack.masks[b0:b1, None]).to(dev)
            rng = BatchRNG.for_slices(int(seed), stack.indices[b0:b1].tolist(), dev)
            out = meth(x, mk, rng)
            rest[b0:b1] = out.restoration.detach().float().reshape(b1 - b0, *rest.shape[1:]).cpu().numpy()
            anom[b0:b1] = out.anomaly.detach().float().reshape(b1 - b0, *anom.shape[1:]).cpu().numpy()
            nfe_per_slice = max(nfe_per_slice, int(out.nfe))
            total_nfe += int(out.nfe) * (b1 - b0)
            if progress is not None:
                progress(b1, n)
    check_cancel()

    post = dict(getattr(meth, "postprocess", {}) or {})
    if post:
        anom = apply_method_postprocess(anom, stack.masks, post)
    anom = np.where(stack.masks, np.maximum(anom, 0.0), 0.0).astype(np.float32)
    restoration, anomaly = to_volumes(stack, rest, anom)
    brain = stack.brain_mask_array()

    thr, source, notes = select_threshold(m, name, meth, threshold, fpr, anomaly, brain)
    mask = threshold_mask(anomaly, thr, int(post.get("min_component_size") or 0))
    brain_img = sitk.GetImageFromArray(brain.astype(np.uint8))
    brain_img.CopyInformation(image)

    params_used = dataclasses.asdict(meth.params) if dataclasses.is_dataclass(meth.params) else dict(params or {})
    info = {
        "method": name,
        "preset": meth.preset,
        "params": params_used,
        "model": m.id,
        "device": str(dev),
        "seed": int(seed),
        "batch_size": batch_size,
        "slices": n,
        "nfe_per_slice": nfe_per_slice,
        "network_evaluations": total_nfe,
        "seconds": time.perf_counter() - t0,
        "threshold": thr,
        "threshold_source": source,
        "fpr": float(fpr if fpr is not None else _default_fpr()),
        "perceptual_backend": meth.perceptual_backend(),
        "warnings": notes,
        "postprocess": post,
        "image_size": stack.image_size,
        "preprocess": dict(stack.info),
    }
    return DetectionResult(restoration=restoration, anomaly=anomaly, mask=mask, info=info, brain_mask=brain_img)
