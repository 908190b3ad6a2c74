"""The background runner against the real ``uad detect`` command (tiny model, slicer-core scene).

The child is this interpreter running ``-m uad.cli detect --progress-format json``, as
PythonSlicer does inside Slicer.  Wrapper scripts stand in for the interpreter where a
failure must be provoked (out of memory, a crash by a signal).
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from test_logic import FAST, _ids, mrml, volume_file  # noqa: F401  (fixtures)

slicer = pytest.importorskip("slicer")

TINY = "tiny-test"  # conftest.tiny_zoo


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _wrapper(tmp_path, name: str, body: str):
    """An executable standing in for the Python interpreter."""
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


@pytest.fixture
def logic(mrml):  # noqa: F811
    from UADExtensionLib.logic import UADExtensionLogic

    return UADExtensionLogic(mrml.scene, segmentationsLogic=mrml.segmentations)


# -- pure parts ----------------------------------------------------------------------------------
def test_event_lines_and_command_line():
    from UADExtensionLib.runner import build_detect_command, parse_event_line

    assert parse_event_line('{"event": "progress", "done": 4, "total": 10}') == {"event": "progress", "done": 4,
                                                                                   "total": 10}
    for other in ("", "input.nrrd: 10 slices", "{not json", '{"no_event": 1}', "[1, 2]"):
        assert parse_event_line(other) is None
    cmd = build_detect_command("in.nrrd", "out", "disyre", model="m1", device="cpu", seed=3, preset="fast",
                               threshold=0.0123456789, batch_size=4, params={"steps": 3, "sampler": "ddim",
                                                                             "flag": True}, python="py")
    assert cmd[:5] == ["py", "-m", "uad.cli", "detect", "in.nrrd"]
    joined = " ".join(cmd)
    for part in ("--method disyre", "--model m1", "--device cpu", "--seed 3", "--preset fast", "--batch-size 4",
                 "--progress-format json", "--param steps=3", "--param sampler=ddim", "--param flag=true",
                 "--threshold 0.0123456789"):
        assert part in joined, part
    # the engine parses the parameters back to the same values
    from uad.cli import parse_params

    params = parse_params([cmd[i + 1] for i, c in enumerate(cmd) if c == "--param"])
    assert params == {"steps": 3, "sampler": "ddim", "flag": True}


def test_kill_process_tree_kills_grandchildren(tmp_path):
    from UADExtensionLib.runner import BackgroundProcess

    code = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
            " print(c.pid, flush=True); time.sleep(60)")
    proc = BackgroundProcess([sys.executable, "-c", code])
    proc.start()
    deadline = time.monotonic() + 30
    lines = []
    while not lines and time.monotonic() < deadline:
        lines = [ln for s, ln in proc.lines() if s == "out"]
        time.sleep(0.05)
    child = int(lines[0])
    assert _alive(proc.pid) and _alive(child)
    proc.kill()
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(proc.pid) and not _alive(child)
    assert proc.returncode() == -signal.SIGKILL


# -- against the real engine ------------------------------------------------------------------------
def test_background_run_equals_in_process_run_and_halves_the_batch_on_oom(mrml, logic, volume_file, tiny_zoo,
                                                                           tmp_path):
    """Progress is parsed; out of memory (simulated at batch 4) retries with batch 2; the nodes equal process()."""
    from UADExtensionLib.runner import DONE, BackgroundRun

    node = mrml.load(volume_file)
    before = _ids(mrml.scene)
    oom = _wrapper(tmp_path, "python-oom", f"""\
        case " $* " in
          *" --batch-size 4 "*) echo "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB" >&2; exit 1;;
        esac
        exec "{sys.executable}" "$@"
        """)
    events = []
    run = BackgroundRun(logic, node, method="anoddpm", model=TINY, device="cpu", seed=1, params=FAST, batchSize=4,
                        threads=1, python=oom, onEvent=events.append)
    run.start()
    tmp = run.temporaryFolder
    assert tmp.is_dir() and _ids(mrml.scene) == before  # nothing in the scene while it runs
    bg = run.wait(timeout=300)
    assert run.state == DONE and not tmp.exists()
    kinds = [e["event"] for e in events]
    assert kinds[0] == "retry" and events[0]["batch_size"] == 2 and run.batchSize == 2
    progress = [(e["done"], e["total"]) for e in events if e["event"] == "progress"]
    n = progress[-1][1]
    assert n == bg.info["slices"] >= 4  # slices with brain, along the acquisition axis
    assert [d for d, _ in progress] == list(range(2, n + 1, 2)) + ([n] if n % 2 else [])
    assert run.tracker.done == n and run.tracker.rate is not None and "slices" in run.tracker.text()
    assert kinds.index("result") > kinds.index("progress") and kinds[-1] == "done"
    assert bg.info["background_process"] and bg.info["batch_size"] == 2

    ref = logic.process(node, method="anoddpm", model=TINY, device="cpu", seed=1, params=FAST, batchSize=2,
                        threads=1)
    for a, b in ((bg.restorationNode, ref.restorationNode), (bg.heatmapNode, ref.heatmapNode)):
        x, y = slicer.util.arrayFromVolume(a), slicer.util.arrayFromVolume(b)
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
        from UADExtensionLib.nodes import ijk_to_ras

        np.testing.assert_allclose(ijk_to_ras(a), ijk_to_ras(b), atol=1e-9)
    assert bg.info["threshold"] == pytest.approx(ref.info["threshold"], rel=1e-6)
    assert bg.info["anomalous_voxels"] == ref.info["anomalous_voxels"] > 0
    for r in (bg, ref):
        seg = r.segmentationNode.GetSegmentation().GetSegment(r.segmentId)
        assert seg.GetName() == "Anomaly"
    assert bg.heatmapNode.GetDisplayNode().GetColorNodeID() == ref.heatmapNode.GetDisplayNode().GetColorNodeID()


def test_cancel_kills_the_engine_and_leaves_the_scene_as_it_was(mrml, logic, volume_file, tiny_zoo):
    from UADExtensionLib.runner import CANCELLED, BackgroundRun

    node = mrml.load(volume_file)
    before = _ids(mrml.scene)
    run = BackgroundRun(logic, node, method="anoddpm", model=TINY, device="cpu", params={"steps": 40, "level": 200},
                        batchSize=1, threads=1)
    run.start()
    tmp, pid = run.temporaryFolder, run.process.pid
    deadline = time.monotonic() + 240
    while run.poll() and run.tracker.done == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert run.tracker.done >= 1 and run.tracker.done < run.tracker.total  # it was really working
    run.cancel()
    assert run.state == CANCELLED and not _alive(pid) and not tmp.exists()
    assert not run.poll()
    assert _ids(mrml.scene) == before
    import uad

    with pytest.raises(uad.Cancelled):
        run.wait()


def test_engine_errors_and_crashes_are_reported_and_contained(mrml, logic, volume_file, tiny_zoo, tmp_path):
    from UADExtensionLib.runner import FAILED, BackgroundRun

    node = mrml.load(volume_file)
    before = _ids(mrml.scene)
    # a crash by a signal after one progress line (stands in for a segfault in a GPU driver)
    crash = _wrapper(tmp_path, "python-crash", """\
        echo '{"event": "progress", "done": 1, "total": 10}'
        echo 'Fatal Python error: Segmentation fault' >&2
        kill -SEGV $$
        """)
    run = BackgroundRun(logic, node, method="anoddpm", model=TINY, device="cpu", python=crash)
    run.start()
    tmp = run.temporaryFolder
    with pytest.raises(RuntimeError, match="crashed"):
        run.wait(timeout=60)
    assert run.state == FAILED and run.tracker.done == 1 and "Segmentation fault" in run.error
    assert not tmp.exists() and _ids(mrml.scene) == before
    # "no kernel image" is recognised, and the message offers the CPU
    nokernel = _wrapper(tmp_path, "python-nokernel", """\
        echo 'torch.AcceleratorError: CUDA error: no kernel image is available for execution on the device' >&2
        exit 1
        """)
    run = BackgroundRun(logic, node, method="anoddpm", model=TINY, device="cuda", python=nokernel)
    run.start()
    with pytest.raises(RuntimeError):
        run.wait(timeout=60)
    assert run.failureKind == "no_kernel_image" and "cpu" in run.error.lower()
    assert _ids(mrml.scene) == before
    with pytest.raises(TypeError):
        BackgroundRun(logic, node, model=object())


def test_mps_is_probed_before_use_on_macos(mrml, logic, volume_file):  # noqa: F811
    from UADExtensionLib.runner import BackgroundRun

    node = mrml.load(volume_file)
    run = BackgroundRun(logic, node, device="auto")
    broken = lambda: {"mps_available": True, "mps_works": False, "mps_error": "NotImplementedError"}  # noqa: E731
    fine = lambda: {"mps_available": True, "mps_works": True}  # noqa: E731
    assert run._checkedDevice("auto", platform="darwin", probe=broken) == "cpu"
    assert "NotImplementedError" in run.warnings[-1] and "CPU" in run.warnings[-1]
    assert run._checkedDevice("mps", platform="darwin", probe=fine) == "mps"
    assert run._checkedDevice("auto", platform="linux", probe=broken) == "auto"  # no probe off macOS
    assert run._checkedDevice("cuda", platform="darwin", probe=broken) == "cuda"


def test_cli_json_events_carry_progress_warnings_and_results(tiny_zoo, tmp_path, capsys, monkeypatch):
    """``uad detect --progress-format json``: the event stream the runner reads (in-process here)."""
    import json
    import logging

    import SimpleITK as sitk

    import uad.pipeline
    from uad.cli import main
    from UADExtensionLib.runner import parse_event_line

    rng = np.random.default_rng(0)
    arr = (400 + 50 * rng.standard_normal((6, 40, 40))).astype(np.float32)  # not skull-stripped: no zero background
    path = tmp_path / "head.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))
    real = uad.pipeline.detect

    def detect(*a, **k):  # an engine warning logged during the run (as the SSIM fallback is)
        logging.getLogger("uad.perceptual").warning("LPIPS (SqueezeNet) is not available: fallback")
        return real(*a, **k)

    monkeypatch.setattr(uad.pipeline, "detect", detect)
    rc = main(["detect", str(path), "-o", str(tmp_path / "out"), "--model", TINY, "--method", "anoddpm",
               "--device", "cpu", "--batch-size", "4", "--param", "steps=2", "--param", "level=20",
               "--progress-format", "json"])
    assert rc == 0
    events = [e for e in (parse_event_line(l) for l in capsys.readouterr().out.splitlines()) if e]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "result"
    progress = [e for e in events if e["event"] == "progress"]
    assert [p["done"] for p in progress] == [4, 6] and all(p["total"] == 6 for p in progress)
    warnings = [e for e in events if e["event"] == "warning"]
    assert any("skull-stripped" in w["message"] and w["source"] == "preprocess" for w in warnings)
    assert any("LPIPS" in w["message"] and w["source"] == "uad.perceptual" for w in warnings)
    result = events[-1]
    assert result["info"]["slices"] == 6 and isinstance(result["info"]["threshold"], float)
    for kind in ("restoration", "anomaly", "mask"):
        assert Path(result["outputs"][kind]).is_file()
    json.dumps(result)  # plain JSON all the way
