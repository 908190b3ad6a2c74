"""The ``uad`` command line: detect (outputs, errors, atomic writes), methods, models."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import uad.pipeline
from conftest import subprocess_env
from uad.cli import main, parse_value

FAST = ["--param", "level=20", "--param", "steps=3", "--param", "sampler=ddim"]


def _write(img, path):
    sitk.WriteImage(img, str(path))
    return str(path)


def _files(d: Path):
    return sorted(p.name for p in d.rglob("*")) if d.exists() else []


def _error_lines(err: str):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    return lines


def _assert_one_line_error(capsys, rc):
    out, err = capsys.readouterr()
    assert rc != 0
    lines = _error_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith("uad: error: ")
    assert "Traceback" not in err
    return lines[0]


def test_detect_writes_outputs_on_input_grid(tiny_zoo, make_volume, tmp_path, capsys):
    d = np.array([[0, 0, 1.0], [1.0, 0, 0], [0, -1.0, 0]])  # permuted, flipped
    img, _, brain = make_volume((14, 30, 26), (1.1, 1.0, 3.0), (12.0, -3.0, 40.0), d)
    inp = _write(img, tmp_path / "case01_T2.nii.gz")
    img2, _, _ = make_volume((12, 28, 28), (1.0, 1.0, 2.0), (0, 0, 0), np.diag([-1.0, -1, 1]), seed=3)
    inp2 = _write(img2, tmp_path / "case02.nrrd")
    outdir = tmp_path / "out"
    rc = main(["detect", inp, inp2, "-o", str(outdir), "--device", "cpu", "--seed", "3", "--no-progress", *FAST])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert _files(outdir) == sorted([f"{s}_{k}" for s in ("case01_T2", "case02")
                                     for k in ("restoration.nii.gz", "anomaly.nii.gz", "mask.nii.gz",
                                               "brainmask.nii.gz", "overview.png")] + ["summary.csv"])
    for stem, ref in (("case01_T2", img), ("case02", img2)):
        for k in ("restoration", "anomaly", "mask"):
            o = sitk.ReadImage(str(outdir / f"{stem}_{k}.nii.gz"))
            assert o.GetSize() == ref.GetSize()
            np.testing.assert_allclose(o.GetSpacing(), ref.GetSpacing(), atol=1e-6)
            np.testing.assert_allclose(o.GetOrigin(), ref.GetOrigin(), atol=1e-5)
            np.testing.assert_allclose(o.GetDirection(), ref.GetDirection(), atol=1e-6)
        assert (outdir / f"{stem}_overview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert str(outdir / f"{stem}_anomaly.nii.gz") in out
    b = sitk.GetArrayFromImage(brain) > 0
    r = sitk.GetArrayFromImage(sitk.ReadImage(str(outdir / "case01_T2_restoration.nii.gz")))
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(outdir / "case01_T2_anomaly.nii.gz")))
    arr = sitk.GetArrayFromImage(img)
    assert np.array_equal(r[~b], arr[~b]) and np.all(a[~b] == 0) and a.max() > 0
    # same as the Python API with the same seed
    res = uad.pipeline.detect(img, device="cpu", seed=3, params={"level": 20, "steps": 3, "sampler": "ddim"})
    np.testing.assert_allclose(a, sitk.GetArrayFromImage(res.anomaly), atol=1e-6)


def _bad_inputs(tmp_path: Path, make_volume):
    img, _, _ = make_volume((8, 16, 16))
    cases = {}
    cases["2d"] = _write(sitk.GetImageFromArray(np.random.rand(20, 20).astype(np.float32)), tmp_path / "2d.nii.gz")
    vol = sitk.GetImageFromArray(np.random.rand(6, 7, 8).astype(np.float32))
    cases["4d"] = _write(sitk.JoinSeries([vol, vol, vol]), tmp_path / "4d.nii.gz")
    cases["vector"] = _write(sitk.GetImageFromArray(np.random.rand(6, 7, 8, 3).astype(np.float32), isVector=True),
                             tmp_path / "rgb.nrrd")
    cases["empty"] = _write(sitk.GetImageFromArray(np.zeros((6, 7, 8), np.float32)), tmp_path / "zeros.nii.gz")
    cases["constant"] = _write(sitk.GetImageFromArray(np.full((6, 7, 8), 5, np.int16)), tmp_path / "const.nii.gz")
    nan = sitk.GetArrayFromImage(img)
    nan[3, 5, 5] = np.nan
    # (ITK's NIfTI reader turns NaN into 0, so NaN is tested through NRRD)
    cases["nan"] = _write(sitk.GetImageFromArray(nan), tmp_path / "nan.nrrd")
    cases["thin"] = _write(sitk.GetImageFromArray(np.random.rand(2, 20, 20).astype(np.float32)), tmp_path / "thin.nii.gz")
    (tmp_path / "text.nii.gz").write_text("this is not an image\n")
    cases["text"] = str(tmp_path / "text.nii.gz")
    cases["missing"] = str(tmp_path / "does_not_exist.nii.gz")
    return cases


EXPECTED = {"2d": "2-D", "4d": "4-D", "vector": "components", "empty": "empty", "constant": "constant",
            "nan": "NaN", "thin": "slice", "text": "not an image", "missing": "no such file"}


@pytest.mark.parametrize("case", list(EXPECTED))
def test_detect_bad_input_one_line_error_nothing_written(tiny_zoo, make_volume, tmp_path, capsys, case):
    (tmp_path / "in").mkdir()
    inputs = _bad_inputs(tmp_path / "in", make_volume)
    outdir = tmp_path / "out"
    rc = main(["detect", inputs[case], "-o", str(outdir), "--device", "cpu", "--no-progress", *FAST])
    line = _assert_one_line_error(capsys, rc)
    assert EXPECTED[case] in line
    assert Path(inputs[case]).name in line
    assert _files(outdir) == []


def test_detect_bad_input_in_a_cohort_is_an_error_row(tiny_zoo, make_volume, tmp_path, capsys):
    """With several inputs a bad one is reported (validated before any is processed) and the rest go on."""
    import csv

    (tmp_path / "in").mkdir()
    inputs = _bad_inputs(tmp_path / "in", make_volume)
    good, _, _ = make_volume()
    good_path = _write(good, tmp_path / "good.nii.gz")
    outdir = tmp_path / "out"
    rc = main(["detect", good_path, inputs["nan"], inputs["text"], inputs["missing"], "-o", str(outdir),
               "--device", "cpu", "--no-progress", *FAST])
    out, err = capsys.readouterr()
    assert rc == 3, err
    assert err.strip().splitlines() == [f"uad: error: 3 of 4 case(s) failed; see {outdir / 'summary.csv'}"]
    with open(outdir / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["case"], r["status"]) for r in rows] == [("good", "ok"), ("nan", "error"), ("text", "error"),
                                                        ("does_not_exist", "error")]
    assert "NaN" in rows[1]["error"] and "not an image" in rows[2]["error"] and "no such file" in rows[3]["error"]
    # all inputs bad: one line, nothing written
    rc = main(["detect", inputs["nan"], inputs["text"], "-o", str(tmp_path / "none"), "--device", "cpu",
               "--no-progress", *FAST])
    assert "NaN" in _assert_one_line_error(capsys, rc) and _files(tmp_path / "none") == []
    assert (outdir / "good_anomaly.nii.gz").is_file() and not (outdir / "nan_anomaly.nii.gz").exists()


def test_detect_usage_errors(tiny_zoo, make_volume, tmp_path, capsys):
    img, _, _ = make_volume()
    inp = _write(img, tmp_path / "a.nii.gz")
    out = tmp_path / "out"
    for argv, msg in [
        (["--method", "nope"], "unknown method"),
        (["--model", "nope"], "no model with id"),
        (["--param", "bogus=1"], "unknown parameter"),
        (["--param", "level"], "KEY=VALUE"),
        (["--preset", "nope"], "preset"),
        (["--brain-mask", inp, "--brain-mask", inp], "one --brain-mask per input"),
        (["--device", "tpu-9000"], "device"),
    ]:
        rc = main(["detect", inp, "-o", str(out), "--no-progress", "--device", "cpu", *argv])
        assert msg in _assert_one_line_error(capsys, rc)
        assert _files(out) == []
    # two inputs whose outputs would collide
    sub = tmp_path / "sub"
    sub.mkdir()
    inp2 = _write(img, sub / "a.nrrd")
    rc = main(["detect", inp, inp2, "-o", str(out), "--no-progress", "--device", "cpu"])
    assert "same name stem" in _assert_one_line_error(capsys, rc)


def test_detect_cancel_writes_nothing(tiny_zoo, make_volume, tmp_path, capsys, monkeypatch):
    img, _, _ = make_volume()
    inp = _write(img, tmp_path / "a.nii.gz")
    real = uad.pipeline.detect

    def cancelled_detect(*args, **kw):
        kw["cancel"] = lambda: True
        return real(*args, **kw)

    monkeypatch.setattr(uad.pipeline, "detect", cancelled_detect)
    out = tmp_path / "out"
    rc = main(["detect", inp, "-o", str(out), "--no-progress", "--device", "cpu", *FAST])
    assert rc == 130
    assert "cancelled" in _assert_one_line_error(capsys, rc)
    assert _files(out) == []


def test_detect_failure_while_writing_leaves_no_partial_files(tiny_zoo, make_volume, tmp_path, capsys,
                                                               monkeypatch):
    import uad.overview

    img, _, _ = make_volume()
    inp = _write(img, tmp_path / "a.nii.gz")

    def broken(path, *a, **k):
        Path(path).write_bytes(b"half a png")
        raise uad.UADError("disk full")

    monkeypatch.setattr(uad.overview, "write_overview", broken)
    out = tmp_path / "out"
    rc = main(["detect", inp, "-o", str(out), "--no-progress", "--device", "cpu", *FAST])
    assert "disk full" in _assert_one_line_error(capsys, rc)
    assert _files(out) == []


def test_detect_sample_prints_metrics(tiny_zoo, make_volume, tmp_path, capsys, monkeypatch):
    sample = tmp_path / "SampleData"
    sample.mkdir()
    img, les, brain = make_volume()
    _write(img, sample / "sample_T2_tumour.nii.gz")
    _write(les, sample / "sample_T2_tumour_lesion.nii.gz")
    _write(brain, sample / "sample_T2_tumour_brainmask.nii.gz")
    monkeypatch.setenv("UAD_SAMPLE_DIR", str(sample))
    out = tmp_path / "out"
    rc = main(["detect", "--sample", "-o", str(out), "--no-progress", "--device", "cpu", *FAST])
    o, err = capsys.readouterr()
    assert rc == 0, err
    assert "AP " in o and "best Dice" in o
    assert (out / "sample_T2_tumour_anomaly.nii.gz").is_file()
    ap = float(o.split("AP ")[1].split(",")[0])
    from uad.metrics import average_precision

    a = sitk.ReadImage(str(out / "sample_T2_tumour_anomaly.nii.gz"))
    assert ap == pytest.approx(average_precision(a, les, brain), abs=1e-3)


def test_detect_with_brain_mask_file(tiny_zoo, make_volume, tmp_path, capsys):
    img, _, brain = make_volume()
    b = sitk.GetArrayFromImage(brain)
    b[: b.shape[0] // 2] = 0
    half = sitk.GetImageFromArray(b)
    half.CopyInformation(img)
    inp, msk = _write(img, tmp_path / "a.nii.gz"), _write(half, tmp_path / "a_mask.nii.gz")
    out = tmp_path / "out"
    rc = main(["detect", inp, "-o", str(out), "--brain-mask", msk, "--no-progress", "--device", "cpu", *FAST])
    assert rc == 0, capsys.readouterr().err
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "a_anomaly.nii.gz")))
    assert np.all(a[b == 0] == 0) and a.max() > 0


def test_parse_value():
    assert parse_value("3") == 3 and parse_value("0.5") == 0.5 and parse_value("true") is True
    assert parse_value("None") is None and parse_value("ddim") == "ddim" and parse_value("[1, 2]") == [1, 2]


def test_methods_and_models_commands(tiny_zoo, tmp_path, capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "anoddpm" in out and "fast*" in out and "paper" in out
    for argv in (["models"], ["models", "list"]):
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert "tiny-test " in out and "tiny-test-thr" in out
    assert main(["models", "info", "tiny-test-thr"]) == 0
    out = capsys.readouterr().out
    assert "0.123" in out and "anoddpm" in out and "denoiser" in out
    assert "no model with id" in _assert_one_line_error(capsys, main(["models", "info", "nope"]))
    assert main(["models", "verify"]) == 0
    assert capsys.readouterr().out.count("ok ") == 2


def test_models_verify_fails_on_tampered_weights(tiny_zoo_dir, tmp_path, monkeypatch, capsys):
    zoo = tmp_path / "zoo"
    shutil.copytree(tiny_zoo_dir, zoo)
    data = bytearray((zoo / "tiny.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (zoo / "tiny.safetensors").write_bytes(bytes(data))
    monkeypatch.setenv("UAD_MODELS_DIR", str(zoo))
    monkeypatch.setenv("UAD_CACHE_DIR", str(tmp_path / "cache"))
    rc = main(["models", "verify"])
    out, err = capsys.readouterr()
    assert rc != 0 and "checksum mismatch" in out and out.count("FAILED") == 2
    assert err.startswith("uad: error:")


def test_models_import(tiny_zoo_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("UAD_MODELS_DIR", str(tmp_path / "none"))
    monkeypatch.setenv("UAD_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["models", "import", str(tiny_zoo_dir), "--only", "tiny-test"]) == 0
    capsys.readouterr()
    manifest = json.loads((tmp_path / "cache" / "models" / "manifest.json").read_text())
    assert [m["id"] for m in manifest["models"]] == ["tiny-test"]
    assert main(["models", "verify"]) == 0
    # a training run folder (model.json + model.safetensors)
    run = tmp_path / "run"
    run.mkdir()
    entry = json.loads((tiny_zoo_dir / "manifest.json").read_text())["models"][0]
    entry.pop("id")
    entry["file"] = "model.safetensors"
    shutil.copyfile(tiny_zoo_dir / "tiny.safetensors", run / "model.safetensors")
    (run / "model.json").write_text(json.dumps(entry))
    assert main(["models", "import", str(run), "--id", "my-run"]) == 0
    assert main(["models", "info", "my-run"]) == 0
    assert "my-run" in capsys.readouterr().out


def test_console_entry_point_bad_input_no_traceback(tmp_path):
    (tmp_path / "x.nii.gz").write_text("not an image")
    env = subprocess_env(tmp_path)
    p = subprocess.run([sys.executable, "-m", "uad.cli", "detect", str(tmp_path / "x.nii.gz"), "-o",
                        str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [f"uad: error: {tmp_path / 'x.nii.gz'}: not an image format "
                                             f"SimpleITK can read"]
    assert not (tmp_path / "out").exists()
