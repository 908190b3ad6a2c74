"""The paired preset comparison on lesion slabs (``uad benchmark --compare-presets``, issue 7 point 6) and the
slice-subset calibration it relies on for expensive presets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

# a sagittal-like acquisition: the input's z axis is the patient's left-right, so the canonical axial slices
# (the method's slicing) run along another input axis than the file's slices
SAGITTAL = (0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
REF = "fast:level=20,steps=4"
CHEAP = "fast:level=20,steps=2"


def test_densest_window_is_the_best_window():
    from uad.benchmark import densest_window

    rng = np.random.default_rng(3)
    for _ in range(50):
        counts = rng.integers(0, 20, size=rng.integers(1, 30))
        k = int(rng.integers(1, 12))
        lo, hi = densest_window(counts, k)
        assert hi - lo == min(k, len(counts))
        best = max(counts[i:i + k].sum() for i in range(max(1, len(counts) - k + 1)))
        assert counts[lo:hi].sum() == best
    assert densest_window([0, 0, 5, 9, 1, 0], 2) == (2, 4)


def test_lesion_slab_holds_the_densest_slices_in_the_canonical_slicing(make_volume):
    from uad.benchmark import lesion_slab

    img, les, brain = make_volume(shape_zyx=(36, 40, 16), spacing=(3.0, 1.0, 1.2), direction=SAGITTAL)
    s = lesion_slab(img, les, brain, 4)
    # independent reference: SimpleITK's own reorientation to LPS, slices along its first numpy axis
    ref = sitk.GetArrayFromImage(sitk.DICOMOrient(les, "LPS")) * sitk.GetArrayFromImage(sitk.DICOMOrient(brain, "LPS"))
    counts = ref.reshape(ref.shape[0], -1).sum(axis=1)
    assert np.array_equal(s["counts"], counts)
    lo, hi = s["slab"]
    assert hi - lo == 4 and s["run"] == (lo, hi)
    assert lo <= int(np.argmax(counts)) < hi  # the densest slice is in the slab
    assert counts[lo:hi].sum() == max(counts[i:i + 4].sum() for i in range(len(counts) - 3))
    m = lesion_slab(img, les, brain, 4, margin=2)
    assert m["slab"] == (lo, hi) and m["run"] == (max(0, lo - 2), min(len(counts), hi + 2))


def test_slab_run_pairs_presets_on_the_same_slices(tiny_model, make_volume, tmp_path):
    from uad.benchmark import parse_setting, run_slab_case
    from uad.pipeline import detect
    from uad.preprocess import canonical_view, orientation_of

    img, les, brain = make_volume(shape_zyx=(36, 40, 16), spacing=(3.0, 1.0, 1.2), direction=SAGITTAL)
    row = {"case": "c1", "contrast": "T2", "lesion": "tumour"}
    for key, im in (("image", img), ("brain_mask", brain), ("lesion_mask", les)):
        row[key] = str(tmp_path / f"{key}.nii.gz")
        sitk.WriteImage(im, row[key])
    cells = {}
    for spec in (REF, CHEAP):
        _, preset, params = parse_setting(spec)
        cells[spec] = run_slab_case(row, "anoddpm", tiny_model, preset, params, "cpu", k=3, seed=5, batch_size=4)
    a, b = cells[REF], cells[CHEAP]
    assert a["slab"] == b["slab"] and a["slab_slices"] == 3
    assert a["slices_computed"] == b["slices_computed"] == 3 and a["slices_match"] and b["slices_match"]
    assert a["nfe_per_slice"] == 4 and b["nfe_per_slice"] == 2
    for c in (a, b):
        assert 0.0 <= c["ap"] <= 1.0 and c["slab_lesion_voxels"] > 0
        assert c["prevalence"] == pytest.approx(c["slab_lesion_voxels"] / c["slab_brain_voxels"])
    # the same seed gives the same result; the slab's maps equal a whole-volume run's on those slices
    again = run_slab_case(row, "anoddpm", tiny_model, "fast", {"level": 20, "steps": 4}, "cpu", k=3, seed=5,
                          batch_size=2)
    assert again["ap"] == a["ap"]
    full = detect(img, method="anoddpm", model=tiny_model, device="cpu", seed=5, preset="fast",
                  params={"level": 20, "steps": 4}, brain_mask=brain, mask=False)
    perm, flip = orientation_of(img)
    lo, hi = a["slab"]
    whole = canonical_view(sitk.GetArrayFromImage(full.anomaly), perm, flip)[lo:hi]
    br = canonical_view(sitk.GetArrayFromImage(brain), perm, flip)[lo:hi] > 0
    lz = (canonical_view(sitk.GetArrayFromImage(les), perm, flip)[lo:hi] > 0) & br
    from uad.metrics import average_precision

    assert average_precision(whole, lz, br) == pytest.approx(a["ap"], abs=1e-6)


def _heldout(tmp_path, make_volume, n=2):
    folder = tmp_path / "ho"
    folder.mkdir()
    cases = []
    for i in range(n):
        img, les, brain = make_volume(shape_zyx=(12, 36, 32), spacing=(1.2, 1.0, 3.0), seed=i)
        name = f"ho_T2_tumour_{i}"
        for suffix, im in (("", img), ("_brainmask", brain), ("_lesion", les)):
            sitk.WriteImage(im, str(folder / f"{name}{suffix}.nii.gz"))
        cases.append({"case": name, "contrast": "T2", "lesion": "tumour", "image": f"{name}.nii.gz",
                      "brain_mask": f"{name}_brainmask.nii.gz", "lesion_mask": f"{name}_lesion.nii.gz"})
    (folder / "heldout.json").write_text(json.dumps({"cases": cases}))
    return folder


def test_compare_presets_report_and_resume(tiny_zoo, make_volume, tmp_path, monkeypatch):
    from uad import benchmark as B

    monkeypatch.setattr(B, "model_for", lambda method, contrast: __import__("uad.zoo", fromlist=["find_model"])
                        .find_model("tiny-test") if contrast == "T2" else None)
    ho = _heldout(tmp_path, make_volume)
    out = tmp_path / "cmp"
    rep = B.compare_presets(out, methods=["anoddpm"], contrasts=["T2", "FLAIR"], settings=[REF, CHEAP],
                            heldout_dir=ho, lesions=["tumour"], max_volumes=2, slab=3, log=lambda s: None)
    assert {"method": "anoddpm", "contrast": "FLAIR"} in rep["missing"]
    assert len(rep["cells"]) == 4 and rep["planned_cells"] == 4
    sha = __import__("uad.zoo", fromlist=["find_model"]).find_model("tiny-test").data["sha256"]
    assert {c["model_sha256"] for c in rep["cells"]} == {sha}  # which weights every cell ran
    for case in ("ho_T2_tumour_0", "ho_T2_tumour_1"):
        pair = [c for c in rep["cells"] if c["case"] == case]
        assert [c["role"] for c in pair] == ["reference", "candidate"] and pair[0]["slab"] == pair[1]["slab"]
    row = next(r for r in rep["summary"] if r["lesion"] == "tumour")
    ref, cheap = row["settings"]["fast:level=20,steps=4"], row["settings"]["fast:level=20,steps=2"]
    aps = {c["setting"]: [] for c in rep["cells"]}
    for c in rep["cells"]:
        aps[c["setting"]].append(c["ap"])
    assert row["n"] == 2 and ref["ap"] == pytest.approx(np.mean(aps[REF])) and ref["ratio"] == pytest.approx(1.0)
    assert cheap["ratio"] == pytest.approx(np.mean(aps[CHEAP]) / np.mean(aps[REF]))
    assert cheap["keeps"] == (cheap["ratio"] >= 0.9) and (cheap["nfe_per_slice"], ref["nfe_per_slice"]) == (2, 4)
    for f in ("presets.json", "presets.csv", "presets.md"):
        assert (out / f).is_file()
    assert "keeps >= 90 %" in (out / "presets.md").read_text()
    # a second run reuses every cell (same case, setting, seed, K) and gives the same summary
    calls = []
    monkeypatch.setattr(B, "run_slab_case", lambda *a, **k: calls.append(a))
    rep2 = B.compare_presets(out, methods=["anoddpm"], contrasts=["T2"], settings=[REF, CHEAP], heldout_dir=ho,
                             lesions=["tumour"], max_volumes=2, slab=3, log=lambda s: None)
    assert not calls and rep2["summary"] == rep["summary"]
    # the header says which cells an earlier run measured (the first run: none)
    assert "earlier run" not in B.presets_header(rep) and not any(c["reused"] for c in rep["cells"])
    assert "4 of the 4 cells (tiny-test T2) were measured by an earlier run" in B.presets_header(rep2)
    # a run interrupted before it reaches every earlier cell loses none of them: the cells it has not reached yet
    # are written beside each intermediate report, and the next run reuses them all
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(B, "run_slab_case", interrupted)
    with pytest.raises(KeyboardInterrupt):
        B.compare_presets(out, methods=["anoddpm"], contrasts=["T2"], settings=[REF, CHEAP, "fast:level=20,steps=1"],
                          heldout_dir=ho, lesions=["tumour"], max_volumes=2, slab=3, log=lambda s: None)
    saved = json.loads((out / "presets.json").read_text())
    kept = sorted((c["case"], c["setting"], c["ap"]) for c in saved["cells"] + saved["other_cells"])
    assert kept == sorted((c["case"], c["setting"], c["ap"]) for c in rep["cells"])
    monkeypatch.setattr(B, "run_slab_case", lambda *a, **k: calls.append(a))
    rep2 = B.compare_presets(out, methods=["anoddpm"], contrasts=["T2"], settings=[REF, CHEAP], heldout_dir=ho,
                             lesions=["tumour"], max_volumes=2, slab=3, log=lambda s: None)
    assert not calls and rep2["summary"] == rep["summary"]
    # --volume-limits: fewer volumes for one method (or contrast)
    rep3 = B.compare_presets(out, methods=["anoddpm"], contrasts=["T2"], settings=[REF, CHEAP], heldout_dir=ho,
                             lesions=["tumour"], max_volumes=2, slab=3, limits={"T2/anoddpm": 1}, log=lambda s: None)
    assert not calls and [c["case"] for c in rep3["cells"]] == ["ho_T2_tumour_0"] * 2
    # --reuse-only: a setting never measured is left out, nothing is computed, the report says partial
    rep4 = B.compare_presets(out, methods=["anoddpm"], contrasts=["T2"], settings=[REF, CHEAP, "fast:level=20,steps=1"],
                             heldout_dir=ho, lesions=["tumour"], max_volumes=2, slab=3, reuse_only=True,
                             log=lambda s: None)
    assert not calls and len(rep4["cells"]) == 4 and rep4["planned_cells"] == 6
    assert "Partial: 4 of 6 cells" in (out / "presets.md").read_text()
    # cells of weights the model no longer ships (re-bundled under the same id) are not reused: computed
    # again, the old ones kept beside as superseded; cells without a recorded sha256 (older reports) are reused
    saved = json.loads((out / "presets.json").read_text())
    saved["cells"][0]["model_sha256"] = "f" * 64
    saved["cells"][1].pop("model_sha256")
    (out / "presets.json").write_text(json.dumps(saved))
    monkeypatch.setattr(B, "run_slab_case", lambda row, method, *a, **k: (
        calls.append(row["case"]), dict(saved["cells"][0], model_sha256=sha, ap=0.5))[1])
    rep5 = B.compare_presets(out, methods=["anoddpm"], contrasts=["T2"], settings=[REF, CHEAP], heldout_dir=ho,
                             lesions=["tumour"], max_volumes=2, slab=3, log=lambda s: None)
    assert calls == [saved["cells"][0]["case"]] and len(rep5["cells"]) == 4
    assert [c["ap"] for c in rep5["cells"]].count(0.5) == 1
    assert [c.get("superseded") for c in rep5["other_cells"]] == ["other weights"]
    assert rep5["other_cells"][0]["model_sha256"] == "f" * 64
    # every measured cell records its preset's values; a cell measured under another definition of the preset
    # (the preset changed since) is measured again and kept beside as superseded; cells without the record reuse
    assert rep["cells"][0]["preset_values"] == B.preset_values("anoddpm", "fast", {"level": 20, "steps": 4})
    assert B.preset_values("thor", "stochastic")["map_norm"] == "none"
    saved = json.loads((out / "presets.json").read_text())
    saved["other_cells"] = []
    saved["cells"][2]["preset_values"] = dict(saved["cells"][2].get("preset_values") or {}, steps=99)
    saved["cells"][3].pop("preset_values", None)
    (out / "presets.json").write_text(json.dumps(saved))
    calls.clear()
    rep6 = B.compare_presets(out, methods=["anoddpm"], contrasts=["T2"], settings=[REF, CHEAP], heldout_dir=ho,
                             lesions=["tumour"], max_volumes=2, slab=3, log=lambda s: None)
    assert calls == [saved["cells"][2]["case"]] and len(rep6["cells"]) == 4
    assert [c.get("superseded") for c in rep6["other_cells"]] == ["other preset definition"]
    # a cell measured twice (same weights and definition, e.g. after an interrupted run): one is reused, the
    # other kept beside and said to be a second measurement, not another definition
    out2 = tmp_path / "cmp2"
    out2.mkdir()
    B.write_presets_report(dict(rep, other_cells=[dict(rep["cells"][0], ap=0.25)]), out2)
    calls.clear()
    monkeypatch.setattr(B, "run_slab_case", lambda *a, **k: calls.append(a))
    rep7 = B.compare_presets(out2, methods=["anoddpm"], contrasts=["T2"], settings=[REF, CHEAP], heldout_dir=ho,
                             lesions=["tumour"], max_volumes=2, slab=3, log=lambda s: None)
    assert not calls and [c["ap"] for c in rep7["cells"]] == [c["ap"] for c in rep["cells"]]
    assert [(c["superseded"], c["ap"]) for c in rep7["other_cells"]] == [
        ("measured twice (same weights and preset; the reused copy is in cells)", 0.25)]
    with pytest.raises(B.UADError, match="KEY=N"):
        B._limits(["wolleb"])


def test_compare_presets_bad_settings(tmp_path):
    from uad import UADError
    from uad.benchmark import compare_presets, parse_setting

    assert parse_setting("anoddpm/fast:steps=55,sampler=ddim") == ("anoddpm", "fast", {"steps": 55, "sampler": "ddim"})
    assert parse_setting("paper") == (None, "paper", {})
    with pytest.raises(UADError, match="KEY=VALUE"):
        parse_setting("fast:steps")
    (tmp_path / "heldout.json").write_text('{"cases": []}')
    with pytest.raises(UADError, match="at least two settings"):
        compare_presets(tmp_path / "o", settings=["paper"], heldout_dir=tmp_path)
    with pytest.raises(UADError, match="reference"):
        compare_presets(tmp_path / "o", settings=["anoddpm/paper", "default"], heldout_dir=tmp_path)
    with pytest.raises(UADError, match="--heldout"):
        compare_presets(tmp_path / "o", settings=["paper", "default"], heldout_dir=tmp_path / "none")


def test_calibration_on_a_slice_subset_records_its_size(tiny_model, make_volume):
    from uad.calibration import calibrate, subset_positions

    assert subset_positions(10, None).tolist() == list(range(10))
    assert subset_positions(10, 3).tolist() == [2, 4, 7] and subset_positions(4, 9).tolist() == [0, 1, 2, 3]
    vols = [make_volume(shape_zyx=(14, 36, 32), spacing=(1.2, 1.0, 3.0), lesion=False, seed=s)[::2] for s in (0, 1)]
    vols = [(img, brain) for img, brain in vols]
    params = {"level": 20, "steps": 2, "sampler": "ddim"}
    _, _, sub = calibrate(tiny_model, "anoddpm", "fast", volumes=vols, params=params, max_slices=3, log=lambda s: None)
    _, _, full = calibrate(tiny_model, "anoddpm", "fast", volumes=vols, params=params, log=lambda s: None)
    assert sub["max_slices"] == 3 and sub["n_slices"] == 6 and full["n_slices"] > 6
    brain_per_slice = [sitk.GetArrayFromImage(b).reshape(14, -1).sum(axis=1) for _, b in vols]
    assert 0 < sub["n_voxels"] < full["n_voxels"] == sum(int(x.sum()) for x in brain_per_slice)
    # the subset's thresholds are the quantiles of a whole-volume run's map over exactly those slices
    from uad.calibration import thresholds_at
    from uad.pipeline import detect

    maps, brains = [], []
    for i, (img, brain) in enumerate(vols):
        a = sitk.GetArrayFromImage(detect(img, method="anoddpm", model=tiny_model, device="cpu", seed=i,
                                          preset="fast", params=params, brain_mask=brain, mask=False).anomaly)
        b = sitk.GetArrayFromImage(brain) > 0
        ks = np.flatnonzero(b.any(axis=(1, 2)))[subset_positions(int(b.any(axis=(1, 2)).sum()), 3)]
        keep = np.zeros(b.shape[0], bool)
        keep[ks] = True
        maps.append(a)
        brains.append(b & keep[:, None, None])
    ref = thresholds_at(maps, brains)
    assert sub["thresholds"].keys() == ref.keys()
    assert all(sub["thresholds"][k] == pytest.approx(ref[k], rel=1e-5, abs=1e-7) for k in ref)
    assert sub["thresholds"] != full["thresholds"]


def _synthetic_report():
    from uad.benchmark import summarise_presets

    cells = []
    for i, (ap_ref, ap_def) in enumerate([(0.40, 0.38), (0.20, 0.17)]):
        for setting, role, ap, nfe in (("paper", "reference", ap_ref, 250), ("fast", "default", ap_def, 25)):
            cells.append({"case": f"v{i}", "contrast": "T2", "lesion": "tumour" if i == 0 else "stroke",
                          "method": "anoddpm", "model": "m-ddpm", "setting": setting, "preset": setting,
                          "params": {}, "role": role, "ap": ap, "nfe_per_slice": nfe, "seconds_per_slice": nfe / 60,
                          "prevalence": 0.05, "slab": [3, 13], "slab_lesion_voxels": 10, "lesion_voxels": 20})
    return {"date_utc": "2026-12-01 15:00 UTC", "hardware": "cpu", "device": "cpu", "batch_size": 16, "seed": 0,
            "command": "uad benchmark --compare-presets paper default", "slab": 10, "rule": 0.9,
            "settings": ["paper", "default"], "methods": ["anoddpm"], "cells": cells, "planned_cells": 4,
            "summary": summarise_presets(cells)}


def test_summary_numbers_and_verdict():
    rep = _synthetic_report()
    top = next(r for r in rep["summary"] if r["lesion"] == "all")
    d = top["settings"]["fast"]
    assert top["n"] == 2 and d["ap"] == pytest.approx(0.275) and d["ratio"] == pytest.approx(0.275 / 0.30)
    assert d["keeps"] is True and d["per_volume_ratio_min"] == pytest.approx(0.85)
    stroke = next(r for r in rep["summary"] if r["lesion"] == "stroke")
    assert stroke["settings"]["fast"]["keeps"] is False  # 0.17 / 0.20 = 0.85 < 0.9


def test_preset_card_section_is_idempotent_and_local(tmp_path):
    from uad.benchmark import PRESET_BEGIN, PRESET_END, update_preset_cards

    models = tmp_path / "models"
    (models / "a").mkdir(parents=True)
    (models / "b").mkdir()
    (models / "a" / "README.md").write_text("# Card A\n\nkeep this\n")
    (models / "b" / "README.md").write_text("# Card B (DISYRE)\n")
    (models / "manifest.json").write_text(json.dumps({"models": [
        {"id": "m-ddpm", "methods": ["anoddpm", "thor"], "card": "a/README.md"},
        {"id": "m-other-ddpm", "methods": ["anoddpm"], "card": "a/../b/README.md"},
        {"id": "m-disyre", "methods": ["disyre"], "card": "b/README.md"}]}))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n\n{PRESET_BEGIN}\nold table\n{PRESET_END}\n\nafter\n")
    rep = _synthetic_report()
    log = dict(update_preset_cards(rep, models, readme))
    card = (models / "a" / "README.md").read_text()
    assert card.startswith("# Card A\n\nkeep this\n") and card.count(PRESET_BEGIN) == 1
    assert "| anoddpm | T2 | all | 2 | fast (default) | 25 |" in card and "within the 10 % rule" in card
    # a model serving a compared method that the run did not measure says so; other methods' cards untouched
    assert "No paired preset measurement" in (models / "b" / "README.md").read_text()
    assert "m-disyre" not in log
    text = readme.read_text()
    assert text.startswith("intro\n\n" + PRESET_BEGIN) and text.endswith(PRESET_END + "\n\nafter\n")
    assert "old table" not in text and "| 0.275 | 0.92 | 0.85-0.95 | yes |" in text  # ratio 0.275 / 0.300
    assert "| stroke |" not in text and "| stroke |" in card  # the README has the rows over all lesion types
    before = {p: p.read_text() for p in [readme, models / "a" / "README.md", models / "b" / "README.md"]}
    again = dict(update_preset_cards(rep, models, readme))
    assert all("unchanged" in v for v in again.values())
    assert all(p.read_text() == t for p, t in before.items())
    # unbalanced markers: refused before any file is written
    readme.write_text(f"{PRESET_BEGIN}\n{PRESET_BEGIN}\n{PRESET_END}\n")
    (models / "a" / "README.md").write_text("# Card A\n")
    with pytest.raises(ValueError, match="unbalanced"):
        update_preset_cards(rep, models, readme)
    assert (models / "a" / "README.md").read_text() == "# Card A\n"


def test_preset_section_of_a_rebundled_model_says_its_weights_were_not_compared(tmp_path):
    """Cells record the sha256 of the weights they ran; a card whose model now ships other weights gets no
    table of the former weights' numbers but a sentence saying so, and the README names the model."""
    from uad.benchmark import PRESET_BEGIN, PRESET_END, update_preset_cards

    models = tmp_path / "models"
    (models / "a").mkdir(parents=True)
    (models / "a" / "README.md").write_text("# Card A\n")
    readme = tmp_path / "README.md"
    readme.write_text(f"{PRESET_BEGIN}\n{PRESET_END}\n")
    rep = _synthetic_report()
    for c in rep["cells"]:
        c["model_sha256"] = "0ld" * 10
    entry = {"id": "m-ddpm", "methods": ["anoddpm"], "card": "a/README.md", "sha256": "0ld" * 10}
    (models / "manifest.json").write_text(json.dumps({"models": [entry]}))
    update_preset_cards(rep, models, readme)
    assert "| anoddpm | T2 | all | 2 | fast (default) | 25 |" in (models / "a" / "README.md").read_text()
    assert "Re-bundled" not in readme.read_text()
    (models / "manifest.json").write_text(json.dumps({"models": [dict(entry, sha256="n3w" * 10)]}))
    update_preset_cards(rep, models, readme)
    card = (models / "a" / "README.md").read_text()
    assert "| anoddpm |" not in card and "no longer ships (sha256 0ld0ld0ld0ld...)" in card
    assert "(n3w" in card and "Re-bundled since this run (its rows measured the former weights): `m-ddpm`" in \
        readme.read_text()


def test_stochastic_ddim_options_for_cheaper_presets(tiny_model):
    """AnoDDPM's ``eta`` and AutoDDPM's ``recon_eta`` (DDIM stochasticity, the candidates tried against the
    ancestral paper chains): 0 is the deterministic chain of before, 1 draws per-slice noise (reproducible)."""
    import torch

    import uad.pipeline
    from uad import UADError
    from uad.rng import BatchRNG

    x = torch.rand(2, 1, 32, 32)
    mk = torch.ones_like(x, dtype=torch.bool)
    for method, key, base in (("anoddpm", "eta", {"level": 20, "steps": 3}),
                              ("thor", "eta", {"level": 20, "steps": 3, "harmonization": [10], "vis_every": 0}),
                              ("autoddpm", "recon_eta", {"level": 20, "recon_steps": 3, "inpaint_level": 8,
                                                         "inpaint_steps": 3, "resample": 2, "threshold": 0.0})):
        run = lambda extra, seed=1: uad.pipeline.build(method, tiny_model, "fast", {**base, **extra})(  # noqa: E731
            x, mk, BatchRNG([seed, seed + 1])).anomaly
        plain, zero, one, again, other = run({}), run({key: 0.0}), run({key: 1.0}), run({key: 1.0}), run({key: 1.0}, 7)
        assert torch.equal(plain, zero), method
        assert not torch.allclose(plain, one) and torch.equal(one, again) and not torch.equal(one, other), method
        with pytest.raises(UADError, match=f"parameter {key} has no effect with preset 'paper'"):
            uad.pipeline.build(method, tiny_model, "paper", {key: 1.0})
        with pytest.raises(UADError, match=f"{key} must be in"):
            uad.pipeline.build(method, tiny_model, "fast", {key: 1.5})


def test_preset_section_of_a_model_measured_only_by_earlier_runs_is_kept(tmp_path):
    """A model whose cells are all from earlier runs (kept in ``other_cells``, e.g. no longer the contrast's
    default model) keeps the section its card has instead of getting "no measurement"."""
    from uad.benchmark import PRESET_BEGIN, PRESET_END, update_preset_cards

    models = tmp_path / "models"
    (models / "a").mkdir(parents=True)
    (models / "b").mkdir()
    kept = f"# Card B\n\n{PRESET_BEGIN}\nthe earlier run's table\n{PRESET_END}\n"
    (models / "a" / "README.md").write_text("# Card A\n")
    (models / "b" / "README.md").write_text(kept)
    (models / "manifest.json").write_text(json.dumps({"models": [
        {"id": "m-ddpm", "methods": ["anoddpm"], "card": "a/README.md"},
        {"id": "m-old", "methods": ["anoddpm"], "card": "b/README.md"}]}))
    rep = _synthetic_report()
    rep["other_cells"] = [dict(rep["cells"][0], model="m-old")]
    log = dict(update_preset_cards(rep, models))
    assert (models / "b" / "README.md").read_text() == kept and "kept" in log["m-old"]
    assert "| anoddpm | T2 | all | 2 | fast (default) | 25 |" in (models / "a" / "README.md").read_text()
    # without a section yet, it says that this run did not measure it
    (models / "b" / "README.md").write_text("# Card B\n")
    update_preset_cards(rep, models)
    assert "No paired preset measurement" in (models / "b" / "README.md").read_text()
