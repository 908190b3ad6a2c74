"""Wolleb et al.: DDIM encoding + classifier-guided decoding, with analytic networks
(an exact epsilon-predictor for Gaussian data, a linear classifier) and tiny MONAI networks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from uad.diffusion import Diffusion
from uad.methods import build_method, get_method_class
from uad.methods.wolleb import ANOMALOUS, HEALTHY, Wolleb, classifier_log_prob_grad, ddim_grid
from uad.networks import build_network, tiny_unet_config
from uad.rng import BatchRNG
from uad.zoo import Model, build_model

SCHEDULE = {"num_train_timesteps": 1000, "schedule": "linear_beta", "beta_start": 1e-4, "beta_end": 2e-2,
            "prediction_type": "epsilon", "clip_sample": False}


class GaussianEps(nn.Module):
    """The exact epsilon-predictor for data x0 ~ N(mu, sd^2 I) (in the model range):
    E[eps | x_t] = sqrt(1-ab) (x_t - sqrt(ab) mu) / (ab sd^2 + 1 - ab).  Its DDIM ODE is
    invertible up to discretisation error.  Records the class labels it was called with."""

    def __init__(self, mu: float = 0.0, sd: float = 0.5):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(()))
        self.register_buffer("ab", Diffusion(SCHEDULE).alpha_bar64.float())
        self.mu, self.sd = mu, sd
        self.labels_seen: list = []

    def forward(self, x, timesteps, class_labels=None):
        self.labels_seen.append(None if class_labels is None else class_labels.tolist())
        ab = self.ab[timesteps.long()].view(-1, 1, 1, 1)
        return (1 - ab).sqrt() * (x - ab.sqrt() * self.mu) / (ab * self.sd ** 2 + 1 - ab) + 0 * self.p


class LinearClassifier(nn.Module):
    """logits = [0, z], z = k * mean(x) + b: p(anomalous) grows with the mean intensity.
    grad_x log p(healthy | x) = -sigmoid(z) * k / N."""

    def __init__(self, k: float = 1.0, b: float = 0.0):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(()))
        self.k, self.b = k, b
        self.calls = 0

    def forward(self, x, timesteps, class_labels=None):
        self.calls += 1
        z = self.k * x.mean(dim=(1, 2, 3)) + self.b + 0 * self.p
        return torch.stack([torch.zeros_like(z), z], dim=1)


class Forbidden(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(()))

    def forward(self, *a, **k):
        raise AssertionError("the classifier must not be called without guidance")


def analytic_model(classifier: nn.Module | None = None, size: int = 8) -> Model:
    cfg = {"methods": ["wolleb"], "image_size": size, "intensity_range": [-1.0, 1.0], "schedule": dict(SCHEDULE)}
    return Model("analytic", cfg, {"denoiser": GaussianEps(), "classifier": classifier or LinearClassifier()})


def data(batch: int = 2, size: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = 0.2 + 0.6 * torch.rand(batch, 1, size, size, generator=g)
    return x, torch.ones_like(x, dtype=torch.bool)


def randomize(net: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return net.eval()


def tiny_model(size: int = 32) -> Model:
    from monai.networks.nets.diffusion_model_unet import DiffusionModelEncoder

    cfg = Wolleb.default_model_config(image_size=size)
    cfg["networks"]["denoiser"] = tiny_unet_config((8, 16, 16), num_class_embeds=2)
    torch.manual_seed(0)
    unet = randomize(build_network(cfg["networks"]["denoiser"]), 1)
    clf = randomize(DiffusionModelEncoder(spatial_dims=2, in_channels=1, out_channels=2, channels=(8, 16, 16),
                                          attention_levels=(False, False, True), num_res_blocks=1,
                                          num_head_channels=16, norm_num_groups=8, input_shape=(size, size)), 2)
    return Model("tiny-wolleb", cfg, {"denoiser": unet, "classifier": clf})


def phantom(batch: int = 2, size: int = 32):
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    c = (size - 1) / 2
    m = ((yy - c) / (0.42 * size)) ** 2 + ((xx - c) / (0.36 * size)) ** 2 < 1
    x = torch.stack([((0.5 + 0.2 * torch.sin(xx / (2.0 + b)) * torch.cos(yy / 3.0)) * m)[None] for b in range(batch)])
    return x, torch.stack([m[None]] * batch)


# --------------------------------------------------------------------------- grid and presets
def test_grid_and_presets():
    assert ddim_grid(500, None) == list(range(500))
    g = ddim_grid(500, 50)
    assert len(g) == 51 and g[0] == 0 and g[-1] == 499 and g == sorted(set(g))
    assert ddim_grid(1, None) == [0] and ddim_grid(2, None) == [0, 1]
    m = analytic_model()
    paper = build_method("wolleb", m, preset="paper")
    assert (paper.params.level, paper.params.scale, len(paper.grid) - 1) == (500, 100.0, 499)
    tut = build_method("wolleb", m, preset="tutorial")
    assert (tut.params.level, tut.params.scale, len(tut.grid) - 1) == (200, 6.0, 199)
    fast = build_method("wolleb", m)
    assert fast.preset == "fast" and len(fast.grid) - 1 == 50
    with pytest.raises(ValueError):
        build_method("wolleb", m, level=0)
    with pytest.raises(ValueError):
        build_method("wolleb", m, level=1001)
    with pytest.raises(ValueError):
        build_method("wolleb", m, scale=-1.0)
    assert get_method_class("wolleb") is Wolleb and Wolleb.needs_labels
    assert Wolleb.roles == ("denoiser", "classifier")


# --------------------------------------------------------------------------- encode / decode
def test_unguided_round_trip_reconstructs_and_improves_with_steps():
    x, m = data()
    model = analytic_model(Forbidden())
    errs = []
    for steps in (5, 10, 50):
        out = build_method("wolleb", model, level=500, steps=steps, scale=0.0)(x, m, BatchRNG([0, 1]))
        assert out.nfe == 2 * steps and out.extras["classifier_calls"] == 0
        errs.append(float((out.restoration - x).abs().max()))
    full = build_method("wolleb", model, preset="paper", scale=0.0)(x, m, BatchRNG([0, 1]))
    assert full.nfe == 2 * 499
    errs.append(float((full.restoration - x).abs().max()))
    assert errs[0] > errs[1] > errs[2] > errs[3]
    assert errs[3] < 5e-3  # every step: near-exact inversion
    assert errs[2] < 3e-2
    assert torch.allclose(full.anomaly, (x - full.restoration).abs())
    # a shallower encoding is even closer
    short = build_method("wolleb", model, preset="paper", level=100, scale=0.0)(x, m, BatchRNG([0, 1]))
    assert float((short.restoration - x).abs().max()) < 2e-3


def test_encoding_reaches_the_latent_and_uses_the_healthy_label():
    """For N(0, sd^2) data the DDIM ODE maps x_s to x_t = x_s * sqrt(ab_t sd^2 + 1 - ab_t) / sqrt(ab_s sd^2 + 1 - ab_s)."""
    x, m = data()
    model = analytic_model(Forbidden())
    d = Diffusion(SCHEDULE)
    y = torch.full((2,), HEALTHY)
    errs = []
    for steps in (6, 60, None):
        meth = build_method("wolleb", model, preset="paper", level=300, steps=steps, scale=0.0)
        with torch.no_grad():
            lat, n = meth.encode(meth.to_model(x), y)
        assert n == (steps or 299) and meth.grid[-1] == 299
        ab, ab0 = d.alpha_bar(299), d.alpha_bar(0)
        k = math.sqrt(ab * 0.25 + 1 - ab) / math.sqrt(ab0 * 0.25 + 1 - ab0)
        errs.append(float((lat - k * meth.to_model(x)).abs().max()))
    assert errs[0] > errs[1] > errs[2] and errs[2] < 5e-3
    assert all(lab == [HEALTHY, HEALTHY] for lab in model.net("denoiser").labels_seen)


def test_scale_zero_equals_plain_ddim():
    x, m = data()
    model = analytic_model(Forbidden())
    out = build_method("wolleb", model, level=200, steps=8, scale=0.0)(x, m, BatchRNG([0, 1]))
    d = Diffusion(SCHEDULE)
    net = model.net("denoiser")
    grid = ddim_grid(200, 8)
    z = x * 2 - 1
    with torch.no_grad():
        for t, tn in zip(grid[:-1], grid[1:]):
            z, _ = d.ddim_reverse_step(net(z, torch.full((2,), t)), t, tn, z)
        for i in range(len(grid) - 1, 0, -1):
            z, _ = d.ddim_step(net(z, torch.full((2,), grid[i])), grid[i], grid[i - 1], z)
    assert torch.allclose(out.restoration, ((z + 1) / 2).clamp(0, 1), atol=1e-6)
    assert out.nfe == 16 and out.extras["unet_calls"] == 16 and out.extras["classifier_calls"] == 0


def test_one_guided_step_matches_the_formula():
    """level 2: encode 0 -> 1, decode 1 -> 0 with eps~ = eps - sqrt(1 - ab_1) s grad log p(healthy | x_1)."""
    x, m = data(1)
    clf = LinearClassifier(k=3.0, b=0.5)
    model = analytic_model(clf)
    s = 40.0
    out = build_method("wolleb", model, level=2, scale=s)(x, m, BatchRNG([0]))
    assert out.nfe == 3 and out.extras["unet_calls"] == 2 and out.extras["classifier_calls"] == 1
    d = Diffusion(SCHEDULE)
    ab0, ab1 = d.alpha_bar(0), d.alpha_bar(1)
    net = model.net("denoiser")
    with torch.no_grad():
        z = x * 2 - 1
        e0 = net(z, torch.tensor([0]))
        x1 = math.sqrt(ab1) * (z - math.sqrt(1 - ab0) * e0) / math.sqrt(ab0) + math.sqrt(1 - ab1) * e0
        e1 = net(x1, torch.tensor([1]))
        zz = 3.0 * x1.mean() + 0.5
        grad = -torch.sigmoid(zz) * 3.0 / x1.numel() * torch.ones_like(x1)
        et = e1 - math.sqrt(1 - ab1) * s * grad
        x0 = (x1 - math.sqrt(1 - ab1) * et) / math.sqrt(ab1)
        rec = math.sqrt(ab0) * x0 + math.sqrt(1 - ab0) * et
    assert torch.allclose(out.restoration, ((rec + 1) / 2).clamp(0, 1), atol=1e-6)


def test_guidance_moves_towards_the_healthy_class():
    """The linear classifier calls bright images anomalous: guidance must darken, more with a larger s."""
    x, m = data()
    shifts, maps = [], []
    for s in (0.0, 10.0, 100.0):
        out = build_method("wolleb", analytic_model(LinearClassifier()), level=500, steps=20, scale=s)(
            x, m, BatchRNG([0, 1]))
        shifts.append(float((out.restoration - x).mean()))
        maps.append(float(out.anomaly.mean()))
        assert out.nfe == 40 + (20 if s > 0 else 0)
    assert shifts[0] > shifts[1] > shifts[2]
    assert shifts[2] < -0.1 and abs(shifts[0]) < 0.02
    assert maps[2] > maps[1] > maps[0]
    # guiding towards healthy lowers p(anomalous) of the output
    clf = LinearClassifier()
    p = [torch.softmax(clf((x + sh) * 2 - 1, torch.zeros(2, dtype=torch.long)), 1)[:, ANOMALOUS].mean()
         for sh in (0.0, shifts[2])]
    assert p[1] < p[0]


def test_classifier_gradient_under_inference_mode():
    x, _ = data()
    clf = LinearClassifier(k=2.0, b=-0.3)
    with torch.inference_mode():
        xi = x * 2 - 1
        y = torch.full((2,), HEALTHY)
        g = classifier_log_prob_grad(clf, xi, 10, y)
        g1 = classifier_log_prob_grad(clf, xi, 10, torch.full((2,), ANOMALOUS))
    z = 2.0 * (x * 2 - 1).mean(dim=(1, 2, 3)) - 0.3
    expect = (-torch.sigmoid(z) * 2.0 / 64).view(2, 1, 1, 1).expand_as(x)
    assert torch.allclose(g, expect, atol=1e-7)
    expect1 = ((1 - torch.sigmoid(z)) * 2.0 / 64).view(2, 1, 1, 1).expand_as(x)
    assert torch.allclose(g1, expect1, atol=1e-7)
    assert not g.requires_grad


def test_paper_preset_nfe():
    x, m = data(1, size=4)
    clf = LinearClassifier()
    out = build_method("wolleb", analytic_model(clf, size=4), preset="paper")(x, m, BatchRNG([0]))
    assert out.nfe == 499 * 3 and out.extras["unet_calls"] == 998 and out.extras["classifier_calls"] == 499
    assert clf.calls == 499


# --------------------------------------------------------------------------- tiny MONAI networks
def test_tiny_networks_shapes_ranges_determinism_batch_independence():
    x, m = phantom(3)
    meth = build_method("wolleb", tiny_model(), level=100, steps=3, scale=50.0)
    a = meth(x, m, BatchRNG([1, 2, 3]))
    assert a.restoration.shape == x.shape and a.anomaly.shape == x.shape
    assert a.restoration.min() >= 0 and a.restoration.max() <= 1
    assert a.anomaly.min() >= 0 and torch.all(a.anomaly[~m] == 0) and a.anomaly.sum() > 0
    assert a.nfe == 9 and a.extras["unet_calls"] == 6 and a.extras["classifier_calls"] == 3
    b = meth(x, m, BatchRNG([7, 8, 9]))  # deterministic: the seed does not matter
    assert torch.equal(a.restoration, b.restoration)
    single = meth(x[1:2], m[1:2], BatchRNG([2]))
    assert torch.allclose(single.restoration[0], a.restoration[1], atol=1e-5)
    assert torch.allclose(single.anomaly[0], a.anomaly[1], atol=1e-5)
    unguided = build_method("wolleb", tiny_model(), level=100, steps=3, scale=0.0)(x, m, BatchRNG([1, 2, 3]))
    assert not torch.allclose(unguided.restoration, a.restoration)


def test_training_loss_parts_and_backprop():
    model = tiny_model()
    for net in model.networks.values():
        net.train()
    x, m = phantom(4)
    y = torch.tensor([0, 1, 0, 1])
    total, parts = Wolleb.training_loss(model, x, m, BatchRNG([1, 2, 3, 4]), labels=y, return_parts=True)
    assert torch.isfinite(total) and set(parts) == {"denoiser", "classifier"}
    assert torch.allclose(total, parts["denoiser"] + parts["classifier"])
    assert Wolleb.last_loss_parts["classifier"] == pytest.approx(float(parts["classifier"].detach()))
    assert float(parts["classifier"].detach()) == pytest.approx(math.log(2), abs=0.5)
    total.backward()
    for role in ("denoiser", "classifier"):
        gsum = sum(float(p.grad.abs().sum()) for p in model.net(role).parameters() if p.grad is not None)
        assert gsum > 0, role
    emb = model.net("denoiser").class_embedding.weight.grad
    assert emb is not None and float(emb.abs().sum()) > 0  # the labels condition the UNet
    for net in model.networks.values():
        net.eval()  # no dropout: the loss is a function of the seeds
    first = Wolleb.training_loss(model, x, m, BatchRNG([1, 2, 3, 4]), labels=y)
    plain = Wolleb.training_loss(model, x, m, BatchRNG([1, 2, 3, 4]), labels=y)
    assert float(plain.detach()) == pytest.approx(float(first.detach()), rel=1e-6)
    flipped = Wolleb.training_loss(model, x, m, BatchRNG([1, 2, 3, 4]), labels=1 - y)
    assert float(flipped.detach()) != pytest.approx(float(first.detach()), rel=1e-6)
    with pytest.raises(ValueError):
        Wolleb.training_loss(model, x, m, BatchRNG([1, 2, 3, 4]))
    with pytest.raises(ValueError):
        Wolleb.training_loss(model, x, m, BatchRNG([1, 2, 3, 4]), labels=torch.tensor([0, 2, 0, 1]))


def test_default_model_config_builds_and_runs():
    cfg = Wolleb.default_model_config(image_size=64)
    assert cfg["networks"]["denoiser"]["num_class_embeds"] == 2
    assert cfg["networks"]["classifier"]["type"] == "DiffusionModelEncoder"
    assert cfg["networks"]["classifier"]["out_channels"] == 2
    assert cfg["networks"]["classifier"]["input_shape"] == [64, 64]
    assert cfg["intensity_range"] == [-1.0, 1.0] and cfg["schedule"]["num_train_timesteps"] == 1000
    model = build_model(cfg)
    x, m = phantom(1, size=64)
    out = build_method("wolleb", model, level=20, steps=1)(x, m, BatchRNG([0]))
    assert out.nfe == 3 and out.anomaly.shape == (1, 1, 64, 64)
    big = Wolleb.default_model_config(image_size=128, small=False)
    assert big["networks"]["denoiser"]["channels"] == [128, 256, 256]
    assert big["networks"]["classifier"]["input_shape"] == [128, 128]


def test_classifier_built_for_another_size_is_refused():
    from uad import ModelError

    model = tiny_model(size=32)
    model.config["image_size"] = 64
    with pytest.raises(ModelError, match="input_shape"):
        build_method("wolleb", model)
    model.config["image_size"] = 32
    assert build_method("wolleb", model).params.level == 500
