"""AutoDDPM on a tiny random network: masks, thresholds, stitching, RePaint NFE, determinism."""

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from uad.methods import build_method, get_method_class
from uad.methods.autoddpm import AutoDDPM, masked_quantile
from uad.rng import BatchRNG
from uad.zoo import Model, build_model

SIZE = 32


def tiny_config():
    from uad.networks import tiny_unet_config

    return {
        "methods": ["anoddpm", "thor", "autoddpm"],
        "image_size": SIZE,
        "intensity_range": [-1.0, 1.0],
        "noise": "gaussian",
        "schedule": {"num_train_timesteps": 1000, "schedule": "linear_beta", "beta_start": 1e-4,
                     "beta_end": 2e-2, "prediction_type": "epsilon", "clip_sample": True},
        "networks": {"denoiser": tiny_unet_config((8, 16, 16))},
    }


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_config(), model_id="tiny")


class Counting(torch.nn.Module):
    """Wraps a UNet and counts its forward passes (batch items are not counted separately)."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.calls = 0

    def forward(self, x, timesteps, **kw):
        self.calls += 1
        return self.net(x, timesteps=timesteps, **kw)


def slices(b=3, seed=0):
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
    return torch.stack(out)[:, None], disc.expand(b, 1, SIZE, SIZE).clone()


SMALL = {"level": 20, "inpaint_level": 6, "resample": 3, "perceptual": "ssim", "levels": "model"}


def run(model, x, mask, seeds, preset="paper", **kw):
    m = build_method("autoddpm", model, preset=preset, **{**SMALL, **kw})
    return m, m(x, mask, BatchRNG(seeds))


def test_registry_and_presets(model):
    assert get_method_class("autoddpm") is AutoDDPM
    p = build_method("autoddpm", model, preset="paper").params
    assert (p.level, p.inpaint_level, p.resample, p.threshold) == (200, 50, 5, 0.13)  # uncalibrated: the paper's
    assert p.recon_sampler == p.inpaint_sampler == "ddpm"
    f = build_method("autoddpm", model, preset="fast").params
    assert (f.recon_sampler, f.recon_steps, f.inpaint_steps, f.resample) == ("ddim", 25, 11, 3)
    assert AutoDDPM.default_model_config(64)["noise"] == "gaussian"
    with pytest.raises(ValueError, match="threshold"):
        build_method("autoddpm", model, threshold=-0.5)
    with pytest.raises(ValueError, match="ddim"):
        build_method("autoddpm", model, preset="paper", inpaint_steps=5)
    with pytest.raises(ValueError, match="resample"):
        build_method("autoddpm", model, resample=0)


def test_paper_preset_nfe_is_451(model):
    """On a [0, 1] model (the reference's range): 201 stage-1 evaluations + 50 x 5 RePaint evaluations,
    counted on the network itself."""
    counting = Counting(model.net("denoiser"))
    m_count = Model("tiny-count", dict(model.config, intensity_range=[0.0, 1.0]), {"denoiser": counting})
    x, mask = slices(1)
    m = build_method("autoddpm", m_count, preset="paper", threshold=-1, perceptual="ssim")
    out = m(x, mask, BatchRNG([5]))
    assert out.nfe == 451 == counting.calls
    assert (out.extras["nfe_stage1"], out.extras["nfe_stage2"]) == (201, 250)
    assert out.extras["levels_used"] == (200, 50)


def test_paper_levels_carried_to_equal_snr_on_a_minus_one_one_model(model):
    """The reference's levels are for [0, 1] images; on a [-1, 1] model (images twice as wide) the
    timestep of equal signal-to-noise ratio ab/(1-ab) * range^2 is used: 200 -> 331, 50 -> 103."""
    from uad.diffusion import Diffusion

    d = Diffusion(model.config["schedule"])
    snr = lambda t: d.alpha_bar(t) / (1 - d.alpha_bar(t))  # noqa: E731
    m = build_method("autoddpm", model, preset="paper", threshold=-1, perceptual="ssim")
    L, Li = m.level_used, m.inpaint_level_used
    for ref, used in ((200, L), (50, Li)):
        target = snr(ref) / 4.0
        assert abs(snr(used) - target) <= min(abs(snr(used - 1) - target), abs(snr(used + 1) - target))
        assert 0.8 < 4 * snr(used) / snr(ref) < 1.25
    assert (L, Li) == (331, 103)
    assert m.nfe_per_slice() == (L + 1) + Li * 5
    assert build_method("autoddpm", model, preset="paper", levels="model").nfe_per_slice() == 451
    f = build_method("autoddpm", model, preset="fast")
    assert f.nfe_per_slice() == 25 + 10 * 3  # strided chains keep their length
    counting = Counting(model.net("denoiser"))
    m_count = Model("tiny-count", model.config, {"denoiser": counting})
    x, mask = slices(1)
    out = build_method("autoddpm", m_count, preset="fast", threshold=-1, perceptual="ssim")(x, mask, BatchRNG([5]))
    assert out.extras["levels_used"] == (331, 103) and out.nfe == counting.calls == 55
    with pytest.raises(ValueError, match="levels"):
        build_method("autoddpm", model, levels="paper")


def test_small_paper_chain_nfe_shapes_ranges(model):
    counting = Counting(model.net("denoiser"))
    m_count = Model("tiny-count", model.config, {"denoiser": counting})
    x, mask = slices()
    m = build_method("autoddpm", m_count, preset="paper", threshold=-1, **SMALL)
    out = m(x, mask, BatchRNG([1, 2, 3]))
    assert out.nfe == counting.calls == 21 + 6 * 3
    assert out.restoration.shape == out.anomaly.shape == (3, 1, SIZE, SIZE)
    assert float(out.restoration.min()) >= 0 and float(out.restoration.max()) <= 1
    assert float(out.anomaly.min()) >= 0
    assert float(out.anomaly[~mask].abs().max()) == 0.0
    ex = out.extras
    assert ex["perceptual"] == "ssim-fallback" and ex["lpips_calls"] == 1 and ex["dilation"] == 3
    assert ex["binary_mask"].dtype == torch.bool and bool(ex["binary_mask"].any())
    assert not bool((ex["binary_mask"] & ~mask).any())  # restricted to the brain
    # A = |x - restoration| * M (M from stage 1)
    assert torch.allclose(out.anomaly, (x - out.restoration).abs() * ex["combined_mask"] * mask)


def test_pixels_outside_binary_mask_equal_input(model):
    x, mask = slices()
    for tau in (-1, 0.13, 0.02):
        _, out = run(model, x, mask, [1, 2, 3], threshold=tau)
        b = out.extras["binary_mask"]
        assert torch.equal(out.restoration[~b], x[~b]), tau
        assert float(out.anomaly[~b].abs().max()) == 0.0
        if bool(b.any()):
            # inside B the stage-2 sample is used
            assert torch.equal(out.restoration[b], out.extras["inpainting"][b])
            assert float((out.restoration[b] - x[b]).abs().max()) > 0


@pytest.mark.parametrize("region", ["slice", "brain"])
def test_threshold_minus_one_is_per_image_p95(model, region):
    """The 95th percentiles (residual normalisation and tau = -1) per slice as the reference, or over the brain."""
    x, mask = slices()
    _, out = run(model, x, mask, [1, 2, 3], threshold=-1, percentile=region)
    ex = out.extras
    comb = ex["combined_mask"].numpy()
    taus = ex["threshold"].numpy()
    for i in range(3):
        inside = comb[i, 0][mask[i, 0].numpy()] if region == "brain" else comb[i, 0].ravel()
        assert taus[i] == pytest.approx(np.percentile(inside, 95), rel=1e-5, abs=1e-7)
        rec = ex["reconstruction"][i, 0].numpy()
        r = np.abs(x[i, 0].numpy() - rec)
        p95 = np.percentile(r[mask[i, 0].numpy()] if region == "brain" else r, 95)
        np.testing.assert_allclose(ex["residual"][i, 0].numpy(), np.clip(r / max(p95, 1e-8), 0, 1), atol=1e-5)
        expected = ndimage.binary_dilation(comb[i, 0] > taus[i], np.ones((3, 3))) & mask[i, 0].numpy()
        assert np.array_equal(ex["binary_mask"][i, 0].numpy(), expected)
        # about 5 % of the brain exceeds its own 95th percentile before dilation
        frac = (inside > taus[i]).mean()
        assert 0.02 < frac <= 0.06


def test_fixed_threshold_path(model):
    """A scalar tau works (the reference indexed the float: TypeError) and is applied to every slice."""
    x, mask = slices()
    _, out = run(model, x, mask, [1, 2, 3], threshold=0.05)
    ex = out.extras
    assert torch.equal(ex["threshold"], torch.full((3,), 0.05))
    comb = ex["combined_mask"].numpy()
    for i in range(3):
        expected = ndimage.binary_dilation(comb[i, 0] > 0.05, np.ones((3, 3))) & mask[i, 0].numpy()
        assert np.array_equal(ex["binary_mask"][i, 0].numpy(), expected)


def test_residual_normalisation(model):
    x, mask = slices(2)
    m = build_method("autoddpm", model, preset="paper", percentile="brain", **SMALL)  # over the brain mask
    rec = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    st = m.masks(x, rec, mask, lambda a, b: torch.ones_like(a))
    r = st["residual"]
    assert float(r.min()) >= 0 and float(r.max()) <= 1
    for i in range(2):
        raw = (x[i] - rec[i]).abs()[mask[i]]
        p95 = np.percentile(raw.numpy(), 95)
        assert torch.allclose(r[i][mask[i]], (raw / p95).clamp(0, 1), atol=1e-5)
        assert float((r[i][mask[i]] >= 1 - 1e-6).float().mean()) == pytest.approx(0.05, abs=0.02)
    assert torch.equal(st["combined"], r)  # perceptual map of ones: M = r
    v = torch.rand(2, 1, 6, 6)
    msk = torch.zeros(2, 1, 6, 6, dtype=torch.bool)
    msk[0, :, :3] = True  # image 1: empty mask -> whole image
    q = masked_quantile(v, msk, 0.95).view(-1)
    assert float(q[0]) == pytest.approx(np.percentile(v[0, 0, :3].numpy(), 95), rel=1e-6)
    assert float(q[1]) == pytest.approx(np.percentile(v[1].numpy(), 95), rel=1e-6)


def test_empty_mask_skips_stage_two(model):
    x, mask = slices()
    _, out = run(model, x, mask, [1, 2, 3], threshold=10.0)
    assert out.nfe == 21 and out.extras["stage2_skipped"]
    assert torch.equal(out.restoration, x)
    assert float(out.anomaly.abs().max()) == 0.0


def test_deterministic_and_batch_independent(model):
    x, mask = slices()
    _, a = run(model, x, mask, [7, 8, 9], threshold=-1)
    _, b = run(model, x, mask, [7, 8, 9], threshold=-1)
    assert torch.equal(a.restoration, b.restoration) and torch.equal(a.anomaly, b.anomaly)
    for i, s in enumerate([7, 8, 9]):
        _, one = run(model, x[i:i + 1], mask[i:i + 1], [s], threshold=-1)
        assert torch.equal(one.extras["binary_mask"], a.extras["binary_mask"][i:i + 1])
        assert torch.allclose(one.restoration, a.restoration[i:i + 1], atol=1e-5)
        assert torch.allclose(one.anomaly, a.anomaly[i:i + 1], atol=1e-5)


def test_fast_preset(model):
    counting = Counting(model.net("denoiser"))
    m_count = Model("tiny-count", model.config, {"denoiser": counting})
    x, mask = slices(2)
    m = build_method("autoddpm", m_count, preset="fast", threshold=-1, perceptual="ssim")
    out = m(x, mask, BatchRNG([1, 2]))
    assert out.nfe == counting.calls == 25 + 10 * 3
    b = out.extras["binary_mask"]
    assert torch.equal(out.restoration[~b], x[~b])
    assert float(out.restoration.min()) >= 0 and float(out.restoration.max()) <= 1


def test_lpips_code_path(model):
    from uad.perceptual import LPIPSMap, perceptual_backend

    x, mask = slices(2)
    _, out = run(model, x, mask, [1, 2], threshold=-1, perceptual=LPIPSMap(pnet_rand=True))
    assert out.extras["perceptual"] == "lpips-squeeze"
    assert torch.isfinite(out.anomaly).all() and float(out.anomaly.max()) > 0
    _, out = run(model, x, mask, [1, 2], threshold=-1, perceptual="auto")
    assert out.extras["perceptual"] == perceptual_backend()


def test_training_loss(model):
    from uad.methods.common import ddpm_loss

    x, mask = slices(2)
    loss = AutoDDPM.training_loss(model, x, mask, BatchRNG([3, 4]))
    assert torch.allclose(loss, ddpm_loss(model, x, BatchRNG([3, 4]), noise="gaussian"))


def test_calibrations_of_an_older_method_version_are_stale():
    """AutoDDPM version 2 changed its levels (equal SNR on the model's range): a record measured by
    version 1 (no ``method_version``) is not used, neither its threshold nor its tau."""
    from uad.calibration import lookup_tau, lookup_threshold, method_version

    assert method_version("autoddpm") == 2 and method_version("thor") == 1
    rec = {"thresholds": {"0.01": 0.3}, "tau": 0.2, "sha256": "ab"}
    cfg = {"sha256": "ab", "calibration": {"autoddpm": {"presets": {"fast": {"ssim-fallback": dict(rec)}}},
                                           "thor": {"presets": {"fast": {"ssim-fallback": dict(rec)}}}}}
    thr, _, msg = lookup_threshold(cfg, "autoddpm", "fast", "ssim-fallback", 0.01)
    assert thr is None and "version 1" in msg and "recalibrate" in msg
    assert lookup_tau(cfg, "fast", "ssim-fallback") is None
    assert lookup_threshold(cfg, "thor", "fast", "ssim-fallback", 0.01)[0] == 0.3  # thor unchanged
    cfg["calibration"]["autoddpm"]["presets"]["fast"]["ssim-fallback"]["method_version"] = 2
    assert lookup_threshold(cfg, "autoddpm", "fast", "ssim-fallback", 0.01)[0] == 0.3
    assert lookup_tau(cfg, "fast", "ssim-fallback") == 0.2


def test_calibrations_of_another_preset_definition_are_stale():
    """A record measured under another definition of its preset (THOR's stochastic preset before its map
    became the raw masks' harmonic mean) is not used: the lookup says why and falls back; records without
    the definition (older ones) and records of today's definition are used."""
    from uad.calibration import lookup_tau, lookup_threshold, preset_values

    now = preset_values("thor", "stochastic")
    assert now == {"eta": 1.0, "map_norm": "none", "sampler": "ddim", "steps": 50}
    rec = {"thresholds": {"0.01": 0.3}, "tau": 0.2, "sha256": "ab", "method_version": 2,
           "preset_values": {"eta": 1.0, "sampler": "ddim", "steps": 50}}
    cfg = {"sha256": "ab", "calibration": {"thor": {"presets": {"stochastic": {"ssim-fallback": dict(rec)}}},
                                           "autoddpm": {"presets": {"fast": {"ssim-fallback": dict(
                                               rec, preset_values={"steps": 3})}}}}}
    thr, _, msg = lookup_threshold(cfg, "thor", "stochastic", "ssim-fallback", 0.01)
    assert thr is None and "another definition of the stochastic preset" in msg and "map_norm" in msg
    assert lookup_tau(cfg, "fast", "ssim-fallback") is None
    cfg["calibration"]["thor"]["presets"]["stochastic"]["ssim-fallback"]["preset_values"] = now
    assert lookup_threshold(cfg, "thor", "stochastic", "ssim-fallback", 0.01)[0] == 0.3
    cfg["calibration"]["autoddpm"]["presets"]["fast"]["ssim-fallback"].pop("preset_values")
    assert lookup_tau(cfg, "fast", "ssim-fallback") == 0.2


def test_calibrations_of_another_normalisation_are_stale():
    """A record calibrated before the entry's normalisation changed (clip_max 1 -> 2) is not used: the lookup
    says why; records without a recorded normalisation (older ones) and records of today's are used."""
    from uad.calibration import lookup_threshold, normalisation_of, other_normalisation, stale

    cfg = {"sha256": "ab", "normalisation": {"clip_max": 2.0}}
    rec = {"thresholds": {"0.01": 0.3}, "sha256": "ab", "normalisation": normalisation_of({})}
    cfg["calibration"] = {"thor": {"presets": {"fast": {"ssim-fallback": rec}}}}
    assert normalisation_of({})["clip_max"] == 1.0 and normalisation_of(cfg)["clip_max"] == 2.0
    assert stale(cfg, rec) and other_normalisation(rec["normalisation"], cfg)
    thr, _, msg = lookup_threshold(cfg, "thor", "fast", "ssim-fallback", 0.01)
    assert thr is None and "another intensity normalisation" in msg and "clip_max 1" in msg and "clip_max 2" in msg
    rec["normalisation"] = normalisation_of(cfg)
    assert not stale(cfg, rec) and lookup_threshold(cfg, "thor", "fast", "ssim-fallback", 0.01)[0] == 0.3
    rec.pop("normalisation")
    assert not stale(cfg, rec) and lookup_threshold(cfg, "thor", "fast", "ssim-fallback", 0.01)[0] == 0.3
    assert other_normalisation({"lower": 50.0, "upper": 10.0}, cfg)  # unreadable record: not trusted


def test_calibrations_of_another_preprocessing_profile_are_stale():
    """A record calibrated before the entry's preprocessing profile changed (a skull-stripped input registered to
    MNI152 at 2 mm instead of taken on its own grid) is not used: the lookup names the keys that changed;
    records without a recorded profile (older ones) and records of today's profile are used; an unreadable
    recorded profile is not trusted."""
    from uad.calibration import lookup_threshold, other_preprocessing, preprocessing_of, stale

    cfg = {"sha256": "ab", "preprocessing": {"registration": "mni152", "spacing_mm": 2}}
    rec = {"thresholds": {"0.01": 0.3}, "sha256": "ab", "preprocessing": preprocessing_of({})}
    cfg["calibration"] = {"thor": {"presets": {"fast": {"ssim-fallback": rec}}}}
    assert preprocessing_of({})["registration"] == "auto" and preprocessing_of(cfg)["spacing_mm"] == 2.0
    assert stale(cfg, rec) and other_preprocessing(rec["preprocessing"], cfg)
    thr, _, msg = lookup_threshold(cfg, "thor", "fast", "ssim-fallback", 0.01)
    assert thr is None and "another preprocessing profile" in msg
    assert "registration 'auto' -> 'mni152'" in msg and "spacing_mm None -> 2.0" in msg
    rec["preprocessing"] = json.loads(json.dumps(preprocessing_of(cfg)))  # as stored in the manifest
    assert not stale(cfg, rec) and lookup_threshold(cfg, "thor", "fast", "ssim-fallback", 0.01)[0] == 0.3
    rec.pop("preprocessing")
    assert not stale(cfg, rec) and lookup_threshold(cfg, "thor", "fast", "ssim-fallback", 0.01)[0] == 0.3
    assert other_preprocessing({"registration": "sideways"}, cfg)  # unreadable record: not trusted
    assert not other_preprocessing(None, cfg)


def test_one_rule_says_a_measurement_is_another_models():
    """uad.calibration.other_model is the rule for calibration records (fields sha256 / normalisation /
    preprocessing) and for benchmark rows and preset cells (the same fields prefixed model_): the first
    fingerprint that differs is named; missing fields pass; hex digests compare without regard to case."""
    from uad.calibration import normalisation_of, other_model, preprocessing_of, stale
    from uad.heldout_table import current_weights

    cfg = {"id": "m", "sha256": "ABCD", "normalisation": {"clip_max": 2.0},
           "preprocessing": {"registration": "mni152", "spacing_mm": 2}}
    same = {"sha256": "abcd", "normalisation": normalisation_of(cfg), "preprocessing": preprocessing_of(cfg)}
    assert other_model(same, cfg) is None and other_model({}, cfg) is None and not stale(cfg, same)
    for field, value, why in [("sha256", "ef01", "other weights"),
                              ("normalisation", normalisation_of({}), "other intensity normalisation"),
                              ("preprocessing", preprocessing_of({}), "other preprocessing profile")]:
        rec = dict(same, **{field: value})
        assert other_model(rec, cfg) == why and stale(cfg, rec)
        row = {"model": "m", "method": "thor", "preset": "fast", **{"model_" + k: v for k, v in rec.items()}}
        assert other_model(row, cfg, "model_") == why and other_model(rec, cfg, "model_") is None
        kept, dropped = current_weights({"results": [row]}, [cfg])
        assert kept["results"] == [] and dropped == [("m", 1, "thor", "fast")]
    row = {"model": "m", **{"model_" + k: v for k, v in same.items()}}
    assert current_weights({"results": [row]}, [cfg])[0]["results"] == [row]
