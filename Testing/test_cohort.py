"""Issue 8, points 5 and 6: cohorts (folders, summary.csv, partial failure, torchrun) and devices
(out-of-memory retries, device report, "no kernel image" fallback, thread bound)."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import uad.pipeline
from conftest import subprocess_env
from uad import UADError
from uad.cli import EXIT_PARTIAL, main
from uad.cohort import SUMMARY_COLUMNS, expand_inputs, split_cases

FAST = ["--param", "level=20", "--param", "steps=3", "--param", "sampler=ddim"]


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def phantom_folder(tmp_path_factory) -> Path:
    """5 small T2 phantoms with a tumour (+ their brain and lesion masks and cohort.csv); the third one
    truncated (a corrupt download)."""
    from uad.phantoms import generate_cohort

    folder = tmp_path_factory.mktemp("cohort")
    rows = generate_cohort(folder, 5, contrast="T2", lesion="tumour", seed=10, spacing=4.0)
    bad = Path(rows[2]["image"])
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    return folder


def test_folder_expansion_skips_masks_and_outputs(phantom_folder, tmp_path):
    cases, skipped = expand_inputs([phantom_folder])
    assert [c.stem for c in cases] == [f"phantom_T2_tumour_{s:06d}" for s in range(10, 15)]
    assert all(c.mask is not None and c.mask.name == f"{c.stem}_brainmask.nii.gz" for c in cases)
    why = {p.name: r for p, r in skipped}
    assert why["cohort.csv"] == "not an image file"
    assert sum(r.startswith("a mask") for r in why.values()) == 10  # 5 brain masks + 5 lesion masks
    assert split_cases(list(range(5)), 0, 2) == [0, 2, 4] and split_cases(list(range(5)), 1, 2) == [1, 3]


def test_folder_of_5_phantoms_one_corrupt(tiny_zoo, phantom_folder, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["detect", str(phantom_folder), "-o", str(out), "--device", "cpu", "--no-progress", "--model",
               "tiny-test", *FAST])
    o, err = capsys.readouterr()
    assert rc == EXIT_PARTIAL == 3, err
    rows = _rows(out / "summary.csv")
    assert list(rows[0]) == list(SUMMARY_COLUMNS)
    assert [r["status"] for r in rows] == ["ok", "ok", "error", "ok", "ok"]
    bad = rows[2]
    assert bad["case"] == "phantom_T2_tumour_000012" and "truncated" in bad["error"]
    results = sorted(p.name for p in out.glob("*_anomaly.nii.gz"))
    assert results == [f"phantom_T2_tumour_{s:06d}_anomaly.nii.gz" for s in (10, 11, 13, 14)]
    for r in rows:
        if r["status"] != "ok":
            continue
        assert (r["method"], r["model"], r["preset"]) == ("anoddpm", "tiny-test", "stochastic") and r["error"] == ""
        a = sitk.ReadImage(str(out / f"{r['case']}_anomaly.nii.gz"))
        m = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{r['case']}_mask.nii.gz")))
        assert float(r["max_score"]) == pytest.approx(float(sitk.GetArrayViewFromImage(a).max()), rel=1e-5)
        ml = m.astype(bool).sum() * np.prod(a.GetSpacing()) / 1000
        assert float(r["anomaly_volume_ml"]) == pytest.approx(ml, rel=1e-3) and float(r["seconds"]) > 0
    assert err.strip().splitlines()[-1] == f"uad: error: 1 of 5 case(s) failed; see {out / 'summary.csv'}"
    # a rerun on the input folder and its own outputs as one folder: the outputs are recognised and skipped
    cases, skipped = expand_inputs([out])
    assert cases == [] and sum(r == "an output of uad" for _, r in skipped) == 4 * 4  # 3 maps + brain mask


@pytest.mark.slow
def test_torchrun_splits_cases_rank0_writes_summary(tiny_zoo_dir, phantom_folder, tmp_path):
    out = tmp_path / "out"
    env = subprocess_env(tmp_path, UAD_MODELS_DIR=tiny_zoo_dir)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "uad.cli",
           "detect", str(phantom_folder), "-o", str(out), "--device", "cpu", "--no-progress", "--model",
           "tiny-test", *FAST]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert p.returncode != 0, p.stderr[-3000:]  # one case is corrupt: rank 0 exits with the partial code 3
    assert p.stderr.count("exitcode  : 3") == 1 and "rank      : 0 " in p.stderr, p.stderr[-3000:]
    assert "rank 0: device: cpu (1 thread)" in p.stdout and "rank 1: device: cpu (1 thread)" in p.stdout
    assert p.stdout.count("summary:") == 1 and "(4 ok, 1 failed)" in p.stdout
    rows = _rows(out / "summary.csv")
    assert [r["case"] for r in rows] == [f"phantom_T2_tumour_{s:06d}" for s in range(10, 15)]
    assert [r["status"] for r in rows] == ["ok", "ok", "error", "ok", "ok"]
    assert len(list(out.glob("*_anomaly.nii.gz"))) == 4 and not list(out.glob(".*part*"))
    # every case ran once, on the rank that owns it (round robin)
    for i, r in enumerate(rows):
        if r["status"] == "ok":
            ran = re.findall(re.escape(f"{phantom_folder / (r['case'] + '.nii.gz')}: ") + r"\d+ slices", p.stdout)
            assert len(ran) == 1, p.stdout


# -- devices --------------------------------------------------------------------------------------
def test_out_of_memory_halves_the_batch_and_gives_the_same_result(tiny_model, fast_params, make_volume):
    img, _, _ = make_volume((16, 40, 36))
    calls = []

    def small_gpu(meth, x, mk, rng):  # a device that only holds 2 slices at a time
        calls.append(x.shape[0])
        if x.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return meth(x, mk, rng)

    logs = []
    res = uad.pipeline.detect(img, model=tiny_model, device="cpu", params=fast_params, batch_size=8,
                              forward=small_gpu, log=logs.append)
    ref = uad.pipeline.detect(img, model=tiny_model, device="cpu", params=fast_params, batch_size=2)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(res.anomaly), sitk.GetArrayFromImage(ref.anomaly))
    assert calls[:3] == [8, 4, 2] and set(calls[3:]) <= {2, 1}
    assert res.info["batch_size_used"] == 2 and res.info["oom_retries"] == 2
    assert len(logs) == 2 and "retrying with 4" in logs[0] and "retrying with 2" in logs[1]

    def no_memory(meth, x, mk, rng):
        raise RuntimeError("CUDA error: out of memory")

    with pytest.raises(UADError, match="even with one slice per batch"):
        uad.pipeline.detect(img, model=tiny_model, device="cpu", params=fast_params, batch_size=4, forward=no_memory)

    def other(meth, x, mk, rng):
        raise RuntimeError("some other failure")

    with pytest.raises(RuntimeError, match="some other failure"):  # not retried
        uad.pipeline.detect(img, model=tiny_model, device="cpu", params=fast_params, forward=other)


NO_KERNEL = "CUDA error: no kernel image is available for execution on the device"


def test_no_kernel_image_clear_message_and_cpu_fallback(monkeypatch):
    def probe(dev):
        raise RuntimeError(NO_KERNEL)

    with pytest.raises(UADError, match="has no kernels for the GPU cuda.*use --device cpu"):
        uad.pipeline.check_device_runs(torch.device("cuda"), probe=probe)
    monkeypatch.setattr(uad.pipeline, "_cuda_available", lambda: True)
    logs = []
    dev = uad.pipeline.resolve_device("auto", probe=probe, log=logs.append)
    assert dev.type == "cpu" and len(logs) == 1 and "falling back to the CPU" in logs[0]
    # an explicit request falls back too, and says that it was explicit (Testing/test_devices_and_defaults.py)
    assert uad.pipeline.resolve_device("cuda", probe=probe, log=logs.append).type == "cpu"
    assert "--device cuda was requested: falling back to the CPU" in logs[1]
    uad.pipeline.check_device_runs(torch.device("cpu"))  # the real probe on a device that runs


def test_device_auto_is_reported(tiny_zoo, make_volume, tmp_path, capsys):
    img, _, _ = make_volume()
    sitk.WriteImage(img, str(tmp_path / "a.nii.gz"))
    assert main(["detect", str(tmp_path / "a.nii.gz"), "-o", str(tmp_path / "o"), "--no-progress", "--threads",
                 "1", *FAST]) == 0
    out = capsys.readouterr().out
    if torch.cuda.is_available():
        name = torch.cuda.get_device_properties(0).name
        assert f"device: cuda:0 ({name}, " in out and "GiB) (picked by --device auto)" in out
    else:
        assert "device: cpu (1 thread) (picked by --device auto)" in out
    assert uad.pipeline.describe_device("cpu") == "cpu (1 thread)"


def test_threads_bounded_to_the_cores_given(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert uad.pipeline.configure_threads() == 4 and torch.get_num_threads() == 4
        assert uad.pipeline.configure_threads(processes=2) == 2 and torch.get_num_threads() == 2
        assert uad.pipeline.configure_threads(16) == 4  # never more than the cores given
        assert uad.pipeline.configure_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert uad.pipeline.configure_threads() == 3
        with pytest.raises(UADError, match="--threads must be >= 1"):
            uad.pipeline.configure_threads(0)
    finally:
        torch.set_num_threads(before)
