"""Noise sources for the diffusion methods.

``make_noise(kind, rng, shape, **options)`` draws one independent field per
batch item from that item's generator (see ``uad.rng.BatchRNG``).  ``options``
go to the noise function (simplex: ``normalise``, ``frequency``; ignored by
Gaussian noise); a model's options are ``uad.zoo.Model.noise_options``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .rng import BatchRNG

NoiseFn = Callable[[BatchRNG, Sequence[int]], torch.Tensor]
_REGISTRY: dict[str, NoiseFn] = {}


def register_noise(name: str):
    def deco(fn: NoiseFn) -> NoiseFn:
        _REGISTRY[name] = fn
        return fn

    return deco


@register_noise("gaussian")
def gaussian(rng: BatchRNG, shape: Sequence[int], **_options) -> torch.Tensor:
    """Standard normal noise, shape (B, *shape) (simplex options are ignored)."""
    return rng.randn(shape)


def noise_kinds() -> list[str]:
    _load_optional()
    return sorted(_REGISTRY)


def make_noise(kind: str, rng: BatchRNG, shape: Sequence[int], **options) -> torch.Tensor:
    """Draw noise of ``kind`` with shape (B, *shape), one independent field per item."""
    _load_optional()
    if kind not in _REGISTRY:
        raise ValueError(f"unknown noise kind {kind!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[kind](rng, shape, **{k: v for k, v in options.items() if v is not None})


#: ``noise_options`` written into new model configs: simplex amplitude and frequency as the reference.
REFERENCE_OPTIONS = {"normalise": "none", "frequency": "scaled"}


def options_for(config: dict, kind: str | None = None) -> dict:
    """The noise options to use with a model config (and a noise ``kind``, default the model's).

    The model's own ``noise_options`` when ``kind`` is its training noise; model
    configs without the key predate the simplex fix and were trained with
    unit-std fields at a fixed 64-px feature size (``uad.simplex.LEGACY_OPTIONS``).
    Another kind than the model's gets the reference defaults.
    """
    own = config.get("noise", "gaussian")
    if kind is not None and kind != own:
        return dict(REFERENCE_OPTIONS)
    if "noise_options" in config:
        return dict(config.get("noise_options") or {})
    if str(own).startswith("simplex"):
        return {"normalise": "unit", "frequency": 64.0}
    return {}


def _load_optional() -> None:
    # Simplex noise lives in its own module and registers itself on import.
    import importlib
    import importlib.util

    if importlib.util.find_spec(__package__ + ".simplex") is not None:
        importlib.import_module(__package__ + ".simplex")
