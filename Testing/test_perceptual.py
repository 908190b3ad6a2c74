"""Perceptual-distance maps: LPIPS code path (random trunk), trunk loading without downloads, SSIM fallback."""

import logging

import numpy as np
import pytest
import torch

from uad import ModelError
from uad import perceptual as P


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No user weights: empty hub dir and uad cache, no $UAD_LPIPS_BACKBONE; fresh module state."""
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.setenv("UAD_CACHE_DIR", str(tmp_path / "uad-cache"))
    monkeypatch.delenv(P.BACKBONE_ENV, raising=False)
    P.reset()
    yield hub
    P.reset()


def _images(b=3, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    base = (0.5 + 0.3 * torch.cos(4 * xx) * torch.sin(3 * yy)).expand(b, 1, size, size).clone()
    return base, torch.randn(b, 1, size, size, generator=g)


@pytest.fixture(scope="module")
def random_trunk_file(tmp_path_factory):
    """A torchvision SqueezeNet 1.1 state dict with random weights (stands in for the ImageNet file)."""
    import torchvision

    torch.manual_seed(1)
    net = torchvision.models.squeezenet1_1(weights=None)
    path = tmp_path_factory.mktemp("trunk") / "squeezenet-random.pth"
    torch.save(net.state_dict(), path)
    return path, net.state_dict()


def test_lpips_code_path_with_random_trunk():
    lp = P.LPIPSMap(pnet_rand=True)
    x, n = _images()
    y = (x + 0.2 * n).clamp(0, 1)
    d = lp(x, y)
    assert d.shape == (3, 1, 32, 32)
    assert torch.isfinite(d).all()
    assert float(lp(x, x).abs().max()) == 0.0  # identical inputs -> exactly 0
    assert float(d.min()) > 0.0  # different inputs -> positive everywhere
    # batched == one image at a time
    single = torch.cat([lp(x[i:i + 1], y[i:i + 1]) for i in range(3)])
    assert torch.allclose(d, single, atol=1e-5)
    # more corruption -> larger mean distance
    y2 = (x + 0.5 * n).clamp(0, 1)
    assert float(lp(x, y2).mean()) > float(d.mean())
    assert not lp.pretrained_trunk


def test_lpips_gray_is_replicated_and_normalised_once():
    """1-channel [0, 1] input == the same image as 3 channels; values outside [0, 1] are clipped."""
    lp = P.LPIPSMap(pnet_rand=True)
    x, n = _images(2)
    y = (x + 0.3 * n).clamp(0, 1)
    d1 = lp(x, y)
    d3 = lp(x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1))
    assert torch.allclose(d1, d3, atol=1e-6)
    # the wrapped lpips module receives [0,1] and normalize=True: compare with a direct call
    direct = lp.lpips(x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1), normalize=True)
    assert torch.allclose(d1, direct, atol=1e-6)


def test_lpips_trunk_loads_from_file_without_download(monkeypatch, random_trunk_file):
    path, state = random_trunk_file

    def no_download(*a, **k):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    lp = P.LPIPSMap(path)
    assert lp.pretrained_trunk
    loaded = lp.lpips.net.state_dict()
    n_checked = 0
    for key, v in state.items():
        if not key.startswith("features."):
            continue
        idx, rest = key.split(".", 2)[1:]
        (match,) = [k for k in loaded if k.split(".", 2)[1] == idx and k.split(".", 2)[2] == rest]
        assert torch.equal(loaded[match], v)
        n_checked += 1
    assert n_checked == 50  # every conv of the trunk came from the file
    x, n = _images(1)
    assert float(lp(x, (x + 0.2 * n).clamp(0, 1)).mean()) > 0


def test_canonical_name_with_wrong_hash_is_rejected(isolated, random_trunk_file, caplog):
    path, _ = random_trunk_file
    ck = isolated / "checkpoints"
    ck.mkdir(parents=True)
    bad = ck / P.backbone_filename()
    bad.write_bytes(path.read_bytes())  # random weights under torchvision's name: sha256 prefix mismatch
    with pytest.raises(ModelError, match="sha256"):
        P.LPIPSMap(bad)
    with caplog.at_level(logging.WARNING, logger="uad.perceptual"):
        assert P.perceptual_backend() == P.FALLBACK_BACKEND
    assert "sha256" in caplog.text


def test_fallback_backend_warns_once_and_is_reported(caplog):
    with caplog.at_level(logging.WARNING, logger="uad.perceptual"):
        assert P.perceptual_backend() == "ssim-fallback"
        assert P.perceptual_backend("auto") == "ssim-fallback"
        mod = P.get_perceptual("auto")
        x, n = _images(1)
        P.perceptual_map(x, x)
    msgs = [r for r in caplog.records if "not available" in r.getMessage()]
    assert len(msgs) == 1
    text = msgs[0].getMessage()
    assert "ssim-fallback" in text and P.BACKBONE_ENV in text and "squeezenet1_1" in text
    assert isinstance(mod, P.SSIMDissimilarity) and mod.name == "ssim-fallback"
    assert P.perceptual_backend("ssim") == "ssim-fallback"
    assert P.perceptual_backend("lpips") == "lpips-squeeze"
    with pytest.raises(ModelError, match="not found"):
        P.get_perceptual("lpips")
    with pytest.raises(ValueError, match="unknown perceptual backend"):
        P.perceptual_backend("vgg")


def test_user_can_point_to_weights(monkeypatch, random_trunk_file, tmp_path):
    path, _ = random_trunk_file
    assert P.perceptual_backend() == "ssim-fallback"
    monkeypatch.setenv(P.BACKBONE_ENV, str(path))  # picked up without a reset (search paths changed)
    assert P.perceptual_backend() == "lpips-squeeze"
    assert isinstance(P.get_perceptual("auto"), P.LPIPSMap)
    monkeypatch.delenv(P.BACKBONE_ENV)
    assert P.perceptual_backend() == "ssim-fallback"
    P.set_lpips_backbone(path)
    assert P.perceptual_backend() == "lpips-squeeze"
    assert P.backbone_candidates()[0] == path
    P.set_lpips_backbone(None)
    assert P.perceptual_backend() == "ssim-fallback"
    with pytest.raises(ModelError, match="not found"):
        P.set_lpips_backbone(tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    torch.save({"a": torch.zeros(1)}, junk)
    with pytest.raises(ModelError, match="SqueezeNet"):
        P.set_lpips_backbone(junk)
    # an explicit file for one call
    assert isinstance(P.get_perceptual("auto", backbone=path), P.LPIPSMap)


def test_fallback_deterministic_zero_for_identical_and_monotone():
    f = P.SSIMDissimilarity()
    x, n = _images(3, size=48)
    assert float(f(x, x).abs().max()) == 0.0
    ds = []
    for amp in (0.02, 0.1, 0.3):
        y = (x + amp * n).clamp(0, 1)
        d = f(x, y)
        assert d.shape == (3, 1, 48, 48)
        assert float(d.min()) >= 0.0 and float(d.max()) <= 1.0
        assert torch.equal(d, f(x, y))  # deterministic
        ds.append(float(d.mean()))
    assert ds[0] < ds[1] < ds[2]
    assert ds[0] > 0
    # local: a corrupted patch lights up there, not far away
    y = x.clone()
    y[:, :, 8:16, 8:16] = 1 - y[:, :, 8:16, 8:16]
    d = f(x, y)
    assert float(d[:, :, 8:16, 8:16].mean()) > 10 * float(d[:, :, 36:, 36:].mean())
    # per image: batched == single
    y = (x + 0.1 * n).clamp(0, 1)
    assert torch.allclose(f(x, y), torch.cat([f(x[i:i + 1], y[i:i + 1]) for i in range(3)]), atol=1e-6)
    # the single-scale map is exactly (1 - SSIM) / 2 with the standard constants
    s = P.SSIMDissimilarity(scales=(1,))
    a, b = x[:1], y[:1]
    dss = s(a, b)
    assert float(dss.min()) >= 0 and float(dss.max()) <= 1
    # global check against skimage's SSIM (Gaussian window, sigma 1.5, data range 1)
    from skimage.metrics import structural_similarity

    _, full = structural_similarity(a[0, 0].double().numpy(), b[0, 0].double().numpy(), data_range=1.0,
                                    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, full=True)
    ours = 1 - 2 * dss[0, 0].double().numpy()
    inner = (slice(6, -6), slice(6, -6))  # away from the borders (padding differs)
    assert np.allclose(ours[inner], full[inner], atol=2e-3)


def test_perceptual_map_is_on_input_device_and_dtype():
    x, n = _images(2)
    y = (x + 0.1 * n).clamp(0, 1)
    d = P.perceptual_map(x, y, backend="ssim")
    assert d.device == x.device and d.dtype == x.dtype and d.shape == (2, 1, 32, 32)
    assert torch.equal(d, P.SSIMDissimilarity()(x, y))
    assert P.get_perceptual("ssim") is P.get_perceptual("ssim")  # cached
