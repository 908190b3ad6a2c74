"""pDDPM on a tiny random network: patch grid, patch-only noising, stitching, averaging, training loss."""

import pytest
import torch
from torch import nn

from uad.diffusion import Diffusion
from uad.methods import available_methods, build_method, get_method_class
from uad.methods.pddpm import PDDPM, box_mask, grid_boxes, grid_positions, patched_input
from uad.noise import make_noise
from uad.rng import BatchRNG
from uad.zoo import Model, build_model

SIZE = 32


def tiny_config(size=SIZE):
    from uad.networks import tiny_unet_config

    cfg = PDDPM.default_model_config(size, small=True)
    cfg["networks"]["denoiser"] = tiny_unet_config((8, 16, 16))
    return cfg


def randomise_zero_init(net, seed=0):
    """MONAI zero-initialises the output convolutions, so an untrained x0-predicting UNet outputs 0
    whatever its input; give those layers small random weights so the tests see a real function."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.numel() and not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return net


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model(tiny_config(), model_id="tiny-pddpm")
    randomise_zero_init(m.net("denoiser"))
    return m


class Recorder(nn.Module):
    """Wraps a network and records every call's input, timesteps and output."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = []

    def forward(self, x, timesteps=None, **kw):
        out = self.inner(x, timesteps=timesteps, **kw)
        self.calls.append((x.detach().clone(), timesteps.detach().clone(), out))
        return out


class ConstNet(nn.Module):
    """Call k returns the constant values[k] everywhere (model range)."""

    def __init__(self, values):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.values = list(values)
        self.n = 0

    def forward(self, x, timesteps=None, **kw):
        v = self.values[self.n]
        self.n += 1
        return torch.full_like(x, float(v)) + 0 * self.dummy


def with_net(model, net):
    return Model(model.id, model.config, {"denoiser": net})


def slices(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, SIZE), torch.linspace(-1, 1, SIZE), indexing="ij")
    disc = (xx ** 2 + yy ** 2) < 0.85
    imgs = [(0.5 + 0.2 * torch.cos(3 * yy + i) + 0.05 * torch.randn(SIZE, SIZE, generator=g)).clamp(0, 1)
            for i in range(b)]
    x = torch.stack([torch.where(disc, im, torch.tensor(0.0)) for im in imgs])[:, None]
    return x, disc.expand(b, 1, SIZE, SIZE).clone()


# -- grid ------------------------------------------------------------------------------------
def test_grid_positions():
    assert grid_positions(96, 48, 48) == [0, 48]  # the reference layout: 2 x 2 patches
    assert grid_positions(64, 32, 32) == [0, 32]
    assert grid_positions(32, 16, 8) == [0, 8, 16]
    assert grid_positions(100, 48, 48) == [0, 26, 52]  # evenly spaced, covering, last one flush
    assert grid_positions(40, 40, 10) == [0]
    with pytest.raises(ValueError):
        grid_positions(32, 33, 16)
    with pytest.raises(ValueError):
        grid_positions(32, 16, 0)
    boxes = grid_boxes(32, 32, 16, 16)
    assert boxes == [(0, 0), (0, 16), (16, 0), (16, 16)]
    m = box_mask(32, 32, boxes, 16)
    assert m.shape == (4, 1, 32, 32) and (m.sum(0) == 1).all()  # a partition of the slice
    # overlapping grids still cover every pixel
    for size, patch, stride in [(32, 16, 8), (48, 20, 7), (100, 48, 48)]:
        m = box_mask(size, size, grid_boxes(size, size, patch, stride), patch)
        assert (m.sum(0) >= 1).all()


def test_patched_input_is_eq3():
    x0 = torch.zeros(2, 1, 8, 8)
    xt = torch.ones(2, 1, 8, 8)
    m = box_mask(8, 8, [(2, 4)], 3)
    out = patched_input(x0, xt, m)
    assert out[:, :, 2:5, 4:7].eq(1).all() and out.sum() == 2 * 9


# -- inference ---------------------------------------------------------------------------------
def test_registered_and_presets(model):
    assert "pddpm" in available_methods() and get_method_class("pddpm") is PDDPM
    paper = build_method("pddpm", model, preset="paper")
    fast = build_method("pddpm", model, preset="fast")
    assert paper.params == fast.params  # fast == paper on purpose (already 1 NFE per patch)
    assert paper.patch_size == SIZE // 2 and paper.stride == SIZE // 2
    assert paper.params.level == 500 and paper.params.error == "l1"
    ov = build_method("pddpm", model, preset="overlap")
    assert ov.params.overlap and ov.stride == SIZE // 4


def test_shapes_ranges_nfe(model):
    x, mask = slices()
    out = build_method("pddpm", model)(x, mask, BatchRNG([1, 2, 3]))
    assert out.restoration.shape == x.shape and out.anomaly.shape == x.shape
    assert out.restoration.min() >= 0 and out.restoration.max() <= 1
    assert (out.anomaly >= 0).all() and (out.anomaly[~mask] == 0).all() and out.anomaly.max() > 0
    assert out.nfe == 4 and out.extras["t"] == 499 and out.extras["noise"] == "simplex2d"
    torch.testing.assert_close(out.anomaly, (x - out.restoration).abs() * mask)
    l2 = build_method("pddpm", model, error="l2")(x, mask, BatchRNG([1, 2, 3]))
    torch.testing.assert_close(l2.restoration, out.restoration)
    torch.testing.assert_close(l2.anomaly, (x - out.restoration) ** 2 * mask)
    ov = build_method("pddpm", model, preset="overlap")(x, mask, BatchRNG([1, 2, 3]))
    assert ov.nfe == 9


def test_determinism_and_batch_independence(model):
    x, mask = slices()
    meth = build_method("pddpm", model)
    a = meth(x, mask, BatchRNG([5, 6, 7]))
    b = meth(x, mask, BatchRNG([5, 6, 7]))
    assert torch.equal(a.restoration, b.restoration) and torch.equal(a.anomaly, b.anomaly)
    one = meth(x[2:], mask[2:], BatchRNG([7]))
    torch.testing.assert_close(one.restoration, a.restoration[2:], atol=1e-5, rtol=0)
    other = meth(x, mask, BatchRNG([50, 60, 70]))
    assert not torch.allclose(other.restoration, a.restoration)


def test_network_sees_noise_only_inside_the_patch(model):
    """Every call: t = 499, clean model-range input outside the patch, q_sample(x, 499, eps) inside,
    with one noise field per image shared by all patches."""
    x, mask = slices(2)
    rec = Recorder(model.net("denoiser"))
    meth = build_method("pddpm", with_net(model, rec))
    out = meth(x, mask, BatchRNG([3, 4]))
    assert len(rec.calls) == out.nfe == 4
    x_m = 2 * x - 1
    eps = make_noise("simplex2d", BatchRNG([3, 4]), x.shape[1:])
    x_t = Diffusion(model.schedule).q_sample(x_m, 499, eps)
    boxes = grid_boxes(SIZE, SIZE, 16, 16)
    for (x_in, t, _), box in zip(rec.calls, boxes):
        assert (t == 499).all()
        m = box_mask(SIZE, SIZE, [box], 16)
        assert torch.equal(x_in[~m.expand_as(x_in)], x_m[~m.expand_as(x_m)])
        torch.testing.assert_close(x_in[m.expand_as(x_in)], x_t[m.expand_as(x_t)])
    # the restoration is the stitched patch predictions
    stitched = torch.zeros_like(x)
    for (_, _, pred), box in zip(rec.calls, boxes):
        m = box_mask(SIZE, SIZE, [box], 16).expand_as(x)
        stitched[m] = ((pred.clamp(-1, 1) + 1) / 2)[m]
    torch.testing.assert_close(out.restoration, stitched)


def test_single_patch_leaves_the_rest_untouched(model):
    x, mask = slices(2)
    for k, (top, left) in enumerate(grid_boxes(SIZE, SIZE, 16, 16)):
        out = build_method("pddpm", model, patches=(k,))(x, mask, BatchRNG([1, 2]))
        assert out.nfe == 1
        m = box_mask(SIZE, SIZE, [(top, left)], 16).expand_as(x)
        torch.testing.assert_close(out.restoration[~m], x[~m], atol=1e-6, rtol=0)
        assert out.anomaly[~m].abs().max() < 1e-6
        assert (out.restoration[m] - x[m]).abs().max() > 1e-3  # the patch itself was reconstructed
    with pytest.raises(ValueError):
        build_method("pddpm", model, patches=(4,))(x, mask, BatchRNG([1, 2]))


def test_overlap_averages_the_predictions(model):
    x, mask = slices(1)
    values = [-0.9 + 0.2 * k for k in range(9)]
    meth = build_method("pddpm", with_net(model, ConstNet(values)), overlap=True, patch_size=16, stride=8)
    out = meth(x, mask, BatchRNG([0]))
    boxes = grid_boxes(SIZE, SIZE, 16, 8)
    assert out.nfe == len(boxes) == 9
    expect = torch.zeros(SIZE, SIZE)
    for i in range(SIZE):
        for j in range(SIZE):
            vals = [v for v, (t, l) in zip(values, boxes) if t <= i < t + 16 and l <= j < l + 16]
            expect[i, j] = (sum(vals) / len(vals) + 1) / 2
    torch.testing.assert_close(out.restoration[0, 0], expect)
    # the centre (covered by four patches) is their mean, the corner only the first patch
    assert abs(out.restoration[0, 0, 0, 0].item() - (values[0] + 1) / 2) < 1e-6
    # without overlap each pixel comes from exactly one patch
    meth = build_method("pddpm", with_net(model, ConstNet(values)), patch_size=16)
    out = meth(x, mask, BatchRNG([0]))
    assert out.restoration[0, 0, 20, 3].item() == pytest.approx((values[2] + 1) / 2)


def test_invalid_parameters(model):
    with pytest.raises(ValueError):
        build_method("pddpm", model, stride=8)  # overlapping grid without overlap=True
    with pytest.raises(ValueError):
        build_method("pddpm", model, error="l3")
    with pytest.raises(ValueError):
        build_method("pddpm", model, level=0)
    with pytest.raises(ValueError):
        build_method("pddpm", model, patch_size=64)(*slices(1), BatchRNG([0]))


def test_postprocess_scales_erosion_with_resolution():
    assert PDDPM.postprocess == {"erode_mask_iterations": 3, "median_size": 5, "min_component_size": 7}
    net = ConstNet([0.0])
    for size, it in [(32, 1), (64, 2), (96, 3), (128, 5)]:
        cfg = PDDPM.default_model_config(size)
        meth = PDDPM(Model("m", cfg, {"denoiser": net}))
        assert meth.postprocess["erode_mask_iterations"] == it
        assert meth.postprocess["median_size"] == 5 and meth.postprocess["min_component_size"] == 7
        assert meth.patch_size == size // 2


# -- training ----------------------------------------------------------------------------------
def test_training_loss_only_on_the_patch(model):
    x, mask = slices(3)
    rec = Recorder(model.net("denoiser"))
    m = with_net(model, rec)
    loss = PDDPM.training_loss(m, x, mask, BatchRNG([1, 2, 3]))
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    (x_in, t, out), = rec.calls
    out.retain_grad()
    loss.backward()
    x_m = 2 * x - 1
    noised = x_in != x_m
    boxes = grid_boxes(SIZE, SIZE, 16, 16)
    patch = torch.zeros_like(noised)
    for b in range(3):
        # the noised region of each sample is exactly one grid cell
        ys, xs = torch.nonzero(noised[b, 0], as_tuple=True)
        box = (int(ys.min()), int(xs.min()))
        assert box in boxes and int(ys.max()) - box[0] == 15 and int(xs.max()) - box[1] == 15
        patch[b, :, box[0]:box[0] + 16, box[1]:box[1] + 16] = True
    assert (t >= 0).all() and (t < 1000).all()
    g = out.grad
    assert (g[~patch] == 0).all() and (g[patch] != 0).float().mean() > 0.9
    # L1 between the x0 prediction and the clean image, averaged over the patch pixels
    torch.testing.assert_close(loss.detach(), (out.detach() - x_m).abs()[patch].mean())
    grads = [p.grad for p in model.net("denoiser").parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(gr).all() for gr in grads)
    model.net("denoiser").zero_grad(set_to_none=True)


def test_training_loss_deterministic_and_defaults(model):
    x, mask = slices(2)
    a = PDDPM.training_loss(model, x, mask, BatchRNG([8, 9]))
    b = PDDPM.training_loss(model, x, mask, BatchRNG([8, 9]))
    assert torch.equal(a.detach(), b.detach())
    cfg = PDDPM.default_model_config(64)
    assert cfg["methods"] == ["pddpm"] and cfg["noise"] == "simplex2d" and cfg["patch_size"] == 32
    assert cfg["schedule"]["schedule"] == "cosine" and cfg["schedule"]["prediction_type"] == "sample"
    assert cfg["intensity_range"] == [-1.0, 1.0]
    big = PDDPM.default_model_config(96, small=False)["networks"]["denoiser"]
    assert big["channels"] == [128, 256, 256] and big["num_res_blocks"] == 3
    assert not any(big["attention_levels"])  # attention only in the middle block
    from uad.networks import build_network

    net = build_network(big)
    assert any("attn" in n.lower() for n, _ in net.middle_block.named_modules())
