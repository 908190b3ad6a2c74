"""THOR on a tiny random network: schedule, masks, harmonization invariants, harmonic mean, morphology."""

import numpy as np
import pytest
import torch
from scipy import ndimage, stats

from uad.methods import build_method, get_method_class
from uad.methods.thor import THOR, harmonic_mean, thor_masks
from uad.morphology import (binary_dilation, gaussian_blur, grey_closing, grey_dilation, grey_erosion,
                            scaled_kernel)
from uad.rng import BatchRNG
from uad.zoo import build_model

SIZE = 32


def tiny_config(noise="gaussian"):
    from uad.networks import tiny_unet_config

    return {
        "methods": ["anoddpm", "thor", "autoddpm"],
        "image_size": SIZE,
        "intensity_range": [-1.0, 1.0],
        "noise": noise,
        "schedule": {"num_train_timesteps": 1000, "schedule": "linear_beta", "beta_start": 1e-4,
                     "beta_end": 2e-2, "prediction_type": "epsilon", "clip_sample": True},
        "networks": {"denoiser": tiny_unet_config((8, 16, 16))},
    }


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_config(), model_id="tiny")


def slices(b=3, seed=0):
    """Smooth 'brain-like' slices in [0, 1] with a bright blob, and a disc-shaped brain mask."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, SIZE), torch.linspace(-1, 1, SIZE), indexing="ij")
    disc = (xx ** 2 + yy ** 2) < 0.8
    out = []
    for i in range(b):
        tex = 0.05 * torch.randn(SIZE, SIZE, generator=g)
        img = 0.45 + 0.15 * torch.cos(3 * torch.sqrt(xx ** 2 + yy ** 2) + i) + tex
        blob = ((xx - 0.2 * (i - 1)) ** 2 + (yy + 0.2) ** 2) < 0.04
        img = torch.where(blob, torch.tensor(0.95), img)
        out.append(torch.where(disc, img.clamp(0, 1), torch.tensor(0.0)))
    x = torch.stack(out)[:, None]
    mask = disc.expand(b, 1, SIZE, SIZE).clone()
    return x, mask


SMALL = {"level": 20, "harmonization": [15, 5], "vis_every": 5, "perceptual": "ssim"}


def run(model, x, mask, seeds, preset="paper", **kw):
    m = build_method("thor", model, preset=preset, **{**SMALL, **kw})
    return m, m(x, mask, BatchRNG(seeds))


def test_registry_presets_and_model_config(model):
    assert get_method_class("thor") is THOR
    m = build_method("thor", model, preset="paper")
    assert (m.params.level, m.params.harmonization) == (350, [300, 150, 50])
    assert m.checkpoints() == list(range(350, -1, -50))  # 8 saved masks
    assert len(m.timesteps()) == 351  # the paper's NFE
    simplex = build_model(tiny_config("simplex"), model_id="tiny-simplex")
    ms = build_method("thor", simplex, preset="paper")
    assert (ms.params.level, ms.params.harmonization) == (250, [200, 150, 100, 50])
    assert len(ms.checkpoints()) == 6 and len(ms.timesteps()) == 251
    # a user level keeps the default H steps below it
    assert build_method("thor", model, preset="paper", level=200).params.harmonization == [150, 50]
    fast = build_method("thor", model, preset="fast")
    ts = fast.timesteps()
    assert ts[0] == 350 and ts[-1] == 0 and ts == sorted(set(ts), reverse=True)
    assert set(fast.checkpoints()) <= set(ts) and {300, 150, 50} <= set(ts)
    assert len(ts) == 31
    assert THOR.default_model_config(64) == get_method_class("anoddpm").default_model_config(64)


def test_validation_errors(model):
    with pytest.raises(ValueError, match="harmonization"):
        build_method("thor", model, preset="paper", level=100, harmonization=[150])
    with pytest.raises(ValueError, match="ddim"):
        build_method("thor", model, preset="paper", steps=10)
    with pytest.raises(ValueError, match="odd"):
        build_method("thor", model, kernel_size=4)
    with pytest.raises(ValueError, match="level"):
        build_method("thor", model, level=1000)
    with pytest.raises(ValueError, match="perceptual"):
        build_method("thor", model, perceptual="vgg")


def test_paper_chain_shapes_ranges_nfe(model):
    x, mask = slices()
    m, out = run(model, x, mask, [1, 2, 3])
    assert out.restoration.shape == out.anomaly.shape == (3, 1, SIZE, SIZE)
    assert float(out.restoration.min()) >= 0 and float(out.restoration.max()) <= 1
    assert float(out.anomaly.min()) >= 0 and float(out.anomaly.max()) <= 0.999
    assert float(out.anomaly[~mask].abs().max()) == 0.0
    assert out.nfe == 21  # L + 1 network evaluations
    ex = out.extras
    assert ex["map_steps"] == [20, 15, 10, 5, 0]
    assert ex["harmonization"] == [15, 5]
    assert ex["lpips_calls"] == 5 and ex["perceptual"] == "ssim-fallback"
    assert ex["maps"].shape == (5, 3, 1, SIZE, SIZE)
    assert ex["kernel_size"] == 3 and ex["blur_sigma"] == pytest.approx(0.5)  # 13 px / sigma 2 at 128 px


def test_final_map_is_harmonic_mean_of_saved_maps(model):
    x, mask = slices()
    _, out = run(model, x, mask, [4, 5, 6])
    maps = out.extras["maps"].double().numpy()
    assert maps.min() >= 0 and maps.max() <= 1
    assert np.allclose(maps.reshape(maps.shape[0], 3, -1).max(-1), 1.0, atol=1e-6)  # per-image max-normalised
    expected = np.clip(stats.hmean(maps, axis=0), 0, 0.999) * mask.numpy()
    assert np.allclose(out.anomaly.double().numpy(), expected, atol=1e-6)
    assert np.allclose(harmonic_mean(torch.tensor([[0.0, 0.5], [0.2, 0.4]])).numpy(), [0.0, 4 / 9])


def test_raw_map_norm_keeps_the_chain_and_drops_the_per_slice_scaling(model):
    """map_norm="none" (the stochastic preset): the same chain and restoration as the paper's per-slice
    normalisation; the output map is the harmonic mean of the raw masks, so a slice whose residual is
    weak scores low instead of being stretched to 1."""
    x, mask = slices()
    _, norm = run(model, x, mask, [4, 5, 6])
    _, raw = run(model, x, mask, [4, 5, 6], map_norm="none")
    assert torch.equal(norm.restoration, raw.restoration)  # R (harmonization) uses the normalised mask
    maps = raw.extras["maps"].double()
    per_max = maps.reshape(maps.shape[0], 3, -1).amax(-1)
    assert float(per_max.max()) < 0.999 and raw.extras["map_norm"] == "none"
    # the raw masks, max-normalised per image, are the paper's masks
    again = (maps / (per_max[:, :, None, None, None] + 1e-8)).clamp(0, 1)
    assert torch.allclose(again, norm.extras["maps"].double(), atol=1e-5)
    expected = np.clip(stats.hmean(maps.numpy(), axis=0), 0, 0.999) * mask.numpy()
    assert np.allclose(raw.anomaly.double().numpy(), expected, atol=1e-6)
    # one slice's map no longer depends on the other slices' or its own maximum: halving the residual
    # everywhere halves the raw score but leaves the per-slice normalised score unchanged
    m_n, _ = thor_masks(x, x * 0.9, lambda a, b: torch.ones_like(a), 3, 0.0)
    m_n2, _ = thor_masks(x, x * 0.95, lambda a, b: torch.ones_like(a), 3, 0.0)
    r1, _ = thor_masks(x, x * 0.9, lambda a, b: torch.ones_like(a), 3, 0.0, raw=True)
    r2, _ = thor_masks(x, x * 0.95, lambda a, b: torch.ones_like(a), 3, 0.0, raw=True)
    assert torch.allclose(m_n, m_n2, atol=1e-5)
    assert torch.allclose(r2, r1 / 2, atol=1e-6)
    assert build_method("thor", model, preset="stochastic").params.map_norm == "none"
    assert build_method("thor", model, preset="paper").params.map_norm == "slice"
    assert build_method("thor", model, preset="fast").params.map_norm == "slice"
    with pytest.raises(ValueError, match="map_norm"):
        build_method("thor", model, map_norm="volume")


def test_deterministic_and_batch_independent(model):
    x, mask = slices()
    _, a = run(model, x, mask, [7, 8, 9])
    _, b = run(model, x, mask, [7, 8, 9])
    assert torch.equal(a.restoration, b.restoration) and torch.equal(a.anomaly, b.anomaly)
    for i, s in enumerate([7, 8, 9]):
        _, one = run(model, x[i:i + 1], mask[i:i + 1], [s])
        assert torch.allclose(one.restoration, a.restoration[i:i + 1], atol=1e-5)
        assert torch.allclose(one.anomaly, a.anomaly[i:i + 1], atol=1e-5)
    _, c = run(model, x, mask, [7, 8, 10])  # another seed for the last slice only
    assert torch.allclose(c.restoration[:2], a.restoration[:2], atol=1e-5)
    assert not torch.allclose(c.restoration[2], a.restoration[2], atol=1e-3)


def test_masks_vanish_where_prediction_equals_input():
    x, _ = slices(2)
    lp_like = lambda a, b: torch.ones_like(a)  # noqa: E731 - a maximal perceptual distance everywhere
    m, region = thor_masks(x, x.clone(), lp_like, 3, 0.5)
    assert float(m.abs().max()) == 0.0 and float(region.abs().max()) == 0.0
    # one deviating pixel: m peaks there at 1, R covers its closing/dilation neighbourhood
    y = x.clone()
    y[0, 0, 10, 12] += 0.3
    m, region = thor_masks(x, y, lp_like, 3, 0.5)
    assert float(m[0, 0, 10, 12]) == pytest.approx(1.0)
    assert float(m[1].abs().max()) == 0.0  # per image: the other slice is untouched
    assert float(region[0, 0, 10, 12]) == pytest.approx(1.0)
    assert float(region[0, 0, 11, 13]) == pytest.approx(0.5)  # dilated only
    assert float(region[0, 0, 14, 12]) == 0.0


def test_zero_mask_returns_the_input(model):
    """With a zero perceptual map every mask is 0, so R = 0: harmonizing at t = 0 gives back the input."""
    x, mask = slices()

    def zero(a, b):
        return torch.zeros_like(a)

    m = build_method("thor", model, preset="paper", level=20, harmonization=[15, 5, 0], vis_every=5,
                     perceptual=zero)
    out = m(x, mask, BatchRNG([1, 2, 3]))
    assert torch.allclose(out.restoration, x, atol=1e-6)
    assert float(out.anomaly.abs().max()) == 0.0
    assert out.extras["perceptual"] == "zero" and out.extras["harmonization"] == [15, 5, 0]
    # the same on the strided DDIM chain
    m = build_method("thor", model, preset="fast", level=60, harmonization=[50, 0], perceptual=zero)
    out = m(x, mask, BatchRNG([1, 2, 3]))
    assert torch.allclose(out.restoration, x, atol=1e-6)


def test_harmonization_pulls_restoration_towards_input(model):
    """Full masks (R = 1) leave the plain chain; zero masks at t = 5 keep the input's noised version."""
    x, mask = slices()
    ones = lambda a, b: torch.ones_like(a)  # noqa: E731
    zero = lambda a, b: torch.zeros_like(a)  # noqa: E731
    kw = dict(level=20, vis_every=5)
    plain = build_method("thor", model, preset="paper", harmonization=[], perceptual=ones, **kw)
    guided = build_method("thor", model, preset="paper", harmonization=[15, 5], perceptual=zero, **kw)
    p = plain(x, mask, BatchRNG([1, 2, 3]))
    g = guided(x, mask, BatchRNG([1, 2, 3]))
    assert float((g.restoration - x).abs().mean()) < float((p.restoration - x).abs().mean())


def test_fast_preset_nfe_matches_timesteps(model):
    x, mask = slices(2)
    m = build_method("thor", model, preset="fast", level=60, perceptual="ssim")
    out = m(x, mask, BatchRNG([1, 2]))
    ts = m.timesteps()
    assert out.nfe == len(ts) == out.extras["timesteps"]
    assert out.extras["map_steps"] == [60, 50, 0] and out.extras["harmonization"] == [50]
    assert 25 <= len(ts) <= 28


def test_lpips_code_path_and_auto_backend(model):
    from uad.perceptual import LPIPSMap, perceptual_backend

    x, mask = slices(2)
    lp = LPIPSMap(pnet_rand=True)
    m = build_method("thor", model, preset="paper", level=10, harmonization=[5], vis_every=5, perceptual=lp)
    out = m(x, mask, BatchRNG([1, 2]))
    assert out.extras["perceptual"] == "lpips-squeeze"
    assert torch.isfinite(out.anomaly).all() and float(out.anomaly.max()) > 0
    m = build_method("thor", model, preset="paper", level=10, harmonization=[5], vis_every=5)
    out = m(x, mask, BatchRNG([1, 2]))
    assert out.extras["perceptual"] == perceptual_backend() in ("lpips-squeeze", "ssim-fallback")


def test_training_loss_is_standard_epsilon_objective(model):
    from uad.methods.common import ddpm_loss

    x, mask = slices(2)
    loss = THOR.training_loss(model, x, mask, BatchRNG([3, 4]))
    ref = ddpm_loss(model, x, BatchRNG([3, 4]), noise="gaussian")
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert torch.allclose(loss, ref)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.net("denoiser").parameters())
    model.net("denoiser").zero_grad(set_to_none=True)


# -- morphology helpers (uad.morphology) against scipy.ndimage --------------------------------------------
def test_morphology_matches_scipy():
    g = np.random.default_rng(0)
    a = g.random((2, 1, 20, 17)).astype(np.float32)
    t = torch.from_numpy(a)
    for k in (1, 3, 5, 13):
        for fn, ref in ((grey_dilation, ndimage.grey_dilation), (grey_erosion, ndimage.grey_erosion),
                        (grey_closing, ndimage.grey_closing)):
            ours = fn(t, k).numpy()
            for b in range(2):
                assert np.allclose(ours[b, 0], ref(a[b, 0], size=(k, k), mode="nearest")), (fn.__name__, k)
    for sigma in (0.5, 2.0, 6.0):  # radius 8 / 24 > image: multiple reflections
        ours = gaussian_blur(t, sigma).numpy()
        for b in range(2):
            assert np.allclose(ours[b, 0], ndimage.gaussian_filter(a[b, 0], sigma, mode="reflect"), atol=1e-5)
    # blur and morphology never mix images of a batch
    t2 = t.clone()
    t2[1] = 0
    assert torch.equal(grey_dilation(t2, 5)[0], grey_dilation(t, 5)[0])
    assert torch.allclose(gaussian_blur(t2, 2.0)[0], gaussian_blur(t, 2.0)[0])
    assert float(gaussian_blur(t2, 2.0)[1].abs().max()) == 0.0
    m = torch.from_numpy(g.random((2, 1, 20, 17)) > 0.9)
    ours = binary_dilation(m, 3).numpy()
    for b in range(2):
        assert np.array_equal(ours[b, 0], ndimage.binary_dilation(m[b, 0].numpy(), np.ones((3, 3))))


def test_kernel_scaling():
    assert [scaled_kernel(13, s) for s in (32, 64, 96, 128, 256)] == [3, 7, 9, 13, 27]
    assert [scaled_kernel(3, s, minimum=3) for s in (32, 64, 128, 256)] == [3, 3, 3, 7]


def test_map_norm_benchmark_forms_the_paper_map_from_the_raw_masks(model):
    """benchmarks/thor_map_norm.py: from one raw-mask run, its 'slice' map is THOR's per-slice map and its 'raw'
    map THOR's map_norm='none' output (so one chain measures both); 'volume' divides by the volume maximum."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "thor_map_norm", Path(__file__).resolve().parents[1] / "benchmarks" / "thor_map_norm.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    x, mask = slices()
    _, norm = run(model, x, mask, [4, 5, 6])
    _, raw = run(model, x, mask, [4, 5, 6], map_norm="none")
    maps = bench.three_maps(raw.extras["maps"][:, :, 0].double().numpy())
    m = mask[:, 0].numpy()
    assert np.allclose(maps["slice"] * m, norm.anomaly[:, 0].numpy(), atol=1e-5)
    assert np.allclose(maps["raw"] * m, raw.anomaly[:, 0].numpy(), atol=1e-5)
    vol = raw.extras["maps"][:, :, 0].double().numpy()
    vol = vol / vol.reshape(vol.shape[0], -1).max(1)[:, None, None, None]
    assert np.allclose(maps["volume"], np.clip(stats.hmean(vol, axis=0), 0, 0.999), atol=1e-5)
