"""uad benchmark on the tiny test zoo: tables, missing models, network-time split, per-slice loop."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import load_script
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
    kw = dict(methods=["anoddpm"], contrasts=["T2", "FLAIR"], quick=True, heldout_dir=small_heldout, speed_slices=3,
              n_reference=1, log=lambda *a: None)
    rep = run_benchmark(out, jobs=2, **kw)  # two worker processes: the accuracy unit and the speed unit
    status = {(r["contrast"], r["method"]): r["status"] for r in rep["results"]}
    assert status[("T2", "anoddpm")] == "ok" and status[("T2", "intensity-floor")] == "ok"
    assert status[("FLAIR", "anoddpm")].startswith("missing")
    row = next(r for r in rep["results"] if r["method"] == "anoddpm" and r["status"] == "ok")
    assert row["preset"] == "stochastic" and row["nfe_per_slice"] == 55 and 0 <= row["tumour"] <= 1
    assert row["overhead_in_run"] > 1.0 and row["network_seconds_per_volume"] > 0
    from uad.zoo import find_model
    assert row["model_sha256"] == find_model(row["model"]).data["sha256"]  # which weights the row measured
    # the tiny model has no calibrated threshold: Dice@cal uses the held-out healthy volumes, said so, and their
    # false-positive volume (circular then) is not reported
    assert "held-out healthy" in row["threshold_source"] and row["healthy_fp_ml"] is None
    assert row["dice_calibrated"] is not None
    md = (out / "benchmark.md").read_text()
    assert "| FLAIR | anoddpm | - | - | missing" in md and "per-slice loop" in md
    for f in ("benchmark.csv", "benchmark.json", "ap_per_lesion.png", "ap_vs_seconds.png", "healthy_fp.png"):
        assert (out / f).stat().st_size > 0
    saved = json.loads((out / "benchmark.json").read_text())
    assert saved["speed"][0]["method"] == "anoddpm" and saved["jobs"] == 2
    assert row["volumes"] == {"tumour": 1, "stroke": 0, "ms": 0, "healthy": 1} and row["by_lesion"]["tumour"]["n"] == 1
    # --jobs 1 (in this process) gives the same results: every unit is seeded; CPU seconds are per unit
    one = run_benchmark(tmp_path / "bench1", jobs=1, **kw)
    cols = ("contrast", "method", "preset", "status", "tumour", "pooled_ap", "pooled_auroc", "best_dice",
            "dice_calibrated", "by_lesion", "nfe_per_slice", "threshold")
    assert [{k: r.get(k) for k in cols} for r in one["results"]] == [{k: r.get(k) for k in cols} for r in rep["results"]]
    assert one["speed"][0]["max_abs_difference"] == rep["speed"][0]["max_abs_difference"]
    assert one["speed"][0]["nfe_per_slice"] == rep["speed"][0]["nfe_per_slice"]
    assert row["clock_seconds_per_volume"] > 0 and one["jobs"] == 1


def test_autocast_model_keeps_maps_close(tiny_zoo, tiny_model, make_volume, fast_params, monkeypatch):
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
    import uad.precision

    monkeypatch.setattr(uad.precision, "cpu_fp16_supported", lambda: False)  # a torch without CPU fp16
    with pytest.raises(Exception, match="fp16"):
        prepare_model("tiny-test", "cpu", precision="fp16")


def sitk_array(img):
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(img)


# ----------------------------------------------------------------------------- held-out table in cards / README
def _synthetic_report():
    def row(method, preset, model, aps, default, fp=1.5, nfe=25):
        return {"contrast": "T2", "method": method, "preset": preset, "model": model, "status": "ok",
                "default_preset": default, "nfe_per_slice": nfe, "seconds_per_volume": 30.0,
                "clock_seconds_per_volume": 12.5, "healthy_fp_percent": fp, "n_healthy": 2,
                "threshold_source": "model: calibrated", "volumes": {"tumour": 2, "stroke": 2, "ms": 1, "healthy": 2},
                "by_lesion": {lt: {"n": {"ms": 1}.get(lt, 2), "ap": ap, "best_dice": ap / 2, "dice_calibrated": ap / 3,
                                   "prevalence": 0.01} for lt, ap in zip(("tumour", "stroke", "ms"), aps)}}

    floor = row("intensity-floor", "-", "-", (0.10, 0.30, 0.002), None, nfe=0)
    return {"date_utc": "2026-12-01 12:00 UTC", "hardware": "test CPU", "device": "cpu", "jobs": 2,
            "batch_size": 16, "precision": "fp32", "quick": False, "max_volumes": 2,
            "command": "uad benchmark --max-volumes 2 -o b",
            "results": [floor, row("thor", "fast", "ddpm-x", (0.25, 0.40, 0.001), "fast", nfe=31),
                        row("thor", "paper", "ddpm-x", (0.15, 0.20, 0.003), "fast", nfe=351),
                        row("disyre", "paper", "disyre-x", (0.80, 0.90, 0.004), "paper", nfe=4),
                        {"contrast": "FLAIR", "method": "thor", "preset": "-", "model": "-",
                         "status": "missing (no bundled model for this contrast)"}]}


def test_heldout_table_rows_and_verdicts():
    from uad.heldout_table import block, table_rows

    rows = table_rows(_synthetic_report())
    assert len(rows) == 9  # 3 measured method/preset rows x 3 lesion types; floor and missing rows excluded
    t = {(r["method"], r["preset"], r["lesion"]): r for r in rows}
    fast_tumour = t[("thor", "fast", "tumour")]
    assert fast_tumour["floor_ap"] == 0.10 and abs(fast_tumour["ratio"] - 2.5) < 1e-12
    assert fast_tumour["beats_floor"] and fast_tumour["twice_floor"] and fast_tumour["default"]
    assert fast_tumour["seconds_per_volume"] == 12.5 and fast_tumour["healthy_fp_percent"] == 1.5  # CPU seconds
    stroke = t[("thor", "fast", "stroke")]
    assert stroke["beats_floor"] and not stroke["twice_floor"]  # 0.40 vs 0.30: above, but short of 2x
    assert not t[("thor", "paper", "stroke")]["beats_floor"] and not t[("thor", "paper", "tumour")]["default"]
    assert t[("thor", "fast", "ms")]["n"] == 1 and t[("thor", "fast", "ms")]["n_healthy"] == 2
    text = block(_synthetic_report())
    assert "uad benchmark --max-volumes 2 -o b" in text and "test CPU" in text and "2026-12-01" in text
    assert "| T2 | stroke | thor | fast (default) | ddpm-x | 2 / 2 | 0.400 | 0.300 | 0.0100 | x1.33 |" in text
    # the default presets' verdicts: thor fast misses 2x on T2 stroke, disyre meets the target; paper not judged
    thor = next(ln for ln in text.splitlines() if ln.startswith("- **thor**"))
    assert "stroke AP 0.400 vs floor 0.300: beats the floor, does NOT reach 2x the floor" in thor
    assert thor.endswith("NOT met.")
    assert next(ln for ln in text.splitlines() if ln.startswith("- **disyre**")).endswith("met.")
    assert not any(ln.startswith("- **thor** (paper") for ln in text.splitlines())
    assert block(_synthetic_report(), {"disyre-x"}).count("| T2 |") == 3


def test_update_cards_replaces_only_the_marked_section(tmp_path):
    from uad.heldout_table import BEGIN, END

    models = tmp_path / "models"
    for d in ("ddpm-x", "disyre-x", "other"):
        (models / d).mkdir(parents=True)
    (models / "manifest.json").write_text(json.dumps({"models": [
        {"id": "ddpm-x", "card": "ddpm-x/README.md"}, {"id": "disyre-x", "card": "disyre-x/README.md"},
        {"id": "other", "card": "other/README.md"}]}))
    with_markers = f"# ddpm-x\n\nuser text before\n\n## Held-out\n{BEGIN}\nold table\n{END}\n\nuser text after\n"
    (models / "ddpm-x/README.md").write_text(with_markers)
    (models / "disyre-x/README.md").write_text("# disyre-x\n\nno markers yet\n")
    (models / "other/README.md").write_text("# other\n")
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "benchmark.json").write_text(json.dumps(_synthetic_report()))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro: the table sits between `{BEGIN}` and `{END}` (quoted: not a marker)\n{BEGIN}\n{END}\n"
                      f"outro\n")
    mod = load_script("scripts/update_cards.py")

    assert mod.main([str(bench), "--models", str(models), "--readme", str(readme), "--as-recorded"]) == 0
    ddpm = (models / "ddpm-x/README.md").read_text()
    assert ddpm.startswith("# ddpm-x\n\nuser text before\n\n## Held-out\n" + BEGIN)
    assert ddpm.endswith(END + "\n\nuser text after\n") and "old table" not in ddpm
    assert "| T2 | tumour | thor | fast (default) | ddpm-x |" in ddpm and "disyre-x |" not in ddpm
    dis = (models / "disyre-x/README.md").read_text()
    assert dis.startswith("# disyre-x\n\nno markers yet\n\n## Held-out benchmark\n\n" + BEGIN)
    assert "| T2 | stroke | disyre | paper (default) | disyre-x |" in dis and "ddpm-x |" not in dis
    assert (models / "other/README.md").read_text() == "# other\n"  # not measured: untouched
    r = readme.read_text()
    assert r.startswith(f"intro: the table sits between `{BEGIN}` and `{END}` (quoted: not a marker)\n{BEGIN}\n")
    assert r.endswith(END + "\noutro\n") and "ddpm-x" in r and "disyre-x" in r
    # idempotent: the same report changes nothing
    before = {p: p.read_text() for p in models.rglob("*.md")}
    assert mod.main([str(bench), "--models", str(models), "--readme", str(readme), "--as-recorded"]) == 0
    assert {p: p.read_text() for p in models.rglob("*.md")} == before and readme.read_text() == r
    # unbalanced markers: refused, no card written (also not the good ones)
    (models / "disyre-x/README.md").write_text(dis + BEGIN + "\n")
    (models / "ddpm-x/README.md").write_text(with_markers)
    assert mod.main([str(bench), "--models", str(models)]) == 1
    assert (models / "ddpm-x/README.md").read_text() == with_markers
    # a README without the markers is refused, unchanged
    readme.write_text("no markers\n")
    assert mod.main([str(bench), "--readme", str(readme)]) == 1 and readme.read_text() == "no markers\n"
    assert not list(tmp_path.rglob("*.part"))


def test_max_volumes_selects_the_first_per_lesion_type():
    from uad import UADError
    from uad.benchmark import select_rows

    rows = [{"contrast": c, "lesion": lt, "case": f"{c}{lt}{i}"} for c in ("T1", "T2")
            for lt in ("tumour", "stroke", "none") for i in range(3)]
    sub = select_rows(rows, 2)
    assert len(sub) == 12 and [r["case"] for r in sub[:2]] == ["T1tumour0", "T1tumour1"]
    assert select_rows(rows, None) == rows and len(select_rows(rows, 5)) == 18
    with pytest.raises(UADError, match="max-volumes"):
        select_rows(rows, 0)


def test_benchmark_cli_options(tmp_path, capsys):
    from uad.benchmark import default_jobs
    from uad.cli import build_parser, main

    a = build_parser().parse_args(["benchmark", "-o", str(tmp_path / "b"), "--jobs", "3", "--max-volumes", "2",
                                   "--precision", "float32"])
    assert a.jobs == 3 and a.max_volumes == 2 and a.precision == "float32"
    assert build_parser().parse_args(["benchmark", "-o", "x"]).jobs is None and 1 <= default_jobs("cpu") <= 2
    rc = main(["benchmark", "-o", str(tmp_path / "b"), "--max-volumes", "0"])
    assert rc == 1 and "--max-volumes must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()  # refused before anything is written


def test_heldout_table_merges_runs_each_against_its_own_floor():
    """Two runs: the later one's rows replace the earlier one's for the same model/preset, and each row is
    judged against the floor of its own run (quick and full sets have different floors)."""
    from uad.heldout_table import block, merged_rows, update_cards

    quick = _synthetic_report()
    full = _synthetic_report()
    full["command"] = "uad benchmark --methods disyre -o full"
    full["results"][0]["by_lesion"]["tumour"]["ap"] = 0.40  # the full run's floor
    full["results"] = [full["results"][0], full["results"][3]]  # floor + disyre only
    full["results"][1]["by_lesion"]["tumour"]["ap"] = 0.60
    rows = merged_rows([quick, full])
    t = {(r["method"], r["preset"], r["lesion"]): r for r in rows}
    assert len(rows) == 9
    assert t[("disyre", "paper", "tumour")]["run"] == 2 and t[("disyre", "paper", "tumour")]["ap"] == 0.60
    assert t[("disyre", "paper", "tumour")]["floor_ap"] == 0.40 and abs(t[("disyre", "paper", "tumour")]["ratio"] - 1.5) < 1e-12
    assert t[("thor", "fast", "tumour")]["run"] == 1 and t[("thor", "fast", "tumour")]["floor_ap"] == 0.10
    text = block([quick, full])
    assert "Run 1: " in text and "Run 2: " in text and "uad benchmark --methods disyre -o full" in text
    assert "| T2 | tumour | disyre | paper (default) | disyre-x | 2 | 2 / 2 | 0.600 | 0.400 |" in text
    only = block([quick, full], {"disyre-x"})
    assert "Run 1: " not in only and "Run 2: " in only  # the header lists only the runs the rows come from


def test_update_cards_accepts_several_runs(tmp_path):
    from uad.heldout_table import update_cards

    models = tmp_path / "models"
    (models / "disyre-x").mkdir(parents=True)
    (models / "manifest.json").write_text(json.dumps({"models": [{"id": "disyre-x", "card": "disyre-x/README.md"}]}))
    (models / "disyre-x/README.md").write_text("# disyre-x\n")
    quick, full = _synthetic_report(), _synthetic_report()
    full["command"] = "uad benchmark -o full"
    log = update_cards([quick, full], models)
    assert any("updated" in w for _, w in log)
    card = (models / "disyre-x/README.md").read_text()
    assert "Run 2: " in card and "uad benchmark -o full" in card and "| 2 | 2 / 2 |" in card


def test_rows_of_replaced_weights_leave_cards_and_manifest(tmp_path):
    """A model retrained and re-bundled under the same id: rows that recorded the old weights' sha256 are
    left out of its card and evaluation.heldout (an older run's rows of the new weights and rows without a
    recorded sha256 stay), so a card never shows numbers of weights it does not ship."""
    from uad.heldout_table import current_weights, update_cards, update_manifest

    models = tmp_path / "models"
    (models / "ddpm-x").mkdir(parents=True)
    (models / "manifest.json").write_text(json.dumps({"models": [
        {"id": "ddpm-x", "sha256": "new", "methods": ["thor"], "card": "ddpm-x/README.md"}]}))
    (models / "ddpm-x/README.md").write_text("# ddpm-x\n")
    old, new = _synthetic_report(), _synthetic_report()
    for r in old["results"][1:3]:
        r["model_sha256"] = "old"  # both thor rows of the first run measured the replaced weights
    new["results"] = [new["results"][0], new["results"][1]]  # floor + thor fast of the new weights
    new["results"][1]["model_sha256"] = "new"
    new["results"][1]["by_lesion"]["tumour"]["ap"] = 0.33
    kept, dropped = current_weights([old, new], json.loads((models / "manifest.json").read_text())["models"])
    assert sorted(dropped) == [("ddpm-x", 1, "thor", "fast"), ("ddpm-x", 1, "thor", "paper")]
    assert len(old["results"]) == 5 and len(kept[0]["results"]) == 3  # the input is not changed
    update_cards([old, new], models)
    card = (models / "ddpm-x/README.md").read_text()
    assert "| thor | fast (default) | ddpm-x | 2 | 2 / 2 | 0.330 |" in card
    assert "| thor | paper |" not in card and "Run 1: " not in card
    update_manifest([old, new], models)
    rec = json.loads((models / "manifest.json").read_text())["models"][0]["evaluation"]["heldout"]
    assert rec["results"]["thor"]["tumour"] == 0.33 and rec["results"]["thor"]["run"]["command"] == new["command"]
    # without a recorded sha256 (older reports) the rows stay, and a model not in the manifest keeps its rows
    for r in old["results"]:
        r.pop("model_sha256", None)
    assert current_weights(old, [{"id": "ddpm-x", "sha256": "new"}])[1] == []
    assert current_weights(old, [])[1] == []


def test_update_manifest_writes_the_heldout_measurements_that_selection_reads(tmp_path):
    """update_cards.py --models writes each measured model's default-preset AP per lesion type (with the
    floor, volume counts and run) into the manifest; best_method then picks from those numbers."""

    from uad.heldout_table import heldout_measurements, update_manifest
    from uad.selection import best_method

    models = tmp_path / "models"
    models.mkdir()
    entries = [{"id": "ddpm-x", "contrast": "T2", "methods": ["thor"], "sha256": "ab", "threshold": 0.1,
                "evaluation": {"phantoms": {"n_per_type": 2, "results": {"thor": {"tumour": 0.99, "stroke": 0.99,
                                                                                    "ms": 0.99}}}}},
               {"id": "disyre-x", "contrast": "T2", "methods": ["disyre"]},
               {"id": "other", "contrast": "T2", "methods": ["pddpm"], "evaluation": {"phantoms": {}}}]
    (models / "manifest.json").write_text(json.dumps({"models": entries}, indent=2) + "\n")
    rep = _synthetic_report()
    rec = heldout_measurements(rep, "ddpm-x")
    thor = rec["results"]["thor"]
    assert thor["preset"] == "fast"  # the default preset's row, not the paper row (0.15 / 0.20 / 0.003)
    assert (thor["tumour"], thor["stroke"], thor["ms"]) == (0.25, 0.40, 0.001)
    assert thor["mean_ap"] == pytest.approx((0.25 + 0.40 + 0.001) / 3, abs=1e-4)
    assert thor["floor"] == {"tumour": 0.10, "stroke": 0.30, "ms": 0.002}
    assert thor["n"] == {"tumour": 2, "stroke": 2, "ms": 1} and thor["n_per_type"] == 1 and thor["n_healthy"] == 2
    assert thor["run"]["command"] == "uad benchmark --max-volumes 2 -o b" and heldout_measurements(rep, "nope") is None

    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "benchmark.json").write_text(json.dumps(rep))
    for d in ("ddpm-x", "disyre-x", "other"):
        (models / d).mkdir()
        (models / d / "README.md").write_text(f"# {d}\n")
        entries[[e["id"] for e in entries].index(d)]["card"] = f"{d}/README.md"
    (models / "manifest.json").write_text(json.dumps({"models": entries}, indent=2) + "\n")
    mod = load_script("scripts/update_cards.py")
    assert mod.main([str(bench), "--models", str(models), "--no-manifest", "--as-recorded"]) == 0
    assert json.loads((models / "manifest.json").read_text())["models"] == entries  # manifest left alone
    assert mod.main([str(bench), "--models", str(models), "--as-recorded"]) == 0
    man = json.loads((models / "manifest.json").read_text())["models"]
    got = {e["id"]: e for e in man}
    assert got["ddpm-x"]["evaluation"]["heldout"]["results"]["thor"]["mean_ap"] == thor["mean_ap"]
    assert got["ddpm-x"]["evaluation"]["phantoms"] == entries[0]["evaluation"]["phantoms"]  # kept
    assert got["ddpm-x"]["sha256"] == "ab" and got["ddpm-x"]["threshold"] == 0.1
    assert got["disyre-x"]["evaluation"]["heldout"]["results"]["disyre"]["tumour"] == 0.80
    assert got["other"] == entries[2]  # not measured: unchanged
    text = (models / "manifest.json").read_text()
    assert mod.main([str(bench), "--models", str(models), "--as-recorded"]) == 0 and (models / "manifest.json").read_text() == text
    # selection reads the held-out record first (the phantom record of ddpm-x says 0.99 and loses now)
    ch = best_method("T2", man)
    assert (ch.method, ch.model, ch.preset) == ("disyre", "disyre-x", "paper")
    assert "held-out set (1 per lesion type)" in ch.reason and "2026-12-01" in ch.reason
    assert update_manifest(rep, models) and not list(models.glob(".manifest-*"))


def test_update_cards_judges_todays_default_presets_and_lists_bundled_models(tmp_path):
    """Rows of a preset that was the default when a run was made, but no longer is, are not judged as the
    default; the README table lists only models in the manifest."""

    from uad.heldout_table import restamp_defaults, table_rows
    from uad.methods import get_method_class

    rep = _synthetic_report()  # thor 'fast' recorded as the default
    now = get_method_class("thor").default_preset_for(None)
    restamp_defaults(rep)
    rows = {(r["method"], r["preset"], r["lesion"]): r for r in table_rows(rep)}
    assert rows[("thor", "fast", "tumour")]["default"] is (now == "fast")
    assert rows[("disyre", "paper", "tumour")]["default"] is (get_method_class("disyre").default_preset_for(None)
                                                             == "paper")
    thor_row = next(r for r in rep["results"] if r["method"] == "thor" and r["preset"] == "fast")
    if now != "fast":
        assert thor_row["default_preset_recorded"] == "fast" and thor_row["default_preset"] == now
    models = tmp_path / "models"
    (models / "disyre-x").mkdir(parents=True)
    (models / "manifest.json").write_text(json.dumps({"models": [{"id": "disyre-x", "card": "disyre-x/README.md"}]}))
    (models / "disyre-x/README.md").write_text("# disyre-x\n")
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "benchmark.json").write_text(json.dumps(_synthetic_report()))
    readme = tmp_path / "README.md"
    from uad.heldout_table import BEGIN, END

    readme.write_text(f"{BEGIN}\n{END}\n")
    mod = load_script("scripts/update_cards.py")
    assert mod.main([str(bench), "--models", str(models), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "disyre-x" in text and "ddpm-x" not in text  # ddpm-x is not bundled (any more)
    if now != "fast":
        assert "- **thor**" not in text


def test_interrupted_benchmark_keeps_the_units_it_measured(tiny_zoo, small_heldout, tmp_path, monkeypatch):
    """A long held-out run stopped part-way (here the second of two units fails, as a kill would stop it)
    leaves a report of the units already measured, marked partial, which the card writer can read."""
    import uad.benchmark as bm

    real, calls = bm.run_unit, []

    def flaky(unit):
        calls.append(unit["kind"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(unit)

    monkeypatch.setattr(bm, "run_unit", flaky)
    out = tmp_path / "bench"
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(out, jobs=1, methods=["anoddpm"], contrasts=["T2"], quick=True, heldout_dir=small_heldout,
                      speed_slices=3, n_reference=1, log=lambda *a: None)
    saved = json.loads((out / "benchmark.json").read_text())
    assert saved["partial"] == {"units_done": 1, "units": 2} and calls == ["accuracy", "speed"]
    row = next(r for r in saved["results"] if r["method"] == "anoddpm")
    assert row["status"] == "ok" and 0 <= row["tumour"] <= 1 and saved["speed"] == []
    assert "PARTIAL: 1 of 2 units" in (out / "benchmark.md").read_text()


def test_verdicts_say_which_of_two_models_is_the_default(monkeypatch):
    """Two models of one method and contrast measured: each verdict says whether 'uad detect' runs that model."""
    import uad.heldout_table as ht

    rep = _synthetic_report()
    second = json.loads(json.dumps(rep["results"][1]))
    second["model"] = "ddpm-y"
    second["by_lesion"]["stroke"]["ap"] = 0.70
    rep["results"].append(second)
    monkeypatch.setattr(ht, "default_model_id", lambda method, contrast: "ddpm-y" if method == "thor" else None)
    lines = [ln for ln in ht.block(rep).splitlines() if ln.startswith("- **thor**")]
    assert len(lines) == 2
    assert "model ddpm-x, not the default model (ddpm-y is)" in lines[0] and lines[0].endswith("NOT met.")
    assert "model ddpm-y, the default model" in lines[1] and lines[1].endswith(" met.")
    disyre = next(ln for ln in ht.block(rep).splitlines() if ln.startswith("- **disyre**"))
    assert "default model" not in disyre  # one model: nothing to say


def test_rows_of_an_earlier_preset_definition_are_marked_and_not_judged():
    """A row measured under another definition of its preset (recorded ``preset_values``) is shown as such,
    is not the default, gets no verdict and is not what the method selection reads; a later run's row of the
    same preset and model replaces it."""
    import uad.heldout_table as ht
    from uad.methods import get_method_class

    rep = _synthetic_report()
    thor_fast = next(r for r in rep["results"] if r.get("method") == "thor" and r.get("preset") == "fast")
    thor_fast["preset_values"] = {"sampler": "ddim", "steps": 7}  # not THOR's fast preset today
    rows = ht.table_rows(rep)
    fast = [r for r in rows if (r["method"], r["preset"]) == ("thor", "fast")]
    assert fast and all(r["earlier_definition"] and r["default"] is False for r in fast)
    text = ht.block(rep)
    assert "| thor | fast (earlier definition) |" in text and "(earlier definition)*: measured under" in text
    assert not any(ln.startswith("- **thor**") for ln in text.splitlines())
    assert "thor" not in (ht.heldout_measurements(rep, "ddpm-x") or {}).get("results", {})
    # today's definition (or no record, older reports) is current
    thor_fast["preset_values"] = get_method_class("thor").preset_values("fast")
    assert not any(r["earlier_definition"] for r in ht.table_rows(rep))
    thor_fast.pop("preset_values")
    assert any(r["default"] for r in ht.table_rows(rep) if r["method"] == "thor")
    # merged with a later run of the same preset and model: the later row replaces the earlier one
    old = json.loads(json.dumps(rep))
    next(r for r in old["results"] if r.get("method") == "thor" and r.get("preset") == "fast")["preset_values"] = \
        {"steps": 7}
    merged = ht.merged_rows([old, rep])
    assert [r["run"] for r in merged if (r["method"], r["preset"]) == ("thor", "fast")] == [2, 2, 2]
    assert get_method_class("thor").preset_values("stochastic", {"steps": 10})["steps"] == 10


def test_update_cards_names_the_new_default_model_on_its_first_run(tmp_path, monkeypatch):
    """A new model measured better than the one beside it: the first update_cards run already says it is the
    default model (the manifest's measurements are written before the tables, which ask the zoo; with the
    tables first, the verdict named the old model until a second run)."""

    import uad.zoo as zoo
    from uad.heldout_table import BEGIN, END

    models = tmp_path / "models"
    for mid in ("ddpm-new", "ddpm-old"):
        (models / mid).mkdir(parents=True)
        (models / mid / "model.safetensors").write_bytes(b"x")
        (models / mid / "README.md").write_text(f"# {mid}\n")
    old_eval = {"heldout": {"thor": {"preset": "fast", "tumour": 0.2, "stroke": 0.2, "ms": 0.2}}}
    (models / "manifest.json").write_text(json.dumps({"models": [
        {"id": "ddpm-new", "file": "ddpm-new/model.safetensors", "contrast": "T2", "methods": ["thor"],
         "card": "ddpm-new/README.md"},
        {"id": "ddpm-old", "file": "ddpm-old/model.safetensors", "contrast": "T2", "methods": ["thor"],
         "card": "ddpm-old/README.md", "evaluation": old_eval}]}))
    monkeypatch.setenv(zoo.MODELS_DIR_ENV, str(models))
    monkeypatch.setattr(zoo, "bundled_dirs", lambda: [])
    monkeypatch.setattr(zoo, "user_models_dir", lambda: tmp_path / "no-cache")
    rep = _synthetic_report()
    new_row = rep["results"][1]  # thor fast, ddpm-x: tumour 0.25, stroke 0.40
    new_row["model"] = "ddpm-new"
    old_row = json.loads(json.dumps(new_row))
    old_row["model"] = "ddpm-old"
    for lt, d in old_row["by_lesion"].items():
        d["ap"] = d["ap"] / 4
    rep["results"] = [rep["results"][0], new_row, old_row]
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "benchmark.json").write_text(json.dumps(rep))
    readme = tmp_path / "README.md"
    readme.write_text(f"{BEGIN}\n{END}\n")
    assert zoo.find_model(method="thor", contrast="T2").id == "ddpm-old"  # the only one measured so far
    mod = load_script("scripts/update_cards.py")
    assert mod.main([str(bench), "--models", str(models), "--readme", str(readme), "--as-recorded"]) == 0
    assert zoo.find_model(method="thor", contrast="T2").id == "ddpm-new"
    lines = [ln for ln in readme.read_text().splitlines() if ln.startswith("- **thor**")]
    assert len(lines) == 2
    assert "model ddpm-new, the default model)" in lines[0]
    assert "model ddpm-old, not the default model (ddpm-new is))" in lines[1]


@pytest.mark.parametrize("field,key,value", [
    ("model_normalisation", "normalisation", {"clip_max": 2.0}),  # clip_max 1 -> 2
    ("model_preprocessing", "preprocessing", {"registration": "mni152", "spacing_mm": 2.0}),  # now registered
])
def test_rows_of_another_normalisation_or_profile_leave_cards_and_manifest(field, key, value):
    """A model whose manifest normalisation or preprocessing profile changed without new weights: rows that
    recorded the old one are left out like rows of replaced weights; rows that recorded today's and rows without
    one (older reports) stay."""
    from uad.calibration import normalisation_of, preprocessing_of
    from uad.heldout_table import current_weights

    of = normalisation_of if key == "normalisation" else preprocessing_of
    entry = {"id": "ddpm-x", "sha256": "same", key: value}
    old, new = _synthetic_report(), _synthetic_report()
    for r in old["results"][1:3]:
        r[field] = of({})
    new["results"][1][field] = of(entry)
    kept, dropped = current_weights([old, new], [entry])
    assert sorted(dropped) == [("ddpm-x", 1, "thor", "fast"), ("ddpm-x", 1, "thor", "paper")]
    assert kept[1]["results"] == new["results"]  # today's and unrecorded rows stay


def test_committed_heldout_tables_are_what_the_committed_run_list_writes(tmp_path, monkeypatch):
    """docs/benchmark/heldout-runs.txt lists, in order, the runs the README's held-out table, every model card's and
    the manifest's evaluation.heldout are written from: `update_cards.py @docs/benchmark/heldout-runs.txt --models
    models/ --readme README.md` on copies of them changes nothing (run numbers, rows and the models' records as
    committed), and every listed run is in the repository."""
    import shutil
    from pathlib import Path

    repo = Path(__file__).parents[1]
    runs = [ln.strip() for ln in (repo / "docs/benchmark/heldout-runs.txt").read_text().splitlines() if ln.strip()]
    assert len(runs) == len(set(runs)) and all((repo / r / "benchmark.json").is_file() for r in runs)
    models = tmp_path / "models"
    models.mkdir()
    manifest = json.loads((repo / "models/manifest.json").read_text())
    shutil.copy(repo / "models/manifest.json", models / "manifest.json")
    cards = {}
    for e in manifest["models"]:
        if e.get("card"):
            (models / e["card"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(repo / "models" / e["card"], models / e["card"])
            cards[e["card"]] = (repo / "models" / e["card"]).read_text()
    shutil.copy(repo / "README.md", tmp_path / "README.md")
    mod = load_script("scripts/update_cards.py")
    monkeypatch.chdir(repo)  # the list's paths are relative to the repository
    assert mod.main(["@docs/benchmark/heldout-runs.txt", "--models", str(models),
                     "--readme", str(tmp_path / "README.md")]) == 0
    assert (tmp_path / "README.md").read_text() == (repo / "README.md").read_text()
    assert len(cards) >= 10 and all((models / c).read_text() == text for c, text in cards.items())
    assert json.loads((models / "manifest.json").read_text()) == manifest


def test_readme_methods_table_shows_the_bundled_defaults_heldout_ap():
    """The README's first table (methods) gives, per method, the T2 default model and its AP on the bundled sample
    (evaluation.sample), and per contrast the held-out tumour / stroke AP of the model `uad detect --method M` runs
    on that contrast (evaluation.heldout, written by update_cards.py) and the intensity floor of those runs, as the
    manifest records them: a re-bundled or re-measured default changes the manifest, and this test then asks for
    the README to follow."""
    import re
    from pathlib import Path

    from uad.heldout_table import default_model_id
    from uad.zoo import find_model

    text = (Path(__file__).parents[1] / "README.md").read_text()
    intro = text[:text.index("\n## ")]
    table = {m.group(1): (m.group(2), m.group(3), m.group(4)) for m in re.finditer(
        r"^\| `(\w+)` \| [^|\n]* \| `([\w.-]+)`[^|\n]* \| ([0-9.]+) \| ([^|\n]*) \|$", intro, re.M)}
    rows = {k: v[2] for k, v in table.items()}
    for method, (model, sample_ap, _) in table.items():  # the T2 default and its AP on the bundled sample
        assert model == default_model_id(method, "T2"), (method, model)
        assert abs(float(sample_ap) - find_model(model).data["evaluation"]["sample"][method]["ap"]) < 0.0005, method
    floor_row = re.search(r"^\| \(intensity floor\) \|[^\n]*\| ([^|\n]*) \|$", intro, re.M).group(1)
    methods = ("disyre", "pddpm", "autoddpm", "thor", "anoddpm", "wolleb")
    assert set(rows) == set(methods)
    floors = {}
    for method in methods:
        cells = [c.strip() for c in rows[method].split(",")]
        assert len(cells) == 3
        for contrast, cell in zip(("T2", "FLAIR", "T1"), cells):
            mid = default_model_id(method, contrast)
            entry = find_model(mid) if mid else None
            if entry is None or entry.data.get("contrast") != contrast:
                assert cell == f"no {contrast} model", (method, contrast, cell)
                continue
            rec = entry.data["evaluation"]["heldout"]["results"][method]
            shown = [float(x) for x in cell.split(" / ")]
            # the README rounds the run's AP to 3 decimals, the manifest stores 4: at most 0.0005 + 0.00005 apart
            assert np.allclose(shown, [rec["tumour"], rec["stroke"]], rtol=0, atol=0.00056), (method, contrast, mid,
                                                                                               cell)
            floors.setdefault(contrast, []).append([rec["floor"]["tumour"], rec["floor"]["stroke"]])
    shown_floor = [[float(x) for x in c.split(" / ")] for c in floor_row.split(", ")]
    for contrast, shown in zip(("T2", "FLAIR", "T1"), shown_floor):  # every default measured against that floor
        assert np.allclose(floors[contrast], [shown] * len(floors[contrast]), rtol=0, atol=0.00056), contrast
