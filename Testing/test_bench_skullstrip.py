"""benchmarks/bench_skullstrip.py --detect: one row per case, a contrast without a bundled model is reported
(a "missing" row), a failing case becomes an "error" row, and the run goes on."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_detect_rows_missing_model_and_error(monkeypatch, tmp_path, capsys):
    import bench_skullstrip

    import uad.phantoms
    import uad.pipeline

    class Ph:  # a tiny stand-in head phantom (the benchmark's phantoms take seconds each)
        def __init__(self):
            a = np.zeros((8, 8, 8), np.float32)
            self.image = self.brain_mask = self.head_mask = self.lesion_mask = sitk.GetImageFromArray(a)

    calls = []
    monkeypatch.setattr(uad.phantoms, "make_phantom", lambda *a, **k: Ph())
    monkeypatch.setattr(uad.phantoms, "resample_phantom", lambda base, **k: base)

    def failing_detect(image, **kw):
        calls.append(kw)
        raise uad.UADError("input image: is empty, nothing to analyse")

    monkeypatch.setattr(uad.pipeline, "detect", failing_detect)
    out = tmp_path / "rows.csv"
    rc = bench_skullstrip.main(["--detect", "--contrasts", "T9,T2", "--acq", "4mm_flipped", "--csv", str(out)])
    assert rc == 0
    rows = list(csv.DictReader(out.open()))
    # the phantom as generated ("axial", the reference of the map agreement) comes first, then the acquisition
    assert [(r["contrast"], r["acquisition"]) for r in rows] == [("T9", ""), ("T2", "axial"), ("T2", "4mm_flipped")]
    assert rows[0]["status"] == "missing: no bundled disyre model for T9"
    for r in rows[1:]:
        assert r["status"].startswith("error: input image: is empty") and r["model"] == "disyre-t2-phantom"
        assert r["map_corr_vs_axial"] == ""
    assert calls == 2 * [{"method": "disyre", "model": "disyre-t2-phantom", "device": "cpu", "preset": "fast",
                          "contrast": "T2"}]
    assert "missing: no bundled disyre model for T9" in capsys.readouterr().out
