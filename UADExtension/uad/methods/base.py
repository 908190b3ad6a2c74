"""The one interface every anomaly-detection method implements.

A method is built from a ``Model`` (its networks and their config) and its
hyper-parameters, and maps a batch of slices in [0, 1] with their brain mask
and a per-slice random generator to a restoration, an anomaly map and the
number of network evaluations it spent.  Methods never read files, choose
devices or know about Slicer; the pipeline never knows which method runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..rng import BatchRNG
from ..zoo import Model


@dataclass
class MethodOutput:
    restoration: torch.Tensor  # (B, 1, H, W), intensities in [0, 1]
    anomaly: torch.Tensor  # (B, 1, H, W), >= 0, higher = more anomalous
    nfe: int  # network evaluations spent per image (UNet / classifier forward passes)
    extras: dict[str, Any] = field(default_factory=dict)


class Method:
    """Base class.  Subclasses set the class attributes and implement ``run``."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    roles: ClassVar[tuple[str, ...]] = ("denoiser",)  # networks the model must provide
    Params: ClassVar[type] = None  # a dataclass whose defaults are the paper's
    presets: ClassVar[dict[str, dict]] = {"paper": {}}
    default_preset: ClassVar[str] = "paper"
    # Volume-level post-processing the method's paper applies to the anomaly map, applied by the
    # pipeline after the slices are stacked (keys: erode_mask_iterations, median_size, min_component_size).
    postprocess: ClassVar[dict] = {}
    # True for weakly supervised methods (Wolleb et al.) whose training needs image-level labels.
    needs_labels: ClassVar[bool] = False

    def __init__(self, model: Model, preset: str | None = None, **overrides):
        self.model = model
        for role in self.roles:
            model.net(role)  # raises a clear ModelError when missing
        self.preset = preset or self.default_preset
        if self.preset not in self.presets:
            raise ValueError(f"method {self.name}: unknown preset {self.preset!r} "
                             f"(available: {', '.join(self.presets)})")
        values = dict(self.presets[self.preset])
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self.Params)}
        if unknown:
            raise ValueError(f"method {self.name}: unknown parameter(s) {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(f.name for f in dataclasses.fields(self.Params))}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        self.params = self.Params(**values)
        self.validate()
        ignored = {k: why for k, why in self.ignored_parameters().items() if overrides.get(k) is not None}
        if ignored:
            k, why = next(iter(ignored.items()))
            raise ValueError(f"method {self.name}: parameter {k} has no effect with preset {self.preset!r} and "
                             f"these settings ({why}); leave it out")

    # -- hooks --------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError for inconsistent parameters."""

    def ignored_parameters(self) -> dict[str, str]:
        """Parameters that have no effect with the current settings -> why (setting one is an error)."""
        return {}

    def run(self, x: torch.Tensor, mask: torch.Tensor, rng: BatchRNG) -> MethodOutput:
        raise NotImplementedError

    @classmethod
    def training_loss(cls, model: Model, x: torch.Tensor, mask: torch.Tensor, rng: BatchRNG,
                      labels: torch.Tensor | None = None) -> torch.Tensor:
        """The training objective of this method's networks on a batch of [0, 1] slices.

        ``labels`` (B,) are image-level labels (0 healthy, 1 anomalous) for the
        weakly supervised methods; the unsupervised ones ignore them.
        """
        raise NotImplementedError(f"{cls.name} defines no training objective")

    @classmethod
    def default_model_config(cls, image_size: int = 64, small: bool = True) -> dict:
        """A model config (networks, schedule, noise, range) suited to this method."""
        raise NotImplementedError(f"{cls.name} defines no default model config")

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, mask: torch.Tensor, rng: BatchRNG) -> MethodOutput:
        return self.run(x, mask, rng)

    # -- helpers shared by the methods -------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.net(self.roles[0]).parameters()).device

    def to_model(self, x01: torch.Tensor) -> torch.Tensor:
        lo, hi = self.model.intensity_range
        return x01 * (hi - lo) + lo

    def from_model(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.model.intensity_range
        return ((x - lo) / (hi - lo)).clamp(0, 1)

    @classmethod
    def describe(cls) -> dict:
        defaults = {f.name: f.default for f in dataclasses.fields(cls.Params)}
        return {"name": cls.name, "title": cls.title, "reference": cls.reference, "roles": list(cls.roles),
                "parameters": defaults, "presets": cls.presets, "default_preset": cls.default_preset}
