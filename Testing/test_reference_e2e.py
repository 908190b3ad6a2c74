"""End to end: an imported THOR-layout checkpoint runs ``uad detect`` with its preprocessing profile.

Needs the clinical preprocessing chain (branch ``chain``: ``make_phantom(..., head=True)``,
the ``preprocessing`` profile applied by ``uad.preprocess``, registration to MNI152); it is
run after that branch is merged.  The checkpoint is GenerativeModels' ``DiffusionModelUNet``
with random weights (small channels) saved in THOR's layout (``monai-generative``; skipped
when the package is absent), imported with ``uad models import-reference``.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import uad.zoo as zoo
from uad.cli import main

from conftest import coarse_registration
from test_reference import _reference_unet, _save_checkpoint


@pytest.fixture
def imported(tmp_path, monkeypatch):
    monkeypatch.setattr(zoo, "bundled_dirs", lambda: [])
    monkeypatch.delenv("UAD_MODELS_DIR", raising=False)
    monkeypatch.setenv("UAD_CACHE_DIR", str(tmp_path / "cache"))
    ckpt = _save_checkpoint(_reference_unet(seed=1, attention=(False, False, True)),
                            tmp_path / "brain_Gaussian.pt", "thor")  # attention at 32 x 32 only: cheap at 128 px
    assert main(["models", "import-reference", "thor", str(ckpt), "--id", "thor-e2e", "--input-range=-1,1",
                 "--slice-range", "0.48,0.52"]) == 0
    return "thor-e2e"


@pytest.fixture(autouse=True)
def _coarse_registration():
    """Fewer affine iterations (40 / 20 instead of 200 / 100): the profile's steps and the way back onto the
    input grid are what is tested here, not the registration's accuracy."""
    with coarse_registration(iterations=(40, 20)):
        yield


@pytest.fixture
def head_t1(tmp_path):
    from uad.phantoms import make_phantom

    ph = make_phantom(3, "T1", spacing=2.0, head=True)
    path = tmp_path / "head_t1.nii.gz"
    sitk.WriteImage(ph.image, str(path))
    return ph.image, path


FAST = {"thor": ["level=20", "steps=3", "harmonization=[10]", "vis_every=0"],
        "autoddpm": ["level=20", "recon_steps=3", "inpaint_level=10", "inpaint_steps=3", "resample=1"]}


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing())
            and np.allclose(a.GetOrigin(), b.GetOrigin()) and np.allclose(a.GetDirection(), b.GetDirection()))


def test_detect_with_imported_reference_model_applies_its_profile(imported, head_t1, tmp_path, capsys):
    """``uad detect --method thor`` (files on the input grid), then ``pipeline.detect`` with
    ``autoddpm`` (the profile recorded in ``info``), on one T1 head phantom.  Each run registers
    the head to MNI152 (a few minutes on a loaded 2-core machine), so one run per method."""
    from uad.cli import parse_value
    from uad.pipeline import detect

    image, path = head_t1
    out = tmp_path / "out-thor"
    argv = ["detect", str(path), "-o", str(out), "--model", imported, "--method", "thor", "--device", "cpu",
            "--no-progress", "--batch-size", "8"]
    for p in FAST["thor"]:
        argv += ["--param", p]
    assert main(argv) == 0, capsys.readouterr()
    capsys.readouterr()
    for kind in ("restoration", "anomaly", "mask"):
        res = sitk.ReadImage(str(out / f"head_t1_{kind}.nii.gz"))
        assert _same_grid(res, image), kind  # on the input's exact grid
    anomaly = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "head_t1_anomaly.nii.gz")))
    assert np.isfinite(anomaly).all() and anomaly.max() > 0

    params = {k: parse_value(v) for k, v in (p.split("=", 1) for p in FAST["autoddpm"])}
    res = detect(image, method="autoddpm", model=imported, device="cpu", seed=0, params=params)
    info = res.info
    assert info["image_size"] == 128
    pre = info["preprocess"]
    prof = pre["profile"]
    assert prof["registration"] == "mni152" and prof["skull_strip"] is False and prof["square"] == "pad"
    assert prof["bias_correction"] is False and prof["intensity"] == "image-percentile"
    assert prof["slice_range"] == [0.48, 0.52]
    names = [s["step"] for s in pre["steps"]]
    assert "register" in names and "bias_correction" not in names
    assert pre["skull_stripped"]["value"] is False  # a head, detected as such
    assert _same_grid(res.anomaly, image) and _same_grid(res.restoration, image)
    # only the central slab was run: most axial slices of the head have anomaly 0
    a = sitk.GetArrayFromImage(sitk.DICOMOrient(res.anomaly, "LPS"))  # (k, j, i), k inferior -> superior
    per_slice = a.reshape(a.shape[0], -1).max(1)
    assert per_slice.max() > 0 and (per_slice == 0).mean() > 0.5
