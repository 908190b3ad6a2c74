"""End to end on CPU: uad train (phantoms) -> --resume -> uad models import -> uad detect with the new model.

Also: the optimizer state of a run is read back without unpickling code
(``torch.load(weights_only=True)``): a run whose optimizer.pt carries a
pickle payload is refused and the payload never runs.
"""

from __future__ import annotations

import csv
import json
import pickle
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from conftest import one_error_line as _one_error_line
import SimpleITK as sitk
import torch

import uad.zoo as zoo
from uad.cli import main
from uad.networks import tiny_unet_config


@pytest.fixture
def private_zoo(tmp_path, monkeypatch):
    """No bundled models, no $UAD_MODELS_DIR, an empty user cache."""
    monkeypatch.setattr(zoo, "bundled_dirs", lambda: [tmp_path / "no-bundled-models"])
    monkeypatch.delenv("UAD_MODELS_DIR", raising=False)
    monkeypatch.setenv("UAD_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"


def _tiny_config(path: Path) -> Path:
    path.write_text(json.dumps({
        "image_size": 32, "batch_size": 4, "val_every": 2, "val_batches": 1, "checkpoint_every": 2,
        "pool_size": 1, "lr": 1e-3, "model_overrides": {"networks": {"denoiser": tiny_unet_config((8, 16, 16))}},
    }))
    return path


def _log_rows(run: Path) -> list[dict]:
    with open(run / "log.csv", newline="") as f:
        return list(csv.DictReader(f))




def test_train_resume_import_detect(private_zoo, tmp_path, capsys):
    from uad.phantoms import make_phantom

    cfg = _tiny_config(tmp_path / "tiny.json")
    run = tmp_path / "run"
    base = ["train", "--method", "anoddpm", "--data", "phantoms", "--contrast", "T2", "-o", str(run),
            "--config", str(cfg), "--no-progress"]
    assert main(base + ["--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert f"run directory: {run} (step 2" in out and f"uad models import {run}" in out
    assert sorted(p.name for p in run.iterdir()) == ["best.safetensors", "config.json", "log.csv", "model.json",
                                                     "model.safetensors", "state.json", "train_state.safetensors"]
    rows = _log_rows(run)
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert all(np.isfinite(float(r["loss"])) for r in rows) and rows[0]["val_loss"] == ""
    assert np.isfinite(float(rows[1]["val_loss"]))
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["image_size"] == 32 and saved["train"]["steps"] == 2
    assert saved["model"]["networks"]["denoiser"]["channels"] == [8, 16, 16]
    w2 = (run / "model.safetensors").read_bytes()

    # a second start in the same folder is refused (it would overwrite the run)
    assert "already holds a training run" in _one_error_line(capsys, main(base + ["--steps", "3"]))

    # resume to 3 steps: the step counter, the log and the seconds continue; the weights change
    assert main(["train", "--method", "anoddpm", "-o", str(run), "--resume", "--steps", "3", "--no-progress"]) == 0
    capsys.readouterr()
    rows = _log_rows(run)
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert float(rows[2]["seconds"]) >= float(rows[1]["seconds"])
    state = json.loads((run / "state.json").read_text())
    entry = json.loads((run / "model.json").read_text())
    assert state["step"] == 3 and entry["training"]["steps"] == 3 and entry["sha256"] == zoo.sha256_file(
        run / "model.safetensors")
    assert (run / "model.safetensors").read_bytes() != w2
    # --resume without --steps: the saved target, already reached -> nothing to do
    assert main(["train", "--method", "anoddpm", "-o", str(run), "--resume", "--no-progress"]) == 0
    assert "already at step 3 of 3" in capsys.readouterr().out
    assert len(_log_rows(run)) == 3

    # import the run into the user cache under a new id
    assert main(["models", "import", str(run), "--id", "my-model"]) == 0
    capsys.readouterr()
    m = json.loads((private_zoo / "manifest.json").read_text())["models"]
    assert [e["id"] for e in m] == ["my-model"]
    assert m[0]["sha256"] == zoo.sha256_file(private_zoo / "my-model" / "model.safetensors")
    assert m[0]["training"]["steps"] == 3 and m[0]["image_size"] == 32

    # detect with it on a small phantom (3 mm)
    ph = make_phantom(123, contrast="T2", lesion="tumour", spacing=3.0)
    inp = tmp_path / "case.nii.gz"
    sitk.WriteImage(ph.image, str(inp))
    outdir = tmp_path / "out"
    rc = main(["detect", str(inp), "--model", "my-model", "--method", "anoddpm", "--param", "steps=2",
               "--param", "level=20", "-o", str(outdir), "--device", "cpu", "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert sorted(p.name for p in outdir.iterdir()) == ["case_anomaly.nii.gz", "case_brainmask.nii.gz",
                                                        "case_mask.nii.gz", "case_overview.png",
                                                        "case_restoration.nii.gz"]
    for kind in ("restoration", "anomaly", "mask"):
        o = sitk.ReadImage(str(outdir / f"case_{kind}.nii.gz"))
        assert o.GetSize() == ph.image.GetSize()
        np.testing.assert_allclose(o.GetSpacing(), ph.image.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(o.GetOrigin(), ph.image.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(o.GetDirection(), ph.image.GetDirection(), atol=1e-6)
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(outdir / "case_anomaly.nii.gz")))
    assert np.isfinite(a).all() and a.max() > 0
    assert f"{inp}: " in out and "network evaluations" in out


class _Payload:
    """Unpickling this object creates a file: a stand-in for code hidden in a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_resume_refuses_pickled_code_in_optimizer_state(private_zoo, tmp_path, capsys):
    from uad.training import TrainConfig, model_config_for
    from uad.zoo import build_model, save_weights

    run = tmp_path / "run"
    run.mkdir()
    cfg = TrainConfig.from_dict({"image_size": 32, "steps": 2, "model_overrides": {
        "networks": {"denoiser": tiny_unet_config((8, 16, 16))}}})
    mcfg = model_config_for(cfg)
    (run / "config.json").write_text(json.dumps({"train": asdict(cfg), "model": mcfg}))
    save_weights(build_model(mcfg), run / "model.safetensors")
    (run / "state.json").write_text(json.dumps({"step": 1, "best_val": 1.0}))
    marker = tmp_path / "payload-ran"
    torch.save({"state": {}, "param_groups": [], "x": _Payload(marker)}, run / "optimizer.pt")
    # the payload is live: plain unpickling would run it
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe)))
    assert probe.exists()

    rc = main(["train", "--method", "anoddpm", "-o", str(run), "--resume", "--steps", "3", "--no-progress"])
    line = _one_error_line(capsys, rc)
    assert "optimizer.pt is not a plain optimizer state" in line and "weights-only" in line
    assert not marker.exists()
    assert json.loads((run / "state.json").read_text())["step"] == 1  # nothing was trained or written
    # and a run of another method is not resumed by mistake
    line = _one_error_line(capsys, main(["train", "--method", "disyre", "-o", str(run), "--resume"]))
    assert "trains method 'anoddpm', not 'disyre'" in line
