"""scripts/rebundle.py: re-bundling a model from a run that continued it, on a copy of a real bundled entry."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
MODEL = "ddpm-t2-ema"


def _load():
    return load_script("scripts/rebundle.py")


def _row(method, model, sha, ap, **kw):
    r = {"method": method, "status": "ok", "model": model, "preset": "stochastic", "tumour": ap, "stroke": ap / 2,
         "ms": ap / 10, "best_dice": ap, "dice_calibrated": ap / 3, "healthy_fp_percent": 1.0,
         "clock_seconds_per_volume": 80.0}
    if sha:
        r["model_sha256"] = sha
    r.update(kw)
    return r


@pytest.fixture()
def setup(tmp_path):
    from uad.zoo import sha256_file

    models = tmp_path / "models"
    (models / MODEL).mkdir(parents=True)
    bundled = json.loads((ROOT / "models/manifest.json").read_text())
    entry = next(e for e in bundled["models"] if e["id"] == MODEL)
    entry = dict(entry, preprocessing={"registration": "mni152", "spacing_mm": 2.0})  # a profile beyond the run's
    other = dict(next(e for e in bundled["models"] if e["id"] == "ddpm-t1-phantom"), id="kept-as-is")
    (models / "manifest.json").write_text(json.dumps({"models": [entry, other]}, indent=1))
    shutil.copyfile(ROOT / "models" / MODEL / "model.safetensors", models / MODEL / "model.safetensors")
    (models / MODEL / "README.md").write_text(
        "# Model card\n\n- **sha256**: `old`\n\n## Training\n\nhand-written text\n\n## Thresholds\n\nstale\n\n"
        "## Held-out phantom test set\n\nstale 2-volume table\n\n## Held-out benchmark\n\ntable\n")
    run = tmp_path / "run"
    run.mkdir()
    # the run's weights: another network of the same size (what a continued run exports)
    shutil.copyfile(ROOT / "models/ddpm-t1-phantom/model.safetensors", run / "best.safetensors")
    shutil.copyfile(ROOT / "models" / MODEL / "model.safetensors", run / "model.safetensors")
    run_entry = {k: v for k, v in entry.items()
                 if k not in ("threshold", "calibration", "card", "license", "preprocessing")}
    run_entry["training"] = {"steps": 10418, "batch_size": 32, "init": {"model": MODEL, "sha256": entry["sha256"]}}
    run_entry["description"] = "what uad train writes"
    run_entry["methods"] = ["anoddpm", "thor"]  # a run trained for fewer methods than the bundled entry serves
    (run / "model.json").write_text(json.dumps(run_entry))
    (run / "state.json").write_text(json.dumps({"step": 10418, "best_step": 10000, "best_val": 0.055,
                                                "seconds": 5580.25}))
    (run / "curve.csv").write_text("step,seconds,val_loss,ap_thor\n0,0,0.06,0.1\n250,600,0.058,0.12\n")
    return {"models": models, "run": run, "entry": entry, "new_sha": sha256_file(run / "best.safetensors"),
            "tmp": tmp_path}


def test_prep_installs_the_run_weights_and_drops_the_replaced_calibration(setup):
    rb = _load()
    old = setup["entry"]
    e = rb.prep(MODEL, setup["run"], setup["models"], weights="best", threads=2, note="step 5,793")
    assert (setup["models"] / MODEL / "model.safetensors").read_bytes() == (setup["run"] / "best.safetensors").read_bytes()
    assert e["sha256"] == setup["new_sha"] != old["sha256"]
    for k in ("license", "card", "normalisation", "preprocessing", "description", "methods"):  # the bundled entry's
        assert e[k] == old[k]
    assert e["methods"] == ["anoddpm", "thor", "autoddpm"]
    assert "threshold" not in e and "calibration" not in e and "evaluation" not in e
    tr = e["training"]
    assert (tr["steps"], tr["run_steps"], tr["best_val_loss"], tr["exported"]) == (10000, 10418, 0.055,
                                                                                  "best validation weights")
    assert tr["replaces"] == {"sha256": old["sha256"], "steps": old["training"]["steps"], "note": "step 5,793"}
    assert tr["threads"] == 2 and tr["wall_seconds"] == 5580.2
    data = json.loads((setup["models"] / "manifest.json").read_text())
    assert [x["id"] for x in data["models"]] == [MODEL, "kept-as-is"]  # order kept, the other entry untouched
    assert (setup["models"] / MODEL / "curve.csv").is_file()
    # the same weights twice is refused (nothing to re-bundle)
    with pytest.raises(SystemExit, match="already"):
        rb.prep(MODEL, setup["run"], setup["models"], weights="best")


def test_backfill_then_card_compares_old_and_new_rows(setup):
    rb = _load()
    old_sha = setup["entry"]["sha256"]
    old_dir, new_dir = setup["tmp"] / "old", setup["tmp"] / "new"
    old_dir.mkdir()
    new_dir.mkdir()
    old_rep = {"results": [_row("thor", MODEL, None, 0.2), _row("anoddpm", MODEL, None, 0.1),
                           _row("thor", "other-model", None, 0.9)]}
    (old_dir / "benchmark.json").write_text(json.dumps(old_rep))
    assert rb.backfill(MODEL, old_sha, [old_dir]) == 2
    tagged = json.loads((old_dir / "benchmark.json").read_text())["results"]
    assert [r.get("model_sha256") for r in tagged] == [old_sha, old_sha, None]
    assert rb.backfill(MODEL, old_sha, [old_dir]) == 0  # rows that say their weights are left alone

    rb.prep(MODEL, setup["run"], setup["models"], weights="best")
    floor = {"method": "intensity-floor", "status": "ok", "model": "-", "tumour": 0.049, "stroke": 0.18, "ms": 0.006}
    new_rep = {"results": [floor, _row("thor", MODEL, setup["new_sha"], 0.3), _row("anoddpm", MODEL, "stale", 0.5),
                           _row("autoddpm", MODEL, setup["new_sha"], 0.4)]}
    (new_dir / "benchmark.json").write_text(json.dumps(new_rep))
    card = rb.card(MODEL, setup["models"], new_dir, {"*": old_dir}).read_text()
    assert f"- **sha256**: `{setup['new_sha']}`" in card
    assert "hand-written text" in card and "stale" not in card and "Held-out phantom test set" not in card
    assert "| thor | stochastic | 0.200 -> 0.300 | 0.100 -> 0.150 | 0.020 -> 0.030 | 0.200 -> 0.300 |" in card
    # anoddpm's new row measured other weights and autoddpm has no old row: neither is compared
    assert "| anoddpm |" not in card and "| autoddpm |" not in card
    assert "floor = the intensity threshold (tumour / stroke / MS AP 0.049 / 0.180 / 0.006)" in card
    assert card.index("## Compared with") < card.index("## Held-out benchmark")
    assert "## Learning curve" in card and "| 250 | 10 | 0.0580 | 0.120 |" in card
    with pytest.raises(SystemExit, match="no method"):
        rb.card(MODEL, setup["models"], old_dir, {"*": old_dir})


def test_card_command_takes_old_reports_per_method(setup, capsys):
    rb = _load()
    old_dir, new_dir = setup["tmp"] / "old=runs", setup["tmp"] / "new"  # an '=' inside a folder name is a path
    old_dir.mkdir()
    new_dir.mkdir()
    (old_dir / "benchmark.json").write_text(json.dumps({"results": [_row("thor", MODEL, setup["entry"]["sha256"], 0.2)]}))
    rb.prep(MODEL, setup["run"], setup["models"], weights="best")
    (new_dir / "benchmark.json").write_text(json.dumps({"results": [_row("thor", MODEL, setup["new_sha"], 0.4)]}))
    for old in (f"thor={old_dir}", str(old_dir)):
        rb.main(["card", "--id", MODEL, "--models", str(setup["models"]), "--new", str(new_dir), "--old", old])
        card = (setup["models"] / MODEL / "README.md").read_text()
        assert "| thor | stochastic | 0.200 -> 0.400 |" in card


def test_new_bundles_a_run_beside_a_model_and_compares_with_it(setup):
    """A run as a new model placed before another entry (the default where both serve); its card compares the two."""
    from uad.zoo import sha256_file

    rb = _load()
    models, run = setup["models"], setup["run"]
    (run / "config.json").write_text(json.dumps({"model": {"normalisation": {"lower": 1.0, "upper": 99.0}}}))
    e = rb.new("ddpm-t2-new", run, models, weights="best", before=MODEL, methods=["thor", "anoddpm"],
               description="a second T2 DDPM", threads=2)
    data = json.loads((models / "manifest.json").read_text())
    assert [x["id"] for x in data["models"]] == ["ddpm-t2-new", MODEL, "kept-as-is"]
    assert e["methods"] == ["thor", "anoddpm"] and e["sha256"] == sha256_file(run / "best.safetensors")
    assert (models / "ddpm-t2-new/model.safetensors").read_bytes() == (run / "best.safetensors").read_bytes()
    assert e["training"]["steps"] == 10000 and e["training"]["threads"] == 2 and e["license"] == "Apache-2.0"
    assert "threshold" not in e and e["card"] == "ddpm-t2-new/README.md"
    text = (models / "ddpm-t2-new/README.md").read_text()
    assert text.startswith("# Model card: ddpm-t2-new") and f"`{e['sha256']}`" in text
    assert "lowest validation loss (0.0550) at step 10,000" in text and "## Learning curve" in text
    with pytest.raises(SystemExit, match="already"):
        rb.new("ddpm-t2-new", run, models)
    old_dir, new_dir = setup["tmp"] / "old", setup["tmp"] / "new"
    old_dir.mkdir()
    new_dir.mkdir()
    old_sha = setup["entry"]["sha256"]
    (old_dir / "benchmark.json").write_text(json.dumps({"results": [_row("thor", MODEL, old_sha, 0.2)]}))
    (new_dir / "benchmark.json").write_text(json.dumps({"results": [_row("thor", "ddpm-t2-new", e["sha256"], 0.4)]}))
    card = rb.card("ddpm-t2-new", models, new_dir, {"*": old_dir}, other=MODEL).read_text()
    assert f"## Compared with `{MODEL}`" in card and f"`{MODEL}` -> this model" in card
    assert "| thor | stochastic | 0.200 -> 0.400 |" in card


def test_new_lists_the_model_files_in_module_models(setup):
    """'new' adds the model's files to MODULE_MODELS of the CMake file (before --before's lines), so the extension
    installs them; a second registration adds nothing; the real CMake file lists every bundled model's files."""
    rb = _load()
    models, run = setup["models"], setup["run"]
    (run / "config.json").write_text(json.dumps({"model": {"normalisation": {"lower": 1.0, "upper": 99.0}}}))
    cmake = setup["tmp"] / "CMakeLists.txt"
    cmake.write_text("set(X\n  a\n  )\n\nset(MODULE_MODELS\n  manifest.json\n"
                     f"  {MODEL}/README.md\n  {MODEL}/model.safetensors\n  kept-as-is/README.md\n  )\n")
    rb.new("ddpm-t2-new", run, models, weights="best", before=MODEL, cmake=cmake)
    body = cmake.read_text().split("set(MODULE_MODELS\n")[1].split(")")[0].split()
    assert body == ["manifest.json", "ddpm-t2-new/README.md", "ddpm-t2-new/curve.csv",
                    "ddpm-t2-new/model.safetensors", f"{MODEL}/README.md", f"{MODEL}/model.safetensors",
                    "kept-as-is/README.md"]
    assert rb.register_module_files("ddpm-t2-new", models, cmake, MODEL) == []
    assert rb.register_module_files("ddpm-t2-new", models, cmake) == []
    # the repository's own list is complete (what a model bundled by hand would miss)
    repo = (ROOT / "UADExtension/CMakeLists.txt").read_text().split("set(MODULE_MODELS\n")[1].split(")")[0].split()
    for e in json.loads((ROOT / "models/manifest.json").read_text())["models"]:
        for name in rb.MODEL_FILES:
            if (ROOT / "models" / e["id"] / name).is_file():
                assert f"{e['id']}/{name}" in repo
