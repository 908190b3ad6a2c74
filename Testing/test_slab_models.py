"""benchmarks/slab_models.py: several weights of one method on the same held-out lesion slabs."""

from __future__ import annotations

import json

import torch

from conftest import FAST_PARAMS, TINY_ID, load_script


def test_weights_compared_on_the_same_slabs(tiny_zoo, tmp_path, monkeypatch, capsys):
    from uad import heldout
    from uad.benchmark import run_slab_case
    from uad.zoo import load_model, save_weights

    monkeypatch.setattr(heldout, "SOURCE_SPACING", 3.0)
    ho = tmp_path / "ho"
    heldout.generate_heldout(ho, contrasts=["T2"], lesions=["tumour"], n=1, n_healthy=1, quick=True)
    # a run folder with other weights (what 'uad train' leaves): model.json + model.safetensors
    model = load_model(TINY_ID)
    run = tmp_path / "run"
    run.mkdir()
    with torch.no_grad():
        for p in model.net("denoiser").parameters():
            p.add_(0.05 * torch.randn_like(p))
    sha = save_weights(model, run / "model.safetensors")
    entry = {k: v for k, v in model.config.items() if k not in ("id", "file", "sha256")}
    (run / "model.json").write_text(json.dumps(entry))
    out = tmp_path / "cells.json"
    rc = load_script("benchmarks/slab_models.py").main([
        "--heldout", str(ho), "--method", "anoddpm", "--models", TINY_ID, str(run), "--preset", "fast",
        "--params", json.dumps(FAST_PARAMS), "--lesions", "tumour", "--n", "1", "--slab", "3", "-o", str(out)])
    assert rc == 0
    cells = json.loads(out.read_text())
    assert len(cells) == 2 and cells[0]["case"] == cells[1]["case"] and cells[0]["slab"] == cells[1]["slab"]
    assert cells[1]["model_sha256"] == sha != cells[0]["model_sha256"]
    # the id's cell is exactly what run_slab_case gives for the bundled-style model
    row = [r for r in heldout.load_heldout(ho, ["T2"]) if r["lesion"] == "tumour"][0]
    ref = run_slab_case(row, "anoddpm", load_model(TINY_ID), "fast", FAST_PARAMS, "cpu", 3, seed=0)
    assert abs(ref["ap"] - cells[0]["ap"]) < 1e-12
    text = capsys.readouterr().out
    assert f"| {TINY_ID} | " in text and f"{cells[0]['ap']:.3f} (1)" in text
