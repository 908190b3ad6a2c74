"""Noise sources for the diffusion methods.

``make_noise(kind, rng, shape)`` draws one independent field per batch item
from that item's generator (see ``uad.rng.BatchRNG``).
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
def gaussian(rng: BatchRNG, shape: Sequence[int]) -> torch.Tensor:
    """Standard normal noise, shape (B, *shape)."""
    return rng.randn(shape)


def noise_kinds() -> list[str]:
    _load_optional()
    return sorted(_REGISTRY)


def make_noise(kind: str, rng: BatchRNG, shape: Sequence[int]) -> torch.Tensor:
    """Draw noise of ``kind`` with shape (B, *shape), one independent field per item."""
    _load_optional()
    if kind not in _REGISTRY:
        raise ValueError(f"unknown noise kind {kind!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[kind](rng, shape)


def _load_optional() -> None:
    # Simplex noise lives in its own module and registers itself on import.
    import importlib
    import importlib.util

    if importlib.util.find_spec(__package__ + ".simplex") is not None:
        importlib.import_module(__package__ + ".simplex")
