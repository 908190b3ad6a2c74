"""Autocast in ``uad detect``: bf16 close to fp32, recorded in info and the overview title, fp16 refused where
torch cannot run it on the CPU, passed through by the Logic and the background runner."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from uad import UADError
from uad.precision import AutocastNetwork, normalise_precision, precision_dtype


def _arr(img):
    return sitk.GetArrayFromImage(img)


@pytest.fixture
def live_model(tiny_model):
    """The tiny model with a non-zero output layer (MONAI zero-initialises it, so the tiny net predicts 0
    whatever the precision)."""
    import copy

    m = copy.deepcopy(tiny_model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, prm in m.net("denoiser").named_parameters():
            if name.startswith("out."):
                prm.copy_(0.2 * torch.randn(prm.shape, generator=g))
    return m


def test_detect_bf16_close_to_fp32_and_recorded(tiny_zoo, live_model, make_volume, fast_params):
    from uad.overview import overview_title
    from uad.pipeline import detect

    tiny_model = live_model
    img, _, brain = make_volume(shape_zyx=(6, 40, 36))
    ref = detect(img, method="anoddpm", model=tiny_model, device="cpu", params=fast_params, brain_mask=brain)
    low = detect(img, method="anoddpm", model=tiny_model, device="cpu", params=fast_params, brain_mask=brain,
                 precision="bf16")
    assert ref.info["precision"] == "fp32" and low.info["precision"] == "bf16"
    assert "bf16" in overview_title("x.nii.gz", low.info) and "fp32" in overview_title("x.nii.gz", ref.info)
    a, b = _arr(ref.anomaly), _arr(low.anomaly)
    assert a.shape == b.shape and b.dtype == np.float32
    scale = float(np.abs(a).max())
    assert scale > 0
    # bf16 keeps ~3 significant digits in the network; the map stays within 1 % (max) / 0.1 % (mean) of the
    # fp32 map's range (measured here: 0.19 % / 0.012 %) ...
    assert float(np.abs(a - b).max()) < 0.01 * scale
    assert float(np.abs(a - b).mean()) < 0.001 * scale
    # ... but it did run in reduced precision (not silently fp32)
    assert float(np.abs(a - b).max()) > 0
    # the caller's model is not wrapped
    assert not isinstance(tiny_model.net("denoiser"), AutocastNetwork)


def test_precision_names_and_fp16_refusal(monkeypatch):
    assert normalise_precision(None) == "fp32" and normalise_precision("float32") == "fp32"
    assert precision_dtype("cpu", "bf16") is torch.bfloat16 and precision_dtype("cpu", "fp32") is None
    with pytest.raises(UADError, match="unknown precision"):
        normalise_precision("int8")
    import uad.precision as prec

    monkeypatch.setattr(prec, "cpu_fp16_supported", lambda: False)
    with pytest.raises(UADError, match="fp16 autocast is not supported on the CPU"):
        precision_dtype("cpu", "fp16")


def test_cli_fp16_refused_before_any_output(tiny_zoo, make_volume, tmp_path, monkeypatch, capsys):
    import uad.precision as prec
    from uad.cli import main

    img, _, brain = make_volume(shape_zyx=(6, 40, 36))
    src = tmp_path / "scan.nii.gz"
    sitk.WriteImage(img, str(src))
    monkeypatch.setattr(prec, "cpu_fp16_supported", lambda: False)
    out = tmp_path / "out"
    rc = main(["detect", str(src), "-o", str(out), "--method", "anoddpm", "--model", "tiny-test", "--device", "cpu",
               "--precision", "fp16", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "fp16 autocast is not supported on the CPU" in err
    assert not out.exists() or not any(out.iterdir())


def test_logic_and_runner_pass_precision(monkeypatch):
    from UADExtensionLib import runner

    cmd = runner.build_detect_command("in.nrrd", "out", "disyre", precision="bf16")
    assert cmd[cmd.index("--precision") + 1] == "bf16"
    assert "--precision" not in runner.build_detect_command("in.nrrd", "out", "disyre")

    class FakeLogic:  # only what BackgroundRun.__init__ / command() touch
        scene = None

    run = runner.BackgroundRun(FakeLogic(), None, method="disyre", precision="BF16")
    from pathlib import Path

    run._tmp, run._inputPath = Path("/tmp/x"), Path("/tmp/x/in.nrrd")
    c = run.command()
    assert c[c.index("--precision") + 1] == "bf16"
