"""DISYRE's "diffusion" process: gradual synthetic-anomaly corruption (no Gaussian noise).

Two parts:

``CorruptionSchedule``
    The severity schedule.  It has the same shape as ``uad.diffusion``'s
    (a config dict with ``num_train_timesteps``, linear ``beta_start`` /
    ``beta_end``; MONAI builds the alpha-bar table) but T = 100 and betas
    1e-3 .. 0.2 (Naval Marimont et al., ISBI 2024).  With
    ``a_t = sqrt(alpha_bar_t)`` (0.9995 at t = 0 down to 0.0045 at t = 99):

        severity(t) = a_{T-1-t}            (0.0045 at t = 0 ... 0.9995 at t = T-1)
        label(alpha) = argmin_t |severity(t) - alpha|

    **Convention (used everywhere, training and inference):** the timestep
    grows with the corruption, as in the DISYRE paper and in DDPM: t = 0 is
    the identity end (alpha ~ 0), t = T-1 is the fully corrupted end
    (alpha ~ 1).  The reference code trains with the opposite index
    (``t_ref = argmin |a_t - alpha|``, large alpha -> small t) but its
    ``step()`` uses ``a.flip(0)[t]``; here one table serves both, and a
    reference training label maps to ``t = T-1 - t_ref`` exactly (same alpha).
    The reference's evaluation labels [99, 74, 49, 24] therefore become
    [0, 25, 50, 75] here (alpha ~ 0.0045, 0.051, 0.27, 0.73).

    ``variant="isbi"`` (config key ``variant``) is the ISBI paper's schedule
    instead: severity(t) = 1 - sqrt(alpha_bar_t) (0.0005 at t = 0 ... 0.9955
    at t = 99, the DDPM analogue the paper names), with the same label map
    ``argmin |severity - alpha|``.  A model is trained with one variant and
    must be used with it.

``corrupt(x, mask, rng, ...)``
    The DAG-like generator ("disentangled anomaly generation", DISYRE v2) on a
    batch of [0, 1] slices, with every random draw of item b taken from
    ``rng.generators[b]``:

    1. location: a random foreground pixel at least half a box from the border;
    2. shape inside a 64-px box (scaled by image_size / 128): a square (side
       U[10, 44] px, rotated by U[-15, 15] degrees with p = 0.5), a disk
       (diameter U[10, 44] px) or a random smooth blob (thresholded smoothed
       noise under a radial envelope), with equal probability; soft edges by
       a Gaussian blur (sigma ~ U(0, 5) px, p = 0.7); zeroed outside the brain;
    3. texture, foreign patch interpolation (FPI): a box-sized patch from
       another image (``donors``) or from another position of the same image,
       min-max matched to the image values under the shape,
       ``x <- x + alpha_texture * m * (patch - x)``  (= x (1 - m a) + patch m a);
    4. intensity bias: the image is quantised to the 5-centroid codebook
       [0.00565, 0.383, 0.612, 0.769, 0.939]; as the reference, EACH centroid
       is drawn independently with probability p_k = n_k / (N + 1000 px)
       (n_k its pixel count in the shape, N the shape's pixel count, 1000 px
       at 128 px scaled with the image area), the bias mask is the union of
       the drawn clusters AND the shape -- the WHOLE shape when none is drawn
       (probability prod_k (1 - p_k), about two thirds for typical shapes) --
       blurred with sigma = 1 px,
       ``x <- clip(x + alpha_bias * sign * mb, 0, upper)``; the effective
       alpha_bias is the largest change this makes (``upper``: the top of the
       slices' intensity range, 1 unless the normalisation keeps values above
       the brain's upper percentile, e.g. ``clip_max`` 2 for FLAIR);
    5. label alpha = max(alpha_texture, alpha_bias) -> t = label(alpha).

    Both steps are written as additive updates, so alpha = 0 returns the input
    bit for bit.  Pixel sizes are given at 128 px and scaled with the image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .rng import BatchRNG

CODEBOOK = (0.00565, 0.383, 0.612, 0.769, 0.939)
REFERENCE_SIZE = 128  # the pixel sizes below are those of the reference at 128 x 128
BOX = 64
SHAPE_SIZE = (10.0, 44.0)
ROTATION_DEG = 15.0
BLUR_SIGMA_MAX = 5.0
BLUR_P = 0.7
CLUSTER_PRIOR = 1000.0
SHAPES = ("square", "disk", "blob")
VARIANTS = ("v2", "isbi")


# --------------------------------------------------------------------------- schedule
@dataclass
class CorruptionScheduleConfig:
    num_train_timesteps: int = 100
    schedule: str = "linear_beta"
    beta_start: float = 1e-3
    beta_end: float = 2e-1
    variant: str = "v2"  # v2: severity(t) = sqrt(ab_{T-1-t}) (v2 code); isbi: 1 - sqrt(ab_t) (ISBI paper)

    @classmethod
    def from_dict(cls, d: dict | None) -> "CorruptionScheduleConfig":
        d = dict(d or {})
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class CorruptionSchedule:
    """Severity alpha per timestep (increasing in t) and the alpha -> t label map."""

    def __init__(self, config: CorruptionScheduleConfig | dict | None = None, variant: str | None = None):
        self.config = (config if isinstance(config, CorruptionScheduleConfig)
                       else CorruptionScheduleConfig.from_dict(config))
        if variant is not None:
            self.config = CorruptionScheduleConfig(**dict(self.config.to_dict(), variant=variant))
        if self.config.variant not in VARIANTS:
            raise ValueError(f"corruption schedule variant must be one of {', '.join(VARIANTS)}, "
                             f"got {self.config.variant!r}")
        from .diffusion import ScheduleConfig, _monai_tables

        _, alpha_bar = _monai_tables(ScheduleConfig(
            num_train_timesteps=self.config.num_train_timesteps, schedule=self.config.schedule,
            beta_start=self.config.beta_start, beta_end=self.config.beta_end))
        self.T = int(self.config.num_train_timesteps)
        self.a64 = alpha_bar.sqrt()  # a_t = sqrt(alpha_bar_t), decreasing (the reference's table)
        self.variant = self.config.variant
        if self.variant == "isbi":
            self.severity64 = 1.0 - self.a64  # the ISBI paper: alpha_t = 1 - sqrt(alpha_bar_t), increasing
        else:
            self.severity64 = self.a64.flip(0)  # severity(t) = a_{T-1-t}, increasing

    def alpha(self, t) -> float | torch.Tensor:
        """Corruption severity at timestep(s) t (int -> float, LongTensor -> float tensor)."""
        if isinstance(t, torch.Tensor):
            return self.severity64.to(t.device)[t.long()].float()
        return float(self.severity64[int(t)])

    def label(self, alpha) -> torch.Tensor:
        """Timestep label(s) t = argmin_t |severity(t) - alpha| (LongTensor, shape of ``alpha``)."""
        a = torch.as_tensor(alpha, dtype=torch.float64)
        dev = a.device
        d = (a.cpu().reshape(-1, 1) - self.severity64.reshape(1, -1)).abs()
        return d.argmin(dim=1).reshape(a.shape).to(dev)

    @staticmethod
    def reference_trailing(T: int, n: int) -> list[int]:
        """The reference's 'trailing' inference timesteps (its own index): T=100, n=4 -> [99, 74, 49, 24]."""
        n = max(1, min(int(n), int(T)))
        ts = [int(round(T - k * T / n)) - 1 for k in range(n)]
        return ts

    def reference_labels(self, n: int) -> list[int]:
        """The reference evaluation's labels mapped into this convention (same alpha), strongest first.

        T=100, n=4: [75, 50, 25, 0] (alpha ~ 0.73, 0.27, 0.051, 0.0045).
        """
        return sorted((self.T - 1 - t for t in self.reference_trailing(self.T, n)), reverse=True)

    def trailing(self, n: int) -> list[int]:
        """Trailing spacing in this convention, strongest first: T=100, n=4 -> [99, 74, 49, 24]
        (alpha ~ 0.9995, 0.71, 0.26, 0.047; the paper's Algorithm 1 starting at t = T)."""
        return self.reference_trailing(self.T, n)


# --------------------------------------------------------------------------- helpers
def _gauss_kernel1d(sigma: float, dtype=torch.float32, device="cpu") -> torch.Tensor:
    r = max(1, int(math.ceil(3.0 * sigma)))
    i = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (i / sigma) ** 2)
    return (k / k.sum()).to(device=device, dtype=dtype)


def gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a 2-D tensor (H, W) with zero padding; sigma <= 0.1 returns it unchanged."""
    if sigma <= 0.1:
        return img
    k = _gauss_kernel1d(sigma, img.dtype, img.device)
    r = (k.numel() - 1) // 2
    x = img[None, None]
    x = F.conv2d(F.pad(x, (r, r, 0, 0)), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r)), k.view(1, 1, -1, 1))
    return x[0, 0]


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g, device=g.device))


def _randint(g: torch.Generator, n: int) -> int:
    return int(torch.randint(0, max(int(n), 1), (1,), generator=g, device=g.device))


def _pick_pixel(g: torch.Generator, ok: torch.Tensor) -> tuple[int, int] | None:
    idx = ok.reshape(-1).nonzero().flatten()
    if idx.numel() == 0:
        return None
    j = int(idx[_randint(g, idx.numel())])
    return j // ok.shape[1], j % ok.shape[1]


def _interior(h: int, w: int, margin: int, device) -> torch.Tensor:
    ok = torch.zeros(h, w, dtype=torch.bool, device=device)
    if h - 2 * margin > 0 and w - 2 * margin > 0:
        ok[margin:h - margin, margin:w - margin] = True
    return ok


def _box_origin(center: tuple[int, int], box: int, h: int, w: int) -> tuple[int, int]:
    """Top-left corner of a box x box window centred at ``center``, clamped into the image."""
    y0 = min(max(center[0] - box // 2, 0), max(h - box, 0))
    x0 = min(max(center[1] - box // 2, 0), max(w - box, 0))
    return y0, x0


def random_shape(g: torch.Generator, box: int, scale: float, kind: str | None = None,
                 device="cpu") -> tuple[torch.Tensor, str]:
    """A binary shape (box, box) float tensor centred in the box, and its kind."""
    if kind is None:
        kind = SHAPES[_randint(g, len(SHAPES))]
    lo, hi = SHAPE_SIZE[0] * scale, min(SHAPE_SIZE[1] * scale, box - 1.0)
    c = (box - 1) / 2.0
    yy, xx = torch.meshgrid(torch.arange(box, dtype=torch.float32, device=device) - c,
                            torch.arange(box, dtype=torch.float32, device=device) - c, indexing="ij")
    if kind == "square":
        side = _uniform(g, lo, hi)
        theta = 0.0
        if _uniform(g, 0.0, 1.0) < 0.5:
            theta = math.radians(_uniform(g, -ROTATION_DEG, ROTATION_DEG))
        u = math.cos(theta) * xx + math.sin(theta) * yy
        v = -math.sin(theta) * xx + math.cos(theta) * yy
        shape = (u.abs() <= side / 2) & (v.abs() <= side / 2)
    elif kind == "disk":
        d = _uniform(g, lo, hi)
        shape = (xx ** 2 + yy ** 2) <= (d / 2) ** 2
    elif kind == "blob":
        # smooth random field under a radial envelope, thresholded to a random area
        noise = torch.rand((box, box), generator=g, device=g.device).to(device)
        field = gaussian_blur(noise - 0.5, max(box / 8.0, 1.0))
        field = field / field.std().clamp_min(1e-6)
        radius = _uniform(g, lo, hi) / 2
        env = (xx ** 2 + yy ** 2) / max(radius, 1.0) ** 2
        score = field - 2.0 * env
        frac = min(math.pi * radius ** 2 / box ** 2, 1.0)
        thr = torch.quantile(score.flatten(), 1.0 - frac)
        shape = score >= thr
    else:
        raise ValueError(f"unknown shape kind {kind!r}; known: {', '.join(SHAPES)}")
    return shape.float(), kind


def cluster_probabilities(counts: torch.Tensor, prior: float = CLUSTER_PRIOR) -> torch.Tensor:
    """p_k = n_k / (N + prior) per codebook centroid (N = sum n_k), as the reference's bias corruption."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    return counts / (counts.sum() + float(prior))


# --------------------------------------------------------------------------- corruption
@dataclass
class Corruption:
    image: torch.Tensor  # (B, 1, H, W) corrupted slices in [0, 1]
    alpha: torch.Tensor  # (B,) label severity max(alpha_texture, alpha_bias)
    t: torch.Tensor  # (B,) long timestep labels (schedule convention)
    shape: torch.Tensor  # (B, 1, H, W) soft shape mask in [0, 1], zero outside the brain
    alpha_texture: torch.Tensor  # (B,)
    alpha_bias: torch.Tensor  # (B,) effective bias (largest change of the bias step)
    kinds: list
    bias_whole_shape: torch.Tensor | None = None  # (B,) bool: no centroid drawn, the whole shape biased
    p_whole_shape: torch.Tensor | None = None  # (B,) the reference formula prod_k (1 - p_k) for that draw
    bias_clusters: list | None = None  # per item: the codebook clusters biased (all when the whole shape)


def corrupt(x: torch.Tensor, mask: torch.Tensor, rng: BatchRNG, schedule: CorruptionSchedule | None = None,
            alpha: float | Sequence[float] | torch.Tensor | None = None, donors: torch.Tensor | None = None,
            texture: bool = True, bias: bool = True, shape_kind: str | None = None,
            upper: float = 1.0) -> Corruption:
    """Corrupt a batch of [0, 1] slices (B, 1, H, W) with DAG-like synthetic anomalies.

    ``upper``: the top of the slices' intensity range (the normalisation's ``clip_max``, at least 1): the
    intensity bias clips to [0, upper].  Clipping to [0, 1] slices normalised to [0, 2] (FLAIR) would cut
    every bright pixel inside an anomaly shape down to 1 and never make an anomaly brighter than 1, so the
    network would learn that values above 1 are never anomalous and keep bright lesions in its restoration.

    ``alpha`` fixes the texture weight and the bias magnitude (scalar or (B,));
    by default both are drawn U(0, 1) per item.  The random draws are the same
    whether or not ``alpha`` is given, so for a fixed seed only the strength
    changes.  ``donors`` (B, 1, H, W) supply the foreign patches (item b's
    patch comes from donors[b]); by default each item uses another position of
    its own image, so items never depend on each other.  Runs in full
    precision even inside an autocast region (training with AMP).
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _corrupt(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x, mask, rng,
                        schedule, alpha, donors, texture, bias, shape_kind, upper)


def _corrupt(x, mask, rng, schedule, alpha, donors, texture, bias, shape_kind, upper=1.0) -> Corruption:
    schedule = schedule or CorruptionSchedule()
    upper = float(upper)
    if not upper >= 1.0:  # also refuses NaN
        raise ValueError(f"corrupt: upper must be at least 1 (the top of the slices' intensity range), got {upper}")
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"corrupt expects (B, 1, H, W) slices, got {tuple(x.shape)}")
    B, _, H, W = x.shape
    if len(rng) != B:
        raise ValueError(f"rng has {len(rng)} generators for a batch of {B}")
    dev, dt = x.device, x.dtype
    fg_all = mask.reshape(B, H, W).bool()
    if alpha is not None:
        alpha_t = torch.as_tensor(alpha, dtype=torch.float32).flatten().cpu()
        if alpha_t.numel() == 1:
            alpha_t = alpha_t.expand(B)
        if alpha_t.numel() != B or (alpha_t < 0).any() or (alpha_t > 1).any():
            raise ValueError("alpha must be a scalar or one value per item, in [0, 1]")
    scale = min(H, W) / REFERENCE_SIZE
    box = max(4, min(int(round(BOX * scale)), H, W))
    codebook = torch.tensor(CODEBOOK, dtype=dt, device=dev)

    out = x.clone()
    shapes = torch.zeros_like(x)
    a_tex = torch.zeros(B)
    a_bias = torch.zeros(B)
    whole = torch.zeros(B, dtype=torch.bool)
    p_whole = torch.full((B,), float("nan"))
    clusters: list = [()] * B
    kinds: list = []
    for b in range(B):
        g = rng.generators[b]
        xb = x[b, 0]
        fg = fg_all[b]
        # draw everything in a fixed order
        draw_tex = _uniform(g, 0.0, 1.0)
        draw_bias = _uniform(g, 0.0, 1.0)
        sign = 1.0 if _uniform(g, 0.0, 1.0) < 0.5 else -1.0
        at = float(alpha_t[b]) if alpha is not None else draw_tex
        ab = float(alpha_t[b]) if alpha is not None else draw_bias
        center = _pick_pixel(g, fg & _interior(H, W, box // 2, dev)) or _pick_pixel(g, fg)
        shp, kind = random_shape(g, box, scale, shape_kind, device=dev)
        blur = _uniform(g, 0.0, BLUR_SIGMA_MAX * scale) if _uniform(g, 0.0, 1.0) < BLUR_P else 0.0
        kinds.append(kind)
        if center is None:  # no brain in this slice: nothing to corrupt
            a_tex[b], a_bias[b] = 0.0, 0.0
            kinds[-1] = None
            continue
        y0, x0 = _box_origin(center, box, H, W)
        m = torch.zeros(H, W, dtype=dt, device=dev)
        m[y0:y0 + box, x0:x0 + box] = shp.to(dt)
        m = gaussian_blur(m, blur) * fg.to(dt)
        shapes[b, 0] = m
        cur = xb
        # -- texture: foreign patch interpolation
        src = donors[b, 0].to(dt) if donors is not None else xb
        src_fg = src > 0
        pc = _pick_pixel(g, src_fg & _interior(H, W, box // 2, dev)) or _pick_pixel(g, src_fg) or (H // 2, W // 2)
        py, px = _box_origin(pc, box, H, W)
        if texture:
            region = m > 1e-3
            patch = torch.zeros(H, W, dtype=dt, device=dev)
            patch[y0:y0 + box, x0:x0 + box] = src[py:py + box, px:px + box]
            if region.any():
                lo, hi = cur[region].min(), cur[region].max()
                plo, phi = patch[region].min(), patch[region].max()
                if float(phi - plo) > 1e-6:
                    patch = (patch - plo) / (phi - plo) * (hi - lo) + lo
                else:
                    patch = torch.full_like(patch, float((lo + hi) / 2))
                cur = cur + (at * m) * (patch - cur)
                a_tex[b] = at
        # -- intensity bias on one intensity cluster inside the shape
        if bias:
            q = (cur.reshape(-1, 1) - codebook.reshape(1, -1)).abs().argmin(dim=1).reshape(H, W)
            inside = m > 0.5 if (m > 0.5).any() else m > 1e-3
            counts = torch.stack([((q == k) & inside).sum() for k in range(len(CODEBOOK))]).double().cpu()
            p_k = cluster_probabilities(counts, CLUSTER_PRIOR * scale ** 2)
            drawn = [_uniform(g, 0.0, 1.0) < float(pk) for pk in p_k]  # one draw per centroid, fixed order
            if any(drawn):
                sel = torch.zeros(H, W, dtype=torch.bool, device=dev)
                for k, d_k in enumerate(drawn):
                    if d_k:
                        sel |= q == k
            else:  # no centroid drawn: the whole shape is biased
                sel = torch.ones(H, W, dtype=torch.bool, device=dev)
            whole[b] = not any(drawn)
            clusters[b] = tuple(k for k, d_k in enumerate(drawn) if d_k) or tuple(range(len(CODEBOOK)))
            p_whole[b] = float(torch.prod(1.0 - p_k))
            if ab > 0:
                mb = gaussian_blur(sel.to(dt) * m, 1.0 * scale) * fg.to(dt)
                new = (cur + (ab * sign) * mb).clamp(0.0, upper)
                a_bias[b] = float((new - cur).abs().max())
                cur = new
        out[b, 0] = cur
    a = torch.maximum(a_tex, a_bias)
    t = schedule.label(a).to(dev)
    return Corruption(image=out, alpha=a.to(dev), t=t, shape=shapes, alpha_texture=a_tex.to(dev),
                      alpha_bias=a_bias.to(dev), kinds=kinds, bias_whole_shape=whole, p_whole_shape=p_whole,
                      bias_clusters=clusters)
