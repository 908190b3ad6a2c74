"""Reduced-precision inference: only the networks run under autocast (bf16 / fp16), everything else float32.

    model = autocast_model(load_model("disyre-t2-phantom"), "bf16")   # or detect(..., precision="bf16")

``AutocastNetwork`` wraps one network: its forward runs under ``torch.autocast`` and
returns float32, so the samplers, the noise, the perceptual maps and the morphology
around it stay float32.  ``fp32`` (alias ``float32``) leaves a model unchanged.
fp16 on the CPU is used only when this torch build can run it (``cpu_fp16_supported``:
a convolution under CPU autocast must come out float16); otherwise it is refused
with one clear message.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch

from . import UADError

#: precision name -> autocast dtype (None: float32, no autocast)
PRECISIONS = {"fp32": None, "float32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: the names offered by the command line (``float32`` is accepted as an alias of ``fp32``)
PRECISION_CHOICES = ("fp32", "bf16", "fp16")


def normalise_precision(precision: str | None) -> str:
    """``fp32`` | ``bf16`` | ``fp16`` (``None`` / ``float32`` -> ``fp32``); an unknown name is a ``UADError``."""
    p = "fp32" if precision is None else str(precision).lower()
    if p not in PRECISIONS:
        raise UADError(f"unknown precision {precision!r}; use {', '.join(PRECISION_CHOICES)}")
    return "fp32" if p == "float32" else p


@functools.lru_cache(maxsize=None)
def cpu_fp16_supported() -> bool:
    """Whether this torch runs float16 autocast on the CPU (older builds warn and fall back to float32)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with torch.autocast(device_type="cpu", dtype=torch.float16):
                y = torch.nn.functional.conv2d(torch.ones(1, 1, 4, 4), torch.ones(1, 1, 3, 3))
        return y.dtype == torch.float16
    except Exception:  # noqa: BLE001 - any failure means: not supported here
        return False


def precision_dtype(device, precision: str | None):
    """The autocast dtype of ``precision`` on ``device`` (None for fp32); refuses what the device cannot run."""
    p = normalise_precision(precision)
    dtype = PRECISIONS[p]
    dev = torch.device(device)
    if dtype is torch.float16 and dev.type == "cpu" and not cpu_fp16_supported():
        raise UADError(f"fp16 autocast is not supported on the CPU by this torch ({torch.__version__}); "
                       f"use --precision bf16 on the CPU, or fp16 on a GPU")
    return dtype


def autocast(device, precision: str | None = "fp32"):
    """An autocast context for ``precision`` (bf16 / fp16) on ``device``, or a no-op for fp32."""
    dtype = precision_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


class AutocastNetwork(torch.nn.Module):
    """Runs the wrapped network under autocast and returns float32: only the network runs in reduced
    precision, the samplers, noise, perceptual maps and morphology around it stay float32."""

    def __init__(self, net: torch.nn.Module, device_type: str, dtype):
        super().__init__()
        self.net = net
        self.device_type = device_type
        self.dtype = dtype

    def forward(self, *args, **kwargs):
        with torch.autocast(device_type=self.device_type, dtype=self.dtype):
            out = self.net(*args, **kwargs)
        return out.float()


def autocast_model(model, precision: str | None = "fp32"):
    """Wrap every network of a loaded ``uad.zoo.Model`` in ``AutocastNetwork`` (in place; fp32: unchanged).

        model = autocast_model(load_model("disyre-t2-phantom", device="cuda"), "bf16")
        detect(image, method="disyre", model=model, device="cuda")
    """
    p = normalise_precision(precision)
    if PRECISIONS[p] is None:
        return model
    for role, net in list(model.networks.items()):
        if isinstance(net, AutocastNetwork):
            net = net.net
        dev = next(net.parameters()).device
        model.networks[role] = AutocastNetwork(net, dev.type, precision_dtype(dev, p))
    return model


def copy_model(model):
    """A shallow copy of a ``uad.zoo.Model`` (same network objects, its own networks dict), so that
    wrapping the copy's networks leaves the caller's model as it was."""
    from .zoo import Model

    return Model(model.id, model.config, dict(model.networks))


def with_precision(model, precision: str | None):
    """``model`` itself for fp32, else an autocast copy of it (the given model is not modified)."""
    p = normalise_precision(precision)
    return model if PRECISIONS[p] is None else autocast_model(copy_model(model), p)
