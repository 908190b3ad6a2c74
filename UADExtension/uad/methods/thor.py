"""THOR (Bercea et al., MICCAI 2024): temporal harmonization with implicit intermediate masks.

The slice is noised to level L with one noise field eps0 (Gaussian or simplex:
the model's noise) and denoised back with the DDPM chain.  At every checkpoint
t (the harmonization set H and the visualisation set V = every ``vis_every``
steps plus L and 0) the current prediction x0_hat is compared with the input
in [0, 1]:

    s = clip(GaussianBlur_sigma(P(x0_hat, x)), 0, 1)       P: perceptual map (LPIPS-SqueezeNet)
    m = s * |x - x0_hat| ;  m = clip(m / (max m + 1e-8), 0, 1)    (per image)
    R = clip((GreyDilate_k(GreyClose_k(m)) + m) / 2, 0, 1)          ("region" map)

and the masks m are saved.  At t in H the healthy part of the input is put
back, x0h = clamp(R * x0_hat + (1 - R) * x, model range), and re-noised with the
*same* eps0 to the level of the next network evaluation.  The anomaly map is
the harmonic mean of the saved masks (a soft AND over time), clipped to
[0, 0.999]; the restoration is the final clean sample.

Fixes relative to the released code (see methods.md section 3): standard
epsilon training objective (no ``(pred + 1) / 2``); inputs mapped to the model
range for sampling and back to [0, 1] for the masks; the harmonized x0 clamped
to the model range (not [0, 1]); blur and max-normalisation per image (not
across the batch); LPIPS sees [0, 1] gray images replicated to 3 channels with
``normalize=True`` (not [-3, 1]); the re-noised sample gets the noise level of
the network evaluation that follows (the reference re-noised to t and then
evaluated at t - 1).

Scale of the morphology: the paper works at 128 x 128 px with a 13 x 13
closing / dilation and a Gaussian blur of sigma 2 px.  By default both scale
with the slice size S so that they cover the same anatomy:
``kernel_size = 2 * floor(13 S / 256) + 1`` (3 at 32, 7 at 64, 13 at 128, 27 at 256)
and ``blur_sigma = 2 S / 128``.

Presets
-------
``paper``: Gaussian model: L = 350, H = [300, 150, 50]; simplex model: L = 250,
H = [200, 150, 100, 50]; full ancestral DDPM chain ("fixed_small" variance):
L + 1 network evaluations (351 / 251), 8 / 6 saved masks.
``fast``: the same L, H and V on a deterministic strided DDIM chain: 25 evenly
spaced timesteps from L to 0 merged with L, every element of H and every
V checkpoint (31 network evaluations for L = 350), about 11x cheaper.
``stochastic`` (the default): the same on 50 strided DDIM timesteps with eta = 1 (fresh noise at every
step, as the ancestral paper chain draws): 50 network evaluations for L = 350.  On the paired held-out
lesion slabs it keeps the paper preset's AP where ``fast`` loses more than 10 % on FLAIR
(docs/benchmark/presets).  Its anomaly map is the harmonic mean of the *raw* masks
(``map_norm="none"``): the max-normalisation per image stays where it steers the chain (the region
map R of the harmonization) but not in the output.  Normalised per slice, as the paper evaluates one
slice at a time, every lesion-free slice of a volume reaches 1 somewhere, and a scan's lesion competes
with the brightest residual of each healthy slice: on the first three held-out T2 tumour and stroke
volumes (ddpm-t2-simplex) the raw map's AP is 0.503 / 0.130 where the per-slice one has 0.229 / 0.100.
(The compai-lab code normalised over the batch; over the whole volume it measured 0.481 / 0.120;
``benchmarks/thor_map_norm.py`` forms the three maps from one chain.)
A user-given ``level`` without ``harmonization`` keeps the default H steps <= L.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..diffusion import Diffusion, partial_timesteps
from ..morphology import gaussian_blur, grey_closing, grey_dilation, scaled_kernel
from ..noise import make_noise, options_for
from ..rng import BatchRNG
from .base import Method, MethodOutput
from .common import ddpm_loss, reverse_chain

# (level, harmonization steps) of the released configs, by noise kind
PAPER_DEFAULTS = {"gaussian": (350, [300, 150, 50]), "simplex": (250, [200, 150, 100, 50])}

PerceptualFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class THORParams:
    level: int | None = None  # L, start timestep (L+1 NFE on the DDPM chain); None: 350 gaussian / 250 simplex
    harmonization: list | None = None  # H; None: [300, 150, 50] gaussian / [200, 150, 100, 50] simplex
    vis_every: int = 50  # V: masks are also saved every vis_every steps (plus L and 0); 0: only at H
    kernel_size: int | None = None  # grey closing / dilation square; None: 13 px at 128 px, scaled
    blur_sigma: float | None = None  # Gaussian blur of the perceptual map; None: 2 px at 128 px, scaled
    sampler: str = "ddpm"  # ddpm (full ancestral chain) | ddim (deterministic, strided)
    steps: int | None = None  # ddim: evenly spaced timesteps from L to 0 (H and V are added); None: all
    eta: float = 0.0  # ddim only: 0 deterministic; 1 draws fresh noise at every step, like the ancestral chain
    noise: str | None = None  # gaussian | simplex; None: the model's training noise
    perceptual: Any = "auto"  # auto | lpips | ssim | callable(a01, b01) -> (B, 1, H, W)
    map_norm: str = "slice"  # the saved masks of the anomaly map: "slice" max-normalised per image (paper); "none" raw


def thor_masks(x01: torch.Tensor, x0hat01: torch.Tensor, perceptual: PerceptualFn, kernel_size: int,
               blur_sigma: float, raw: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """THOR's intermediate mask m and region map R for (B, 1, H, W) images in [0, 1], per image.

    m = max-normalised clip(blur(P(x0_hat, x)), 0, 1) * |x - x0_hat|;
    R = clip((grey_dilation(grey_closing(m)) + m) / 2, 0, 1).
    Where x0_hat equals x, m and R are 0 (the input is kept there).  ``raw``: the mask returned is
    m before its max-normalisation (R is the same either way).
    """
    s = perceptual(x0hat01, x01).to(x01.dtype)
    s = gaussian_blur(s, blur_sigma).clamp(0, 1)
    m_raw = s * (x01 - x0hat01).abs()
    m = (m_raw / (m_raw.amax(dim=(1, 2, 3), keepdim=True) + 1e-8)).clamp(0, 1)
    region = ((grey_dilation(grey_closing(m, kernel_size), kernel_size) + m) / 2).clamp(0, 1)
    return (m_raw if raw else m), region


def harmonic_mean(maps: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Harmonic mean along ``dim`` (0 wherever one of the values is 0, like scipy.stats.hmean)."""
    n = maps.shape[dim]
    with torch.no_grad():
        return n / (1.0 / maps).sum(dim)


class THOR(Method):
    name = "thor"
    title = "THOR: temporal harmonization with implicit intermediate masks"
    reference = "Bercea et al., Diffusion Models with Implicit Guidance for Medical Anomaly Detection, MICCAI 2024"
    roles = ("denoiser",)
    Params = THORParams
    presets = {
        "paper": {},
        "fast": {"sampler": "ddim", "steps": 25},
        "stochastic": {"sampler": "ddim", "steps": 50, "eta": 1.0, "map_norm": "none"},
    }
    measured_default = "stochastic"

    def validate(self) -> None:
        p = self.params
        self.diffusion = Diffusion(self.model.schedule)
        T = self.diffusion.T
        self.noise_kind = p.noise or self.model.noise
        self.noise_options = options_for(self.model.config, self.noise_kind)
        d_level, d_harm = PAPER_DEFAULTS.get(self.noise_kind, PAPER_DEFAULTS["gaussian"])
        level = int(p.level) if p.level is not None else d_level
        if not 1 <= level <= T - 1:
            raise ValueError(f"thor: level must be in [1, {T - 1}], got {level}")
        if p.harmonization is None:
            harm = [t for t in d_harm if t <= level]
        else:
            harm = [int(t) for t in p.harmonization]
            bad = [t for t in harm if not 0 <= t <= level]
            if bad:
                raise ValueError(f"thor: harmonization steps must lie in [0, level={level}], got {bad}")
        harm = sorted(set(harm), reverse=True)
        if p.vis_every is None or int(p.vis_every) < 0:
            raise ValueError(f"thor: vis_every must be >= 0, got {p.vis_every}")
        if p.sampler not in ("ddpm", "ddim"):
            raise ValueError(f"thor: sampler must be 'ddpm' or 'ddim', got {p.sampler!r}")
        if p.sampler == "ddpm" and p.steps is not None and int(p.steps) < level + 1:
            raise ValueError("thor: a strided chain (steps <= level) needs sampler='ddim'")
        if p.steps is not None and int(p.steps) < 1:
            raise ValueError(f"thor: steps must be >= 1, got {p.steps}")
        if not 0 <= float(p.eta) <= 1:
            raise ValueError(f"thor: eta must be in [0, 1], got {p.eta}")
        if p.kernel_size is not None and (int(p.kernel_size) < 1 or int(p.kernel_size) % 2 == 0):
            raise ValueError(f"thor: kernel_size must be an odd number >= 1, got {p.kernel_size}")
        if p.blur_sigma is not None and float(p.blur_sigma) < 0:
            raise ValueError(f"thor: blur_sigma must be >= 0, got {p.blur_sigma}")
        if p.map_norm not in ("slice", "none"):
            raise ValueError(f"thor: map_norm must be 'slice' or 'none', got {p.map_norm!r}")
        if not callable(p.perceptual):
            from ..perceptual import _normalise

            _normalise(p.perceptual)  # raises for unknown names
        self.params = dataclasses.replace(p, level=level, harmonization=harm)

    def ignored_parameters(self) -> dict[str, str]:
        if self.params.sampler == "ddpm":
            return {"steps": "the ddpm sampler runs every timestep from level to 0",
                    "eta": "only the ddim sampler has an eta"}
        return {}

    # -- schedule --------------------------------------------------------------
    def checkpoints(self) -> list[int]:
        """Timesteps where a mask is computed and saved: H plus V (every vis_every steps, L and 0)."""
        p = self.params
        vis = set()
        if p.vis_every:
            vis = set(range(0, p.level + 1, int(p.vis_every))) | {p.level}
        return sorted(vis | set(p.harmonization), reverse=True)

    def timesteps(self) -> list[int]:
        """The chain's timesteps (one network evaluation each), L first, 0 last."""
        p = self.params
        if p.sampler == "ddpm" or p.steps is None:
            return list(range(p.level, -1, -1))
        return sorted(set(partial_timesteps(p.level, int(p.steps))) | set(self.checkpoints()), reverse=True)

    def nfe_per_slice(self) -> int:
        return len(self.timesteps())

    def perceptual_backend(self) -> str:
        """"lpips-squeeze", "ssim-fallback" (what "auto" resolves to here) or a custom map's name."""
        f = self.params.perceptual
        if callable(f):
            return str(getattr(f, "name", getattr(f, "__name__", "custom")))
        from ..perceptual import perceptual_backend

        return perceptual_backend(f)

    def _perceptual(self, device) -> tuple[PerceptualFn, str]:
        f = self.params.perceptual
        if callable(f):
            return f, getattr(f, "name", getattr(f, "__name__", "custom"))
        from ..perceptual import get_perceptual

        mod = get_perceptual(f, device)
        return mod, mod.name

    # -- inference ------------------------------------------------------------
    def run(self, x: torch.Tensor, mask: torch.Tensor, rng: BatchRNG) -> MethodOutput:
        p = self.params
        net = self.model.net("denoiser")
        lo, hi = self.model.intensity_range
        size = int(x.shape[-1])
        k = int(p.kernel_size) if p.kernel_size is not None else scaled_kernel(13, size)
        sigma = float(p.blur_sigma) if p.blur_sigma is not None else 2.0 * size / 128.0
        perceptual, pname = self._perceptual(x.device)
        raw = p.map_norm == "none"

        x_m = self.to_model(x)
        eps0 = make_noise(self.noise_kind, rng, x.shape[1:], **self.noise_options).to(x)
        ts = self.timesteps()
        checks = set(self.checkpoints())
        harm = set(p.harmonization)
        maps: list[torch.Tensor] = []
        map_steps: list[int] = []
        harmonized: list[int] = []

        def hook(t, t_next, x_next, x0_hat):
            if t not in checks:
                return None
            m, region = thor_masks(x, self.from_model(x0_hat), perceptual, k, sigma, raw=raw)
            maps.append(m)
            map_steps.append(t)
            if t not in harm:
                return None
            harmonized.append(t)
            x0h = (region * x0_hat + (1 - region) * x_m).clamp(lo, hi)
            if t_next < 0:
                return x0h
            return self.diffusion.q_sample(x0h, t_next, eps0)

        x_t = self.diffusion.q_sample(x_m, ts[0], eps0)
        rec_m, _, nfe = reverse_chain(self.diffusion, net, x_t, ts, rng, sampler=p.sampler,
                                      noise=self.noise_kind, variance="fixed_small",
                                      eta=float(p.eta), hook=hook,
                                      noise_options=self.noise_options)
        rec = self.from_model(rec_m.clamp(lo, hi))
        stacked = torch.stack(maps)  # (n, B, 1, H, W)
        amap = harmonic_mean(stacked, 0).clamp(0.0, 0.999)
        amap = amap * mask.to(amap.dtype)
        return MethodOutput(
            restoration=rec, anomaly=amap, nfe=nfe,
            extras={"noise": self.noise_kind, "timesteps": len(ts), "level": p.level,
                    "harmonization": harmonized, "map_steps": map_steps, "maps": stacked,
                    "lpips_calls": len(maps), "perceptual": pname, "kernel_size": k, "blur_sigma": sigma,
                    "map_norm": p.map_norm},
        )

    # -- training / model -------------------------------------------------------
    @classmethod
    def training_loss(cls, model, x, mask, rng, labels=None):
        # The standard epsilon objective on [-1, 1] inputs (THOR's released trainer applied
        # "(pred + 1) / 2" to the prediction; not reproduced).  The denoiser is shared with AnoDDPM.
        return ddpm_loss(model, x, rng, noise=model.noise, t_max=model.config.get("train_t_max"))

    @classmethod
    def default_model_config(cls, image_size: int = 64, small: bool = True, noise: str = "gaussian") -> dict:
        from .anoddpm import AnoDDPM

        return AnoDDPM.default_model_config(image_size, small, noise=noise)
