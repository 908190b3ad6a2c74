"""DISYRE (Naval Marimont et al., ISBI 2024; v2 MICCAI 2024): diffusion-inspired synthetic restoration.

The "diffusion" is a synthetic-anomaly corruption process (``uad.corruption``),
not Gaussian noise: the network P(x_t, t) is trained to restore a slice
corrupted with severity alpha_t (label t) to its healthy version (x0
prediction, MSE).  At test time the slice itself is treated as "corrupted" and
the restoration residuals over a few labels are accumulated.

Timestep convention (see ``uad.corruption``): t grows with the corruption
severity, alpha(t) = sqrt(alpha_bar_{T-1-t}), t = 0 is the identity end; the
same table labels the training corruptions and drives inference.

Modes
-----
``mean-single-step`` (the reference evaluation default): for each label t,
x0_t = P(x, t) on the *unchanged* input, AS = mean_t |x - x0_t|.  The labels
are the reference's trailing timesteps [99, 74, 49, 24] mapped to this
convention (same alpha): [75, 50, 25, 0], i.e. alpha ~ 0.73, 0.27, 0.051,
0.0045.  The restoration is x0 at the strongest of these labels (the last
network call of the reference loop, the most "healed" prediction);
``restoration="mean"`` averages the x0 predictions instead.

``multi-step`` (the v2 code's multi-step restoration, cold-diffusion update):
start at the strongest label and walk down the trailing grid [99, 74, 49, 24]
(alpha ~ 0.9995, 0.71, 0.26, 0.047); at each label x0 = P(x_t, t),
AS += |x_t - x0|, then x_t <- x0 + (a_next / a_t)(x_t - x0), clamped to
[0, 1] (the reference's ``x - [x0 (1-a) + a xT] + [x0 (1-a') + a' xT]`` with
xT = (x - x0 (1-a)) / a, simplified); the last x0 is the restoration.

``isbi`` (Algorithm 1 of the ISBI paper as written): the same walk t = T,
T - step_size, ... over the ISBI schedule alpha_t = 1 - sqrt(alpha_bar_t)
([99, 74, 49, 24] -> alpha ~ 0.9955, 0.95, 0.73, 0.27), and the plain
interpolation of Eq. 1 with m = 1 as the update:
x_t <- (1 - alpha_next) x0 + alpha_next x_t.  A model trained with the v2
schedule (the default) gets a note in the output's extras that its labels
mean other severities; train with ``schedule.variant = "isbi"`` for the
true ISBI variant.
AS is divided by the number of labels in all modes.

Then AS is multiplied by the brain fraction of the window (weight_foreground)
and zeroed outside the brain mask.  Slices larger than the model's training
patch (config ``patch_size``, default ``image_size``) are processed with a
sliding window: patch-sized windows, stride patch/4, zero padding so that the
windows tile, folded with a Gaussian importance map (sigma = patch/8, floor
1e-3); every window runs the whole pipeline, as in the reference.

Presets
-------
``paper``: mean-single-step, 4 labels [75, 50, 25, 0] (reference evaluation).
``isbi``: the ISBI paper's Algorithm 1, 4 labels [99, 74, 49, 24] (step_size 25).
``multi-step``: the v2 code's multi-step restoration on the same labels.
``fast``: mean-single-step with the 2 strongest paper labels [75, 50]
(alpha 0.73, 0.27): the mildest labels barely change the input and add little.
NFE = labels x windows per slice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..corruption import CorruptionSchedule, corrupt
from ..networks import call_unet
from ..rng import BatchRNG
from .base import Method, MethodOutput

MODES = ("mean-single-step", "multi-step", "isbi")


@dataclass
class DISYREParams:
    steps: int = 4  # number of labels N (ignored when ``labels`` is given)
    mode: str = "mean-single-step"  # mean-single-step | multi-step (v2 code, cold diffusion) | isbi (Algorithm 1)
    labels: tuple | None = None  # explicit label timesteps (this package's convention)
    weight_foreground: bool = True  # multiply the window's score by its brain fraction
    restoration: str = "strongest"  # mean-single-step restoration: strongest | mean
    sw_batch_size: int = 64  # windows per network call in the sliding window


def importance_map(patch: int, sigma_scale: float = 0.125, floor: float = 1e-3,
                   device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Gaussian importance weights (patch, patch), max 1, floored at ``floor``."""
    sigma = max(sigma_scale * patch, 1e-6)
    c = (patch - 1) / 2.0
    i = torch.arange(patch, dtype=torch.float64)
    g = torch.exp(-0.5 * ((i - c) / sigma) ** 2)
    w = g[:, None] * g[None, :]
    w = (w / w.max()).clamp_min(floor)
    return w.to(device=device, dtype=dtype)


def window_starts(size: int, patch: int, stride: int) -> tuple[list[int], int]:
    """Window origins along one axis of a zero-padded image, and the padded size."""
    if size <= patch:
        return [0], patch
    n = int(math.ceil((size - patch) / stride)) + 1
    padded = (n - 1) * stride + patch
    return [i * stride for i in range(n)], padded


def sliding_window(fn, x: torch.Tensor, mask: torch.Tensor, patch: int, overlap: float = 0.25,
                   sigma_scale: float = 0.125, sw_batch_size: int = 64):
    """Run ``fn(xw, mw) -> (score, restoration)`` on patch-sized windows and fold the results.

    Windows: size ``patch``, stride ``int(overlap * patch)``, the image zero-padded
    (centred) so that they tile; outputs are averaged with Gaussian importance
    weights.  Returns (score, restoration, number of windows per image).
    """
    B, C, H, W = x.shape
    stride = max(int(overlap * patch), 1)
    ys, Hp = window_starts(H, patch, stride)
    xs, Wp = window_starts(W, patch, stride)
    ph, pw = Hp - H, Wp - W
    pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
    xp = torch.nn.functional.pad(x, pad)
    mp = torch.nn.functional.pad(mask.to(x.dtype), pad)
    origins = [(y, xx) for y in ys for xx in xs]
    wmap = importance_map(patch, sigma_scale, device=x.device, dtype=x.dtype)
    score = torch.zeros(B, C, Hp, Wp, device=x.device, dtype=x.dtype)
    rest = torch.zeros_like(score)
    norm = torch.zeros(1, 1, Hp, Wp, device=x.device, dtype=x.dtype)
    for y, xx in origins:
        norm[..., y:y + patch, xx:xx + patch] += wmap
    # all windows of all items, in chunks
    items = [(b, y, xx) for b in range(B) for (y, xx) in origins]
    for s in range(0, len(items), max(int(sw_batch_size), 1)):
        chunk = items[s:s + max(int(sw_batch_size), 1)]
        xw = torch.stack([xp[b, :, y:y + patch, xx:xx + patch] for b, y, xx in chunk])
        mw = torch.stack([mp[b, :, y:y + patch, xx:xx + patch] for b, y, xx in chunk])
        sc, rc = fn(xw, mw)
        for j, (b, y, xx) in enumerate(chunk):
            score[b, :, y:y + patch, xx:xx + patch] += sc[j] * wmap
            rest[b, :, y:y + patch, xx:xx + patch] += rc[j] * wmap
    score = score / norm
    rest = rest / norm
    crop = (slice(None), slice(None), slice(pad[2], pad[2] + H), slice(pad[0], pad[0] + W))
    return score[crop], rest[crop], len(origins)


def intensity_top(model) -> float:
    """The top of the model's training slices' intensity range in [0, 1] units: its normalisation's ``clip_max``
    (1 by default; 2 for the FLAIR models, which keep hyperintensities), infinite without clipping."""
    from ..preprocess import normalisation_settings

    s = normalisation_settings(model.normalisation)
    return float(s["clip_max"]) if s["clip"] else math.inf


class DISYRE(Method):
    name = "disyre"
    title = "DISYRE: diffusion-inspired synthetic restoration"
    reference = "Naval Marimont et al., DISYRE, ISBI 2024 (v2: MICCAI 2024)"
    roles = ("denoiser",)
    Params = DISYREParams
    presets = {
        "paper": {},
        "isbi": {"mode": "isbi"},
        "multi-step": {"mode": "multi-step"},
        "fast": {"labels": (75, 50)},
    }

    def validate(self) -> None:
        p = self.params
        if p.mode not in MODES:
            raise ValueError(f"disyre: mode must be one of {', '.join(MODES)}, got {p.mode!r}")
        if p.restoration not in ("strongest", "mean"):
            raise ValueError(f"disyre: restoration must be 'strongest' or 'mean', got {p.restoration!r}")
        self.schedule = CorruptionSchedule(self.model.schedule, variant="isbi" if p.mode == "isbi" else None)
        self.variant_note = None
        trained = CorruptionSchedule(self.model.schedule).variant
        if p.mode == "isbi" and trained != "isbi":
            self.variant_note = (f"disyre isbi: model {self.model.id} was trained with the {trained} severity "
                                 f"schedule; its labels mean other severities than the ISBI schedule assumes")
        T = self.schedule.T
        if p.labels is not None:
            labels = [int(t) for t in p.labels]
            if not labels or any(not 0 <= t < T for t in labels):
                raise ValueError(f"disyre: labels must be timesteps in [0, {T - 1}], got {list(p.labels)}")
            # strongest corruption first (the multi-step chain walks towards the identity end)
            self.labels = sorted(set(labels), reverse=True)
        else:
            if not 1 <= int(p.steps) <= T:
                raise ValueError(f"disyre: steps must be in [1, {T}], got {p.steps}")
            self.labels = (self.schedule.reference_labels(p.steps) if p.mode == "mean-single-step"
                           else self.schedule.trailing(p.steps))  # multi-step / isbi: t = T, T - step, ...
        self.patch = int(self.model.config.get("patch_size") or self.model.image_size)

    def nfe_per_slice(self) -> int:
        """Labels x sliding windows on a slice of the model's resolution."""
        size = self.model.image_size
        if size <= self.patch:
            return len(self.labels)
        stride = max(int(0.25 * self.patch), 1)
        n = len(window_starts(size, self.patch, stride)[0])
        return len(self.labels) * n * n

    # -- one pass on patch-sized inputs -----------------------------------
    def _pipeline(self, x: torch.Tensor, mask: torch.Tensor):
        """Score and restoration (both in [0, 1] space) of windows x (N, 1, P, P)."""
        p = self.params
        net = self.model.net("denoiser")
        n = len(self.labels)
        score = torch.zeros_like(x)
        if p.mode == "mean-single-step":
            x_m = self.to_model(x)
            preds = []
            for t in self.labels:
                x0 = self.from_model(call_unet(net, x_m, t).to(x.dtype))
                score += (x - x0).abs()
                preds.append(x0)
            rest = preds[0] if p.restoration == "strongest" else torch.stack(preds).mean(0)
        else:
            cur = x
            rest = x
            for i, t in enumerate(self.labels):
                x0 = self.from_model(call_unet(net, self.to_model(cur), t).to(x.dtype))
                score += (cur - x0).abs()
                if i + 1 < n:
                    a_n = self.schedule.alpha(self.labels[i + 1])
                    if p.mode == "isbi":  # Q(x0_hat, x_t, t_next, m = 1): plain interpolation (Eq. 1)
                        cur = ((1.0 - a_n) * x0 + a_n * cur).clamp(0.0, 1.0)
                    else:  # the v2 code's cold-diffusion update
                        a_t = self.schedule.alpha(t)
                        cur = (x0 + (a_n / a_t) * (cur - x0)).clamp(0.0, 1.0)
                else:
                    rest = x0
        score = score / n
        m = mask.to(x.dtype)
        if p.weight_foreground:
            score = score * m.mean(dim=(1, 2, 3), keepdim=True)
        return score * m, rest

    def ignored_parameters(self) -> dict[str, str]:
        p = self.params
        out = {}
        if p.labels is not None:
            out["steps"] = "explicit labels set the label timesteps"
        if p.mode != "mean-single-step":
            out["restoration"] = "only the mean-single-step mode combines restorations"
        return out

    def run(self, x: torch.Tensor, mask: torch.Tensor, rng: BatchRNG) -> MethodOutput:
        H, W = x.shape[-2:]
        if H > self.patch or W > self.patch:
            score, rest, nwin = sliding_window(self._pipeline, x, mask, self.patch,
                                               sw_batch_size=self.params.sw_batch_size)
        else:
            score, rest = self._pipeline(x, mask)
            nwin = 1
        amap = score.clamp_min(0) * mask.to(score.dtype)
        return MethodOutput(restoration=rest.clamp(0, 1), anomaly=amap, nfe=len(self.labels) * nwin,
                            extras={"labels": list(self.labels), "mode": self.params.mode, "windows": nwin,
                                    "schedule_note": self.variant_note,
                                    "alphas": [round(self.schedule.alpha(t), 4) for t in self.labels]})

    # -- training -----------------------------------------------------------
    @classmethod
    def training_loss(cls, model, x, mask, rng, labels=None):
        """Corrupt (DAG-like, donors = the next image of the batch), predict x0 from (x_c, t), MSE.

        Foreign patches come from another image of the batch (item b uses item
        b+1, cyclically), as FPI's patches come from other subjects; with a
        single-image batch another position of the same image is used.
        """
        schedule = CorruptionSchedule(model.schedule)
        donors = x.roll(1, dims=0) if x.shape[0] > 1 else None
        c = corrupt(x, mask, rng, schedule, donors=donors, upper=intensity_top(model))
        lo, hi = model.intensity_range
        x_c = c.image * (hi - lo) + lo
        target = x * (hi - lo) + lo
        out = call_unet(model.net("denoiser"), x_c, c.t)
        return torch.mean((out.float() - target.float()) ** 2)

    @classmethod
    def default_model_config(cls, image_size: int = 64, small: bool = True) -> dict:
        from ..networks import small_unet_config

        if small:
            net = small_unet_config()
        else:
            # the reference's diffusers UNet2DModel (32, 64, 96, 128, 256, 256), 2 res blocks,
            # attention at the fifth level, rebuilt as a MONAI DiffusionModelUNet
            net = {
                "type": "DiffusionModelUNet", "spatial_dims": 2, "in_channels": 1, "out_channels": 1,
                "channels": [32, 64, 96, 128, 256, 256],
                "attention_levels": [False, False, False, False, True, False],
                "num_res_blocks": 2, "num_head_channels": 32, "norm_num_groups": 32,
            }
        return {
            "methods": ["disyre"],
            "image_size": image_size,
            "patch_size": image_size,
            "intensity_range": [0.0, 1.0],
            "noise": "synthetic",
            "schedule": {"kind": "disyre-corruption", "num_train_timesteps": 100, "schedule": "linear_beta",
                         "beta_start": 1e-3, "beta_end": 2e-1, "prediction_type": "sample",
                         "clip_sample": True, "clip_min": 0.0, "clip_max": 1.0,
                         "convention": "t increases with severity: alpha(t) = sqrt(alpha_bar[T-1-t])"},
            "networks": {"denoiser": net},
        }
