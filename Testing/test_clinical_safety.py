"""Issue 8, point 7: no silent wrong result, no lost file (one test per finding of the bad-input battery).

Each test reproduces a finding (it failed before the fix) and checks the fixed behaviour: the user's
files are byte-for-byte unchanged, nothing is computed when a check fails, and the error is one line.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import uad.pipeline
from conftest import subprocess_env
from uad import InputError, UADError
from uad.cli import main
from uad.imageio import (check_nifti_file, output_marker, plausibility_warnings, read_image, read_output_marker,
                         validate)

FAST = ["--param", "level=20", "--param", "steps=3", "--param", "sampler=ddim"]
RUN = ["--device", "cpu", "--no-progress", *FAST]


def _write(img, path) -> Path:
    sitk.WriteImage(img, str(path))
    return Path(path)


def _one_line(capsys, rc, expect_rc=1) -> str:
    out, err = capsys.readouterr()
    assert rc == expect_rc, (out, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("uad: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def no_compute(monkeypatch):
    """Fails the test if detection runs (checks must come before any computing)."""
    calls = []

    def never(*a, **k):
        calls.append(1)
        raise AssertionError("detection ran although a check should have stopped the run first")

    monkeypatch.setattr(uad.pipeline, "detect", never)
    return calls


# -- outputs never overwrite a file that is not this tool's output of the same input --------------
def test_output_never_replaces_the_brain_mask_given_to_the_same_run(tiny_zoo, make_volume, tmp_path, capsys,
                                                                     no_compute):
    img, _, brain = make_volume()
    out = tmp_path / "out"
    out.mkdir()
    inp = _write(img, tmp_path / "a.nii.gz")
    user_mask = _write(brain, out / "a_mask.nii.gz")  # the user's brain mask, where a's mask output goes
    before = user_mask.read_bytes()
    for extra in ([], ["--overwrite"]):  # even --overwrite never replaces an input of the run
        rc = main(["detect", str(inp), "--brain-mask", str(user_mask), "-o", str(out), *RUN, *extra])
        line = _one_line(capsys, rc)
        assert "would overwrite the brain mask" in line and "a_mask.nii.gz" in line
    assert user_mask.read_bytes() == before and sorted(p.name for p in out.iterdir()) == ["a_mask.nii.gz"]
    assert not no_compute


def test_an_input_named_like_another_inputs_output_is_refused(tiny_zoo, make_volume, tmp_path, capsys,
                                                              no_compute):
    img, _, _ = make_volume()
    a = _write(img, tmp_path / "a.nii.gz")
    b = _write(make_volume(seed=4)[0], tmp_path / "a_anomaly.nii.gz")  # a scan that happens to have this name
    before = b.read_bytes()
    rc = main(["detect", str(a), str(b), "-o", str(tmp_path), *RUN])
    line = _one_line(capsys, rc)
    assert "would overwrite the input" in line and "a_anomaly.nii.gz" in line
    assert b.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz", "a_anomaly.nii.gz"]


def test_outputs_replace_only_this_tools_outputs_of_the_same_input(tiny_zoo, make_volume, tmp_path, capsys):
    img, _, _ = make_volume()
    a = _write(img, tmp_path / "a.nii.gz")
    out = tmp_path / "out"
    assert main(["detect", str(a), "-o", str(out), *RUN]) == 0
    capsys.readouterr()
    from uad.imageio import sha256_file

    digest = sha256_file(a)
    assert read_output_marker(out / "a_anomaly.nii.gz") == output_marker("anomaly", digest)
    assert read_output_marker(out / "a_overview.png") == output_marker("overview", digest)
    # the same input again: its own outputs are replaced
    assert main(["detect", str(a), "-o", str(out), *RUN]) == 0
    capsys.readouterr()
    # another input with the same stem (other folder): refused, nothing replaced
    other = tmp_path / "other"
    other.mkdir()
    a2 = _write(make_volume(seed=9)[0], other / "a.nii.gz")
    snapshot = {p.name: p.read_bytes() for p in out.iterdir()}
    line = _one_line(capsys, main(["detect", str(a2), "-o", str(out), *RUN]))
    assert "is not uad's output of a.nii.gz" in line and "--overwrite" in line
    # a user's own file where an output goes: refused too
    _write(img, out / "a_restoration.nii.gz")
    snapshot["a_restoration.nii.gz"] = (out / "a_restoration.nii.gz").read_bytes()
    line = _one_line(capsys, main(["detect", str(a), "-o", str(out), *RUN]))
    assert "a_restoration.nii.gz exists and is not uad's output" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == snapshot
    # ... unless --overwrite
    assert main(["detect", str(a), "-o", str(out), "--overwrite", *RUN]) == 0
    assert read_output_marker(out / "a_restoration.nii.gz") == output_marker("restoration", digest)


# -- truncated files, NaN / Inf, shear ----------------------------------------------------------
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_truncated_nifti_is_refused(make_volume, tmp_path, suffix):
    img, _, _ = make_volume()
    p = _write(img, tmp_path / f"scan{suffix}")
    data = p.read_bytes()
    p.write_bytes(data[: int(len(data) * 0.6)])
    # before the fix ITK read the missing voxels as zeros and the run went on (exit 0)
    with pytest.raises(InputError, match="truncated"):
        read_image(p)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_in_nifti_are_refused_like_nrrd(make_volume, tmp_path, suffix, value):
    img, _, _ = make_volume()
    a = sitk.GetArrayFromImage(img)
    a[3, 5, 5] = value
    a[4, 6, 6] = value
    bad = sitk.GetImageFromArray(a)
    bad.CopyInformation(img)
    p = _write(bad, tmp_path / f"scan{suffix}")
    assert np.isfinite(sitk.GetArrayFromImage(sitk.ReadImage(str(p)))).all()  # what ITK alone gives: zeros
    with pytest.raises(InputError, match="2 NaN or infinite"):
        read_image(p)
    with pytest.raises(InputError, match="NaN"):
        validate(read_image(_write(bad, tmp_path / "scan.nrrd")))


def test_sheared_direction_is_refused(make_volume, tmp_path, capsys):
    import nibabel as nib

    img, _, _ = make_volume()
    sheared = sitk.Image(img)
    sheared.SetDirection([1.0, 0.25, 0.0, 0.0, 0.9682458365518543, 0.0, 0.0, 0.0, 1.0])  # unit columns, not orthogonal
    with pytest.raises(InputError, match="sheared"):
        validate(sheared)
    p = _write(sheared, tmp_path / "sheared.nrrd")  # NRRD keeps the shear
    with pytest.raises(InputError, match="sheared"):
        validate(read_image(p))
    # a NIfTI with a sheared sform: ITK silently uses an orthogonalised matrix (outputs misplaced)
    aff = np.diag([1.2, 1.0, 3.0, 1.0])
    aff[0, 1] = 0.3
    nii = nib.Nifti1Image(sitk.GetArrayFromImage(img).transpose(2, 1, 0), aff)
    nii.set_sform(aff, code=2)
    nii.set_qform(np.diag([1.2, 1.0, 3.0, 1.0]), code=1)
    q = tmp_path / "sheared.nii.gz"
    nib.save(nii, str(q))
    with pytest.raises(InputError, match="sheared"):
        check_nifti_file(q)
    rc = main(["detect", str(q), "-o", str(tmp_path / "out"), "--device", "cpu", "--no-progress"])
    assert "Resample it onto an orthogonal grid" in _one_line(capsys, rc)
    # an orthogonal sform (rotation) is fine
    rot = np.eye(4)
    rot[:3, :3] = [[0, -1.2, 0], [1.0, 0, 0], [0, 0, 3.0]]
    nii.set_sform(rot, code=2)
    nib.save(nii, str(q))
    check_nifti_file(q)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-0.5"])
def test_threshold_nan_inf_negative_refused(tiny_zoo, make_volume, tmp_path, capsys, no_compute, value):
    inp = _write(make_volume()[0], tmp_path / "a.nii.gz")
    rc = main(["detect", str(inp), "-o", str(tmp_path / "out"), f"--threshold={value}", *RUN])
    assert "threshold must be a finite number >= 0" in _one_line(capsys, rc)
    with pytest.raises(UADError, match="finite"):
        uad.pipeline.check_threshold(float(value))


# -- unwritable folder, full disk, write errors, SIGTERM, umask ----------------------------------
def test_unwritable_output_folder_checked_before_computing(tiny_zoo, make_volume, tmp_path, capsys, no_compute):
    inp = _write(make_volume()[0], tmp_path / "a.nii.gz")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    rc = main(["detect", str(inp), "-o", str(blocker / "out"), *RUN])
    assert "cannot create the output folder" in _one_line(capsys, rc)
    if os.geteuid() != 0:  # root writes into read-only folders
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        rc = main(["detect", str(inp), "-o", str(ro), *RUN])
        assert "cannot write into the output folder" in _one_line(capsys, rc)


def test_full_disk_checked_before_computing(tiny_zoo, make_volume, tmp_path, capsys, no_compute, monkeypatch):
    import shutil
    from collections import namedtuple

    inp = _write(make_volume()[0], tmp_path / "a.nii.gz")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 4096, 4096))
    rc = main(["detect", str(inp), "-o", str(tmp_path / "out"), *RUN])
    assert "not enough free disk space" in _one_line(capsys, rc)


def test_disk_full_while_writing_one_line_no_part_files(tiny_zoo, make_volume, tmp_path, capsys, monkeypatch):
    import uad.overview

    inp = _write(make_volume()[0], tmp_path / "a.nii.gz")

    def full(path, *a, **k):
        Path(path).write_bytes(b"half a png")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(uad.overview, "write_overview", full)
    out = tmp_path / "out"
    rc = main(["detect", str(inp), "-o", str(out), *RUN])
    line = _one_line(capsys, rc)
    assert "cannot write (No space left on device)" in line
    assert list(out.iterdir()) == []


SIGTERM_SCRIPT = r"""
import sys, time, uad.overview
from uad.cli import main
def slow(path, *a, **k):
    open(path, "wb").write(b"partial")
    print("writing", flush=True)
    time.sleep(60)
uad.overview.write_overview = slow
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or sys.platform == "win32", reason="POSIX signals")
def test_sigterm_removes_temporary_files(tiny_zoo_dir, make_volume, tmp_path):
    inp = _write(make_volume()[0], tmp_path / "a.nii.gz")
    out = tmp_path / "out"
    env = subprocess_env(tmp_path, UAD_MODELS_DIR=tiny_zoo_dir)
    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_SCRIPT, "detect", str(inp), "-o", str(out),
                             "--model", "tiny-test", *RUN], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        deadline = time.time() + 240
        line = ""
        while "writing" not in line and time.time() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
        assert "writing" in line, proc.stderr.read()
        assert any(p.name.endswith(".part.png") for p in out.iterdir())  # mid-way: temporaries exist
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "terminated (signal 15)" in err and "Traceback" not in err
    assert list(out.iterdir()) == []


def test_results_follow_the_umask(tiny_zoo, make_volume, tmp_path, capsys, mask=0o027):
    a = _write(make_volume()[0], tmp_path / "a.nii.gz")
    b = _write(make_volume(seed=2)[0], tmp_path / "b.nii.gz")
    old = os.umask(mask)
    try:
        assert main(["detect", str(a), str(b), "-o", str(tmp_path / "out"), *RUN]) == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert len(modes) == 11 and set(modes.values()) == {0o666 & ~mask}, modes  # before: 0600 whatever the umask


# -- warnings ------------------------------------------------------------------------------------
def _head(make_volume, spacing=(1.0, 1.0, 1.0), shape=(150, 30, 30)):
    img, _, _ = make_volume(shape, spacing)
    return img


def test_plausibility_warnings(make_volume):
    head = sitk.GetImageFromArray(np.random.default_rng(0).random((40, 60, 50), dtype=np.float32) * 800)
    head.SetSpacing((3.5, 3.5, 4.0))  # 175 x 210 x 160 mm: a head
    assert plausibility_warnings(head) == []
    tiny = sitk.Image(head)
    tiny.SetSpacing((0.05, 0.05, 0.05))
    w = plausibility_warnings(tiny)
    assert any("spacing 0.05 x 0.05 x 0.05 mm is outside 0.1-10 mm" in x for x in w)
    assert any("field of view" in x and "not that of a head" in x for x in w)
    thick = sitk.Image(head)
    thick.SetSpacing((3.5, 3.5, 12.0))
    assert any("spacing" in x for x in plausibility_warnings(thick))
    hu = sitk.GetArrayFromImage(head) * 0 - 1000.0
    hu[10:30, 15:45, 10:40] = 40.0
    hu[10:30, 14, 10:40] = 1500.0  # bone
    ct = sitk.GetImageFromArray(hu.astype(np.float32))
    ct.CopyInformation(head)
    assert any("look like CT" in x for x in plausibility_warnings(ct))
    body = sitk.Image(head)
    body.SetSpacing((3.5, 3.5, 15.0))  # 600 mm long
    assert any("not that of a head" in x for x in plausibility_warnings(body))


def test_contrast_mismatch_warns(tiny_zoo, make_volume, tmp_path, capsys):
    img, _, _ = make_volume()
    t1 = _write(img, tmp_path / "case_T1w.nii.gz")  # the tiny test model is a T2 model
    plain = _write(img, tmp_path / "case.nii.gz")
    assert main(["detect", str(t1), str(plain), "-o", str(tmp_path / "o1"), *RUN]) == 0
    out = capsys.readouterr().out
    assert out.count("warning: the model tiny-test is for T2 but the scan looks T1 (metadata / file name)") == 1
    assert "is for T2 but" not in out.split(f"{plain}: ")[1]  # nothing says what the second scan is
    assert main(["detect", str(plain), "-o", str(tmp_path / "o3"), "--contrast", "flair", *RUN]) == 0
    assert "is for T2 but the scan looks FLAIR (--contrast)" in capsys.readouterr().out


# -- parameters ----------------------------------------------------------------------------------
def test_param_type_and_ignored_parameter_errors(tiny_zoo, make_volume, tmp_path, capsys, no_compute):
    inp = _write(make_volume()[0], tmp_path / "a.nii.gz")
    rc = main(["detect", str(inp), "-o", str(tmp_path / "out"), "--device", "cpu", "--param", "level=abc"])
    assert _one_line(capsys, rc).endswith("parameter level of anoddpm expects an integer, got 'abc'")
    rc = main(["detect", str(inp), "-o", str(tmp_path / "out"), "--device", "cpu", "--param", "sampler=3"])
    assert "parameter sampler of anoddpm expects a string, got 3" in _one_line(capsys, rc)
    # the default preset (stochastic) samples with DDIM, which has no step variance: setting it did nothing silently
    rc = main(["detect", str(inp), "-o", str(tmp_path / "out"), "--device", "cpu", "--param",
               "variance=fixed_small"])
    assert "parameter variance has no effect with preset 'stochastic'" in _one_line(capsys, rc)
    rc = main(["detect", str(inp), "-o", str(tmp_path / "out"), "--device", "cpu", "--method", "thor",
               "--preset", "paper", "--param", "steps=400"])
    assert "parameter steps has no effect" in _one_line(capsys, rc)
    assert not no_compute


def test_ignored_parameters_of_autoddpm(tiny_model):
    with pytest.raises(UADError, match="parameter eta has no effect with preset 'paper'"):
        uad.pipeline.build("autoddpm", tiny_model, "paper", {"eta": 0.5})
    assert uad.pipeline.build("autoddpm", tiny_model, "fast", {"eta": 0.5}).params.eta == 0.5  # DDIM in-painting
    assert uad.pipeline.build("anoddpm", tiny_model, "paper", {"variance": "fixed_small"}).params.variance == \
        "fixed_small"  # the ancestral sampler uses it


# -- the model zoo -------------------------------------------------------------------------------
def test_broken_user_manifest_does_not_block_bundled_models(tiny_zoo, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "uad-cache" / "models"
    cache.mkdir(parents=True)
    (cache / "manifest.json").write_text("{ this is not json")
    from uad.zoo import find_model, list_models, load_model

    assert [e.id for e in list_models()] == ["tiny-test", "tiny-test-thr"]
    assert load_model("tiny-test").id == "tiny-test"
    assert main(["models", "list"]) == 0
    out, err = capsys.readouterr()
    assert "tiny-test" in out and "warning: skipped the model manifest" in err and "not valid JSON" in err
    with pytest.raises(UADError, match="skipped the model manifest"):
        find_model("only-in-the-broken-one")


@pytest.mark.parametrize("field,value,msg", [
    ("image_size", "big", "image_size must be an integer"),
    ("methods", "anoddpm", "methods must be a list of method names"),
    ("networks", ["denoiser"], "networks must be an object"),
    ("threshold", "high", "threshold must be a number"),
    ("normalisation", 5, "normalisation must be an object"),
    ("intensity_range", [1], "intensity_range must be two numbers"),
])
def test_wrong_typed_manifest_fields_clear_error(tiny_zoo_dir, tmp_path, monkeypatch, capsys, field, value, msg):
    zoo_dir = tmp_path / "zoo"
    zoo_dir.mkdir()
    (zoo_dir / "tiny.safetensors").write_bytes((tiny_zoo_dir / "tiny.safetensors").read_bytes())
    entry = json.loads((tiny_zoo_dir / "manifest.json").read_text())["models"][0]
    entry[field] = value
    (zoo_dir / "manifest.json").write_text(json.dumps({"models": [entry]}))
    monkeypatch.setenv("UAD_MODELS_DIR", str(zoo_dir))
    monkeypatch.setenv("UAD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr("uad.zoo.bundled_dirs", lambda: [])
    from uad import ModelError
    from uad.zoo import load_model

    with pytest.raises(ModelError, match=msg):
        load_model("tiny-test")
    assert main(["models", "list"]) == 0  # listing still works and says what is wrong
    assert "invalid" in capsys.readouterr().out
    rc = main(["models", "verify", "tiny-test"])
    out, err = capsys.readouterr()
    assert rc == 1 and msg in out and "Traceback" not in out + err


def test_model_card_outside_its_folder_is_refused(tiny_zoo_dir, tmp_path, monkeypatch, capsys):
    zoo_dir = tmp_path / "zoo"
    zoo_dir.mkdir()
    (tmp_path / "secret.txt").write_text("not a model card\n")
    entry = json.loads((tiny_zoo_dir / "manifest.json").read_text())["models"][0]
    (zoo_dir / "tiny.safetensors").write_bytes((tiny_zoo_dir / "tiny.safetensors").read_bytes())
    entry["card"] = "../secret.txt"
    (zoo_dir / "manifest.json").write_text(json.dumps({"models": [entry]}))
    monkeypatch.setenv("UAD_MODELS_DIR", str(zoo_dir))
    monkeypatch.setenv("UAD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr("uad.zoo.bundled_dirs", lambda: [])
    rc = main(["models", "info", "tiny-test"])
    out, err = capsys.readouterr()
    assert "not a model card" not in out
    assert rc == 1 and "card path ../secret.txt points outside the model folder" in err
