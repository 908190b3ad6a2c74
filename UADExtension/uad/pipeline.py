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
    mask: sitk.Image | None  # uint8, anomaly > threshold, input grid (None with detect(..., mask=False))
    info: dict = field(default_factory=dict)
    brain_mask: sitk.Image | None = None  # uint8 brain mask used, input grid


def _cuda_available() -> bool:  # a seam for tests of the fallback (machines without a GPU)
    import torch

    return torch.cuda.is_available()


def _probe(dev) -> None:
    """Run a few kernels on ``dev`` (a convolution and a reduction): raises when the build cannot."""
    import torch

    x = torch.ones(1, 1, 8, 8, device=dev)
    w = torch.ones(1, 1, 3, 3, device=dev)
    float(torch.nn.functional.conv2d(x, w, padding=1).sum().item())


class NoKernelImage(UADError):
    """The installed PyTorch build has no kernels for this GPU ("no kernel image is available")."""


def no_kernel_message(device: str, torch_version: str, cuda_version: str | None = None, gpu: str | None = None,
                      capability: str | None = None, arch_list=None) -> str:
    """The one message for a CUDA build that cannot run on the GPU (the engine and the Slicer module both
    use it): the GPU, its compute capability and the architectures the build supports."""
    what = f"the GPU {device}" + (f" ({gpu}" + (f", compute capability {capability}" if capability else "") + ")"
                                  if gpu else (f" (compute capability {capability})" if capability else ""))
    build = f"torch {torch_version}" + (f", CUDA {cuda_version}" if cuda_version else "")
    archs = " ".join(arch_list or []) or "unknown"
    return (f"this PyTorch build ({build}) has no kernels for {what}: it supports {archs}; "
            f"install a PyTorch build for this GPU, or use --device cpu")


def _no_kernel_error(dev) -> NoKernelImage:
    import torch

    gpu = capability = None
    archs: list = []
    try:
        gpu = torch.cuda.get_device_name(dev)
    except Exception:
        pass
    try:
        cap = torch.cuda.get_device_capability(dev)
        capability = f"{cap[0]}.{cap[1]}"
    except Exception:
        pass
    try:
        archs = list(torch.cuda.get_arch_list())
    except Exception:
        pass
    index = getattr(dev, "index", None)
    if index is None:
        try:
            index = torch.cuda.current_device()
        except Exception:
            index = 0
    return NoKernelImage(no_kernel_message(f"cuda:{index}", torch.__version__, getattr(torch.version, "cuda", None), gpu,
                                           capability, archs))


def is_no_kernel_image(text: str) -> bool:
    low = " ".join(str(text).split()).lower()
    return "no kernel image" in low or "not compatible with the current pytorch" in low or "not compatible" in low


def check_device_runs(dev, probe: Callable | None = None) -> None:
    """Raise ``UADError`` with a clear message when kernels cannot run on ``dev``; a CUDA build without
    kernels for this GPU ("no kernel image is available for execution on the device") raises
    ``NoKernelImage`` naming the GPU and the build's architectures (``torch.cuda.get_arch_list()``)."""
    try:
        (probe or _probe)(dev)
    except (RuntimeError, AssertionError) as e:
        text = " ".join(str(e).split())
        if is_no_kernel_image(text):
            raise _no_kernel_error(dev) from None
        raise UADError(f"device {dev} cannot run ({text[:200]})") from None


def _device_log(log: Callable[[str], None] | None) -> Callable[[str], None]:
    if log is not None:
        return log
    import logging

    return logging.getLogger("uad").warning


def resolve_device(device: str | None = "auto", probe: Callable | None = None,
                   log: Callable[[str], None] | None = None):
    """``"auto"`` -> cuda, else mps, else cpu; an explicit device must be available (``UADError`` otherwise).

    A CUDA device is first probed with a few kernels.  When the PyTorch build has no kernels for the GPU
    ("no kernel image"), with ``"auto"`` and with an explicit ``cuda`` / ``cuda:N`` alike, the message
    (the GPU, its compute capability, the architectures of the build) goes to ``log`` (default: the
    ``uad`` logger, which the CLI turns into a JSON warning for the Slicer module) and the CPU is used:
    the run still gives its result, and says where it ran.  Other failures of an explicit device raise.
    """
    import torch

    name = (str(device) if device is not None else "auto").strip().lower()
    if name == "auto":
        if _cuda_available():
            dev = torch.device("cuda")
            try:
                check_device_runs(dev, probe)
                return dev
            except UADError as e:
                _device_log(log)(f"warning: {e}; falling back to the CPU")
                return torch.device("cpu")
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
        if not _cuda_available():
            raise UADError(f"device {device!r} was requested but CUDA is not available "
                           f"(torch {torch.__version__}); use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UADError(f"device {device!r} was requested but only {torch.cuda.device_count()} "
                           f"CUDA device(s) exist")
        try:
            check_device_runs(dev, probe)
        except NoKernelImage as e:  # the GPU cannot be used by this build at all: say so, run on the CPU
            _device_log(log)(f"warning: {e}; --device {name} was requested: falling back to the CPU")
            return torch.device("cpu")
        return dev
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UADError(f"device {device!r} was requested but Apple MPS is not available; "
                           f"use --device cpu or auto")
        return dev
    raise UADError(f"unsupported device {device!r}; use auto, cpu, cuda, cuda:N or mps")


def describe_device(dev) -> str:
    """``cuda:0 (NVIDIA H200, 139.8 GiB)``, ``mps (Apple GPU)`` or ``cpu (4 threads)``."""
    import torch

    dev = torch.device(dev)
    if dev.type == "cuda":
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        return f"cuda:{idx} ({props.name}, {props.total_memory / 2**30:.1f} GiB)"
    if dev.type == "mps":
        return "mps (Apple GPU)"
    return f"cpu ({torch.get_num_threads()} thread{'s' if torch.get_num_threads() != 1 else ''})"


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a cgroup / taskset limit)."""
    import os

    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def configure_threads(threads: int | None = None, processes: int = 1) -> int:
    """Bound torch's intra-op threads to the cores given; returns the number set.

    ``threads`` (``--threads``): at most the available cores.  Default: the available cores
    (``os.sched_getaffinity``) divided among ``processes`` on this node, and at most
    ``$OMP_NUM_THREADS`` when that is set.
    """
    import os

    import torch

    cores = available_cores()
    if threads is not None:
        if int(threads) < 1:
            raise UADError(f"--threads must be >= 1, got {threads}")
        n = min(int(threads), cores)
    else:
        n = max(1, cores // max(1, int(processes)))
        omp = os.environ.get("OMP_NUM_THREADS", "")
        if omp.isdigit() and int(omp) > 0:
            n = min(n, int(omp))
    torch.set_num_threads(n)
    return n


def resolve_model(model, method: str, device, contrast: str | None = None):
    """A ``uad.zoo.Model`` (moved to ``device``) from a Model, a model id or None (the method's default:
    its model for ``contrast`` when one is given, else the first in the manifest)."""
    from .zoo import Model, ModelEntry, load_model

    if isinstance(model, Model):
        m = model.to(device)
    elif model is None or isinstance(model, (str, ModelEntry)):
        m = load_model(model, method=method, device=device, contrast=contrast)
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


_TYPE_NAMES = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
               "list": "a list", "tuple": "a list", "dict": "an object", "None": "none"}


def _fits(value, token: str) -> bool:
    import numbers

    if token == "None":
        return value is None
    if token == "bool":
        return isinstance(value, bool)
    if token == "int":
        return (isinstance(value, numbers.Integral) and not isinstance(value, bool)) or \
            (isinstance(value, float) and value.is_integer())
    if token == "float":
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if token == "str":
        return isinstance(value, str)
    if token in ("list", "tuple"):
        return isinstance(value, (list, tuple))
    if token == "dict":
        return isinstance(value, dict)
    return True


def check_params(method: str, params: dict | None) -> None:
    """Raise ``UADError`` naming the parameter and its expected type when a value has the wrong type
    (``--param level=abc``: "parameter level of anoddpm expects an integer, got 'abc'")."""
    import dataclasses

    cls = method_class(method)
    fields = {f.name: f for f in dataclasses.fields(cls.Params)} if cls.Params is not None else {}
    for k, v in (params or {}).items():
        f = fields.get(k)
        if f is None or v is None:
            continue  # unknown names are reported by the method itself
        ann = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        tokens = [t.strip() for t in str(ann).replace("Optional[", "").rstrip("]").split("|")]
        if not all(t in _TYPE_NAMES for t in tokens):
            continue  # e.g. callables: checked by the method
        if not any(_fits(v, t) for t in tokens):
            want = " or ".join(dict.fromkeys(_TYPE_NAMES[t] for t in tokens if t != "None"))
            raise UADError(f"parameter {k} of {method} expects {want}, got {v!r}")


def build(method: str, model, preset: str | None = None, params: dict | None = None):
    """The method object; a wrong method name, preset or parameter raises ``UADError`` (one line)."""
    from .methods import build_method

    cls = method_class(method)
    check_params(method, params)
    params = {**model_method_params(model, method, preset, cls, params), **dict(params or {})}
    try:
        return build_method(method, model, preset, **params)
    except (ValueError, TypeError) as e:
        raise UADError(" ".join(str(e).split())) from None


def model_method_params(model, method: str, preset: str | None = None, cls=None, given: dict | None = None) -> dict:
    """The model's own parameters for ``method`` (manifest ``method_params``, e.g. the noise level of an
    imported reference checkpoint), minus the keys the chosen preset sets.

    Precedence: method defaults < model parameters < preset < the caller's ``given`` parameters.  The
    model's parameters are one set: when the caller sets any of them (say THOR's ``level``), none of
    the model's apply (its ``harmonization`` steps may not fit the caller's level).
    """
    cfg = getattr(model, "config", None) or {}
    own = dict((cfg.get("method_params") or {}).get(method) or {})
    if not own or set(own) & set(given or {}):
        return {}
    cls = cls or method_class(method)
    preset_keys = set((cls.presets or {}).get(preset or cls.default_preset, {}) or {})
    return {k: v for k, v in own.items() if k not in preset_keys}


def model_threshold(model, method: str, preset: str | None) -> float | None:
    """The model's calibrated threshold for ``method`` / ``preset``.

    The manifest's ``threshold`` is either one number, or a dict keyed by method
    whose values are numbers or dicts keyed by preset.
    """
    from .calibration import legacy_threshold

    t = legacy_threshold(model.config, method, preset)
    if t is None:
        return None
    try:
        return float(t)
    except (TypeError, ValueError):
        raise ModelError(f"model {model.id}: invalid threshold {t!r} in its manifest") from None


def preprocessing_profile(model, override: dict | None = None) -> dict:
    """The model's ``preprocessing`` profile (validated, defaults filled), updated with ``override``."""
    from .preprocess import profile_settings

    prof = model.config.get("preprocessing")
    if prof is not None and not isinstance(prof, dict):
        raise ValueError(f"preprocessing must be a dict, got {type(prof).__name__}")
    merged = dict(prof or {})
    merged.update(override or {})
    return profile_settings(merged)


def check_threshold(value) -> float:
    """A usable anomaly threshold: a finite number >= 0 (NaN, inf or a negative value give an empty or a full
    mask without saying so); ``UADError`` otherwise."""
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise UADError(f"threshold must be a number, got {value!r}") from None
    if not np.isfinite(t) or t < 0:
        raise UADError(f"threshold must be a finite number >= 0 (anomaly scores are >= 0), got {value!r}")
    return t


def is_out_of_memory(err: BaseException) -> bool:
    """A device out-of-memory error (``torch.cuda.OutOfMemoryError`` or its RuntimeError forms)."""
    import torch

    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(err, oom):
        return True
    text = str(err).lower()
    return isinstance(err, (RuntimeError, MemoryError)) and (
        "out of memory" in text or "can't allocate memory" in text or isinstance(err, MemoryError))


def _free_device_memory(dev) -> None:
    import gc

    import torch

    gc.collect()
    if getattr(dev, "type", str(dev)) == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_batches(meth, stack, dev, seed: int, batch_size: int, rest: np.ndarray, anom: np.ndarray,
                forward: Callable | None = None, progress: Callable[[int, int], None] | None = None,
                check_cancel: Callable[[], None] | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Feed ``stack`` to ``meth`` in batches, filling ``rest`` / ``anom`` (N, S, S) in place.

    Out of memory: the batch is halved and the same slices are tried again; below one slice the
    error is a ``UADError``.  Returns the network evaluations, the batch size finally used and
    the number of retries.
    """
    import torch

    from .rng import BatchRNG

    forward = forward or (lambda m, x, mk, rng: m(x, mk, rng))
    n = len(stack)
    bs = int(batch_size)
    retries = 0
    nfe_per_slice = total_nfe = 0
    b0 = 0
    with torch.inference_mode():
        while b0 < n:
            if check_cancel is not None:
                check_cancel()
            b1 = min(n, b0 + bs)
            oom = None
            try:
                x = torch.from_numpy(stack.slices[b0:b1, None]).to(dev)
                mk = torch.from_numpy(stack.masks[b0:b1, None]).to(dev)
                rng = BatchRNG.for_slices(int(seed), stack.indices[b0:b1].tolist(), dev)
                out = forward(meth, x, mk, rng)
                r = out.restoration.detach().float().reshape(b1 - b0, *rest.shape[1:]).cpu().numpy()
                a = out.anomaly.detach().float().reshape(b1 - b0, *anom.shape[1:]).cpu().numpy()
            except Exception as e:  # noqa: BLE001 - only out-of-memory errors are handled here
                if not is_out_of_memory(e):
                    raise
                oom = " ".join(str(e).split())[:160]
            if oom is not None:  # outside the except block, so the failed batch's tensors can be freed
                x = mk = rng = None
                _free_device_memory(dev)
                if bs == 1:
                    raise UADError(f"the device {dev} ran out of memory even with one slice per batch; use "
                                   f"--device cpu or a smaller model") from None
                bs = max(1, bs // 2)
                retries += 1
                if log is not None:
                    log(f"warning: out of memory on {dev} with {b1 - b0} slices per batch; retrying with {bs}")
                continue
            rest[b0:b1] = r
            anom[b0:b1] = a
            nfe_per_slice = max(nfe_per_slice, int(out.nfe))
            total_nfe += int(out.nfe) * (b1 - b0)
            del out, x, mk
            if progress is not None:
                progress(b1, n)
            b0 = b1
    return {"nfe_per_slice": nfe_per_slice, "network_evaluations": total_nfe, "batch_size_used": bs,
            "oom_retries": retries}


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
        vals = sitk.GetArrayViewFromImage(anomaly)[brain]  # one copy, partially sorted in place
        thr = float(np.percentile(vals, pct, overwrite_input=True)) if vals.size else 0.0
        del vals
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
           cancel: Callable[[], bool] | None = None, skull_stripped="auto",
           bias_correction: bool | None = None, preprocessing: dict | None = None,
           contrast: str | None = None, forward: Callable | None = None,
           log: Callable[[str], None] | None = None, fpr: float | None = None,
           precision: str = "fp32", mask: bool = True) -> DetectionResult:
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
    the backend of the map).  ``mask=False``: no threshold is chosen and no binary mask computed
    (``result.mask`` is None, ``info["threshold"]`` None): for callers that only want the map, e.g.
    calibration and learning curves (``threshold=float("inf")``, the old way of saying it, is read
    the same).  The input image is not modified.

    Preprocessing follows the model's ``preprocessing`` profile (``uad.preprocess.DEFAULT_PROFILE``;
    ``preprocessing`` overrides keys of it).  ``skull_stripped``: "auto" (detected), True or False:
    whether the input is skull-stripped (if not, it is skull-stripped, see ``uad.skullstrip``, unless
    ``brain_mask`` is given).  ``bias_correction``: N4 on/off (None: the profile's; "auto" = on for
    inputs that are not skull-stripped).  ``contrast``: the scan's contrast (default: the model's),
    which chooses the skull stripper.

    When the device runs out of memory the batch is halved and retried (down to one slice;
    ``info["batch_size_used"]``, ``info["oom_retries"]``); results do not change, since every slice
    has its own random generator.  ``forward(method, x, mask, rng)`` replaces the method call (a seam
    for tests); ``log`` receives the retry messages.  ``precision``: fp32 (default), bf16 or fp16 --
    only the networks run under autocast (``uad.precision``), ``info["precision"]`` records it.
    """
    from .postprocess import apply_method_postprocess, threshold_mask, to_volumes
    from .preprocess import preprocess

    t0 = time.perf_counter()
    validate(image)
    want_mask = bool(mask)
    if threshold is not None and threshold == float("inf"):  # the old spelling of mask=False
        want_mask, threshold = False, None
    if threshold is not None:
        threshold = check_threshold(threshold)
    if brain_mask is not None:
        validate_mask(brain_mask, image)
    if int(batch_size) < 1:
        raise UADError(f"batch size must be >= 1, got {batch_size}")
    batch_size = int(batch_size)
    name = method_key(method)
    method_class(name)
    device_notes: list[str] = []

    def device_log(msg: str) -> None:
        device_notes.append(msg[len("warning: "):] if msg.startswith("warning: ") else msg)
        _device_log(log)(msg)

    dev = resolve_device(device, log=device_log)
    from .precision import normalise_precision, with_precision

    precision = normalise_precision(precision)
    m = with_precision(resolve_model(model, name, dev, contrast=contrast), precision)  # the caller's model is not wrapped
    meth = build(name, m, preset, params)

    def check_cancel():
        if cancel is not None and cancel():
            raise Cancelled("cancelled")

    check_cancel()
    try:
        profile = preprocessing_profile(m, preprocessing)
    except ValueError as e:  # the model's preprocessing profile
        raise ModelError(f"model {m.id}: {' '.join(str(e).split())}") from None
    try:
        stack = preprocess(image, m.image_size, brain_mask=brain_mask, normalisation=m.normalisation,
                           profile=profile, skull_stripped=skull_stripped, bias_correction=bias_correction,
                           contrast=contrast or m.config.get("contrast"), device=dev)
    except ValueError as e:  # the model's image_size / normalisation settings
        raise ModelError(f"model {m.id}: {' '.join(str(e).split())}") from None
    n = len(stack)
    rest = np.zeros_like(stack.slices)
    anom = np.zeros_like(stack.slices)
    run = run_batches(meth, stack, dev, int(seed), batch_size, rest, anom, forward=forward, progress=progress,
                      check_cancel=check_cancel, log=log)
    nfe_per_slice, total_nfe = run["nfe_per_slice"], run["network_evaluations"]
    check_cancel()

    post = dict(getattr(meth, "postprocess", {}) or {})
    if post:
        anom = apply_method_postprocess(anom, stack.masks, post)
    anom = np.where(stack.masks, np.maximum(anom, 0.0), 0.0).astype(np.float32)
    restoration, anomaly = to_volumes(stack, rest, anom)
    brain = stack.brain_mask_array()

    if want_mask:
        thr, source, notes = select_threshold(m, name, meth, threshold, fpr, anomaly, brain)
        mask_img = threshold_mask(anomaly, thr, int(post.get("min_component_size") or 0))
    else:
        thr, source, notes, mask_img = None, "none: no mask computed (mask=False)", [], None
    brain_img = stack.brain_mask_image()

    params_used = dataclasses.asdict(meth.params) if dataclasses.is_dataclass(meth.params) else dict(params or {})
    info = {
        "method": name,
        "preset": meth.preset,
        "params": params_used,
        "model": m.id,
        "device": str(dev),
        "seed": int(seed),
        "precision": precision,
        "batch_size": batch_size,
        "batch_size_used": run["batch_size_used"],
        "oom_retries": run["oom_retries"],
        "slices": n,
        "nfe_per_slice": nfe_per_slice,
        "network_evaluations": total_nfe,
        "seconds": time.perf_counter() - t0,
        "threshold": thr,
        "threshold_source": source,
        "fpr": float(fpr if fpr is not None else _default_fpr()),
        "perceptual_backend": meth.perceptual_backend(),
        "warnings": device_notes + notes,
        "postprocess": post,
        "image_size": stack.image_size,
        "preprocess": dict(stack.info),
    }
    return DetectionResult(restoration=restoration, anomaly=anomaly, mask=mask_img, info=info, brain_mask=brain_img)
