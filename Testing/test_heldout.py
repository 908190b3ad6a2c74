"""The held-out set: seeds disjoint from every seed training uses, unseen geometry, manifest."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from uad import heldout
from uad.heldout import HELDOUT_SEEDS, Geometry, acquire, case_specs, generate_heldout, load_heldout

ROOT = Path(__file__).resolve().parents[1]


def _training_seed_ranges():
    """Every phantom seed range the training, validation, calibration and old evaluation code draws from."""
    from uad import evaluation, training
    from uad.phantoms import HOLDOUT_SEED_OFFSET

    stride = training.RANK_SEED_STRIDE
    base_seeds = {training.TrainConfig().seed}
    manifest = json.loads((ROOT / "models" / "manifest.json").read_text())
    for e in manifest["models"]:
        if isinstance(e.get("training"), dict) and e["training"].get("seed") is not None:
            base_seeds.add(int(e["training"]["seed"]))
    ranges = []
    for s in base_seeds:
        ranges.append((s, s + 64 * stride))  # up to 64 processes, < stride phantoms each
        ranges.append((HOLDOUT_SEED_OFFSET + s, HOLDOUT_SEED_OFFSET + s + 64 * stride))  # validation stream
    cal = inspect.signature(training.calibrate_threshold).parameters["seed"].default
    ranges.append((cal, cal + 100_000))
    from uad import calibration
    ranges.append((calibration.AXIAL_SEED, calibration.AXIAL_SEED + 100_000))  # threshold calibration, 2 mm axial
    ranges.append((calibration.ACQUIRED_SEED, calibration.ACQUIRED_SEED + 100_000))  # acquired like clinical scans
    pc = inspect.signature(evaluation.phantom_cases).parameters["seed"].default
    ranges.append((pc, pc + 100_000))
    hr = inspect.signature(evaluation.healthy_reference).parameters["seed"].default
    ranges.append((hr, hr + 100_000))
    ranges.append((0, 1000))  # the sample case and scripts' small seeds
    from conftest import load_script

    s = load_script("benchmarks/gpu_bench.py").GPU_BENCH_SEED
    ranges.append((s, s + 2))  # the speed benchmark's two volumes
    s = load_script("scripts/gpu/train.py").GPU_TRAIN_SEED  # the prepared GPU training run
    ranges += [(s, s + 64 * stride), (HOLDOUT_SEED_OFFSET + s, HOLDOUT_SEED_OFFSET + s + 64 * stride)]
    return ranges


def test_heldout_seeds_are_disjoint_from_training_seeds():
    specs = case_specs()
    seeds = [s.seed for s in specs]
    assert len(seeds) == len(set(seeds))
    assert all(HELDOUT_SEEDS[0] <= s < HELDOUT_SEEDS[1] for s in seeds)
    for lo, hi in _training_seed_ranges():
        assert hi <= HELDOUT_SEEDS[0] or lo >= HELDOUT_SEEDS[1], (lo, hi)
    # >= 5 volumes per lesion type per contrast, >= 5 healthy per contrast
    for c in ("T1", "T2", "FLAIR"):
        for lt in ("tumour", "stroke", "ms", "none"):
            assert sum(s.contrast == c and s.lesion == lt for s in specs) >= 5
    # geometry unseen in training (2 mm isotropic axial): every case has 1.5-4 mm slices, several orientations
    assert all(1.5 <= s.geometry.thickness <= 4.0 and s.geometry.thickness != s.geometry.inplane for s in specs)
    orients = {s.geometry.orientation for s in specs if s.lesion == "tumour" and s.contrast == "T2"}
    assert {"axial", "sagittal", "coronal", "oblique-axial"} <= orients
    quick = case_specs(quick=True)
    assert len(quick) == 3 * 4 and {s.geometry.thickness for s in quick} == {5.0}


def test_geometry_directions_are_rotations():
    for orient, tilt in (("axial", (0, 0)), ("coronal", (0, 0)), ("sagittal", (0, 0)), ("oblique-axial", (15, -5))):
        for order in ("LPS", "RAS"):
            d = Geometry(orient, 3.0, 1.0, tilt, order).direction()
            assert np.allclose(d.T @ d, np.eye(3)) and np.linalg.det(d) == pytest.approx(1.0)
    d = Geometry("sagittal", 3.0, 1.0, (0, 0), "LPS").direction()
    assert np.allclose(d[:, 2], [1, 0, 0])  # slices stacked left-right
    d = Geometry("oblique-axial", 3.0, 1.0, (15.0, 0.0), "LPS").direction()
    assert np.degrees(np.arccos(d[2, 2])) == pytest.approx(15.0)  # slice normal tilted by 15 degrees


def test_acquire_keeps_lesion_volume_and_position(make_volume):
    img, les, brain = make_volume(shape_zyx=(40, 44, 40), spacing=(1.0, 1.0, 1.0), seed=3)
    n_les = int(sitk.GetArrayViewFromImage(les).sum())
    for geo in (Geometry("sagittal", 3.0, 1.0, (0, 0), "LPS"), Geometry("oblique-axial", 2.0, 1.2, (12, 4), "RAS")):
        a_img, a_brain, a_les = acquire(img, brain, les, geo)
        assert a_img.GetSpacing() == pytest.approx(geo.spacing)
        assert np.allclose(np.array(a_img.GetDirection()).reshape(3, 3), geo.direction())
        vox = float(np.prod(geo.spacing))
        vol = int(sitk.GetArrayViewFromImage(a_les).sum()) * vox
        assert vol == pytest.approx(n_les, rel=0.25)  # mm^3 at 1 mm source voxels
        # the lesion centroid stays where it was in physical space
        def centroid(m):
            st = sitk.LabelShapeStatisticsImageFilter()
            st.Execute(m)
            return np.array(st.GetCentroid(1))
        assert np.linalg.norm(centroid(a_les) - centroid(les)) < 1.5
        arr = sitk.GetArrayViewFromImage(a_img)
        assert (arr[sitk.GetArrayViewFromImage(a_brain) == 0] == 0).all()  # skull-stripped


def test_generate_heldout_manifest_and_reuse(tmp_path, monkeypatch):
    monkeypatch.setattr(heldout, "SOURCE_SPACING", 3.0)  # coarse source phantom: a fast test
    rows = generate_heldout(tmp_path / "ho", contrasts=["T2"], lesions=["stroke"], n=1, n_healthy=1)
    assert [r["lesion"] for r in rows] == ["stroke", "none"]
    csv_text = (tmp_path / "ho" / "heldout.csv").read_text().splitlines()
    assert csv_text[0].startswith("case,contrast,lesion,seed,spacing_mm,orientation") and len(csv_text) == 3
    loaded = load_heldout(tmp_path / "ho")
    assert all(Path(r["image"]).is_file() and Path(r["lesion_mask"]).is_file() for r in loaded)
    les = sitk.ReadImage(loaded[0]["lesion_mask"])
    assert int(sitk.GetArrayViewFromImage(les).sum()) == rows[0]["lesion_voxels"] > 0
    assert rows[0]["lesion_ml"] == pytest.approx(rows[0]["lesion_voxels"] * np.prod(les.GetSpacing()) / 1000, rel=1e-3)
    assert int(sitk.GetArrayViewFromImage(sitk.ReadImage(loaded[1]["lesion_mask"])).sum()) == 0
    mtime = Path(loaded[0]["image"]).stat().st_mtime_ns
    generate_heldout(tmp_path / "ho", contrasts=["T2"], lesions=["stroke"], n=1, n_healthy=1)
    assert Path(loaded[0]["image"]).stat().st_mtime_ns == mtime  # reused, not regenerated
    with pytest.raises(ValueError, match="heldout.json"):
        load_heldout(tmp_path)


def test_cli_registers_heldout_evaluate_benchmark():
    from uad.cli import build_parser

    p = build_parser()
    a = p.parse_args(["heldout", "out", "--quick", "--contrasts", "T2"])
    assert a.quick and a.contrasts == ["T2"] and callable(a.func)
    a = p.parse_args(["evaluate", "pred", "gt", "--brain-masks", "b", "-o", "o", "--median", "5"])
    assert a.brain_masks == "b" and a.median == 5
    a = p.parse_args(["benchmark", "-o", "o", "--methods", "disyre", "--contrasts", "T2", "FLAIR", "--quick",
                      "--precision", "bf16"])
    assert a.methods == ["disyre"] and a.contrasts == ["T2", "FLAIR"] and a.precision == "bf16"


def test_validation_set_has_its_own_seeds():
    """``uad heldout --validation``: the same construction (geometry per index) from seeds disjoint from the
    held-out set and from every training stream, cases named validation_..., so that a setting can be chosen
    without the test set."""
    from uad.cli import build_parser
    from uad.heldout import VALIDATION_SEEDS

    held, val = case_specs(), case_specs(validation=True)
    assert len(val) == len(held) and all(v.case.startswith("validation_") for v in val)
    assert all(VALIDATION_SEEDS[0] <= v.seed < VALIDATION_SEEDS[1] for v in val)
    assert not {v.seed for v in val} & {h.seed for h in held}
    assert VALIDATION_SEEDS[1] <= HELDOUT_SEEDS[0] or VALIDATION_SEEDS[0] >= HELDOUT_SEEDS[1]
    for lo, hi in _training_seed_ranges():
        assert hi <= VALIDATION_SEEDS[0] or lo >= VALIDATION_SEEDS[1], (lo, hi)
    # the same kinds of acquisition, case by case (orientation and slice ranges come from the index)
    assert [v.geometry.orientation for v in val] == [h.geometry.orientation for h in held]
    assert [(v.contrast, v.lesion) for v in val] == [(h.contrast, h.lesion) for h in held]
    args = build_parser().parse_args(["heldout", "out", "--validation", "--contrasts", "FLAIR"])
    assert args.validation and args.contrasts == ["FLAIR"]
