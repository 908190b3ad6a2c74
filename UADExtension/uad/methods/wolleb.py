"""Wolleb et al. (MICCAI 2022): DDIM encoding + classifier-guided DDIM decoding.

Weakly supervised: a class-conditional epsilon UNet (MONAI DiffusionModelUNet
with ``num_class_embeds=2``) and a noise-aware classifier (MONAI
DiffusionModelEncoder, 2 logits) are trained on healthy AND anomalous slices
with image-level labels.  **Labels: 0 = healthy, 1 = anomalous** everywhere
(training, class conditioning and guidance target); the MONAI tutorial's
inverted ``slice_label`` is not reproduced.

Inference (Algorithm 1 of the paper), on the timestep grid
0 = tau_0 < tau_1 < ... < tau_K = L-1 of the T-step schedule:

1. deterministic DDIM *encoding* (inverse DDIM, no guidance) of the input,
   taken as the sample at tau_0, up to tau_K: K UNet calls.  The UNet is
   conditioned on the healthy label, as in the reference code (guided
   diffusion passes ``y`` to both loops; a class-conditional MONAI UNet also
   cannot be called unconditioned);
2. DDIM *decoding* (eta = 0) from tau_K back to tau_0 with classifier guidance
   towards y = healthy:
   eps~ = eps^ - sqrt(1 - abar_t) * s * grad_x log p(y | x_t, t)
   (Dhariwal & Nichol's score conditioning; eps^ comes from the clipped x0^
   when the schedule clips, x0 is not re-clipped after guidance, as in
   guided-diffusion): K UNet calls + K classifier forward+backward passes;
3. anomaly map = sum over channels |x - x~| in [0, 1] space, zero outside the
   brain; the restoration is x~.

With s = 0 the classifier is never called and the chain is plain DDIM
encode-decode (an exact round trip up to discretisation error).  Level L
means the latent sits at timestep index L-1 (as AnoDDPM's lambda), so the
paper's L = 500 with every step costs 499 + 499 UNet calls + 499 classifier
passes, which is what the reference code spends.

Presets
-------
``paper``: L = 500, every timestep (499 encoding + 499 decoding steps), s = 100.
``tutorial``: the MONAI tutorial's L = 200, s = 6, every timestep.
``fast`` (default): L = 500, s = 100, a strided DDIM grid of 50 encoding and
50 decoding steps (150 evaluations instead of 1497).  The guided DDIM ODE
targets the same distribution whatever the stride, so s is kept.

NFE = UNet calls + classifier calls (a classifier forward+backward counts as
one evaluation); both are reported in ``extras``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..diffusion import Diffusion, partial_timesteps
from ..networks import call_unet
from ..rng import BatchRNG
from .base import Method, MethodOutput

HEALTHY = 0
ANOMALOUS = 1


@dataclass
class WollebParams:
    level: int = 500  # L: noise level of the encoding (latent at timestep index L-1)
    steps: int | None = None  # None: every timestep (L-1 steps each way); k: k strided DDIM steps each way
    scale: float = 100.0  # s: classifier gradient scale


def ddim_grid(level: int, steps: int | None) -> list[int]:
    """Ascending timesteps 0 = tau_0 < ... < tau_K = level-1 (K = level-1 or ``steps``)."""
    top = int(level) - 1
    if top <= 0:
        return [0]
    ts = partial_timesteps(top, None if steps is None else int(steps) + 1)
    return sorted(set(int(t) for t in ts))


def classifier_log_prob_grad(classifier: torch.nn.Module, x: torch.Tensor, t: int, y: torch.Tensor) -> torch.Tensor:
    """grad_x log softmax(classifier(x, t))[y], computed with autograd even under ``torch.inference_mode``.

    The pipeline calls methods under inference mode, whose tensors cannot
    take part in autograd, so a fresh normal leaf tensor is built here with
    inference mode switched off and gradients switched on.  Items are
    independent (the per-item log-probabilities are summed).
    """
    with torch.inference_mode(False), torch.enable_grad():
        x_in = x.detach().clone().requires_grad_(True)
        tt = torch.full((x_in.shape[0],), int(t), dtype=torch.long, device=x_in.device)
        logits = classifier(x_in, timesteps=tt)
        logp = F.log_softmax(logits.float(), dim=-1)
        idx = y.detach().clone().to(logp.device).long().view(-1, 1)
        sel = logp.gather(1, idx).sum()
        (grad,) = torch.autograd.grad(sel, x_in)
    return grad.detach().clone()


class Wolleb(Method):
    name = "wolleb"
    title = "Wolleb et al.: DDIM encoding with classifier guidance (weakly supervised)"
    reference = "Wolleb et al., Diffusion Models for Medical Anomaly Detection, MICCAI 2022"
    roles = ("denoiser", "classifier")
    Params = WollebParams
    presets = {
        "paper": {},
        "tutorial": {"level": 200, "scale": 6.0},
        "fast": {"steps": 50},
    }
    needs_labels = True

    def validate(self) -> None:
        p = self.params
        self.diffusion = Diffusion(self.model.schedule)
        T = self.diffusion.T
        if not 1 <= int(p.level) <= T:
            raise ValueError(f"wolleb: level must be in [1, {T}], got {p.level}")
        if p.steps is not None and int(p.steps) < 1:
            raise ValueError(f"wolleb: steps must be >= 1 or None, got {p.steps}")
        if p.scale < 0:
            raise ValueError(f"wolleb: the guidance scale must be >= 0, got {p.scale}")
        self.grid = ddim_grid(p.level, p.steps)
        self._check_classifier_size()

    def _check_classifier_size(self) -> None:
        """A DiffusionModelEncoder's final linear layer fixes its input size; say so clearly."""
        clf = self.model.net("classifier")
        head = getattr(clf, "out", None)
        chans = getattr(clf, "block_out_channels", None)
        if not isinstance(head, torch.nn.Sequential) or not chans or not hasattr(head[0], "in_features"):
            return
        side = [self.model.image_size] * 2
        for _ in chans:
            side = [-(-s // 2) for s in side]
        expected = side[0] * side[1] * int(chans[-1])
        if int(head[0].in_features) != expected:
            from .. import ModelError

            raise ModelError(f"model {self.model.id}: the classifier was built for another input size than "
                             f"image_size {self.model.image_size} (its 'input_shape' must be "
                             f"[{self.model.image_size}, {self.model.image_size}])")

    def nfe_per_slice(self) -> int:
        """Encoding and decoding UNet calls plus classifier passes (none with s = 0)."""
        k = len(self.grid) - 1
        return 2 * k + (k if self.params.scale != 0 else 0)

    # -- the two loops --------------------------------------------------------
    def encode(self, x_m: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Inverse DDIM from tau_0 to tau_K (model range).  Returns (latent, UNet calls)."""
        net = self.model.net("denoiser")
        x = x_m
        for t, t_next in zip(self.grid[:-1], self.grid[1:]):
            out = call_unet(net, x, t, y).to(x.dtype)
            x, _ = self.diffusion.ddim_reverse_step(out, t, t_next, x)
        return x, len(self.grid) - 1

    def decode(self, x_lat: torch.Tensor, y: torch.Tensor, scale: float) -> tuple[torch.Tensor, int, int]:
        """Guided DDIM (eta = 0) from tau_K to tau_0.  Returns (image, UNet calls, classifier calls)."""
        net = self.model.net("denoiser")
        clf = self.model.net("classifier")
        d = self.diffusion
        x = x_lat
        n_unet = n_clf = 0
        for i in range(len(self.grid) - 1, 0, -1):
            t, t_prev = self.grid[i], self.grid[i - 1]
            out = call_unet(net, x, t, y).to(x.dtype)
            n_unet += 1
            if scale == 0:
                x, _ = d.ddim_step(out, t, t_prev, x)
                continue
            _, eps = d.split_prediction(out, t, x)
            grad = classifier_log_prob_grad(clf, x, t, y).to(x.dtype)
            n_clf += 1
            ab_t, ab_p = d.alpha_bar(t), d.alpha_bar(t_prev)
            eps = eps - (1.0 - ab_t) ** 0.5 * float(scale) * grad
            x0 = (x - (1.0 - ab_t) ** 0.5 * eps) / ab_t ** 0.5
            x = ab_p ** 0.5 * x0 + (1.0 - ab_p) ** 0.5 * eps
        return x, n_unet, n_clf

    def run(self, x: torch.Tensor, mask: torch.Tensor, rng: BatchRNG) -> MethodOutput:
        p = self.params
        y = torch.full((x.shape[0],), HEALTHY, dtype=torch.long, device=x.device)
        x_m = self.to_model(x)
        lat, n_enc = self.encode(x_m, y)
        rec_m, n_dec, n_clf = self.decode(lat, y, p.scale)
        rec = self.from_model(rec_m)
        amap = (x - rec).abs().sum(dim=1, keepdim=True)
        amap = amap * mask.to(amap.dtype)
        nfe = n_enc + n_dec + n_clf
        return MethodOutput(restoration=rec, anomaly=amap, nfe=nfe,
                            extras={"unet_calls": n_enc + n_dec, "classifier_calls": n_clf,
                                    "encode_steps": n_enc, "decode_steps": n_dec, "level": p.level,
                                    "scale": p.scale, "latent_timestep": self.grid[-1]})

    # -- training -------------------------------------------------------------
    last_loss_parts: dict = {}

    @classmethod
    def training_loss(cls, model, x, mask, rng, labels=None, return_parts: bool = False):
        """epsilon-MSE of the class-conditional UNet + cross-entropy of the noise-aware classifier.

        Both terms use the image labels (0 healthy, 1 anomalous).  The UNet sees
        x_t at t ~ U{0..T-1}; the classifier sees its own noised copy (fresh
        t and noise).  Returns the sum; the parts are kept in
        ``Wolleb.last_loss_parts`` (floats) and returned as a dict of tensors
        with ``return_parts=True``.
        """
        if labels is None:
            raise ValueError("wolleb is weakly supervised: training needs image labels (0 healthy, 1 anomalous)")
        y = torch.as_tensor(labels, device=x.device).reshape(-1).long()
        if y.numel() != x.shape[0]:
            raise ValueError(f"wolleb: {y.numel()} labels for a batch of {x.shape[0]}")
        if ((y != HEALTHY) & (y != ANOMALOUS)).any():
            raise ValueError("wolleb: labels must be 0 (healthy) or 1 (anomalous)")
        d = Diffusion(model.schedule)
        lo, hi = model.intensity_range
        x0 = x * (hi - lo) + lo
        shape = tuple(x0.shape[1:])
        # denoiser
        n = rng.randn(shape).to(x0)
        t = rng.randint(0, d.T).to(x0.device)
        x_t = d.q_sample(x0, t, n)
        out = call_unet(model.net("denoiser"), x_t, t, y)
        target = d.training_target(x0, n, t)
        loss_eps = torch.mean((out.float() - target.float()) ** 2)
        # classifier on independently noised inputs
        n_c = rng.randn(shape).to(x0)
        t_c = rng.randint(0, d.T).to(x0.device)
        xc_t = d.q_sample(x0, t_c, n_c)
        logits = model.net("classifier")(xc_t, timesteps=t_c)
        loss_ce = F.cross_entropy(logits.float(), y)
        total = loss_eps + loss_ce
        cls.last_loss_parts = {"denoiser": float(loss_eps.detach()), "classifier": float(loss_ce.detach())}
        if return_parts:
            return total, {"denoiser": loss_eps, "classifier": loss_ce}
        return total

    @classmethod
    def default_model_config(cls, image_size: int = 64, small: bool = True) -> dict:
        from ..networks import paper_unet_config, small_unet_config

        if small:
            unet = small_unet_config(num_class_embeds=2)
            clf = {"type": "DiffusionModelEncoder", "spatial_dims": 2, "in_channels": 1, "out_channels": 2,
                   "channels": [16, 32, 32], "attention_levels": [False, False, True], "num_res_blocks": 1,
                   "num_head_channels": 32, "norm_num_groups": 8, "input_shape": [image_size, image_size]}
        else:
            unet = dict(paper_unet_config(), num_class_embeds=2)
            # the MONAI tutorial's classifier, with the reference's residual down-sampling
            clf = {"type": "DiffusionModelEncoder", "spatial_dims": 2, "in_channels": 1, "out_channels": 2,
                   "channels": [32, 64, 64], "attention_levels": [False, True, True], "num_res_blocks": [1, 1, 1],
                   "num_head_channels": 64, "resblock_updown": True, "input_shape": [image_size, image_size]}
        return {
            "methods": ["wolleb"],
            "image_size": image_size,
            "intensity_range": [-1.0, 1.0],
            "noise": "gaussian",
            "labels": {"0": "healthy", "1": "anomalous"},
            "schedule": {"num_train_timesteps": 1000, "schedule": "linear_beta", "beta_start": 1e-4,
                         "beta_end": 2e-2, "prediction_type": "epsilon", "clip_sample": True},
            "networks": {"denoiser": unet, "classifier": clf},
        }
