"""The Logic's in-process ``process(precision=...)`` reaches the engine (info and the same map as detect)."""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is needed for the MRML tests (pip install slicer-core)")

from test_logic import FAST, logic, mrml, tiny_model, volume_file  # noqa: E402,F401 - shared fixtures


def test_logic_process_passes_precision(mrml, logic, volume_file, tiny_model):  # noqa: F811
    from uad.pipeline import detect

    from UADExtensionLib.nodes import volume_node_to_sitk

    node = mrml.load(volume_file)
    result = logic.process(node, method="anoddpm", model=tiny_model, device="cpu", seed=3, params=FAST,
                           batchSize=4, precision="bf16")
    assert result.info["precision"] == "bf16"
    ref = detect(volume_node_to_sitk(node), method="anoddpm", model=tiny_model, device="cpu", seed=3,
                 params=FAST, batch_size=4, precision="bf16")
    heat = slicer.util.arrayFromVolume(result.heatmapNode)
    import SimpleITK as sitk

    assert np.array_equal(heat, sitk.GetArrayFromImage(ref.anomaly))
