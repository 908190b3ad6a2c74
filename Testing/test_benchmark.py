"""uad benchmark on the tiny test zoo: tables, missing models, network-time split, per-slice loop."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from uad import heldout
from uad.benchmark import (NetworkTimer, PeakMemory, autocast, autocast_model, loop_speedup, prepare_model,
                           run_benchmark, run_case)


@pytest.fixture
def small_heldout(tmp_path, monkeypatch):
    monkeypatch.setattr(heldout, "SOURCE_SPACING", 3.0)
    d = tmp_path / "ho"
    heldout.generate_heldout(d, contrasts=["T2"], lesions=["tumour"], n=1, n_healthy=1, quick=True)
    return d


def test_network_timer_counts_every_call(tiny_model):
    net = tiny_model.net("denoiser")
    with NetworkTimer(tiny_model) as t:
        with torch.inference_mode():
            for b in (4, 4, 2):
                net(torch.zeros(b, 1, 32, 32), timesteps=torch.zeros(b, dtype=torch.long))
    assert t.calls == 3 and sorted(t.counts.values()) == [1, 2]
    secs, parts = t.network_seconds(repeats=1)
    assert secs > 0 and sum(p["calls"] for p in parts) == 3
    # hooks are removed afterwards
    with torch.inference_mode():
        net(torch.zeros(1, 1, 32, 32), timesteps=torch.zeros(1, dtype=torch.long))
    assert t.calls == 3


def test_peak_memory_and_autocast():
    with PeakMemory("cpu") as m0:
        pass
    with PeakMemory("cpu") as m:
        x = np.ones((64, 1024, 1024), np.float32)  # 256 MB
        x += 1
    assert m.peak_bytes > m0.peak_bytes + 100 * 2 ** 20
    del x
    with autocast("cpu", "bf16"):
        y = torch.nn.functional.linear(torch.ones(2, 4), torch.ones(3, 4))
    assert y.dtype == torch.bfloat16
    with autocast("cpu", "float32"):
        assert torch.nn.functional.linear(torch.ones(2, 4), torch.ones(3, 4)).dtype == torch.float32


def test_run_case_network_split_and_loop(tiny_zoo, tiny_model, small_heldout):
    rows = heldout.load_heldout(small_heldout)
    r = run_case(rows[0], "anoddpm", tiny_model, "fast", "cpu", batch_size=8)
    # every network call was counted: NFE per slice x number of batches
    n_batches = -(-r.slices // 8)
    assert r.network_calls == r.nfe_per_slice * n_batches
    assert 0 < r.in_run_network_seconds < r.clock_seconds
    assert 0 < r.network_seconds < 1.5 * r.clock_seconds  # isolated re-timing of the same calls
    sp = loop_speedup(rows[0], "anoddpm", tiny_model, "fast", "cpu", n_slices=4, batch_size=8)
    assert sp["slices"] == 4 and sp["speedup"] > 0
    assert sp["max_abs_difference"] < 1e-4  # the per-slice loop computes the same maps


def test_benchmark_quick_tables_and_missing(tiny_zoo, small_heldout, tmp_path):
    out = tmp_path / "bench"
    rep = run_benchmark(out, methods=["anoddpm"], contrasts=["T2", "FLAIR"], quick=True,
                        heldout_dir=small_heldout, speed_slices=3, n_reference=1, log=lambda *a: None)
    status = {(r["contrast"], r["method"]): r["status"] for r in rep["results"]}
    assert status[("T2", "anoddpm")] == "ok" and status[("T2", "intensity-floor")] == "ok"
    assert status[("FLAIR", "anoddpm")].startswith("missing")
    row = next(r for r in rep["results"] if r["method"] == "anoddpm" and r["status"] == "ok")
    assert row["preset"] == "fast" and row["nfe_per_slice"] == 25 and 0 <= row["tumour"] <= 1
    assert row["overhead_in_run"] > 1.0 and row["network_seconds_per_volume"] > 0
    # the tiny model has no calibrated threshold: Dice@cal uses the held-out healthy volumes, said so, and their
    # false-positive volume (circular then) is not reported
    assert "held-out healthy" in row["threshold_source"] and row["healthy_fp_ml"] is None
    assert row["dice_calibrated"] is not None
    md = (out / "benchmark.md").read_text()
    assert "| FLAIR | anoddpm | - | - | missing" in md and "per-slice loop" in md
    for f in ("benchmark.csv", "benchmark.json", "ap_per_lesion.png", "ap_vs_seconds.png", "healthy_fp.png"):
        assert (out / f).stat().st_size > 0
    saved = json.loads((out / "benchmark.json").read_text())
    assert saved["speed"][0]["method"] == "anoddpm"


def test_autocast_model_keeps_maps_close(tiny_zoo, tiny_model, make_volume, fast_params):
    """bf16 runs the network only in bf16 (noise, samplers stay float32): maps close to float32, float32 output."""
    from uad.pipeline import detect

    img, _, brain = make_volume(shape_zyx=(6, 40, 36))
    ref = detect(img, method="anoddpm", model=tiny_model, device="cpu", params=fast_params, brain_mask=brain)
    from uad.benchmark import _copy_model

    m16 = autocast_model(_copy_model(tiny_model), "bf16")
    with torch.inference_mode():
        out = m16.net("denoiser")(torch.zeros(2, 1, 32, 32), timesteps=torch.zeros(2, dtype=torch.long))
    assert out.dtype == torch.float32
    low = detect(img, method="anoddpm", model=m16, device="cpu", params=fast_params, brain_mask=brain)
    a = sitk_array(ref.anomaly)
    b = sitk_array(low.anomaly)
    assert np.abs(a - b).mean() < 0.05 * np.abs(a).mean() + 1e-6
    assert tiny_model.net("denoiser") is not m16.net("denoiser")  # the original model is not wrapped
    with pytest.raises(Exception, match="fp16"):
        prepare_model("tiny-test", "cpu", precision="fp16")


def sitk_array(img):
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(img)
