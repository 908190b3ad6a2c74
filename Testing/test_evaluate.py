"""uad evaluate: pooled / per-volume metrics, calibrated Dice, post-processing, files and CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
from sklearn.metrics import average_precision_score

from uad.evaluation import evaluate_arrays, evaluate_dirs, match_files, postprocess_volume
from uad.metrics import pr_stats


def _case(seed, lesion=True, shape=(6, 12, 12)):
    rng = np.random.default_rng(seed)
    brain = np.zeros(shape, bool)
    brain[1:-1, 2:-2, 2:-2] = True
    y = np.zeros(shape, bool)
    if lesion:
        y[2:4, 4:7, 4:7] = True
    s = rng.random(shape).astype(np.float32) + 0.8 * y
    return s, y.astype(np.uint8), brain.astype(np.uint8)


def test_evaluate_arrays_pooled_per_volume_and_calibrated():
    items, healthy = [], []
    for i in range(3):
        s, y, b = _case(i)
        items.append({"name": f"c{i}_tumour", "scores": s, "lesion": y, "brain": b, "voxel_ml": 0.001})
    for i in range(2):
        s, y, b = _case(10 + i, lesion=False)
        healthy.append({"name": f"h{i}", "scores": s, "lesion": y, "brain": b})
    res = evaluate_arrays(items, fpr=0.05, healthy=healthy)
    # pooled AP = sklearn on the concatenated brain voxels
    ps = np.concatenate([it["scores"][it["brain"] > 0] for it in items])
    py = np.concatenate([it["lesion"][it["brain"] > 0] for it in items])
    assert res["pooled"]["ap"] == pytest.approx(average_precision_score(py, ps))
    for it, row in zip(items, res["per_volume"]):
        b = it["brain"] > 0
        assert row["ap"] == pytest.approx(average_precision_score(it["lesion"][b], it["scores"][b]))
        assert row["lesion_type"] == "tumour" and row["lesion_ml"] == pytest.approx(0.018)
    assert res["mean"]["mean_ap"] == pytest.approx(np.mean([r["ap"] for r in res["per_volume"]]))
    # calibrated threshold: 5 % of the healthy brain voxels above it
    hs = np.concatenate([h["scores"][h["brain"] > 0] for h in healthy])
    assert (hs > res["threshold"]).mean() <= 0.05 and (hs >= res["threshold"]).mean() > 0.05
    thr = res["threshold"]
    tp = int(sum((((it["scores"] > thr) & (it["brain"] > 0)) & (it["lesion"] > 0)).sum() for it in items))
    npred = int(sum(((it["scores"] > thr) & (it["brain"] > 0)).sum() for it in items))
    assert res["pooled"]["dice_calibrated"] == pytest.approx(2 * tp / (npred + py.sum()))
    # the oracle (best pooled) Dice is at least the calibrated one
    assert res["pooled"]["best_dice"] >= res["pooled"]["dice_calibrated"]
    assert res["by_size"] and list(res["by_size"])[0].startswith("small")
    # an explicit threshold reports the healthy false-positive fraction
    r2 = evaluate_arrays(items, threshold=0.9, healthy=healthy)
    assert r2["healthy"][0]["fp_fraction"] == pytest.approx(
        float((healthy[0]["scores"][healthy[0]["brain"] > 0] > 0.9).mean()))
    with pytest.raises(ValueError, match="no case with a lesion"):
        evaluate_arrays(healthy)


def test_postprocessing_median_erode_components():
    s, y, b = _case(0)
    bb = b > 0
    spike = np.zeros_like(s)
    spike[3, 9, 9] = 50.0  # one isolated bright voxel inside the brain
    out = postprocess_volume(spike, bb, median=3)
    assert out.max() == 0.0  # the median removes a single voxel
    er = postprocess_volume(np.ones_like(s), bb, erode=1)
    assert er[bb].min() == 0.0 and er[1, 5, 5] == 0.0 and er[3, 5, 5] == 1.0  # border slice eroded, core kept
    # small-component removal changes the calibrated Dice only, not AP
    item = {"name": "x_stroke", "scores": s + spike, "lesion": y, "brain": b}
    a = evaluate_arrays([item], threshold=1.0)
    c = evaluate_arrays([item], threshold=1.0, min_component=2)
    assert a["pooled"]["ap"] == c["pooled"]["ap"]
    assert c["per_volume"][0]["dice_calibrated"] >= a["per_volume"][0]["dice_calibrated"]


def _write(arr, path, spacing=(1.0, 1.0, 2.0)):
    im = sitk.GetImageFromArray(arr)
    im.SetSpacing(spacing)
    sitk.WriteImage(im, str(path))


def test_evaluate_dirs_and_cli(tmp_path, capsys):
    from uad.cli import main

    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    for i, les in enumerate([True, True, False]):
        s, y, b = _case(i, lesion=les)
        name = f"case{i}_{'ms' if les else 'healthy'}"
        _write(s, pred / f"{name}_anomaly.nii.gz")
        _write(np.zeros_like(s), pred / f"{name}_restoration.nii.gz")  # uad detect's other outputs are ignored
        _write(y, gt / f"{name}_lesion.nii.gz")
        _write(b, gt / f"{name}_brainmask.nii.gz")
        _write(s, gt / f"{name}.nii.gz")  # the image itself sits beside the masks
    pairs = match_files(pred, gt)
    assert [p["case"] for p in pairs] == ["case0_ms", "case1_ms", "case2_healthy"]
    assert all(p["brain"] is not None and p["lesion"].name.endswith("_lesion.nii.gz") for p in pairs)
    res = evaluate_dirs(pred, gt)
    assert res["n_lesion_volumes"] == 2 and res["n_healthy_volumes"] == 1
    assert res["per_volume"][0]["lesion_ml"] == pytest.approx(18 * 0.002)
    before = sorted(p.name for p in pred.iterdir())
    rc = main(["evaluate", str(pred), str(gt), "-o", str(tmp_path / "out"), "--median", "3"])
    assert rc in (0, None)
    text = capsys.readouterr().out
    saved = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert f"pooled AP {saved['pooled']['ap']:.4f}" in text
    assert (tmp_path / "out" / "evaluation.csv").read_text().count("\n") == 2 + 1 + 2  # header, 2 rows, pooled, mean
    assert sorted(p.name for p in pred.iterdir()) == before  # inputs untouched
    assert main(["evaluate", str(tmp_path / "nope"), str(gt)]) == 1
