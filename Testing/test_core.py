"""Diffusion core, per-slice RNG, networks and model zoo."""

import json

import numpy as np
import pytest
import torch

from uad import ModelError
from uad.diffusion import Diffusion, partial_timesteps
from uad.networks import build_network, count_parameters, tiny_unet_config
from uad.rng import BatchRNG, slice_seed
from uad.zoo import build_model, find_model, load_model, save_weights, sha256_file, verify


def test_schedule_matches_reference_formula():
    d = Diffusion({"schedule": "linear_beta", "beta_start": 1e-4, "beta_end": 2e-2})
    betas = np.linspace(1e-4, 2e-2, 1000)
    ab = np.cumprod(1 - betas)
    assert np.allclose(d.alpha_bar64.numpy(), ab, rtol=1e-6)
    # noise std at THOR's level 350 is sqrt(1 - ab_350) ~ 0.847
    assert abs(np.sqrt(1 - ab[350]) - 0.847) < 0.002


def test_cosine_schedule_is_monotone():
    d = Diffusion({"schedule": "cosine"})
    ab = d.alpha_bar64.numpy()
    assert ab[0] > 0.999 and ab[-1] < 1e-3 and np.all(np.diff(ab) < 0)


def test_ddpm_step_matches_monai_scheduler():
    from monai.networks.schedulers import DDPMScheduler

    torch.manual_seed(0)
    d = Diffusion()
    ref = DDPMScheduler(num_train_timesteps=1000, schedule="linear_beta", clip_sample=True)
    x_t = torch.randn(2, 1, 8, 8)
    eps = torch.randn(2, 1, 8, 8)
    for t in (0, 1, 17, 500, 999):
        # MONAI's step adds Gaussian noise drawn from a generator; draw the same noise ourselves
        g = torch.Generator().manual_seed(t)
        ref_prev, ref_x0 = ref.step(eps, t, x_t, generator=g)
        g = torch.Generator().manual_seed(t)
        z = torch.randn(x_t.shape, generator=g)
        ours_prev, ours_x0 = d.ddpm_step(eps, t, x_t, z, variance="fixed_small")
        assert torch.allclose(ours_x0, ref_x0, atol=1e-5)
        assert torch.allclose(ours_prev, ref_prev, atol=1e-4), t


def test_ddim_step_and_inverse_match_monai():
    from monai.networks.schedulers import DDIMScheduler

    d = Diffusion()
    ref = DDIMScheduler(num_train_timesteps=1000, schedule="linear_beta", clip_sample=False)
    ref.set_timesteps(50)  # stride 20
    x_t = torch.randn(2, 1, 8, 8) * 0.5
    eps = torch.randn(2, 1, 8, 8)
    ours, _ = d.ddim_step(eps, 500, 480, x_t)
    theirs, _ = ref.step(eps, 500, x_t)
    d_noclip = Diffusion({"clip_sample": False})
    ours, _ = d_noclip.ddim_step(eps, 500, 480, x_t)
    assert torch.allclose(ours, theirs, atol=1e-5)
    ours_next, _ = d_noclip.ddim_reverse_step(eps, 480, 500, x_t)
    theirs_next, _ = ref.reversed_step(eps, 480, x_t)
    assert torch.allclose(ours_next, theirs_next, atol=1e-5)


def test_ddim_with_exact_epsilon_recovers_x0():
    d = Diffusion({"clip_sample": False})
    x0 = torch.rand(1, 1, 8, 8) * 2 - 1
    noise = torch.randn_like(x0)
    x_t = d.q_sample(x0, 300, noise)
    x_prev, x0_hat = d.ddim_step(noise, 300, -1, x_t)
    assert torch.allclose(x0_hat, x0, atol=1e-5) and torch.allclose(x_prev, x0, atol=1e-5)


def test_prediction_types_round_trip():
    x0 = torch.rand(2, 1, 4, 4) * 2 - 1
    n = torch.randn_like(x0)
    t = torch.tensor([10, 700])
    for p in ("epsilon", "sample", "v_prediction"):
        d = Diffusion({"prediction_type": p, "clip_sample": False})
        x_t = d.q_sample(x0, t, n)
        target = d.training_target(x0, n, t)
        x0_hat, eps_hat = d.split_prediction(target, t, x_t)
        assert torch.allclose(x0_hat, x0, atol=1e-4), p
        assert torch.allclose(eps_hat, n, atol=1e-3), p


def test_partial_timesteps():
    assert partial_timesteps(5, None) == [5, 4, 3, 2, 1, 0]
    ts = partial_timesteps(249, 25)
    assert ts[0] == 249 and ts[-1] == 0 and len(ts) == 25 and all(a > b for a, b in zip(ts, ts[1:]))
    assert partial_timesteps(10, 100) == list(range(10, -1, -1))


def test_batch_rng_is_batch_independent():
    a = BatchRNG.for_slices(3, [0, 1, 2, 3]).randn((1, 4, 4))
    b = BatchRNG.for_slices(3, [2, 3]).randn((1, 4, 4))
    assert torch.equal(a[2:], b)
    c = BatchRNG.for_slices(4, [2, 3]).randn((1, 4, 4))
    assert not torch.equal(b, c)
    assert slice_seed(0, 1) != slice_seed(1, 0)


def test_tiny_network_shapes():
    net = build_network(tiny_unet_config((8, 16, 16)))
    y = net(torch.zeros(3, 1, 32, 32), timesteps=torch.tensor([0, 5, 999]))
    assert y.shape == (3, 1, 32, 32)
    assert count_parameters(net) > 1000


def _tiny_config():
    return {"methods": ["anoddpm"], "image_size": 32, "intensity_range": [-1, 1], "noise": "gaussian",
            "schedule": {}, "networks": {"denoiser": tiny_unet_config((8, 16, 16))}}


def test_zoo_roundtrip_and_tamper_detection(tmp_path, monkeypatch):
    model = build_model(_tiny_config(), model_id="tiny")
    weights = tmp_path / "tiny" / "model.safetensors"
    digest = save_weights(model, weights)
    entry = dict(_tiny_config(), id="tiny", file="tiny/model.safetensors", sha256=digest)
    (tmp_path / "manifest.json").write_text(json.dumps({"models": [entry]}))
    monkeypatch.setenv("UAD_MODELS_DIR", str(tmp_path))
    e = find_model("tiny")
    assert verify(e) == sha256_file(weights)
    loaded = load_model("tiny")
    x = torch.randn(1, 1, 32, 32)
    t = torch.tensor([3])
    with torch.no_grad():
        assert torch.equal(loaded.net("denoiser")(x, timesteps=t), model.net("denoiser")(x, timesteps=t))
    assert find_model(method="anoddpm").id == "tiny"
    # tamper: flip one byte
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="checksum mismatch"):
        load_model("tiny")
    with pytest.raises(ModelError, match="no model with id"):
        find_model("does-not-exist")
