"""benchmarks/smoothing_vs_floor.py: a method's map and the intensity floor, raw and median-filtered alike."""

from __future__ import annotations

import json

import numpy as np
import SimpleITK as sitk

from conftest import FAST_PARAMS, TINY_ID, load_script


def test_method_and_floor_scored_raw_and_filtered_alike(tiny_zoo, tmp_path, monkeypatch):
    from uad import heldout
    from uad.evaluation import IntensityBaseline, healthy_reference, postprocess_volume
    from uad.metrics import average_precision
    from uad.pipeline import detect

    monkeypatch.setattr(heldout, "SOURCE_SPACING", 3.0)
    ho = tmp_path / "ho"
    heldout.generate_heldout(ho, contrasts=["T2"], lesions=["tumour"], n=1, n_healthy=1, quick=True)
    out = tmp_path / "rows.json"
    rc = load_script("benchmarks/smoothing_vs_floor.py").main([
        "--heldout", str(ho), "--method", "anoddpm", "--model", TINY_ID, "--preset", "fast",
        "--params", json.dumps(FAST_PARAMS), "--lesion", "tumour", "--n", "1", "--sizes", "3", "-o", str(out)])
    assert rc == 0
    (row,) = json.loads(out.read_text())
    assert set(row) >= {"anoddpm_raw", "anoddpm_median3", "floor_raw", "floor_median3"}
    # reference computation: the same detect call and the floor of uad benchmark, scored over the brain
    case = [r for r in heldout.load_heldout(ho, ["T2"]) if r["lesion"] == "tumour"][0]
    img, bm = sitk.ReadImage(case["image"]), sitk.ReadImage(case["brain_mask"])
    brain = sitk.GetArrayFromImage(bm) > 0
    lesion = sitk.GetArrayFromImage(sitk.ReadImage(case["lesion_mask"])) > 0
    res = detect(img, method="anoddpm", model=TINY_ID, device="cpu", seed=0, brain_mask=bm, preset="fast",
                 params=FAST_PARAMS)
    m = sitk.GetArrayFromImage(res.anomaly)
    assert abs(row["anoddpm_raw"] - average_precision(m, lesion, mask=brain)) < 1e-9
    base = IntensityBaseline().fit(*healthy_reference("T2", n=3, spacing=2.0))
    f = sitk.GetArrayFromImage(base.score(img, bm))
    assert abs(row["floor_raw"] - average_precision(f, lesion, mask=brain)) < 1e-9
    assert abs(row["floor_median3"] - average_precision(postprocess_volume(f, brain, median=3), lesion,
                                                        mask=brain)) < 1e-9
    # the filter changes the ranking (a real filter, not the raw map again)
    assert not np.isclose(row["floor_median3"], row["floor_raw"])
