"""Devices (threads, out of memory, GPU probe), engine warnings and the GUI's default method / texts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def test_thread_bound_and_failure_kinds():
    import torch

    from UADExtensionLib.devices import bounded_torch_threads, classify_failure, default_thread_count

    assert default_thread_count(16) == 15 and default_thread_count(1) == 1 and default_thread_count(2) == 1
    before = torch.get_num_threads()
    with bounded_torch_threads(1) as n:
        assert torch.get_num_threads() == 1 == n
    assert torch.get_num_threads() == before
    assert classify_failure("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate") == "oom"
    assert classify_failure("CUDA error: no kernel image is available for execution on the device") == "no_kernel_image"
    assert classify_failure("NVIDIA RTX 5090 with CUDA capability sm_120 is not compatible with the current "
                            "PyTorch installation") == "no_kernel_image"
    assert classify_failure("ValueError: bad input") is None


def test_out_of_memory_halves_the_batch_until_it_fits():
    from UADExtensionLib.devices import detect_halving_batch_on_oom

    tried, logged = [], []

    def detect(image, batch_size, **kw):
        tried.append(batch_size)
        if batch_size > 3:
            raise RuntimeError("CUDA out of memory. Tried to allocate 1.2 GiB")
        return ("result", image, kw["seed"])

    out, b = detect_halving_batch_on_oom(detect, "img", batch_size=16, seed=4, log=logged.append)
    assert out == ("result", "img", 4) and b == 2 and tried == [16, 8, 4, 2] and len(logged) == 3

    def always(image, batch_size, **kw):
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        detect_halving_batch_on_oom(always, "img", batch_size=4, log=logged.append)

    def other(image, batch_size, **kw):
        tried.append(batch_size)
        raise RuntimeError("shape mismatch")

    tried.clear()
    with pytest.raises(RuntimeError, match="shape"):
        detect_halving_batch_on_oom(other, "img", batch_size=8)
    assert tried == [8]  # no retry for other errors


def test_device_probe_in_a_separate_process():
    import torch

    from UADExtensionLib.devices import describe, parse_probe_output, probe_command
    from UADExtensionLib.runner import engine_path

    cmd = probe_command(sys.executable)
    env = {"PYTHONPATH": engine_path(), "PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    info = parse_probe_output(out.stdout)
    assert info["torch"] == torch.__version__ and info["gpus"] == [] and info["mps_works"] is False
    text = describe(info)
    assert f"PyTorch {torch.__version__}" in text and "no CUDA GPU" in text and "CPU threads" in text
    gpu = dict(info, gpus=[{"index": 0, "name": "NVIDIA H200", "memory_gib": 139.8, "capability": "9.0"}],
               cuda_build="12.8", mps_available=True, mps_works=False)
    text = describe(gpu)
    assert "GPU 0: NVIDIA H200, 139.8 GiB, compute capability 9.0" in text and "(CUDA 12.8)" in text
    assert "failed a test convolution" in text
    assert describe({"torch": None, "error": "ModuleNotFoundError"}).startswith("PyTorch is not installed")
    with pytest.raises(ValueError):
        parse_probe_output("no json here")


def _zoo(tmp_path, monkeypatch, entries):
    monkeypatch.setenv("UAD_MODELS_DIR", str(tmp_path))
    monkeypatch.setenv("UAD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr("uad.zoo._candidate_dirs", lambda: [tmp_path])
    (tmp_path / "manifest.json").write_text(json.dumps({"models": entries}))


def test_default_method_prefers_disyre_then_a_method_with_a_model(tmp_path, monkeypatch):
    from UADExtensionLib.logic import UADExtensionLogic

    logic = UADExtensionLogic(scene=object())
    _zoo(tmp_path, monkeypatch, [{"id": "a", "methods": ["thor", "anoddpm"], "contrast": "T1"},
                                 {"id": "b", "methods": ["pddpm"], "contrast": "T2"}])
    assert logic.defaultMethod() == "thor"  # display order: thor before pddpm
    assert logic.defaultMethod("T2") == "pddpm"
    _zoo(tmp_path, monkeypatch, [{"id": "a", "methods": ["thor"]}, {"id": "d", "methods": ["disyre"], "contrast": "T2"}])
    assert logic.defaultMethod() == "disyre"
    _zoo(tmp_path, monkeypatch, [])
    assert logic.defaultMethod() == "disyre"  # no model at all: the best-measuring method


def test_default_choice_follows_the_measured_best_method_for_the_input_contrast(tmp_path, monkeypatch):
    """With held-out measurements in the manifest, the GUI's default for a T1 volume is the best
    measured T1 method (uad.selection), not the static rule; without any, the static rule."""
    import slicer
    from UADExtensionLib.logic import UADExtensionLogic
    from uad.phantoms import make_phantom

    ev = lambda m, ap: {"heldout": {"n_per_type": 5, "results": {m: {"tumour": ap, "stroke": ap, "ms": ap}}}}  # noqa: E731
    _zoo(tmp_path, monkeypatch, [
        {"id": "a", "methods": ["thor"], "contrast": "T1", "evaluation": ev("thor", 0.40), "file": "a/model.safetensors"},
        {"id": "b", "methods": ["disyre"], "contrast": "T1", "evaluation": ev("disyre", 0.10),
         "file": "b/model.safetensors"},
        {"id": "c", "methods": ["pddpm"], "contrast": "T2", "evaluation": ev("pddpm", 0.90),
         "file": "c/model.safetensors"}])
    scene = slicer.vtkMRMLScene()
    logic = UADExtensionLogic(scene=scene)
    for mid in "abc":  # installed models (the choice only takes models whose weights are here)
        (tmp_path / mid).mkdir()
        (tmp_path / mid / "model.safetensors").write_bytes(b"")
    method, reason = logic.defaultChoice(contrast="T1")
    assert method == "thor" and "0.400" in reason
    assert logic.defaultChoice(contrast="T2")[0] == "pddpm"
    # from a T1 volume node: the contrast is guessed from the image
    import SimpleITK as sitk

    ph = make_phantom(5, "T1", spacing=3.0)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    arr = sitk.GetArrayFromImage(ph.image)
    node.SetSpacing(*ph.image.GetSpacing())
    import vtk
    from vtk.util import numpy_support

    img = vtk.vtkImageData()
    img.SetDimensions(arr.shape[2], arr.shape[1], arr.shape[0])
    img.GetPointData().SetScalars(numpy_support.numpy_to_vtk(arr.ravel().astype("float32"), deep=True))
    node.SetAndObserveImageData(img)
    method, reason = logic.defaultChoice(node)
    assert method == "thor" and "T1" in reason
    _zoo(tmp_path, monkeypatch, [{"id": "d", "methods": ["disyre"], "contrast": "T2"}])
    assert logic.defaultChoice(contrast="T1")[0] == "disyre"  # no measurement: the static rule


def test_gui_texts_and_slider_range(tmp_path, monkeypatch):
    from UADExtensionLib.logic import UADExtensionLogic

    logic = UADExtensionLogic(scene=object())
    entry = {"id": "m", "threshold": {"disyre": 0.0129482075},
             "calibration": {"disyre": {"threshold": 0.0129482075, "quantile": 0.95}}}
    _zoo(tmp_path, monkeypatch, [dict(entry, methods=["disyre"])])
    assert logic.modelEntryData("disyre")["id"] == "m" and logic.modelEntryData("disyre", "m")["id"] == "m"
    assert logic.modelEntryData("disyre", "nope") is None
    r = logic.thresholdSliderRange(None, entry, "disyre")
    assert r["value"] == 0.0129482075 and r["maximum"] >= 2 * r["value"] and r["step"] <= r["maximum"] / 1000
    text = logic.thresholdText(0.0129482075, 42, entry, "disyre")
    assert "0.0129482" in text and "42 anomalous voxels" in text and "healthy false-positive rate 5 %" in text
    assert logic.resolveThreshold("fpr", 0.05, entry, "disyre") == 0.0129482075


def test_engine_warnings_reach_the_result(mrml_scene_logic=None):
    import logging

    from UADExtensionLib.devices import collect_engine_warnings

    with collect_engine_warnings() as msgs:
        logging.getLogger("uad.perceptual").warning("LPIPS (SqueezeNet) is not available:\n  fallback")
        logging.getLogger("uad.perceptual").info("not a warning")
        logging.getLogger("other").warning("not the engine")
    assert msgs == ["LPIPS (SqueezeNet) is not available: fallback"]


NO_KERNEL = "CUDA error: no kernel image is available for execution on the device"


@pytest.fixture
def gpu_without_kernels(monkeypatch):
    """A CUDA build that sees a GPU it has no kernels for (the probe raises "no kernel image")."""
    import torch

    import uad.pipeline

    def probe(dev):
        raise RuntimeError(NO_KERNEL)

    monkeypatch.setattr(uad.pipeline, "_cuda_available", lambda: True)
    monkeypatch.setattr(uad.pipeline, "_probe", probe)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA Future GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (12, 0))
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_80", "sm_90"])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    return probe


def test_explicit_cuda_without_kernels_falls_back_to_the_cpu_and_names_the_gpu(gpu_without_kernels):
    import torch

    import uad.pipeline

    logs = []
    for name in ("cuda", "cuda:0", "auto"):
        assert uad.pipeline.resolve_device(name, log=logs.append) == torch.device("cpu")
    assert len(logs) == 3
    for msg in logs:  # the GPU, its compute capability and what the build supports, then the way out
        assert "has no kernels for the GPU cuda" in msg and "(NVIDIA Future GPU, compute capability 12.0)" in msg
        assert "it supports sm_80 sm_90" in msg and "falling back to the CPU" in msg
    assert "--device cuda was requested" in logs[0] and "--device cuda:0 was requested" in logs[1]
    # other failures of an explicit device are not hidden
    uad.pipeline._probe = lambda dev: (_ for _ in ()).throw(RuntimeError("CUDA error: an illegal memory access"))
    with pytest.raises(uad.UADError, match="cannot run .*illegal memory access"):
        uad.pipeline.resolve_device("cuda")
    # the Slicer side builds the same message from the device probe's JSON
    from UADExtensionLib.devices import no_kernel_message

    info = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "arch_list": ["sm_80", "sm_90"],
            "gpus": [{"index": 0, "name": "NVIDIA Future GPU", "memory_gib": 32.0, "capability": "12.0"}]}
    assert no_kernel_message(info, "cuda") in logs[0]


def test_explicit_cuda_fallback_reaches_the_result_and_the_json_events(gpu_without_kernels, tiny_zoo, make_volume,
                                                                      tmp_path, capsys):
    import SimpleITK as sitk

    import uad.pipeline
    from uad.cli import main

    img, _, _ = make_volume()
    r = uad.pipeline.detect(img, model="tiny-test", device="cuda", params={"steps": 2, "level": 20})
    assert r.info["device"] == "cpu"
    assert any("NVIDIA Future GPU" in w and "falling back to the CPU" in w for w in r.info["warnings"])
    sitk.WriteImage(img, str(tmp_path / "a.nii.gz"))
    rc = main(["detect", str(tmp_path / "a.nii.gz"), "-o", str(tmp_path / "o"), "--model", "tiny-test",
               "--device", "cuda", "--progress-format", "json", "--param", "steps=2", "--param", "level=20"])
    assert rc == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    warned = [e["message"] for e in events if e["event"] == "warning" and "NVIDIA Future GPU" in e["message"]]
    assert warned and "it supports sm_80 sm_90" in warned[0]  # what the Slicer runner shows (run.warnings)
    assert (tmp_path / "o" / "a_anomaly.nii.gz").is_file()
