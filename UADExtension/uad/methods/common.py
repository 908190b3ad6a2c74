"""Diffusion loops shared by the DDPM-based methods (AnoDDPM, THOR, AutoDDPM, ...)."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ..diffusion import Diffusion
from ..networks import call_unet
from ..noise import make_noise
from ..rng import BatchRNG

# hook(t, t_next, x_next, x0_hat) -> replacement for x_next (or None to keep it)
StepHook = Callable[[int, int, torch.Tensor, torch.Tensor], Optional[torch.Tensor]]


def reverse_chain(
    diffusion: Diffusion,
    net: torch.nn.Module,
    x_t: torch.Tensor,
    timesteps: Sequence[int],
    rng: BatchRNG,
    sampler: str = "ddpm",
    noise: str = "gaussian",
    variance: str = "fixed_small",
    eta: float = 0.0,
    hook: StepHook | None = None,
    class_labels: torch.Tensor | None = None,
    noise_options: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Denoise ``x_t`` (at ``timesteps[0]``) through ``timesteps`` down to a clean image.

    At every listed t the network is evaluated once and the sample moves to the
    next listed timestep (or to the clean image after the last).  ``sampler``
    "ddpm" needs consecutive timesteps and adds ``noise`` ("gaussian" or
    "simplex", with ``noise_options``) at every step; "ddim" accepts any stride (eta=0: deterministic).
    Returns (x_clean, last x0_hat, network evaluations).
    """
    ts = [int(t) for t in timesteps]
    if sampler == "ddpm" and any(a - b != 1 for a, b in zip(ts, ts[1:])):
        raise ValueError("the DDPM sampler needs consecutive timesteps; use sampler='ddim' for strided chains")
    x, x0 = x_t, x_t
    nfe = 0
    shape = tuple(x.shape[1:])
    opts = dict(noise_options or {})
    for i, t in enumerate(ts):
        t_next = ts[i + 1] if i + 1 < len(ts) else -1
        out = call_unet(net, x, t, class_labels)
        nfe += 1
        if sampler == "ddpm":
            z = make_noise(noise, rng, shape, **opts).to(x) if t > 0 else None
            x_new, x0 = diffusion.ddpm_step(out, t, x, z, variance=variance)
            if t_next == -1 and t > 0:
                # the chain stops early (a hook moved it); finish with the prediction
                x_new = x0
        elif sampler == "ddim":
            z = make_noise(noise, rng, shape, **opts).to(x) if (eta > 0 and t_next >= 0) else None
            x_new, x0 = diffusion.ddim_step(out, t, t_next, x, eta=eta, noise=z)
        else:
            raise ValueError(f"unknown sampler {sampler!r}")
        if hook is not None:
            repl = hook(t, t_next, x_new, x0)
            if repl is not None:
                x_new = repl
        x = x_new
    return x, x0, nfe


def ddpm_loss(model, x01: torch.Tensor, rng: BatchRNG, noise: str | None = None,
              t_max: int | None = None, reduction_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Standard denoising objective on a batch of [0, 1] slices.

    t ~ U{t_min..t_max-1} (t_min: the model config's ``train_t_min``, default 0), x_t = sqrt(ab) x0 + sqrt(1-ab) n with n Gaussian or simplex,
    MSE between the network output and the target of the model's prediction type
    (epsilon by default).  Inputs are mapped to the model's intensity range first
    (no "(pred+1)/2" on the output, unlike THOR's released trainer).
    """
    from ..networks import call_unet

    diffusion = Diffusion(model.schedule)
    lo, hi = model.intensity_range
    x0 = x01 * (hi - lo) + lo
    kind = noise or model.noise
    from ..noise import options_for

    n = make_noise(kind, rng, x0.shape[1:], **options_for(model.config, kind)).to(x0)
    t_lo = int(model.config.get("train_t_min") or 0)  # a training run's range (uad.training t_min / t_max)
    t = rng.randint(t_lo, int(t_max or diffusion.T)).to(x0.device)
    x_t = diffusion.q_sample(x0, t, n)
    out = call_unet(model.net("denoiser"), x_t, t)
    target = diffusion.training_target(x0, n, t)
    err = (out - target) ** 2
    if reduction_mask is not None:
        w = reduction_mask.to(err.dtype)
        return (err * w).sum() / w.sum().clamp_min(1.0)
    return err.mean()
