"""The one diffusion core shared by every DDPM-based method.

The noise schedule comes from MONAI's schedulers (``DDPMScheduler`` builds the
beta / alpha-bar tables for the ``linear_beta`` and ``cosine`` schedules); the
step functions below are written once on top of those tables so that

* the noise added in a stochastic step can be Gaussian *or* simplex (MONAI's
  ``step`` draws Gaussian noise only),
* a DDIM step can jump between any two timesteps (partial chains from level L
  with any stride, which MONAI's ``set_timesteps`` grid cannot express),
* the inverse DDIM step (deterministic encoding, Wolleb et al.) uses the same
  tables.

Conventions: timestep indices run 0..T-1, ``alpha_bar[t] = prod_{i<=t}(1-beta_i)``,
the network works on images in the model's range (usually [-1, 1]).
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field

import torch


@dataclass
class ScheduleConfig:
    num_train_timesteps: int = 1000
    schedule: str = "linear_beta"  # MONAI names: linear_beta | scaled_linear_beta | sigmoid_beta | cosine
    beta_start: float = 1e-4
    beta_end: float = 2e-2
    prediction_type: str = "epsilon"  # epsilon | sample | v_prediction
    clip_sample: bool = True
    clip_min: float = -1.0
    clip_max: float = 1.0

    @classmethod
    def from_dict(cls, d: dict | None) -> "ScheduleConfig":
        d = dict(d or {})
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _monai_tables(cfg: ScheduleConfig):
    from monai.networks.schedulers import DDPMScheduler

    kwargs = {}
    if cfg.schedule in ("linear_beta", "scaled_linear_beta", "sigmoid_beta"):
        kwargs = {"beta_start": cfg.beta_start, "beta_end": cfg.beta_end}
    sched = DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        schedule=cfg.schedule,
        variance_type="fixed_small",
        clip_sample=cfg.clip_sample,
        prediction_type=cfg.prediction_type,
        clip_sample_min=cfg.clip_min,
        clip_sample_max=cfg.clip_max,
        **kwargs,
    )
    return sched.betas.double(), sched.alphas_cumprod.double()


class Diffusion:
    """Noise schedule plus forward noising, DDPM, DDIM and inverse-DDIM steps.

    Every function takes the timestep ``t`` as a Python int (the whole batch is at
    the same step) or as a LongTensor of shape (B,) (training).
    """

    def __init__(self, config: ScheduleConfig | dict | None = None):
        self.config = config if isinstance(config, ScheduleConfig) else ScheduleConfig.from_dict(config)
        betas, alpha_bar = _monai_tables(self.config)
        self.T = self.config.num_train_timesteps
        self.betas64 = betas
        self.alpha_bar64 = alpha_bar
        self._cache: dict = {}

    # -- tables -------------------------------------------------------------
    def _tables(self, device, dtype=torch.float32):
        key = (str(device), dtype)
        if key not in self._cache:
            ab = self.alpha_bar64
            ab_prev = torch.cat([torch.ones(1, dtype=ab.dtype), ab[:-1]])
            betas = self.betas64
            post_var = betas * (1 - ab_prev) / (1 - ab)
            self._cache[key] = {
                "alpha_bar": ab.to(device, dtype),
                "alpha_bar_prev": ab_prev.to(device, dtype),
                "betas": betas.to(device, dtype),
                "post_var": post_var.to(device, dtype),
                "coef_x0": (betas * ab_prev.sqrt() / (1 - ab)).to(device, dtype),
                "coef_xt": ((1 - ab_prev) * (1 - betas).sqrt() / (1 - ab)).to(device, dtype),
            }
        return self._cache[key]

    def _at(self, name: str, t, ref: torch.Tensor) -> torch.Tensor:
        tab = self._tables(ref.device, ref.dtype)[name]
        if isinstance(t, torch.Tensor) and t.ndim > 0:
            return tab[t.to(ref.device).long()].view(-1, *([1] * (ref.ndim - 1)))
        return tab[int(t)]

    def alpha_bar(self, t: int) -> float:
        """alpha_bar at step t; t = -1 means the clean image (alpha_bar = 1)."""
        return 1.0 if t < 0 else float(self.alpha_bar64[int(t)])

    def matched_level(self, t: int, scale: float) -> int:
        """The timestep whose signal-to-noise ratio on images ``scale`` times larger equals t's on unit ones.

        A level L of a network trained on [0, 1] images destroys as much of the image as the level L'
        with alpha_bar'/(1 - alpha_bar') = alpha_bar_L/(1 - alpha_bar_L) / scale^2 does on a network
        trained on images ``scale`` times as wide (scale 2: [-1, 1]); the nearest timestep in log SNR.
        """
        t = int(t)
        if scale == 1.0:
            return t
        ab = self.alpha_bar64.double()
        log_snr = torch.log(ab) - torch.log1p(-ab)
        target = log_snr[t] - 2.0 * math.log(float(scale))
        return int(torch.argmin((log_snr - target).abs()).item())

    # -- forward ------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise."""
        ab = self._at("alpha_bar", t, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise if isinstance(ab, torch.Tensor) else (
            ab ** 0.5 * x0 + (1 - ab) ** 0.5 * noise
        )

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """What the network must output for the configured prediction type."""
        p = self.config.prediction_type
        if p == "epsilon":
            return noise
        if p == "sample":
            return x0
        if p == "v_prediction":
            ab = self._at("alpha_bar", t, x0)
            return ab.sqrt() * noise - (1 - ab).sqrt() * x0
        raise ValueError(f"unknown prediction type {p!r}")

    # -- model output -> (x0, eps) -------------------------------------------
    def split_prediction(self, model_output: torch.Tensor, t, x_t: torch.Tensor, clip: bool | None = None):
        """Return (x0_hat, eps_hat) from the network output at step t.

        With clipping on, x0_hat is clamped to the model range and eps_hat is
        recomputed from the clamped x0_hat (as guided-diffusion does).
        """
        ab = self._at("alpha_bar", t, x_t)
        sab = ab.sqrt() if isinstance(ab, torch.Tensor) else ab ** 0.5
        s1 = (1 - ab).sqrt() if isinstance(ab, torch.Tensor) else (1 - ab) ** 0.5
        p = self.config.prediction_type
        if p == "epsilon":
            x0 = (x_t - s1 * model_output) / sab
        elif p == "sample":
            x0 = model_output
        elif p == "v_prediction":
            x0 = sab * x_t - s1 * model_output
        else:
            raise ValueError(f"unknown prediction type {p!r}")
        clip = self.config.clip_sample if clip is None else clip
        if clip:
            x0 = x0.clamp(self.config.clip_min, self.config.clip_max)
        if p == "epsilon" and not clip:
            eps = model_output
        else:
            eps = (x_t - sab * x0) / max(s1, 1e-12) if not isinstance(s1, torch.Tensor) else (x_t - sab * x0) / s1.clamp_min(1e-12)
        return x0, eps

    # -- reverse steps ------------------------------------------------------
    def ddpm_step(self, model_output: torch.Tensor, t: int, x_t: torch.Tensor, noise: torch.Tensor | None,
                  variance: str = "fixed_small"):
        """One ancestral DDPM step t -> t-1.

        ``noise`` (Gaussian or simplex, same shape as x_t) is added for t > 0 with
        std sqrt(beta_tilde_t) ("fixed_small", MONAI / THOR / AutoDDPM) or
        sqrt(beta_t) ("fixed_large", AnoDDPM's guided-diffusion fork).
        Returns (x_{t-1}, x0_hat).
        """
        x0, _ = self.split_prediction(model_output, t, x_t)
        mean = self._at("coef_x0", t, x_t) * x0 + self._at("coef_xt", t, x_t) * x_t
        if int(t) > 0 and noise is not None:
            if variance == "fixed_small":
                var = float(self._at("post_var", t, x_t))
            elif variance == "fixed_large":
                var = float(self._at("betas", t, x_t))
            else:
                raise ValueError(f"unknown variance type {variance!r}")
            mean = mean + var ** 0.5 * noise
        return mean, x0

    def ddim_step(self, model_output: torch.Tensor, t: int, t_prev: int, x_t: torch.Tensor,
                  eta: float = 0.0, noise: torch.Tensor | None = None):
        """DDIM step from t to t_prev < t (t_prev = -1 returns x0_hat).  Returns (x_prev, x0_hat)."""
        x0, eps = self.split_prediction(model_output, t, x_t)
        if t_prev < 0:
            return x0, x0
        ab_t, ab_p = self.alpha_bar(t), self.alpha_bar(t_prev)
        sigma = 0.0
        if eta > 0:
            sigma = eta * (((1 - ab_p) / (1 - ab_t)) * (1 - ab_t / ab_p)) ** 0.5
        dir_coef = max(1 - ab_p - sigma ** 2, 0.0) ** 0.5
        x_prev = ab_p ** 0.5 * x0 + dir_coef * eps
        if sigma > 0 and noise is not None:
            x_prev = x_prev + sigma * noise
        return x_prev, x0

    def ddim_reverse_step(self, model_output: torch.Tensor, t: int, t_next: int, x_t: torch.Tensor):
        """Deterministic DDIM encoding step from t to t_next > t.  Returns (x_next, x0_hat)."""
        x0, eps = self.split_prediction(model_output, t, x_t)
        ab_n = self.alpha_bar(t_next)
        return ab_n ** 0.5 * x0 + (1 - ab_n) ** 0.5 * eps, x0


def partial_timesteps(level: int, steps: int | None) -> list[int]:
    """Timesteps of a reverse chain that starts at noise level ``level``.

    ``steps=None`` (or >= level+1) gives the full chain [L, L-1, ..., 0]
    (L+1 network evaluations, as in THOR/AutoDDPM); otherwise ``steps`` evenly
    spaced timesteps from L down to 0, both included.
    """
    level = int(level)
    if steps is None or steps >= level + 1:
        return list(range(level, -1, -1))
    steps = max(int(steps), 1)
    if steps == 1:
        return [level]
    ts = torch.linspace(level, 0, steps).round().long().tolist()
    out: list[int] = []
    for t in ts:
        if not out or t < out[-1]:
            out.append(int(t))
    return out


@dataclass
class ChainResult:
    x0: torch.Tensor
    nfe: int
    intermediates: dict = field(default_factory=dict)
