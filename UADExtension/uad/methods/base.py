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

#: A method's default preset is its paper preset unless that costs more network evaluations per
#: slice than this (issue 7, point 6); then the closest cheaper preset (see ``Method.default_preset_for``).
MAX_DEFAULT_NFE = 60


class _DefaultPreset:
    """``Method.default_preset``: computed from the presets' network evaluations, not declared.

    On the class it uses the method's nominal model (its ``default_model_config``
    at 64 px); on an instance, the instance's model.
    """

    def __get__(self, obj, cls):
        return cls.default_preset_for(obj.model if obj is not None else None)


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
    # raised when a change of the method changes its maps: calibrations of older versions are stale
    calibration_version: ClassVar[int] = 1
    default_preset = _DefaultPreset()  # the NFE rule below (a str on the class and on instances)
    # the cheaper preset that the paired held-out comparison (``uad benchmark --compare-presets``,
    # docs/benchmark/presets) showed to keep at least 90 % of the paper preset's AP: the default when the paper
    # preset costs more than MAX_DEFAULT_NFE and this one fits (issue 7, point 6)
    measured_default: ClassVar[str | None] = None
    # Volume-level post-processing the method's paper applies to the anomaly map, applied by the
    # pipeline after the slices are stacked (keys: erode_mask_iterations, median_size, min_component_size).
    postprocess: ClassVar[dict] = {}
    # True for weakly supervised methods (Wolleb et al.) whose training needs image-level labels.
    needs_labels: ClassVar[bool] = False

    def __init__(self, model: Model, preset: str | None = None, **overrides):
        self.model = model
        for role in self.roles:
            model.net(role)  # raises a clear ModelError when missing
        self.preset = preset or type(self).default_preset_for(model)
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

    # -- cost and the default preset -----------------------------------------
    def nfe_per_slice(self) -> int:
        """Network evaluations per slice of the model's resolution, computed from the parameters
        (an upper bound where a run may skip work, e.g. AutoDDPM's stage 2 without a mask)."""
        raise NotImplementedError(f"{self.name} does not compute its NFE")

    @classmethod
    def nominal_model(cls) -> Model:
        """A weightless stand-in of the method's default model (64 px) to cost the presets."""
        cfg = cls.default_model_config(image_size=64, small=True)
        return Model(f"nominal-{cls.name}", cfg, {role: None for role in cls.roles})

    @classmethod
    def preset_values(cls, preset: str, params: dict | None = None) -> dict:
        """What a preset (with ``params`` on top) sets, JSON-comparable.  Measurements record it, so that one
        made under another definition of a preset (the preset changed since) is recognised as such."""
        import json

        values = dict(cls.presets.get(preset, {}))
        values.update(params or {})
        return json.loads(json.dumps(values, sort_keys=True, default=str))

    @classmethod
    def preset_costs(cls, model: Model | None = None) -> dict[str, int]:
        """{preset: network evaluations per slice} on ``model`` (default: the nominal model)."""
        import warnings

        model = model if model is not None else cls.nominal_model()
        with warnings.catch_warnings():  # e.g. "uncalibrated" notes: only costs are wanted here
            warnings.simplefilter("ignore")
            return {name: int(cls(model, preset=name).nfe_per_slice()) for name in cls.presets}

    @classmethod
    def default_preset_for(cls, model: Model | None = None) -> str:
        """The rule: ``paper`` if it costs at most ``MAX_DEFAULT_NFE`` evaluations per slice; else
        ``measured_default`` when it fits that budget; else the most expensive preset within it (the closest
        to the paper); else the cheapest."""
        if model is None and "_nominal_default" in cls.__dict__:
            return cls.__dict__["_nominal_default"]
        try:
            costs = cls.preset_costs(model)
        except NotImplementedError:
            return "paper" if "paper" in cls.presets else next(iter(cls.presets))
        if costs.get("paper", MAX_DEFAULT_NFE + 1) <= MAX_DEFAULT_NFE:
            choice = "paper"
        else:
            within = {k: v for k, v in costs.items() if v <= MAX_DEFAULT_NFE}
            if cls.measured_default in within:
                choice = cls.measured_default
            elif within:
                choice = max(within, key=lambda k: (within[k], k == "fast"))
            else:
                choice = min(costs, key=lambda k: costs[k])
        if model is None:
            cls._nominal_default = choice  # the nominal model never changes: cache per class
        return choice

    def perceptual_backend(self) -> str:
        """The perceptual backend the anomaly map depends on ("none" for methods without one)."""
        return "none"

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
        """Network space -> [0, 1], also for models whose slices span [0, clip_max > 1] (FLAIR): a pseudo-healthy
        restoration tops out at the brain's upper normalisation percentile (1); measured for DISYRE FLAIR in
        Testing/test_disyre.py::test_restoration_tops_out_at_the_upper_percentile."""
        lo, hi = self.model.intensity_range
        return ((x - lo) / (hi - lo)).clamp(0, 1)

    @classmethod
    def describe(cls) -> dict:
        defaults = {f.name: f.default for f in dataclasses.fields(cls.Params)}
        return {"name": cls.name, "title": cls.title, "reference": cls.reference, "roles": list(cls.roles),
                "parameters": defaults, "presets": cls.presets, "default_preset": cls.default_preset,
                "preset_nfe": cls.preset_costs()}
