"""Thresholds calibrated on healthy phantoms acquired like clinical scans (thick slices, every orientation)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import uad
import uad.pipeline
from uad import calibration
from uad.heldout import HELDOUT_SEEDS

ROOT = Path(__file__).resolve().parents[1]


def test_acquired_specs_cover_the_clinical_geometries_with_calibration_seeds():
    specs = calibration.acquired_specs("T2", 5)
    seeds = [s.seed for s in specs]
    assert seeds == list(range(calibration.ACQUIRED_SEED, calibration.ACQUIRED_SEED + 5))
    # inside the calibration range, never the held-out one
    assert all(2_000_000 <= s < 3_000_000 and not HELDOUT_SEEDS[0] <= s < HELDOUT_SEEDS[1] for s in seeds)
    assert {s.geometry.orientation for s in specs} == {"axial", "sagittal", "coronal", "oblique-axial"}
    th = [s.geometry.thickness for s in specs]
    assert min(th) >= 1.5 and max(th) <= 4.0 and max(th) - min(th) > 1.0
    assert {s.geometry.order for s in specs} == {"LPS", "RAS"}
    assert any(any(s.geometry.tilt_deg) for s in specs)
    assert [s.geometry for s in calibration.acquired_specs("T2", 5)] == [s.geometry for s in specs]  # seeded
    assert all(s.lesion == "none" for s in specs)
    with pytest.raises(ValueError, match="held-out range"):
        calibration.acquired_specs("T2", 1, seed=HELDOUT_SEEDS[0])
    with pytest.raises(ValueError, match="held-out range"):
        calibration.acquired_specs("T2", 3, seed=HELDOUT_SEEDS[0] - 2)  # the last one would be held-out


def test_acquired_calibration_records_its_geometry_and_holds_its_rate(tiny_model):
    short = {"level": 20, "steps": 3}
    p, backend, rec = calibration.calibrate(tiny_model, "anoddpm", "fast", n_volumes=2, geometry="acquired",
                                            params=short, log=lambda s: None)
    assert rec["geometry"] == "acquired" and rec["spacing_mm"] is None
    assert rec["seeds"] == [calibration.ACQUIRED_SEED, calibration.ACQUIRED_SEED + 1]
    specs = calibration.acquired_specs("T2", 2)
    assert rec["acquisitions"] == [s.geometry.describe() for s in specs]
    vols = list(calibration.acquired_healthy_volumes("T2", 2))
    for (img, brain), s in zip(vols, specs):
        assert img.GetSpacing()[2] == pytest.approx(s.geometry.thickness)
        assert np.allclose(np.reshape(img.GetDirection(), (3, 3)), s.geometry.direction(), atol=1e-6)
    # the stored 1 % threshold flags 1 % of the brain voxels of those acquired volumes
    vals = []
    for i, (img, brain) in enumerate(vols):
        res = uad.pipeline.detect(img, method="anoddpm", model=tiny_model, device="cpu", seed=i, preset="fast",
                                  params=short, brain_mask=brain, mask=False)
        vals.append(sitk.GetArrayFromImage(res.anomaly)[sitk.GetArrayFromImage(brain) > 0])
    v = np.concatenate(vals)
    assert rec["n_voxels"] == v.size
    assert abs((v > rec["thresholds"]["0.01"]).mean() - 0.01) < 0.002
    # the axial default is recorded as such
    _, _, ax = calibration.calibrate(tiny_model, "anoddpm", "fast", n_volumes=1, params=short, log=lambda s: None)
    assert ax["geometry"] == "axial" and ax["spacing_mm"] == 2.0 and "acquisitions" not in ax
    with pytest.raises(ValueError, match="held-out range"):
        calibration.calibrate(tiny_model, "anoddpm", "fast", n_volumes=1, seed=HELDOUT_SEEDS[0], params=short)
    entry = dict(tiny_model.config)
    calibration.store(entry, "anoddpm", "fast", "none", rec)
    thr, source, _ = calibration.lookup_threshold(entry, "anoddpm", "fast", "none")
    assert thr == rec["thresholds"]["0.01"] and "2 healthy T2 volume(s) acquired like clinical scans" in source
    with pytest.raises(ValueError, match="geometry"):
        calibration.calibrate(tiny_model, "anoddpm", "fast", n_volumes=1, geometry="oblique", params=short)


def test_card_says_how_the_calibration_volumes_were_acquired():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from train_bundled import threshold_section
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    rec = {"thresholds": {"0.01": 0.2, "0.05": 0.1}, "n_volumes": 10, "n_voxels": 1000, "nfe_per_slice": 4,
           "geometry": "acquired"}
    old = dict(rec, n_volumes=2, geometry=None, spacing_mm=2.0)
    entry = {"calibration": {"disyre": {"presets": {"paper": {"none": rec}, "fast": {"none": old}}}}}
    lines = "\n".join(threshold_section(entry))
    assert "| disyre | paper | none | 0.2 | 0.1 | - | 4 | 10 acquired like clinical scans" in lines
    assert "| disyre | fast | none | 0.2 | 0.1 | - | 4 | 2 at 2 mm axial |" in lines


def test_thick_sagittal_or_coronal_slices_are_warned(tiny_model, make_volume):
    from uad.heldout import Geometry
    from uad.preprocess import acquisition_warnings

    def image(orient, thickness, order="LPS", tilt=(0.0, 0.0)):
        g = Geometry(orient, thickness, 1.0, tilt, order)
        im = sitk.Image(8, 8, 8, sitk.sitkFloat32)
        im.SetSpacing(g.spacing)
        im.SetDirection([float(v) for v in g.direction().ravel()])
        return im

    for orient, word in (("sagittal", "left-right"), ("coronal", "anterior-posterior")):
        for order in ("LPS", "RAS"):
            w = acquisition_warnings(image(orient, 3.5, order))
            assert len(w) == 1 and w[0].startswith(f"{orient} slices 3.5 mm thick") and word in w[0]
        assert acquisition_warnings(image(orient, 2.5)) == []  # thinner than THICK_NON_AXIAL_MM
    assert acquisition_warnings(image("axial", 5.0)) == []  # the networks' own slice plane
    assert acquisition_warnings(image("oblique-axial", 4.0, tilt=(20.0, 5.0))) == []
    iso = image("sagittal", 3.5)
    iso.SetSpacing((3.2, 3.2, 3.5))  # near-isotropic coarse voxels: no slice-thickness effect
    assert acquisition_warnings(iso) == []
    # detect reports it with the preprocessing warnings (CLI and Slicer print those)
    img, _, brain = make_volume(shape_zyx=(12, 36, 32), spacing=(1.0, 1.0, 3.5), lesion=False, seed=4,
                                direction=Geometry("sagittal", 3.5, 1.0, (0, 0), "LPS").direction())
    res = uad.pipeline.detect(img, method="anoddpm", model=tiny_model, device="cpu", preset="fast",
                              params={"level": 20, "steps": 2}, brain_mask=brain, mask=False)
    assert any(w.startswith("sagittal slices 3.5 mm thick") for w in res.info["preprocess"]["warnings"])
