"""Importing the authors' published THOR / AutoDDPM checkpoints (``uad.reference``).

Parity against the reference network: the PyPI package ``monai-generative`` (0.2.3, module
``generative``) ships the GenerativeModels ``DiffusionModelUNet`` that THOR and AutoDDPM
copied verbatim into their repositories; it imports beside MONAI 1.6 (installed with
``pip install --no-deps monai-generative==0.2.3``; it is in the ``test`` extra of
pyproject.toml).  The tests build it with random weights (THOR's architecture with small
channels: 32-64-64, attention F-T-T, one res block, one head of the deepest width, 32 groups,
eps 1e-6), save it in THOR's and AutoDDPM's checkpoint layouts, import the files and compare
the imported MONAI network, and a seeded THOR chain through our engine, with the reference
network itself.  Tests needing the package skip when it is absent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import one_error_line as _one_error_line
import torch

import uad.zoo as zoo
from uad import ModelError
from uad.cli import main

SMALL = {"num_channels": (32, 64, 64), "attention_levels": (False, True, True), "num_res_blocks": 1,
         "num_head_channels": 64, "norm_num_groups": 32, "norm_eps": 1e-6}




def _reference_unet(seed: int = 0, attention=None):
    """GenerativeModels' DiffusionModelUNet (THOR's architecture, small channels), random weights.

    ``attention``: other attention levels (e.g. (False, False, True), cheaper at 128 px).
    """
    generative = pytest.importorskip("generative.networks.nets")
    torch.manual_seed(seed)
    kw = dict(SMALL, attention_levels=tuple(attention)) if attention is not None else SMALL
    net = generative.DiffusionModelUNet(spatial_dims=2, in_channels=1, out_channels=1, **kw)
    with torch.no_grad():  # the default init zeroes the output convolutions: randomise everything
        for mod in net.modules():
            for name, p in mod.named_parameters(recurse=False):
                if isinstance(mod, torch.nn.GroupNorm) and name == "weight":
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
                elif p.ndim > 1:  # unit-gain weights so that the output is O(1)
                    p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
                else:
                    p.copy_(0.05 * torch.randn_like(p))
    return net.eval()


def _save_checkpoint(net, path: Path, layout: str = "thor", extra: dict | None = None,
                     drop: tuple = ()) -> Path:
    """Write ``net`` as the authors did: {'model_weights': {'unet.*', ['l_pips_sq.*']}, 'optimizer_weights', 'epoch'}."""
    weights = {f"unet.{k}": v.clone() for k, v in net.state_dict().items() if k not in drop}
    if layout == "thor":  # THOR's DDPM module also held its LPIPS network
        g = torch.Generator().manual_seed(1)
        weights["l_pips_sq.net.slice1.0.weight"] = torch.randn(64, 3, 3, 3, generator=g)
        weights["l_pips_sq.lin0.model.1.weight"] = torch.randn(1, 64, 1, 1, generator=g)
    weights.update(extra or {})
    ckpt = {"model_weights": weights,
            "optimizer_weights": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1, 2]}]},
            "epoch": 1499 if layout == "thor" else 2999}
    torch.save(ckpt, path)
    return path




# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("method,layout,rng", [("thor", "thor", "-1,1"), ("autoddpm", "autoddpm", "0,1")])
def test_imported_network_equals_reference_network(cache, tmp_path, method, layout, rng):
    from uad.networks import build_network
    from uad.reference import import_reference

    ref = _reference_unet(seed=3)
    ckpt = _save_checkpoint(ref, tmp_path / f"{layout}.pt", layout)
    before = zoo.sha256_file(ckpt)
    entry = import_reference(method, ckpt, model_id=f"{method}-small", input_range=rng)
    assert zoo.sha256_file(ckpt) == before  # the user's file is only read
    cfg = entry.data["networks"]["denoiser"]
    assert cfg["include_fc"] is False and cfg["channels"] == [32, 64, 64] and cfg["num_head_channels"] == 64
    model = zoo.load_model(entry.id)
    net = model.net("denoiser")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 32, 32, generator=g)
    t = torch.tensor([0, 250, 999])
    with torch.inference_mode():
        a, b = ref(x, timesteps=t), net(x, timesteps=t)
    assert a.abs().mean() > 0.1  # a non-trivial output (the reference's init would give zeros)
    assert float((a - b).abs().max()) < 1e-5
    # with MONAI's default include_fc=True (proj_attn applied) the outputs differ clearly
    fc = build_network(dict(cfg, include_fc=True))
    fc.load_old_state_dict({k: v.clone() for k, v in ref.state_dict().items()})
    with torch.inference_mode():
        c = fc.eval()(x, timesteps=t)
    assert float((a - c).abs().max()) > 1e-3


def test_thor_chain_equals_reference_network_chain(cache, tmp_path):
    """A seeded THOR run with the imported network equals the same run driven by the reference network."""
    from uad.methods import build_method
    from uad.reference import import_reference
    from uad.rng import BatchRNG

    ref = _reference_unet(seed=5)
    entry = import_reference("thor", _save_checkpoint(ref, tmp_path / "brain_Gaussian.pt"), model_id="thor-small",
                             input_range="-1,1")
    imported = zoo.load_model(entry.id)
    reference = zoo.Model("reference", dict(imported.config), {"denoiser": ref})

    def perceptual(a, b):  # deterministic, cheap stand-in for LPIPS (the same for both runs)
        return (a - b).abs().mean(1, keepdim=True)

    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    disk = ((xx ** 2 + yy ** 2) < 0.7).float()
    x = torch.stack([0.3 + 0.5 * disk, 0.2 + 0.6 * disk * (xx > 0)])[:, None].clamp(0, 1)
    mask = disk.bool().expand(2, 1, 32, 32)
    outs = []
    for model in (imported, reference):
        meth = build_method("thor", model, "paper", level=12, harmonization=[9, 4], vis_every=3,
                            perceptual=perceptual)
        outs.append(meth(x, mask, BatchRNG.for_slices(7, [10, 11])))
    a, b = outs
    assert a.nfe == b.nfe == 13 and a.extras["harmonization"] == [9, 4]
    assert float((a.restoration - b.restoration).abs().max()) < 1e-5
    assert float((a.anomaly - b.anomaly).abs().max()) < 1e-5
    assert float(a.anomaly.max()) > 0  # the maps are not trivially zero


# ----------------------------------------------------------------------------- refusals


def _payload_ran(path):  # what a malicious checkpoint would run on unpickling
    Path(path).write_text("code ran")
    return {}


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (_payload_ran, (str(self.path),))


def test_pickled_code_payload_is_refused_and_runs_nothing(cache, tmp_path, capsys):
    sentinel = tmp_path / "sentinel.txt"
    bad = tmp_path / "brain_Gaussian.pt"
    torch.save({"model_weights": {"unet.conv_in.conv.weight": torch.zeros(1)}, "epoch": _Payload(sentinel)}, bad)
    rc = main(["models", "import-reference", "thor", str(bad), "--input-range=-1,1"])
    line = _one_error_line(capsys, rc)
    assert "refused" in line and "needs code to unpickle" in line and "Nothing from it was executed" in line
    assert not sentinel.exists()
    assert not (cache / "manifest.json").exists() and not any(cache.glob("*")) if cache.exists() else True
    # the payload is live: an unsafe load would have run it (so the test above can fail)
    torch.load(bad, weights_only=False)
    assert sentinel.read_text() == "code ran"


def test_missing_and_unexpected_keys_are_named(cache, tmp_path, capsys):
    ref = _reference_unet()
    ckpt = _save_checkpoint(ref, tmp_path / "brain_Gaussian.pt", drop=("middle_block.attention.to_q.weight",),
                            extra={"unet.extra_head.weight": torch.zeros(3)})
    rc = main(["models", "import-reference", "thor", str(ckpt), "--input-range=-1,1"])
    line = _one_error_line(capsys, rc)
    assert "1 missing tensor(s): middle_block.attention.to_q.weight" in line
    assert "1 unexpected tensor(s): extra_head.weight" in line
    # a tensor outside 'unet.' (other than THOR's LPIPS) is named too
    ckpt2 = _save_checkpoint(ref, tmp_path / "b.pt", extra={"ema.conv_in.conv.weight": torch.zeros(3)})
    with pytest.raises(ModelError, match=r"outside 'unet.': ema.conv_in.conv.weight"):
        from uad.reference import import_reference

        import_reference("thor", ckpt2, input_range="-1,1")
    assert not (cache / "manifest.json").exists()


def test_not_a_checkpoint_gets_one_clear_error(cache, tmp_path, capsys):
    junk = tmp_path / "latest_model.pt"
    junk.write_bytes(b"not a torch file at all")
    line = _one_error_line(capsys, main(["models", "import-reference", "autoddpm", str(junk)]))
    assert "not a readable PyTorch checkpoint" in line
    line = _one_error_line(capsys, main(["models", "import-reference", "thor", str(tmp_path / "missing.pt")]))
    assert "no such checkpoint file" in line


# ----------------------------------------------------------------------------- round trip
def test_round_trip_into_cache_list_verify_and_entry(cache, tmp_path, capsys):
    from uad.reference import AUTODDPM_PARAMS, THOR_PARAMS

    ref = _reference_unet(seed=2)
    ckpt = _save_checkpoint(ref, tmp_path / "brain_Simplex.pt")
    rc = main(["models", "import-reference", "thor", str(ckpt), "--id", "thor-s", "--input-range=-1,1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "imported thor-s" in out and "mid-axial" in out and "--model thor-s --method thor" in out
    assert main(["models", "list"]) == 0
    row = [ln.split() for ln in capsys.readouterr().out.splitlines() if ln.startswith("thor-s ")][0]
    assert row[1:5] == ["thor,autoddpm,anoddpm", "T1", "128x128", "-"] and " ".join(row[5:]) == "user cache"
    assert main(["models", "verify", "thor-s"]) == 0
    assert "ok      thor-s" in capsys.readouterr().out

    e = zoo.find_model("thor-s")
    d = e.data
    assert d["noise"] == "simplex" and d["noise_options"]["normalise"] == "none"  # from the file name
    assert d["noise_options"]["frequency"] == 64.0
    assert d["intensity_range"] == [-1.0, 1.0] and d["image_size"] == 128 and d["contrast"] == "T1"
    assert d["schedule"]["beta_start"] == 1e-4 and d["schedule"]["beta_end"] == 0.02
    assert d["schedule"]["prediction_type"] == "epsilon" and d["schedule"]["clip_sample"] is True
    assert d["method_params"]["thor"] == THOR_PARAMS["simplex"] == {"level": 250, "harmonization": [200, 150, 100, 50]}
    assert d["method_params"]["autoddpm"] == AUTODDPM_PARAMS
    assert d["preprocessing"] == {"registration": "mni152", "spacing_mm": 1.0, "skull_strip": False,
                                  "bias_correction": False, "square": "pad", "pad_value": "min",
                                  "intensity": "image-percentile", "slice_range": [0.35, 0.65]}
    assert d["sha256"] == zoo.sha256_file(e.weights_path)
    assert d["source"]["sha256"] == zoo.sha256_file(ckpt) and d["source"]["epoch"] == 1499
    card = e.card_path.read_text()
    assert "no licence file" in card and "https://github.com/ci-ber/THOR_DDPM" in card
    assert "2 tensors under 'l_pips_sq.'" in card and "proj_attn" in card and "include_fc=False" in card
    assert "architecture differs from the published one" in card  # small test channels
    # the imported file is a plain zoo model: tensors keyed denoiser.*, no pickle
    from safetensors.torch import load_file

    assert all(k.startswith("denoiser.") for k in load_file(str(e.weights_path)))
    # the model's method parameters reach the method (below the preset and the caller)
    from uad.pipeline import build

    m = zoo.load_model("thor-s")
    assert build("thor", m, "fast").params.level == 250
    assert build("thor", m, "fast").params.harmonization == [200, 150, 100, 50]
    assert build("thor", m, "fast", {"level": 100}).params.level == 100
    # the simplex model samples the reference's unscaled simplex noise
    from uad.rng import BatchRNG

    out = build("thor", m, "fast", {"level": 6, "steps": 2, "harmonization": [3], "vis_every": 0,
                                    "perceptual": "ssim"})(torch.full((1, 1, 32, 32), 0.5),
                                                           torch.ones(1, 1, 32, 32, dtype=torch.bool),
                                                           BatchRNG.for_slices(0, [0]))
    assert out.extras["noise"] == "simplex" and torch.isfinite(out.anomaly).all()
    from uad.noise import options_for

    assert options_for(m.config, "simplex")["normalise"] == "none"  # sampled at the reference amplitude
    a = build("autoddpm", m, "fast").params
    assert (a.level, a.inpaint_level, a.threshold, a.resample) == (200, 50, 0.13, 3)  # fast's resample wins
    assert build("autoddpm", m, "paper").params.resample == 5

    # AutoDDPM defaults: [0, 1] input, Gaussian, id autoddpm-ixi-t1, every slice with --slice-range all
    ck2 = _save_checkpoint(ref, tmp_path / "latest_model.pt", "autoddpm")
    assert main(["models", "import-reference", "autoddpm", str(ck2), "--slice-range", "all"]) == 0
    capsys.readouterr()
    d2 = zoo.find_model("autoddpm-ixi-t1").data
    assert d2["intensity_range"] == [0.0, 1.0] and d2["noise"] == "gaussian" and d2["methods"][0] == "autoddpm"
    assert d2["preprocessing"]["slice_range"] is None and d2["license"] == "GPL-3.0"
    assert "GPL-3.0" in zoo.find_model("autoddpm-ixi-t1").card_path.read_text()


def test_imported_model_runs_through_the_pipeline_like_any_model(cache, tmp_path, make_volume, monkeypatch):
    """pipeline.detect with the imported model: the model's method parameters reach the method,
    outputs land on the input grid.  (The preprocessing profile is exercised by test_reference_e2e.py;
    here it is removed so that the test does not depend on registration.)"""
    import SimpleITK as sitk

    import uad.reference as reference
    from uad.pipeline import detect
    from uad.reference import import_reference

    monkeypatch.setattr(reference, "IMAGE_SIZE", 32)  # 128 px (the released size) is slow on a CPU
    entry = import_reference("autoddpm", _save_checkpoint(_reference_unet(seed=8), tmp_path / "latest_model.pt",
                                                          "autoddpm"), model_id="auto-pipe")
    model = zoo.load_model(entry.id)
    model.config.pop("preprocessing")
    image, _, _ = make_volume(shape_zyx=(4, 40, 36))
    res = detect(image, method="thor", model=model, device="cpu", seed=0,
                 params={"level": 10, "steps": 3, "harmonization": [5], "vis_every": 0})
    assert res.info["model"] == "auto-pipe" and res.info["image_size"] == 32
    assert res.anomaly.GetSize() == image.GetSize() and res.anomaly.GetSpacing() == image.GetSpacing()
    assert np.isfinite(sitk.GetArrayFromImage(res.anomaly)).all()
    res2 = detect(image, method="autoddpm", model=model, device="cpu", seed=0, preset="fast",
                  params={"threshold": 0.2, "recon_steps": 3, "inpaint_steps": 3, "resample": 1})
    # the caller set 'threshold' (one of the model's AutoDDPM parameters): none of the model's set applies
    assert res2.info["params"]["threshold"] == 0.2 and res2.info["params"]["resample"] == 1
    res3 = detect(image, method="autoddpm", model=model, device="cpu", seed=0, preset="fast",
                  params={"recon_steps": 3, "inpaint_steps": 3})
    assert res3.info["params"]["level"] == 200 and res3.info["params"]["threshold"] == 0.13
    assert res3.info["params"]["resample"] == 3  # the preset's, not the model's 5


# ----------------------------------------------------------------------------- input range
class _Oracle(torch.nn.Module):
    """A 'network' that knows the clean slices in one convention and returns the exact noise for them."""

    def __init__(self, x01, lo, hi):
        super().__init__()
        from uad.diffusion import Diffusion
        from uad.reference import REFERENCE_SCHEDULE

        self.x0 = torch.as_tensor(x01)[:, None] * (hi - lo) + lo
        self.d = Diffusion(REFERENCE_SCHEDULE)
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, timesteps):
        ab = self.d.alpha_bar(int(timesteps[0]))
        return (x - ab ** 0.5 * self.x0[: x.shape[0]]) / (1 - ab) ** 0.5


@pytest.mark.parametrize("lo,hi,key", [(-1.0, 1.0, "-1,1"), (0.0, 1.0, "0,1")])
def test_measure_input_ranges_identifies_the_trained_convention(lo, hi, key):
    from uad.reference import measure_input_ranges

    g = np.random.default_rng(0)
    x01 = np.clip(g.random((4, 16, 16)), 0, 1).astype(np.float32)
    errs = measure_input_ranges(_Oracle(x01, lo, hi), x01, batch_size=8)
    other = "0,1" if key == "-1,1" else "-1,1"
    assert errs[key] < 1e-4 and errs[other] > 0.02


def test_input_range_auto_prints_both_errors_and_keeps_the_lower(cache, tmp_path, capsys, monkeypatch):
    import uad.reference as reference

    calls = {}
    real = reference.healthy_slices

    def small_slices(image_size, n=6, seed=0, slice_range=None, spacing=None):
        calls["args"] = (image_size, slice_range)
        s, notes = real(32, n=2, seed=seed, slice_range=slice_range, spacing=2.0)
        return s, notes

    monkeypatch.setattr(reference, "healthy_slices", small_slices)
    monkeypatch.setattr(reference, "IMAGE_SIZE", 32)
    ckpt = _save_checkpoint(_reference_unet(seed=4), tmp_path / "brain_Gaussian.pt")
    assert main(["models", "import-reference", "thor", str(ckpt), "--id", "auto-test"]) == 0
    out = capsys.readouterr().out
    assert calls["args"] == (32, (0.35, 0.65))  # prepared over the profile's central slab
    line = [ln for ln in out.splitlines() if ln.startswith("input range:")][0]
    import re

    e01 = float(re.search(r"\[0,1\] ([0-9.]+)", line).group(1))
    e11 = float(re.search(r"\[-1,1\] ([0-9.]+)", line).group(1))
    chosen = [0.0, 1.0] if e01 < e11 else [-1.0, 1.0]
    d = zoo.find_model("auto-test").data
    assert d["intensity_range"] == chosen
    assert any("approximations" in c and "no registration" in c for c in d["checks"])


def test_healthy_slices_follow_the_profile():
    from uad.reference import healthy_slices

    s, notes = healthy_slices(32, n=3, slice_range=(0.4, 0.6), spacing=2.0)
    assert s.shape == (3, 32, 32) and s.dtype == np.float32
    assert float(s.min()) == 0.0 and float(s.max()) == 1.0  # image minimum -> 0, 98th percentile -> 1 (clipped)
    # padded with the image minimum: the slices are taller (233 mm A-P) than wide (197 mm L-R), so the
    # first and last columns are padding (-> 0), whatever the background of the phantom (a head has noise)
    assert float(s[:, :, 0].max()) < 1e-3 and float(s[:, :, -1].max()) < 1e-3
    assert notes and "no registration" in notes[0]


def test_reference_simplex_options_keep_the_reference_amplitude():
    """THOR's simplex network was trained on unscaled simplex fields (std about 0.46), not unit-std ones:
    the imported entry's ``noise_options`` give those fields, and unit std stays an explicit option."""
    from uad.noise import make_noise
    from uad.reference import REFERENCE_SIMPLEX_OPTIONS
    from uad.rng import BatchRNG

    raw = make_noise("simplex", BatchRNG.for_slices(0, [0, 1, 2]), (1, 64, 64), **REFERENCE_SIMPLEX_OPTIONS)
    unit = make_noise("simplex", BatchRNG.for_slices(0, [0, 1, 2]), (1, 64, 64),
                      **{**REFERENCE_SIMPLEX_OPTIONS, "normalise": "unit"})
    std = raw.flatten(1).std(1)
    assert ((std > 0.3) & (std < 0.7)).all()
    assert torch.allclose(unit.flatten(1).std(1), torch.ones(3), atol=1e-3)
    # same fields up to the per-field affine rescaling
    z = (raw - raw.mean((2, 3), keepdim=True)) / raw.flatten(2).std(2)[..., None, None]
    assert float((z - unit).abs().max()) < 1e-3

