"""Unprocessed heads: skull stripping, N4 and (optionally) registration in the chain, with the bundled
``disyre-t2-phantom`` model on head phantoms (2-3 mm, small registration iteration counts)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import coarse_registration
from uad import skullstrip
from uad.metrics import average_precision
from uad.phantoms import make_phantom, resample_phantom
from uad.pipeline import detect

MODEL = "disyre-t2-phantom"
FAST_STRIP = dict(skullstrip.REGISTRATION_MASK_OPTIONS, voxel_mm=3.0, affine_iterations=(30, 15),
                  bspline_iterations=5)
FAST_AFFINE = {"iterations": (30, 15)}  # two levels, as production, with fewer iterations


def _a(img):
    return sitk.GetArrayFromImage(img)


def _dice(a, b):
    return 2.0 * (a & b).sum() / max(1, a.sum() + b.sum())


@pytest.fixture(scope="module")
def fast_registration():
    with pytest.MonkeyPatch.context() as mp, coarse_registration(**FAST_AFFINE):
        mp.setattr(skullstrip, "REGISTRATION_MASK_OPTIONS", FAST_STRIP)
        yield


@pytest.fixture(scope="module")
def t2_head():
    return make_phantom(5, "T2", "tumour", spacing=3.0, head=True)


@pytest.fixture(scope="module")
def head_run(t2_head, fast_registration, tmp_path_factory):
    """One detection on the T2 head phantom (automatic everything), its outputs written as the CLI does."""
    from uad.cli import _outputs, _write_all

    res = detect(t2_head.image, method="disyre", model=MODEL, device="cpu", preset="fast")
    out = tmp_path_factory.mktemp("head")
    paths = _outputs(out, "head")
    _write_all(res, t2_head.image, paths, "head phantom")
    return res, paths


def test_head_is_detected_corrected_and_stripped(head_run):
    res, _ = head_run
    pre = res.info["preprocess"]
    assert pre["skull_stripped"]["value"] is False and pre["skull_stripped"]["source"] == "detected"
    names = [s["step"] for s in pre["steps"]]
    # stripped from the scan as acquired, registered, then N4 on the template's grid (fitted to the brain)
    assert names[:4] == ["reorient", "brain_mask", "register", "bias_correction"]
    bm = pre["steps"][1]
    assert bm["source"] == f"skull strip ({skullstrip.STRIPPER_BY_CONTRAST['T2']})"
    assert bm["boundary_margin_mm"] > 0


def test_lesion_found_over_the_whole_head_and_non_brain_quiet(head_run, t2_head):
    res, _ = head_run
    truth_brain = _a(t2_head.brain_mask) > 0
    head = _a(t2_head.head_mask) > 0
    lesion = _a(t2_head.lesion_mask) > 0
    img = _a(t2_head.image)
    anomaly = _a(res.anomaly)
    # AP over every head voxel, against the intensity floor computed with the true brain mask
    ap_head = average_precision(anomaly[head], lesion[head])
    floor = average_precision(img[truth_brain], lesion[truth_brain])
    assert ap_head > 2.0 * floor, (ap_head, floor)
    # fewer than 1% of the non-brain head voxels flagged (model's calibrated threshold)
    flagged = _a(res.mask) > 0
    assert res.info["threshold_source"].startswith("model")
    assert flagged[head & ~truth_brain].mean() < 0.01
    assert flagged[lesion].mean() > 0.3  # and the lesion is flagged
    # the brain mask used
    assert _dice(_a(res.brain_mask) > 0, truth_brain) >= 0.90


def test_brain_mask_written_and_outlined(head_run, t2_head):
    from matplotlib.image import imread

    res, paths = head_run
    bm = sitk.ReadImage(str(paths["brainmask"]))
    assert paths["brainmask"].name == "head_brainmask.nii.gz"
    for attr in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(bm, attr)() == getattr(t2_head.image, attr)()
    assert np.array_equal(_a(bm), _a(res.brain_mask))
    png = imread(str(paths["overview"]))[..., :3]
    cyan = (png[..., 0] < 0.2) & (png[..., 1] > 0.8) & (png[..., 2] > 0.8)
    assert cyan.sum() > 100  # the brain outline


def test_deepbet_strips_a_t1_head():
    ph = make_phantom(8, "T1", "none", spacing=3.0, head=True)
    mask = skullstrip.deepbet_mask(ph.image)
    assert mask.shape == _a(ph.image).shape
    assert _dice(mask, _a(ph.brain_mask) > 0) >= 0.95


def test_registered_inference_agrees_across_orientations_and_spacings(t2_head, fast_registration):
    """The mni152 profile: the same head as acquired (3 mm), and oblique with 4 mm slices, flipped."""
    prof = {"registration": "mni152", "spacing_mm": 3.0}
    oblique = resample_phantom(t2_head, spacing=(3.0, 3.0, 4.0), rotation_deg=(10.0, 0.0, 15.0),
                               flip=(True, False, False))
    maps = []
    for ph in (t2_head, oblique):
        r = detect(ph.image, method="disyre", model=MODEL, device="cpu", preset="fast", preprocessing=prof)
        assert r.anomaly.GetSize() == ph.image.GetSize() and r.anomaly.GetDirection() == ph.image.GetDirection()
        assert "register" in [s["step"] for s in r.info["preprocess"]["steps"]]
        maps.append(_a(sitk.Resample(r.anomaly, t2_head.image, sitk.Transform(), sitk.sitkLinear, 0.0,
                                     sitk.sitkFloat32)))
    b = _a(t2_head.brain_mask) > 0
    b &= _a(sitk.Resample(oblique.brain_mask, t2_head.brain_mask, sitk.Transform(), sitk.sitkNearestNeighbor)) > 0
    assert np.corrcoef(maps[0][b], maps[1][b])[0, 1] >= 0.9


def test_registration_auto_registers_heads_only(t2_head, fast_registration):
    """Profile ``registration: "auto"``: a head (not skull-stripped) is registered to MNI152, a
    skull-stripped brain is not; ``info["registration"]`` says which and why."""
    from uad.preprocess import preprocess

    stripped = make_phantom(5, "T2", "tumour", spacing=3.0)
    head = preprocess(t2_head.image, 64, profile={"registration": "auto"}, contrast="T2")
    brain = preprocess(stripped.image, 64, profile={"registration": "auto"}, contrast="T2")
    assert "register" in [s.name for s in head.steps]
    assert head.info["registration"]["value"] == "mni152" and "not skull-stripped" in head.info["registration"]["reason"]
    assert "register" not in [s.name for s in brain.steps]
    assert brain.info["registration"] == {"value": None, "profile": "auto", "reason": "the input is skull-stripped"}
    # the skull-stripped input's slices are those of the unregistered chain
    plain = preprocess(stripped.image, 64, contrast="T2")
    assert np.array_equal(plain.slices, brain.slices)


def test_registration_profile_values_and_cli_switch():
    from uad.cli import _registration_override
    from uad.preprocess import profile_settings

    assert profile_settings({"registration": "AUTO"})["registration"] == "auto"
    assert profile_settings({"registration": "mni152"})["registration"] == "mni152"
    assert profile_settings({"registration": None})["registration"] is None
    for bad in ("rigid", 1, True):
        with pytest.raises(ValueError, match="registration"):
            profile_settings({"registration": bad})
    assert _registration_override("profile") is None
    assert _registration_override("yes") == {"registration": "mni152"}
    assert _registration_override("no") == {"registration": None}
    assert _registration_override("auto") == {"registration": "auto"}


def test_registered_slices_keep_the_canonical_orientation(fast_registration):
    """The template's own voxel order is RAS-like; registered slices must still be canonical LPS slices
    (as the models were trained on), not mirrored left-right and front-back.  Before the fix the best
    match of an unregistered slice among the registered ones was its double mirror image."""
    from uad.preprocess import preprocess

    ph = make_phantom(200, "T2", "none", spacing=3.0)
    plain = preprocess(ph.image, 64, brain_mask=ph.brain_mask, contrast="T2")
    reg = preprocess(ph.image, 64, brain_mask=ph.brain_mask, profile={"registration": "mni152"}, contrast="T2")
    a = plain.slices[len(plain) // 2].ravel()
    best = {}
    for name, f in (("same", lambda s: s), ("mirror_lr", lambda s: s[:, ::-1]), ("mirror_ap", lambda s: s[::-1, :]),
                    ("both", lambda s: s[::-1, ::-1])):
        best[name] = max(float(np.corrcoef(a, f(s).ravel())[0, 1]) for s in reg.slices if s.std() > 0)
    assert best["same"] >= 0.8
    assert best["same"] > max(best["mirror_ap"], best["both"]) + 0.05
