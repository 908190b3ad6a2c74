"""Behaviour kept by the review clean-ups: one key-mismatch message for every state-dict check, one legacy
threshold lookup for the engine and the live threshold, one progress line for the phantom writers, one
contrast resolution per case in ``uad detect``."""

from __future__ import annotations

import pytest
import torch

from uad import ModelError


def test_key_mismatch_message_shared_by_the_importers():
    from uad.guided_diffusion import WOLLEB_CLASSIFIER, build_guided_encoder, load_guided_classifier
    from uad.reference import key_mismatch

    assert key_mismatch([], []) == ""
    many = [f"k{i:02d}" for i in range(14)]
    msg = key_mismatch(["b", "a"], many)
    assert msg.startswith("2 missing tensor(s): a, b; 14 unexpected tensor(s): k00, k01")
    assert msg.endswith("k11 ... and 2 more")
    cfg = dict(WOLLEB_CLASSIFIER, image_size=32, in_channels=1, model_channels=32, num_res_blocks=1,
               channel_mult=[1, 1], attention_resolutions=[16], num_head_channels=32)
    torch.manual_seed(0)
    state = dict(build_guided_encoder(cfg).state_dict())
    gone = sorted(k for k in state if k.startswith("out."))[-1]
    del state[gone]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ModelError) as e:
        load_guided_classifier(state, "cls.pt", base=cfg)
    assert f"1 missing tensor(s): {gone}; 1 unexpected tensor(s): extra.weight" in str(e.value)


def test_legacy_threshold_one_lookup_each_callers_error_behaviour():
    from types import SimpleNamespace

    from UADExtensionLib.thresholding import calibrated_threshold
    from uad.calibration import legacy_threshold
    from uad.pipeline import model_threshold

    entry = {"id": "m", "threshold": {"thor": {"fast": 0.2, "default": 0.5}, "anoddpm": 0.7, "bad": "x",
                                      "inf": float("inf")}}
    model = SimpleNamespace(id="m", config=entry)
    for method, preset, want in (("thor", "fast", 0.2), ("thor", "paper", 0.5), ("anoddpm", "paper", 0.7),
                                 ("disyre", None, None)):
        assert legacy_threshold(entry, method, preset) == want
        assert model_threshold(model, method, preset) == want
        assert calibrated_threshold(entry, method, preset) == want
    assert legacy_threshold({"threshold": 0.3}, "any") == 0.3
    # the engine refuses a bad value; the live threshold treats a non-finite one as none
    with pytest.raises(ModelError, match="invalid threshold"):
        model_threshold(model, "bad", None)
    assert calibrated_threshold(entry, "inf") is None and model_threshold(model, "inf", None) == float("inf")


def test_phantom_writers_share_the_progress_report(tmp_path, capsys, monkeypatch):
    from uad import heldout
    from uad.cli import main
    from uad.phantoms import run_writer

    rc = run_writer(lambda progress: [progress(i, 2, {"x": i}) for i in (1, 2)], lambda r: f"case {r['x']}",
                    lambda res: f"done {len(res)}")
    lines = capsys.readouterr().out.splitlines()
    assert rc == 0 and lines[0].startswith("[1/2] case 1, ") and lines[0].endswith(" s") and lines[-1] == "done 2"

    def fail(progress):
        raise ValueError("bad\n  input")

    assert run_writer(fail, str, str) == 2 and capsys.readouterr().out.strip() == "error: bad input"
    monkeypatch.setattr(heldout, "SOURCE_SPACING", 3.0)
    out = tmp_path / "ho"
    assert main(["heldout", str(out), "--quick", "--contrasts", "T2", "--lesions", "tumour"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[1/2] heldout_T2_tumour_") and " mm (LPS), lesion " in lines[0]
    assert lines[-1] == f"wrote 2 held-out volume(s), heldout.csv and heldout.json to {out}"
    (tmp_path / "afile").write_text("x")
    assert main(["heldout", str(tmp_path / "afile"), "--quick", "--contrasts", "T2"]) == 2
    assert capsys.readouterr().out.startswith("error: ") and (tmp_path / "afile").read_text() == "x"


def test_detect_resolves_each_cases_contrast_once(tiny_zoo, tmp_path, monkeypatch, make_volume, capsys):
    """The default method and the model-mismatch warning use one contrast resolution per case."""
    import SimpleITK as sitk

    import uad.selection
    from uad.cli import main

    calls = []
    real = uad.selection.guess_contrast

    def counting(image, brain_mask=None):
        calls.append(brain_mask is not None)
        g = real(image, brain_mask)
        return type(g)(**{**g.__dict__, "contrast": "FLAIR"})  # "looks FLAIR": the T2 model gets a warning

    monkeypatch.setattr(uad.selection, "guess_contrast", counting)
    img, _, brain = make_volume(shape_zyx=(6, 40, 36))
    inp, msk = str(tmp_path / "scan.nii.gz"), str(tmp_path / "scan_bm.nii.gz")
    sitk.WriteImage(img, inp)
    sitk.WriteImage(brain, msk)
    fast = ["--param", "level=20", "--param", "steps=3", "--param", "sampler=ddim"]
    rc = main(["detect", inp, "-o", str(tmp_path / "out"), "--method", "anoddpm", "--model", "tiny-test",
               "--brain-mask", msk, "--device", "cpu", "--no-progress", *fast])
    out = capsys.readouterr().out
    assert rc == 0 and calls == [True]  # once, with the brain mask
    assert "the model tiny-test is for T2 but the scan looks FLAIR (guessed from the intensities)" in out
    # --contrast: no guess at all
    calls.clear()
    rc = main(["detect", inp, "-o", str(tmp_path / "out2"), "--method", "anoddpm", "--model", "tiny-test",
               "--contrast", "T1", "--device", "cpu", "--no-progress", *fast])
    assert rc == 0 and calls == [] and "scan looks T1 (--contrast)" in capsys.readouterr().out


def test_card_threshold_rewrite_keeps_the_notes_after_the_table(tmp_path):
    """The threshold table of a card is rewritten from the manifest; a note written after it stays."""
    from conftest import load_script
    from uad import calibration

    tb = load_script("scripts/train_bundled.py")
    entry: dict = {}
    rec = {"thresholds": {"0.01": 0.5, "0.05": 0.25}, "nfe_per_slice": 25, "n_volumes": 2, "n_voxels": 1000}
    calibration.store(entry, "anoddpm", "fast", "none", dict(rec))
    card = tmp_path / "README.md"
    note = "AutoDDPM note: a hand-written remark about the rows above."
    card.write_text("# Model card\n\n## Thresholds\n\nold text\n\n| method | preset |\n|---|---|\n| anoddpm | old |\n\n"
                    f"{note}\n\n## Next section\n\nkept\n")
    tb.update_card_thresholds(entry, card)
    text = card.read_text()
    assert "| anoddpm | fast | none | 0.5 | 0.25 | - | 25 | 2 | 1,000 |" in text
    assert "| anoddpm | old |" not in text and "old text" not in text
    assert text.count(note) == 1 and text.index("| anoddpm | fast") < text.index(note) < text.index("## Next section")
    assert text.endswith("## Next section\n\nkept\n")
    calibration.store(entry, "anoddpm", "paper", "none", dict(rec, nfe_per_slice=250))
    tb.update_card_thresholds(entry, card)
    again = card.read_text()
    assert "| anoddpm | paper | none |" in again and again.count(note) == 1
    tb.update_card_thresholds(entry, card)
    assert card.read_text() == again  # idempotent
    bare = tmp_path / "bare.md"
    bare.write_text("# Model card\n\n## Thresholds\n\n| a |\n|---|\n\n## Next\n")
    tb.update_card_thresholds(entry, bare)
    assert "|\n\n## Next\n" in bare.read_text()  # no note: one blank line before the next section
    fresh = tmp_path / "fresh.md"  # a card without the section (a new model's): appended after one blank line
    fresh.write_text("# Model card\n\n| step | AP |\n|---|---|\n| 0 | 0.1 |\n")
    tb.update_card_thresholds(entry, fresh)
    assert "| 0 | 0.1 |\n\n## Thresholds\n" in fresh.read_text()


def test_card_header_says_the_models_normalisation():
    """A model card's input line was hard-coded 'percentile-normalised to [0, 1]', wrong for a model that keeps
    intensities up to clip_max 2 (the FLAIR models); it now follows the manifest entry's normalisation."""
    from conftest import load_script

    tb = load_script("scripts/train_bundled.py")
    entry = {"id": "m", "methods": ["thor"], "contrast": "FLAIR", "image_size": 64, "intensity_range": [-1.0, 1.0],
             "noise": "simplex", "schedule": {}, "networks": {"denoiser": {"type": "DiffusionModelUNet"}},
             "sha256": "0" * 64}
    line = tb.card_header(dict(entry, normalisation={"lower": 1.0, "upper": 99.0, "clip_max": 2.0}), 10)[3]
    assert "1st / 99th percentiles" in line and "clipped to [0, 2]" in line and "`clip_max` 2" in line
    line = tb.card_header(entry, 10)[3]  # no normalisation given: the preprocessing defaults (1 / 99, clip at 1)
    assert "clipped to [0, 1]" in line and "clip_max" not in line
    line = tb.card_header(dict(entry, normalisation={"lower": 0.5, "upper": 99.5, "clip": False}), 10)[3]
    assert "0.5th / 99.5th" in line and "not clipped" in line


def test_card_counts_the_steps_behind_a_fine_tune_of_a_fine_tune(monkeypatch):
    """'N steps in all' on a card counted only the init model's own run; it now follows the chain of bundled
    inits while each entry still holds the weights that were continued (same sha256 and steps)."""
    from types import SimpleNamespace

    from conftest import load_script

    tb = load_script("scripts/train_bundled.py")
    zoo = {"b": {"sha256": "sb", "training": {"steps": 800, "init": {"model": "a", "sha256": "sa", "steps": 500}}},
           "a": {"sha256": "sa", "training": {"steps": 500, "init": {"model": "gone", "sha256": "s0", "steps": 70}}},
           "c": {"sha256": "new", "training": {"steps": 900, "init": {"model": "a", "sha256": "sa", "steps": 500}}}}

    def find(mid):
        if mid not in zoo:
            raise KeyError(mid)
        return SimpleNamespace(data=zoo[mid])

    monkeypatch.setattr(tb, "find_model", find)
    assert tb.lineage_steps({"model": "b", "sha256": "sb", "steps": 800}) == 800 + 500 + 70
    assert tb.lineage_steps({"model": "c", "sha256": "old", "steps": 400}) == 400  # re-bundled since: its own only
    assert tb.lineage_steps({"model": "gone", "steps": 70}) == 70
    line = " ".join(tb.training_details({"steps": 100, "contrast": "T1",
                                         "init": {"model": "b", "sha256": "sb", "steps": 800}}))
    assert "100 further steps on T1 phantoms, 1,470 steps in all" in line
