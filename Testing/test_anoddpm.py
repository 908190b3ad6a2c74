"""AnoDDPM on a tiny random network, with Gaussian and simplex noise."""

import pytest
import torch

from uad.diffusion import Diffusion
from uad.methods import available_methods, build_method, get_method_class
from uad.methods.anoddpm import AnoDDPM
from uad.noise import make_noise
from uad.rng import BatchRNG
from uad.zoo import build_model

SIZE = 32


def tiny_config(noise="gaussian"):
    from uad.networks import tiny_unet_config

    return {
        "methods": ["anoddpm"],
        "image_size": SIZE,
        "intensity_range": [-1.0, 1.0],
        "noise": noise,
        "schedule": {"num_train_timesteps": 1000, "schedule": "linear_beta", "beta_start": 1e-4,
                     "beta_end": 2e-2, "prediction_type": "epsilon", "clip_sample": True},
        "networks": {"denoiser": tiny_unet_config((8, 16, 16))},
    }


@pytest.fixture(scope="module", params=["gaussian", "simplex"])
def model(request):
    torch.manual_seed(0)
    m = build_model(tiny_config(request.param), model_id=f"tiny-{request.param}")
    # MONAI zero-initialises the output convolutions; small random weights make the network a real
    # function of its input (otherwise eps_hat = 0 whatever the input)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.net("denoiser").parameters():
            if p.numel() and not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return m


def slices(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, SIZE), torch.linspace(-1, 1, SIZE), indexing="ij")
    disc = (xx ** 2 + yy ** 2) < 0.8
    x = torch.stack([torch.where(disc, (0.5 + 0.2 * torch.cos(3 * xx + i) + 0.05 * torch.randn(SIZE, SIZE,
                                                                                                 generator=g)).clamp(0, 1),
                                 torch.tensor(0.0)) for i in range(b)])[:, None]
    return x, disc.expand(b, 1, SIZE, SIZE).clone()


def test_registered():
    assert "anoddpm" in available_methods()
    assert get_method_class("anoddpm") is AnoDDPM


def test_shapes_ranges_and_mask(model):
    x, mask = slices()
    out = build_method("anoddpm", model, preset="fast", level=30, steps=4)(x, mask, BatchRNG([1, 2, 3]))
    assert out.restoration.shape == x.shape and out.anomaly.shape == x.shape
    assert out.restoration.min() >= 0 and out.restoration.max() <= 1
    assert (out.anomaly >= 0).all() and torch.isfinite(out.anomaly).all()
    assert (out.anomaly[~mask] == 0).all()
    assert out.anomaly[mask].max() > 0
    assert out.extras["noise"] == model.noise
    # fast preset: absolute error in [0, 1]
    torch.testing.assert_close(out.anomaly, (x - out.restoration).abs() * mask)


def test_paper_preset_squared_error_in_model_range(model):
    x, mask = slices(2)
    out = build_method("anoddpm", model, preset="paper", level=8)(x, mask, BatchRNG([4, 5]))
    assert out.nfe == 8  # lambda network evaluations: t = lambda-1 .. 0
    # (x_m - rec_m)^2 with x_m = 2x - 1 -> 4 (x - rec)^2
    torch.testing.assert_close(out.anomaly, 4 * (x - out.restoration) ** 2 * mask, atol=1e-5, rtol=1e-4)
    assert (out.anomaly[~mask] == 0).all()


@pytest.mark.parametrize("level,steps", [(12, 3), (40, 5), (25, 25)])
def test_nfe_fast_equals_steps(model, level, steps):
    x, mask = slices(1)
    out = build_method("anoddpm", model, preset="fast", level=level, steps=steps)(x, mask, BatchRNG([0]))
    assert out.nfe == steps


def test_nfe_paper_equals_level(model):
    x, mask = slices(1)
    for level in (1, 5):
        out = build_method("anoddpm", model, preset="paper", level=level)(x, mask, BatchRNG([0]))
        assert out.nfe == level


def test_determinism_and_batch_independence(model):
    x, mask = slices(3)
    meth = build_method("anoddpm", model, preset="fast", level=30, steps=4, sampler="ddim")
    a = meth(x, mask, BatchRNG([7, 8, 9]))
    b = meth(x, mask, BatchRNG([7, 8, 9]))
    assert torch.equal(a.restoration, b.restoration) and torch.equal(a.anomaly, b.anomaly)
    single = meth(x[1:2], mask[1:2], BatchRNG([8]))
    torch.testing.assert_close(single.restoration, a.restoration[1:2], atol=1e-5, rtol=0)
    torch.testing.assert_close(single.anomaly, a.anomaly[1:2], atol=1e-5, rtol=0)
    # another seed gives another result
    c = meth(x, mask, BatchRNG([70, 80, 90]))
    assert not torch.allclose(c.restoration, a.restoration)


def test_paper_chain_batch_independence_with_stochastic_steps(model):
    """The ancestral chain draws noise (Gaussian or simplex) at every step from each item's generator."""
    x, mask = slices(2)
    meth = build_method("anoddpm", model, preset="paper", level=6)
    a = meth(x, mask, BatchRNG([11, 12]))
    single = meth(x[1:], mask[1:], BatchRNG([12]))
    torch.testing.assert_close(single.restoration, a.restoration[1:], atol=1e-5, rtol=0)


def test_initial_noising_uses_the_model_noise(model):
    """Level 1 (t = 0), one DDIM step: rec = x0_hat(x_0^noisy) exactly as computed by hand."""
    from uad.networks import call_unet

    x, mask = slices(2)
    meth = build_method("anoddpm", model, preset="fast", level=1, steps=1)
    out = meth(x, mask, BatchRNG([3, 4]))
    rng = BatchRNG([3, 4])
    eps = make_noise(model.noise, rng, x.shape[1:], **model.noise_options)
    d = Diffusion(model.schedule)
    x_t = d.q_sample(2 * x - 1, 0, eps)
    with torch.no_grad():
        x0, _ = d.split_prediction(call_unet(model.net("denoiser"), x_t, 0), 0, x_t)
    torch.testing.assert_close(out.restoration, ((x0.clamp(-1, 1) + 1) / 2).clamp(0, 1), atol=1e-5, rtol=0)


def test_noise_override(model):
    x, mask = slices(1)
    other = "simplex" if model.noise == "gaussian" else "gaussian"
    meth = build_method("anoddpm", model, preset="fast", level=10, steps=2, noise=other)
    assert meth(x, mask, BatchRNG([1])).extras["noise"] == other


def test_invalid_parameters(model):
    with pytest.raises(ValueError):
        build_method("anoddpm", model, level=0)
    with pytest.raises(ValueError):
        build_method("anoddpm", model, level=1001)
    with pytest.raises(ValueError):
        build_method("anoddpm", model, preset="paper", level=50, steps=10)  # strided chain needs ddim
    with pytest.raises(ValueError):
        build_method("anoddpm", model, error="huber")
    with pytest.raises(ValueError):
        build_method("anoddpm", model, preset="nope")
    with pytest.raises(ValueError):
        build_method("anoddpm", model, bogus=1)


def test_training_loss(model):
    x, mask = slices(2)
    loss = AnoDDPM.training_loss(model, x, mask, BatchRNG([1, 2]))
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    grads = [p.grad for p in model.net("denoiser").parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.net("denoiser").zero_grad(set_to_none=True)
    again = AnoDDPM.training_loss(model, x, mask, BatchRNG([1, 2]))
    assert torch.allclose(loss.detach(), again.detach())


@pytest.mark.parametrize("noise", ["gaussian", "simplex"])
def test_default_model_config(noise):
    cfg = AnoDDPM.default_model_config(SIZE, small=True, noise=noise)
    assert cfg["noise"] == noise and "anoddpm" in cfg["methods"]
    assert cfg["schedule"]["prediction_type"] == "epsilon"
    assert cfg["image_size"] == SIZE and "denoiser" in cfg["networks"]
