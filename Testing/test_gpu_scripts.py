"""The prepared GPU run (scripts/gpu/): its training config, the float16 weights, the parts the device tool can
bring back, the unpacking here, and the refusal to export next to the bundled models. (The whole run is checked
end to end on a CPU by ``bash scripts/gpu/train.sh --dry-run --device cpu`` in a staged scratch copy; CI does not
run it: minutes, and it needs the staged wheels.)"""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


def _gpu_train():
    return load_script("scripts/gpu/train.py")


def test_the_gpu_config_is_the_paper_ddpm_at_128_px():
    from uad.methods import get_method_class
    from uad.networks import build_network, count_parameters, paper_unet_config
    from uad.training import TrainConfig, _deep_update

    d = json.loads((ROOT / "scripts" / "gpu" / "ddpm_paper.json").read_text())
    cfg = TrainConfig.from_dict(dict(d, method="anoddpm"))
    assert (cfg.small, cfg.image_size, cfg.ema_decay, cfg.t_max) == (False, 128, 0.999, 400)
    mc = get_method_class("anoddpm").default_model_config(image_size=cfg.image_size, small=cfg.small)
    _deep_update(mc, cfg.model_overrides)
    net = mc["networks"]["denoiser"]
    paper = paper_unet_config()
    assert {k: net[k] for k in paper} == paper and net["use_flash_attention"] is True
    assert set(cfg.curve_methods) == {"thor", "anoddpm"}
    n = count_parameters(build_network(net))
    assert 18e6 < n < 19e6  # 37 MB in float16: the bundled weights stay under 100 MB


def test_float16_weights_split_into_parts_and_joined_back(tmp_path):
    from safetensors.torch import load_file, save_file

    g = _gpu_train()
    torch.manual_seed(0)
    w = {"denoiser.a": torch.randn(300, 1000), "denoiser.b": torch.randn(77), "denoiser.steps": torch.arange(5)}
    save_file(w, str(tmp_path / "w.safetensors"), metadata={"uad_model": "x"})
    g.to_float16(tmp_path / "w.safetensors", tmp_path / "model.safetensors")
    half = load_file(str(tmp_path / "model.safetensors"))
    assert half["denoiser.a"].dtype == torch.float16 and half["denoiser.steps"].dtype == torch.int64
    np.testing.assert_array_equal(half["denoiser.a"].numpy(), w["denoiser.a"].half().numpy())
    out = tmp_path / "out"
    out.mkdir()
    parts = g.split_file(tmp_path / "model.safetensors", out, part_bytes=100_000)
    assert len(parts) == 7 and all(p.stat().st_size <= 100_000 for p in parts)
    g.join_parts(out, "model.safetensors", tmp_path / "joined.safetensors")
    assert (tmp_path / "joined.safetensors").read_bytes() == (tmp_path / "model.safetensors").read_bytes()
    parts[3].unlink()
    with pytest.raises(SystemExit, match="missing"):
        g.join_parts(out, "model.safetensors", tmp_path / "joined2.safetensors")


def test_run_refuses_a_checkout_with_the_bundled_models(tmp_path):
    g = _gpu_train()
    assert (ROOT / "models" / "manifest.json").exists()
    with pytest.raises(SystemExit, match="holds a manifest"):
        g.main(["run", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--device", "cpu"])
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()


def _result(tmp_path: Path, g, sha: str | None = None, evil: bool = False) -> Path:
    """What a run brings back: result.tar.gz (manifest entry, card, run files, benchmark) and the weight parts."""
    from safetensors.torch import save_file

    src = tmp_path / "src"
    (src / "models" / "m1").mkdir(parents=True)
    (src / "run").mkdir()
    (src / "bench").mkdir()
    (src / "logs").mkdir()
    weights = tmp_path / "model.safetensors"
    save_file({"denoiser.w": torch.ones(10, dtype=torch.float16)}, str(weights))
    real = hashlib.sha256(weights.read_bytes()).hexdigest()
    entry = {"id": "m1", "file": "m1/model.safetensors", "sha256": sha or real, "methods": ["anoddpm"]}
    (src / "models" / "manifest.json").write_text(json.dumps({"version": 1, "models": [entry]}))
    (src / "models" / "m1" / "README.md").write_text("card")
    (src / "run" / "log.csv").write_text("step,loss\n")
    (src / "bench" / "benchmark.json").write_text("{}")
    (src / "logs" / "train.log").write_text("ok")
    files = tmp_path / "files"
    files.mkdir()
    with tarfile.open(files / "result.tar.gz", "w:gz") as tar:
        for name in ("models", "run", "bench", "logs"):
            tar.add(str(src / name), arcname=name)
        if evil:
            tar.add(str(src / "logs" / "train.log"), arcname="../escape.txt")
    g.split_file(weights, files, part_bytes=64)
    return files


def test_unpack_installs_the_model_checked_against_its_sha256(tmp_path):
    g = _gpu_train()
    root = tmp_path / "checkout"
    (root / "models").mkdir(parents=True)
    other = {"id": "other", "file": "other/model.safetensors", "sha256": "0" * 64}
    (root / "models" / "manifest.json").write_text(json.dumps({"version": 1, "models": [other]}))
    files = _result(tmp_path, g)
    assert g.main(["unpack", str(files), "--root", str(root), "--work", str(tmp_path / "w")]) == 0  # its one model
    man = json.loads((root / "models" / "manifest.json").read_text())
    assert [e["id"] for e in man["models"]] == ["other", "m1"]
    got = (root / "models" / "m1" / "model.safetensors").read_bytes()
    assert hashlib.sha256(got).hexdigest() == man["models"][1]["sha256"]
    assert (root / "models" / "m1" / "README.md").read_text() == "card"
    assert (root / "checkpoints" / "m1" / "log.csv").exists()
    assert (root / "docs" / "benchmark" / "gpu-m1" / "benchmark.json").exists()


def test_unpack_refuses_wrong_weights_and_escaping_members(tmp_path):
    g = _gpu_train()
    root = tmp_path / "checkout"
    (root / "models").mkdir(parents=True)
    (tmp_path / "a").mkdir()
    files = _result(tmp_path / "a", g, sha="f" * 64)
    with pytest.raises(SystemExit, match="no model 'm2'"):
        g.main(["unpack", str(files), "--id", "m2", "--root", str(root), "--work", str(tmp_path / "w")])
    with pytest.raises(SystemExit, match="sha256"):
        g.main(["unpack", str(files), "--id", "m1", "--root", str(root), "--work", str(tmp_path / "w")])
    assert not (root / "models" / "m1" / "model.safetensors").exists()
    (tmp_path / "b").mkdir()
    files = _result(tmp_path / "b", g, evil=True)
    with pytest.raises(SystemExit, match="refusing member"):
        g.main(["unpack", str(files), "--id", "m1", "--root", str(root), "--work", str(tmp_path / "w")])
    assert not (tmp_path / "w" / "escape.txt").exists() and not (tmp_path / "escape.txt").exists()
