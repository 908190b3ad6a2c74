"""Devices, threads and memory: what the module tells the user about the machine and how it copes.

- ``default_thread_count()`` / ``bounded_torch_threads()``: torch never takes every core of
  Slicer's process (one core is left to the GUI).
- ``detect_halving_batch_on_oom()``: out of GPU memory halves the batch and retries.
- ``classify_failure(text)``: "out of memory", "no kernel image" (a GPU too new or too old for
  the installed torch build: offer the CPU), or None.
- ``no_kernel_message(info)``: the engine's one message for such a build (GPU, compute capability,
  the build's architectures); the engine itself falls back to the CPU with it as a warning.
- ``device_info()`` (run it in a separate process with ``probe_command()``, so that Slicer's
  process never imports torch just to show it): torch and CUDA versions, GPU names and memory,
  and whether MPS is present *and* passes a tiny convolution.

No Qt, no torch at import.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys

OOM_MARKERS = ("out of memory", "outofmemoryerror", "cuda error: out of memory", "cublas_status_alloc_failed")
NO_KERNEL_MARKERS = ("no kernel image is available", "is not compatible with the current pytorch installation",
                     "cudaerrornokernelimagefordevice")


def default_thread_count(cpu_count: int | None = None) -> int:
    """CPU threads for torch: all cores but one (at least one)."""
    n = cpu_count if cpu_count is not None else (os.cpu_count() or 2)
    return max(1, int(n) - 1)


@contextlib.contextmanager
def bounded_torch_threads(threads: int | None = None):
    """Limit torch's intra-op threads for the duration of the block (restored afterwards)."""
    import torch

    previous = torch.get_num_threads()
    wanted = default_thread_count() if threads is None else max(1, int(threads))
    if wanted < previous:
        torch.set_num_threads(wanted)
    try:
        yield min(wanted, previous)
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


@contextlib.contextmanager
def collect_engine_warnings(logger_name: str = "uad"):
    """Collect the messages of warnings the engine logs (e.g. the SSIM fallback) during the block."""
    messages: list[str] = []

    class Handler(logging.Handler):
        def emit(self, record):
            messages.append(" ".join(record.getMessage().split()))

    handler = Handler(level=logging.WARNING)
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def classify_failure(text) -> str | None:
    """'oom', 'no_kernel_image' or None for an error message / log text."""
    low = str(text).lower()
    if any(m in low for m in NO_KERNEL_MARKERS):
        return "no_kernel_image"
    if any(m in low for m in OOM_MARKERS):
        return "oom"
    return None


def _release_gpu_memory() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # nothing to release
        pass


def detect_halving_batch_on_oom(detect, image, batch_size: int = 16, log=logging.warning, **kwargs):
    """``(detect(image, batch_size=b, **kwargs), b)``: on out-of-memory, retry with b // 2 down to 1.

    The run is deterministic per slice (``uad.rng.BatchRNG``), so a smaller batch
    gives the same result.  GPU memory is released after every attempt.
    """
    b = max(1, int(batch_size))
    while True:
        try:
            return detect(image, batch_size=b, **kwargs), b
        except (RuntimeError, MemoryError) as e:
            if classify_failure(e) != "oom" or b <= 1:
                raise
            _release_gpu_memory()
            new = max(1, b // 2)
            log(f"UAD: out of memory with {b} slices per batch; retrying with {new}")
            b = new
        finally:
            _release_gpu_memory()


def device_info(probe_mps: bool = True) -> dict:
    """What torch sees: versions, CUDA GPUs (name, memory, compute capability), MPS (probed)."""
    info: dict = {"python": sys.version.split()[0]}
    try:
        import torch
    except Exception as e:  # torch missing or broken
        info["torch"] = None
        info["error"] = f"{type(e).__name__}: {e}"
        return info
    info["torch"] = torch.__version__
    info["cuda_build"] = getattr(torch.version, "cuda", None)
    info["threads"] = torch.get_num_threads()
    gpus = []
    try:
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                gpus.append({"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2 ** 30, 2),
                             "capability": f"{p.major}.{p.minor}"})
            info["arch_list"] = list(torch.cuda.get_arch_list())
    except Exception as e:
        info["cuda_error"] = f"{type(e).__name__}: {e}"
    info["gpus"] = gpus
    mps = getattr(torch.backends, "mps", None)
    info["mps_available"] = bool(mps is not None and mps.is_available())
    info["mps_works"] = False
    if info["mps_available"] and probe_mps:
        try:  # some operators are missing on MPS: a tiny convolution shows whether it is usable at all
            x = torch.ones(1, 1, 8, 8, device="mps")
            w = torch.ones(1, 1, 3, 3, device="mps")
            y = torch.nn.functional.conv2d(x, w, padding=1)
            info["mps_works"] = bool(abs(float(y.sum().cpu()) - float(torch.nn.functional.conv2d(
                torch.ones(1, 1, 8, 8), torch.ones(1, 1, 3, 3), padding=1).sum())) < 1e-3)
        except Exception as e:
            info["mps_error"] = f"{type(e).__name__}: {e}"
    return info


def describe(info: dict) -> str:
    """One paragraph for the GUI from ``device_info()``."""
    if not info.get("torch"):
        return f"PyTorch is not installed ({info.get('error', 'not importable')})."
    parts = [f"PyTorch {info['torch']}" + (f" (CUDA {info['cuda_build']})" if info.get("cuda_build") else " (CPU build)")]
    for g in info.get("gpus") or []:
        parts.append(f"GPU {g['index']}: {g['name']}, {g['memory_gib']:.1f} GiB, compute capability {g['capability']}")
    if not info.get("gpus"):
        parts.append("no CUDA GPU" + (f" ({info['cuda_error']})" if info.get("cuda_error") else ""))
    if info.get("mps_available"):
        parts.append("Apple MPS: " + ("works" if info.get("mps_works") else
                                      "present but failed a test convolution; the CPU is used"))
    parts.append(f"{info.get('threads', '?')} CPU threads")
    return "; ".join(parts) + "."


def no_kernel_message(info: dict, device: str = "cuda:0") -> str:
    """The engine's message for a PyTorch build without kernels for the GPU (``uad.pipeline.no_kernel_message``),
    from ``device_info()``: the GPU, its compute capability and the build's architectures."""
    from uad.pipeline import no_kernel_message as engine_message

    index = int(str(device).split(":")[1]) if ":" in str(device) else 0
    gpu = next((g for g in info.get("gpus") or [] if g.get("index") == index), None)
    return engine_message(f"cuda:{index}", str(info.get("torch") or "?"), info.get("cuda_build"),
                          gpu.get("name") if gpu else None, gpu.get("capability") if gpu else None,
                          info.get("arch_list") or [])


def probe_command(python: str | None = None) -> list[str]:
    """Command line printing ``device_info()`` as one JSON line (run it in a separate process)."""
    return [python or sys.executable, "-c",
            "import json; from UADExtensionLib.devices import device_info; print(json.dumps(device_info()))"]


def parse_probe_output(stdout: str) -> dict:
    for line in reversed(str(stdout).strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("the device probe printed no JSON")
