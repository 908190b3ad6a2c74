"""DISYRE: the synthetic-corruption schedule and generator, the method's inference modes,
the sliding window and the training objective (tiny networks, 32 x 32 slices)."""

from __future__ import annotations

import math

import pytest
import numpy as np
import torch

from uad.networks import small_unet_config
from torch import nn

from uad.corruption import CODEBOOK, CorruptionSchedule, corrupt, gaussian_blur, random_shape
from uad.methods import build_method, get_method_class
from uad.methods.disyre import DISYRE, importance_map, sliding_window, window_starts
from uad.networks import build_network, tiny_unet_config
from uad.rng import BatchRNG
from uad.zoo import Model, build_model

S = 32


def phantom(batch: int = 2, size: int = S, seed: int = 0):
    """Brain-like slices in [0, 1] (an ellipse with structure) and their masks."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    c = (size - 1) / 2
    m = ((yy - c) / (0.42 * size)) ** 2 + ((xx - c) / (0.36 * size)) ** 2 < 1
    xs, ms = [], []
    for b in range(batch):
        tex = 0.45 + 0.2 * torch.sin(xx / (2.0 + b)) * torch.cos(yy / 3.0) + 0.1 * torch.rand(size, size, generator=g)
        xs.append((tex.clamp(0, 1) * m)[None])
        ms.append(m[None])
    return torch.stack(xs), torch.stack(ms)


def randomize(net: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    """Perturb every parameter (MONAI zero-initialises the output convolution)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return net.eval()


def tiny_model(patch_size: int | None = None, net: nn.Module | None = None) -> Model:
    cfg = DISYRE.default_model_config(image_size=S)
    cfg["networks"]["denoiser"] = tiny_unet_config((8, 16, 16))
    if patch_size is not None:
        cfg["patch_size"] = patch_size
    if net is None:
        torch.manual_seed(0)
        net = randomize(build_network(cfg["networks"]["denoiser"]))
    return Model("tiny-disyre", cfg, {"denoiser": net})


class Pointwise(nn.Module):
    """A per-pixel 'restorer' x0 = f(x, t): translation-equivariant, so windows cannot change it."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.7))

    def forward(self, x, timesteps, class_labels=None):
        t = timesteps.to(x.dtype).view(-1, 1, 1, 1)
        return self.w * x + 0.15 + 0.001 * t + 0.05 * torch.sin(7 * x)


class Constant(nn.Module):
    def __init__(self, c: float):
        super().__init__()
        self.c = nn.Parameter(torch.tensor(float(c)))

    def forward(self, x, timesteps, class_labels=None):
        return torch.zeros_like(x) + self.c


class Identity(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(()))

    def forward(self, x, timesteps, class_labels=None):
        return x + 0 * self.p


# --------------------------------------------------------------------------- schedule
def test_schedule_tables_and_reference_mapping():
    s = CorruptionSchedule()
    assert s.T == 100
    sev = s.severity64
    assert torch.all(sev[1:] > sev[:-1])  # severity grows with t
    assert sev[0] == pytest.approx(0.0045, abs=2e-4) and sev[-1] == pytest.approx(0.9995, abs=2e-4)
    # a_t = sqrt(alpha_bar_t) of the linear 1e-3..0.2 schedule
    betas = torch.linspace(1e-3, 0.2, 100, dtype=torch.float64)
    a = torch.cumprod(1 - betas, 0).sqrt()
    assert torch.allclose(s.a64, a, atol=1e-6)
    assert s.reference_trailing(100, 4) == [99, 74, 49, 24]
    assert s.reference_trailing(100, 5) == [99, 79, 59, 39, 19]
    assert s.reference_labels(4) == [75, 50, 25, 0]
    assert s.reference_labels(5) == [80, 60, 40, 20, 0]
    assert s.trailing(4) == [99, 74, 49, 24]
    # a reference training label t_ref (alpha = a[t_ref]) is T-1-t_ref here, with the same alpha
    for t_ref, t in zip([99, 74, 49, 24], [0, 25, 50, 75]):
        assert s.alpha(t) == float(s.a64[t_ref])
    assert [round(s.alpha(t), 3) for t in s.reference_labels(4)] == [0.727, 0.272, 0.051, 0.005]


def test_labels_monotone_and_round_trip():
    s = CorruptionSchedule()
    alphas = torch.linspace(0, 1, 401)
    t = s.label(alphas)
    assert t.dtype == torch.long and t.shape == alphas.shape
    assert torch.all(t[1:] >= t[:-1])
    assert int(t[0]) == 0 and int(t[-1]) == 99
    ts = torch.arange(100)
    assert torch.equal(s.label(s.alpha(ts).double()), ts)
    assert int(s.label(0.73)) == 75 and int(s.label(0.0)) == 0


# --------------------------------------------------------------------------- corruption
def test_zero_alpha_is_identity():
    x, m = phantom(3)
    c = corrupt(x, m, BatchRNG([1, 2, 3]), alpha=0.0)
    assert torch.equal(c.image, x)
    assert torch.equal(c.t, torch.zeros(3, dtype=torch.long))
    assert torch.all(c.alpha == 0)
    # the shapes were still drawn (same draws as with alpha > 0)
    assert torch.all(c.shape.sum(dim=(1, 2, 3)) > 0)


def test_corruption_in_foreground_range_and_labels():
    x, m = phantom(4, size=64)
    s = CorruptionSchedule()
    for seed in range(3):
        c = corrupt(x, m, BatchRNG([seed * 10 + i for i in range(4)]), s, donors=x.roll(1, 0))
        outside = ~m
        assert torch.all(c.shape[outside] == 0)
        assert torch.all(c.image[outside] == x[outside])
        assert c.image.min() >= 0 and c.image.max() <= 1
        assert torch.all((c.shape >= 0) & (c.shape <= 1 + 1e-6))
        assert torch.all((c.alpha >= 0) & (c.alpha <= 1))
        assert torch.equal(c.alpha, torch.maximum(c.alpha_texture, c.alpha_bias))
        assert torch.equal(c.t, s.label(c.alpha))
        assert torch.all((c.image - x).abs().amax(dim=(1, 2, 3)) > 0)
        # changes only where the shape is (the bias blur adds ~3 sigma around it)
        near = gaussian_blur_batch(c.shape, 4.0) > 1e-6
        assert torch.all((c.image - x)[~near].abs() < 1e-6)


def gaussian_blur_batch(t, sigma):
    return torch.stack([gaussian_blur(t[b, 0], sigma)[None] for b in range(t.shape[0])])


def test_corruption_deterministic_and_batch_independent():
    x, m = phantom(3)
    a = corrupt(x, m, BatchRNG([5, 6, 7]))
    b = corrupt(x, m, BatchRNG([5, 6, 7]))
    assert torch.equal(a.image, b.image) and torch.equal(a.t, b.t)
    single = corrupt(x[1:2], m[1:2], BatchRNG([6]))
    assert torch.equal(single.image[0], a.image[1])
    assert torch.equal(single.t[0], a.t[1])
    other = corrupt(x, m, BatchRNG([8, 9, 10]))
    assert not torch.equal(other.image, a.image)


def test_texture_monotone_in_alpha_for_a_fixed_draw():
    x, m = phantom(2, size=64)
    s = CorruptionSchedule()
    prev_diff, prev_t = None, None
    for alpha in [0.0, 0.1, 0.3, 0.6, 1.0]:
        c = corrupt(x, m, BatchRNG([3, 4]), s, alpha=alpha, bias=False)
        diff = (c.image - x).abs()
        assert torch.equal(c.t, s.label(torch.full((2,), alpha)))
        if prev_diff is not None:
            assert torch.all(diff >= prev_diff - 1e-6)
            assert torch.all(c.t >= prev_t)
        prev_diff, prev_t = diff, c.t
    assert prev_diff.sum() > 0


def test_bias_changes_the_drawn_clusters_by_at_most_alpha():
    x, m = phantom(2, size=64)
    c = corrupt(x, m, BatchRNG([11, 12]), alpha=0.4, texture=False)
    d = (c.image - x).abs()
    assert d.max() <= 0.4 + 1e-6
    assert torch.all(c.alpha_texture == 0)
    assert torch.all(c.alpha_bias <= 0.4 + 1e-6)
    # without texture the label is the effective bias (the largest change it made)
    assert torch.equal(c.alpha, c.alpha_bias)
    assert torch.allclose(c.alpha, d.amax(dim=(1, 2, 3)))
    assert torch.all(c.alpha > 0.2)
    # the strongest changes lie in the drawn intensity clusters of the codebook (all: the whole shape)
    code = torch.tensor(CODEBOOK)
    for b in range(2):
        strong = d[b, 0] > 0.9 * float(d[b].max())
        q = (x[b, 0][strong].reshape(-1, 1) - code).abs().argmin(1)
        assert set(q.unique().tolist()) <= set(c.bias_clusters[b])
        assert bool(c.bias_whole_shape[b]) == (len(c.bias_clusters[b]) == len(CODEBOOK))
    assert len(CODEBOOK) == 5


def test_bias_keeps_the_slices_intensity_range():
    """Slices normalised to [0, 2] (FLAIR's clip_max 2): the bias clips to [0, upper], so a bright pixel inside a
    shape is changed by at most alpha and a brightened anomaly may exceed 1; clipping to [0, 1] (the default
    upper, right for [0, 1] slices) would cut the bright pixels down to 1, a change larger than alpha."""
    x, m = phantom(4, size=64)
    bright = (x * 2.4).clamp(max=2.0)  # values up to 1.8
    assert float(bright.max()) > 1.5
    c = corrupt(bright, m, BatchRNG([21, 22, 23, 24]), alpha=0.4, texture=False, upper=2.0)
    d = (c.image - bright).abs()
    assert d.max() <= 0.4 + 1e-6
    assert torch.allclose(c.alpha, d.amax(dim=(1, 2, 3)))
    assert c.image.min() >= 0 and c.image.max() <= 2.0
    brightened = (c.image - bright) > 0.2
    assert brightened.any() and float(c.image[brightened].max()) > 1.0
    cut = corrupt(bright, m, BatchRNG([21, 22, 23, 24]), alpha=0.4, texture=False)  # upper 1
    assert float((cut.image - bright).abs().max()) > 0.45  # e.g. 1.8 -> 1 somewhere in a shape
    # the same draws: on [0, 1] slices the upper bound changes nothing
    a = corrupt(x, m, BatchRNG([5, 6, 7, 8]), upper=2.0)
    b = corrupt(x, m, BatchRNG([5, 6, 7, 8]))
    assert torch.equal(a.t, b.t) and torch.equal(a.shape, b.shape)
    with pytest.raises(ValueError, match="upper"):
        corrupt(x, m, BatchRNG([5, 6, 7, 8]), upper=0.5)


def test_cluster_selection_as_the_reference():
    """Each centroid is drawn with p_k = n_k / (N + 1000); none drawn -> the whole shape: the rate of
    whole-shape corruptions matches the reference formula prod_k (1 - p_k) averaged over the draws."""
    from uad.corruption import CLUSTER_PRIOR, cluster_probabilities

    p = cluster_probabilities(torch.tensor([300.0, 200.0, 0.0, 0.0, 500.0]), CLUSTER_PRIOR)
    np.testing.assert_allclose(p.numpy(), [0.15, 0.1, 0.0, 0.0, 0.25])
    n = 400
    x, m = phantom(n, size=32)
    c = corrupt(x, m, BatchRNG(range(5000, 5000 + n)), alpha=0.5, texture=False)
    ok = ~torch.isnan(c.p_whole_shape)
    expected = float(c.p_whole_shape[ok].mean())
    observed = float(c.bias_whole_shape[ok].float().mean())
    sd = (expected * (1 - expected) / int(ok.sum())) ** 0.5
    assert abs(observed - expected) < 3.5 * sd + 0.01, (observed, expected)
    assert 0.45 < expected < 0.95  # most corruptions bias the whole shape, as in the reference
    # an independent draw per centroid: several clusters biased together happens
    assert any(len(k) >= 2 and not w for k, w in zip(c.bias_clusters, c.bias_whole_shape.tolist()))


@pytest.mark.parametrize("kind", ["square", "disk", "blob"])
def test_random_shapes(kind):
    g = torch.Generator().manual_seed(1)
    shp, k = random_shape(g, 32, 0.5, kind)
    assert k == kind and shp.shape == (32, 32)
    area = float(shp.sum())
    assert 0 < area < 32 * 32 * 0.6
    assert set(torch.unique(shp).tolist()) <= {0.0, 1.0}


# --------------------------------------------------------------------------- method
def test_presets_labels_and_validation():
    model = tiny_model()
    assert build_method("disyre", model).labels == [75, 50, 25, 0]
    assert build_method("disyre", model, preset="fast").labels == [75, 50]
    assert build_method("disyre", model, preset="isbi").labels == [99, 74, 49, 24]
    assert build_method("disyre", model, steps=5).labels == [80, 60, 40, 20, 0]
    assert build_method("disyre", model, labels=(10, 90)).labels == [90, 10]
    with pytest.raises(ValueError):
        build_method("disyre", model, mode="bogus")
    with pytest.raises(ValueError):
        build_method("disyre", model, labels=(100,))
    assert get_method_class("disyre") is DISYRE


@pytest.mark.parametrize("preset,nfe", [("paper", 4), ("fast", 2), ("isbi", 4)])
def test_run_shapes_ranges_and_mask(preset, nfe):
    x, m = phantom(2)
    out = build_method("disyre", tiny_model(), preset=preset)(x, m, BatchRNG([1, 2]))
    assert out.restoration.shape == x.shape and out.anomaly.shape == x.shape
    assert out.restoration.min() >= 0 and out.restoration.max() <= 1
    assert out.anomaly.min() >= 0 and torch.isfinite(out.anomaly).all()
    assert torch.all(out.anomaly[~m] == 0)
    assert out.anomaly[m].sum() > 0
    assert out.nfe == nfe and out.extras["windows"] == 1


def test_deterministic_and_batch_independent():
    x, m = phantom(3)
    meth = build_method("disyre", tiny_model())
    a = meth(x, m, BatchRNG([1, 2, 3]))
    b = meth(x, m, BatchRNG([1, 2, 3]))
    assert torch.equal(a.anomaly, b.anomaly) and torch.equal(a.restoration, b.restoration)
    single = meth(x[2:3], m[2:3], BatchRNG([3]))
    assert torch.allclose(single.anomaly[0], a.anomaly[2], atol=1e-5)
    assert torch.allclose(single.restoration[0], a.restoration[2], atol=1e-5)


def test_identity_restorer_gives_zero_score():
    x, m = phantom(2)
    for preset in ("paper", "isbi"):
        out = build_method("disyre", tiny_model(net=Identity()), preset=preset)(x, m, BatchRNG([1, 2]))
        assert torch.all(out.anomaly == 0)
        assert torch.allclose(out.restoration, x)


def test_constant_restorer_scores_analytically():
    """x0 = c everywhere: single-step AS = |x - c| * brain fraction; the multi-step (cold-diffusion)
    chain shrinks |x_t - c| by a_next / a_t per step, so AS = |x - c| * mean_i(a_i / a_0) * fraction."""
    c = 0.25
    x, m = phantom(2)
    frac = m.float().mean(dim=(1, 2, 3), keepdim=True)
    model = tiny_model(net=Constant(c))
    single = build_method("disyre", model)(x, m, BatchRNG([1, 2]))
    expect = (x - c).abs() * frac * m
    assert torch.allclose(single.anomaly, expect, atol=1e-6)
    assert torch.allclose(single.restoration, torch.full_like(x, c))
    multi = build_method("disyre", model, preset="multi-step")(x, m, BatchRNG([1, 2]))
    s = CorruptionSchedule()
    alphas = [s.alpha(t) for t in [99, 74, 49, 24]]
    factor = sum(a / alphas[0] for a in alphas) / 4
    assert torch.allclose(multi.anomaly, (x - c).abs() * factor * frac * m, atol=1e-6)
    assert torch.allclose(multi.restoration, torch.full_like(x, c))
    # ISBI Algorithm 1: x_t <- (1 - a_next) c + a_next x_t, so |x_t - c| shrinks by a_next (ISBI schedule)
    isbi = build_method("disyre", model, preset="isbi")(x, m, BatchRNG([1, 2]))
    a_isbi = [CorruptionSchedule(variant="isbi").alpha(t) for t in [99, 74, 49, 24]]
    assert a_isbi[0] == pytest.approx(1 - math.sqrt(float(s.a64[99] ** 2)), abs=1e-9)  # 1 - sqrt(alpha_bar_99)
    factor_isbi = sum(math.prod(a_isbi[1:i + 1]) for i in range(4)) / 4
    assert torch.allclose(isbi.anomaly, (x - c).abs() * factor_isbi * frac * m, atol=1e-6)
    assert isbi.extras["schedule_note"] and "v2" in isbi.extras["schedule_note"]
    unweighted = build_method("disyre", model, weight_foreground=False)(x, m, BatchRNG([1, 2]))
    assert torch.allclose(unweighted.anomaly * frac, single.anomaly, atol=1e-7)


@pytest.mark.parametrize("clip_max", [1.0, 2.0])
def test_restoration_tops_out_at_the_upper_percentile(clip_max):
    """The restoration is clamped to [0, 1] whatever the model's clip_max: 1 is the brain's upper normalisation
    percentile, and a pseudo-healthy FLAIR is not brighter than that, although the FLAIR models' slices span
    [0, 2] and the network is trained on them (a constant 1.5 restores to 1 and scores |x - 1|).  Deliberate:
    clamping to [0, clip_max] instead lowered the FLAIR MS validation AP (0.866 -> 0.861; tumour and stroke
    unchanged), since a lesion the network partly keeps still scores at least its excess over 1."""
    c = 1.5
    x, m = phantom(2)
    x = (x * 1.8).clamp(max=clip_max)
    frac = m.float().mean(dim=(1, 2, 3), keepdim=True)
    model = tiny_model(net=Constant(c))
    model.config["normalisation"] = {"clip_max": clip_max}
    single = build_method("disyre", model)(x, m, BatchRNG([1, 2]))
    assert torch.allclose(single.restoration, torch.ones_like(x))
    assert torch.allclose(single.anomaly, (x - 1.0).abs() * frac * m, atol=1e-6)
    if clip_max > 1:
        assert (single.anomaly[x > 1.0] > 0).all()


def test_restoration_strongest_or_mean():
    x, m = phantom(1)
    model = tiny_model(net=Pointwise())
    strongest = build_method("disyre", model)(x, m, BatchRNG([1]))
    mean = build_method("disyre", model, restoration="mean")(x, m, BatchRNG([1]))
    f = lambda t: (0.7 * x + 0.15 + 0.001 * t + 0.05 * torch.sin(7 * x)).clamp(0, 1)  # noqa: E731
    assert torch.allclose(strongest.restoration, f(75), atol=1e-6)
    assert torch.allclose(mean.restoration, sum(f(t) for t in [75, 50, 25, 0]) / 4, atol=1e-6)


# --------------------------------------------------------------------------- sliding window
def test_window_geometry_and_importance_map():
    assert window_starts(32, 32, 8) == ([0], 32)
    assert window_starts(20, 32, 8) == ([0], 32)
    starts, padded = window_starts(40, 16, 4)
    assert starts[0] == 0 and starts[-1] + 16 == padded and padded >= 40 and len(starts) == 7
    w = importance_map(16)
    assert w.shape == (16, 16) and float(w.max()) == pytest.approx(1.0, abs=0.01)
    assert float(w.min()) >= 1e-3 and torch.allclose(w, w.T) and torch.allclose(w, w.flip(0))
    sigma = 0.125 * 16
    ratio = math.exp(-0.5 * ((7 - 7.5) ** 2 - (4 - 7.5) ** 2) / sigma ** 2)
    assert float(w[8, 7] / w[8, 4]) == pytest.approx(ratio, rel=1e-4)
    assert float(w[8, 0]) == pytest.approx(1e-3)  # the floor


@pytest.mark.parametrize("size", [32, 38])
def test_sliding_window_reproduces_single_pass(size):
    """With a per-pixel restorer, folding overlapping windows must give the single-pass result."""
    x, m = phantom(2, size=size)
    net = Pointwise()
    whole = build_method("disyre", tiny_model(patch_size=size, net=net), "paper", weight_foreground=False)
    # (with 16-px windows the paper preset costs 4 x windows > 60 NFE, so the default would be "fast")
    win = build_method("disyre", tiny_model(patch_size=16, net=net), "paper", weight_foreground=False,
                       sw_batch_size=7)
    a = whole(x, m, BatchRNG([1, 2]))
    b = win(x, m, BatchRNG([1, 2]))
    assert a.extras["windows"] == 1 and b.extras["windows"] > 1
    n_axis = math.ceil((size - 16) / 4) + 1
    assert b.extras["windows"] == n_axis ** 2 and b.nfe == 4 * n_axis ** 2
    assert torch.allclose(a.anomaly, b.anomaly, atol=1e-6)
    assert torch.allclose(a.restoration, b.restoration, atol=1e-6)
    # multi-step too
    a2 = build_method("disyre", tiny_model(patch_size=size, net=net), preset="isbi", weight_foreground=False)(
        x, m, BatchRNG([1, 2]))
    b2 = build_method("disyre", tiny_model(patch_size=16, net=net), preset="isbi", weight_foreground=False)(
        x, m, BatchRNG([1, 2]))
    assert torch.allclose(a2.anomaly, b2.anomaly, atol=1e-6)


def test_patch_covering_the_image_is_a_single_pass():
    x, m = phantom(2)
    net = randomize(build_network(tiny_unet_config((8, 16, 16))), seed=3)
    default = build_method("disyre", tiny_model(net=net))(x, m, BatchRNG([1, 2]))
    big = build_method("disyre", tiny_model(patch_size=64, net=net))(x, m, BatchRNG([1, 2]))
    assert torch.equal(default.anomaly, big.anomaly) and big.extras["windows"] == 1
    # the generic fold with one window equals the function itself
    fn = build_method("disyre", tiny_model(net=net))._pipeline
    score, rest, n = sliding_window(fn, x, m, patch=S)
    s1, r1 = fn(x, m)
    assert n == 1 and torch.allclose(score, s1, atol=1e-6) and torch.allclose(rest, r1, atol=1e-6)


def test_sliding_window_with_a_unet_and_foreground_weighting():
    x, m = phantom(1, size=48)
    out = build_method("disyre", tiny_model(patch_size=16), "paper")(x, m, BatchRNG([1]))
    assert out.anomaly.shape == x.shape and torch.isfinite(out.anomaly).all()
    assert torch.all(out.anomaly[~m[:, :, :, :]] == 0) and out.anomaly.sum() > 0
    assert out.nfe == 4 * (math.ceil((48 - 16) / 4) + 1) ** 2


# --------------------------------------------------------------------------- training
def test_training_loss_finite_backprop_and_deterministic():
    model = tiny_model()
    net = model.net("denoiser").train()
    x, m = phantom(3)
    loss = DISYRE.training_loss(model, x, m, BatchRNG([1, 2, 3]))
    assert loss.ndim == 0 and torch.isfinite(loss) and float(loss.detach()) > 0
    loss.backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    again = DISYRE.training_loss(model, x, m, BatchRNG([1, 2, 3]))
    assert float(again.detach()) == pytest.approx(float(loss.detach()), rel=1e-6)


def test_training_target_is_the_clean_image():
    """A perfect restorer of the clean batch has zero loss; the identity pays for the corruption."""
    x, m = phantom(2)

    class Oracle(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.zeros(()))

        def forward(self, xc, timesteps, class_labels=None):
            return x + 0 * self.p

    assert float(DISYRE.training_loss(tiny_model(net=Oracle()), x, m, BatchRNG([1, 2])).detach()) == 0.0
    assert float(DISYRE.training_loss(tiny_model(net=Identity()), x, m, BatchRNG([1, 2])).detach()) > 0


@pytest.mark.parametrize("clip_max", [1.0, 2.0])
def test_training_corrupts_within_the_models_normalisation_range(clip_max):
    """training_loss corrupts within [0, the model's clip_max]: with the identity network the loss is the
    mean squared corruption, computed here with corrupt(upper=clip_max) from the same draws."""
    x, m = phantom(3)
    x = (x * 2.4).clamp(max=2.0) if clip_max > 1 else x
    model = tiny_model(net=Identity())
    model.config["normalisation"] = {"clip_max": clip_max}
    from uad.methods.disyre import intensity_top

    assert intensity_top(model) == clip_max
    loss = float(DISYRE.training_loss(model, x, m, BatchRNG([4, 5, 6])).detach())
    sched = CorruptionSchedule(model.schedule)
    ref = corrupt(x, m, BatchRNG([4, 5, 6]), sched, donors=x.roll(1, dims=0), upper=clip_max).image
    assert loss == pytest.approx(float(((ref - x) ** 2).mean()), rel=1e-5)
    if clip_max > 1:
        cut = corrupt(x, m, BatchRNG([4, 5, 6]), sched, donors=x.roll(1, dims=0)).image
        assert loss != pytest.approx(float(((cut - x) ** 2).mean()), rel=1e-3)
    model.config["normalisation"] = {"clip": False}
    assert intensity_top(model) == math.inf


def test_default_model_config():
    cfg = DISYRE.default_model_config(image_size=32)
    assert cfg["methods"] == ["disyre"] and cfg["intensity_range"] == [0.0, 1.0]
    assert cfg["schedule"]["prediction_type"] == "sample" and cfg["schedule"]["num_train_timesteps"] == 100
    assert cfg["schedule"]["beta_start"] == 1e-3 and cfg["schedule"]["beta_end"] == 0.2
    assert cfg["networks"]["denoiser"]["channels"] == small_unet_config()["channels"]
    model = build_model(cfg)
    out = build_method("disyre", model, preset="fast")(*phantom(1), BatchRNG([0]))
    assert out.anomaly.shape == (1, 1, 32, 32)
    big = DISYRE.default_model_config(image_size=128, small=False)
    assert big["networks"]["denoiser"]["channels"] == [32, 64, 96, 128, 256, 256]
