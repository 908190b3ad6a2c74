"""Live threshold: moving the threshold re-makes the segment from the existing heatmap, with no inference."""

from __future__ import annotations

import numpy as np
import pytest

from test_logic import FAST, _export_segment, mrml, tiny_model, volume_file  # noqa: F401  (fixtures)

slicer = pytest.importorskip("slicer")


@pytest.fixture
def logic(mrml):  # noqa: F811
    from UADExtensionLib.logic import UADExtensionLogic

    return UADExtensionLogic(mrml.scene, segmentationsLogic=mrml.segmentations)


def test_threshold_updates_the_segment_without_any_method_call(mrml, logic, volume_file, tiny_model, monkeypatch):
    import uad.methods
    import uad.pipeline
    from uad.postprocess import threshold_mask

    from UADExtensionLib.logic import UADExtensionLogic

    node = mrml.load(volume_file)
    result = logic.process(node, model=tiny_model, device="cpu", params=FAST)
    heat = np.array(slicer.util.arrayFromVolume(result.heatmapNode), copy=True)
    calls = []

    def forbidden(*a, **k):
        calls.append(a)
        raise AssertionError("inference was called by a threshold change")

    monkeypatch.setattr(uad.pipeline, "detect", forbidden)
    monkeypatch.setattr(uad.methods, "build_method", forbidden)
    monkeypatch.setattr(UADExtensionLogic, "process", forbidden)
    inside = heat[heat > 0]
    counts = []
    for q in (50, 90, 99, 99.9):
        t = float(np.percentile(inside, q))
        n = logic.updateThreshold(result, t)
        seg, lm = _export_segment(mrml, result.segmentationNode, result.segmentId, node)
        mrml.scene.RemoveNode(lm)
        expected = heat > t
        assert n == int(expected.sum()) == int((seg > 0).sum())
        assert np.array_equal(seg > 0, expected)
        assert result.heatmapNode.GetDisplayNode().GetLowerThreshold() == pytest.approx(0.5 * t)
        assert float(result.heatmapNode.GetAttribute("UAD.threshold")) == t  # full precision is kept
        counts.append(n)
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1] > 0
    # a threshold above every score empties the segment (the segment itself stays)
    n_nodes = mrml.scene.GetNumberOfNodes()
    assert logic.updateThreshold(result.heatmapNode, float(heat.max()) + 1.0) == 0
    assert mrml.scene.GetNumberOfNodes() == n_nodes  # the temporary label map is removed again
    seg, lm = _export_segment(mrml, result.segmentationNode, result.segmentId, node)
    mrml.scene.RemoveNode(lm)
    assert not seg.any() and result.segmentationNode.GetSegmentation().GetSegment(result.segmentId) is not None
    assert calls == []
    # same as the run's own mask with the connected-component filter
    result.heatmapNode.SetAttribute("UAD.minComponentSize", "5")
    t = float(np.percentile(inside, 95))
    assert logic.updateThreshold(result, t) == int(threshold_mask(heat, t, 5).sum())


def test_live_threshold_equals_a_run_with_that_threshold(mrml, logic, volume_file, tiny_model):
    node = mrml.load(volume_file)
    first = logic.process(node, model=tiny_model, device="cpu", params=FAST, seed=2)
    heat = slicer.util.arrayFromVolume(first.heatmapNode)
    t = float(np.percentile(heat[heat > 0], 97.3))
    logic.updateThreshold(first, t)
    second = logic.process(node, model=tiny_model, device="cpu", params=FAST, seed=2, threshold=t)
    a, lm1 = _export_segment(mrml, first.segmentationNode, first.segmentId, node)
    b, lm2 = _export_segment(mrml, second.segmentationNode, second.segmentId, node)
    assert np.array_equal(a, b) and a.any()


def test_threshold_modes():
    from UADExtensionLib.thresholding import (calibrated_threshold, fpr_for_threshold, resolve_threshold,
                                              threshold_for_fpr)

    bundled = {"id": "m", "threshold": {"disyre": 0.0129482075},
               "calibration": {"disyre": {"threshold": 0.0129482075, "quantile": 0.95}}}
    assert resolve_threshold("calibrated", None, bundled, "disyre") == 0.0129482075
    assert resolve_threshold("fpr", 0.05, bundled, "disyre") == 0.0129482075  # the calibrated point itself
    with pytest.raises(ValueError, match="5 %"):  # one calibrated point: no other rate can be claimed
        threshold_for_fpr(bundled, "disyre", 0.01)
    assert fpr_for_threshold(bundled, "disyre", 0.0129482075) == pytest.approx(0.05)
    table = {"id": "t", "calibration": {"thor": {"quantiles": {"0.9": 0.10, "0.99": 0.30, "0.999": 0.50}}}}
    assert threshold_for_fpr(table, "thor", 0.01) == pytest.approx(0.30)
    assert threshold_for_fpr(table, "thor", 0.055) == pytest.approx(0.10 + (0.945 - 0.9) / 0.09 * 0.20)
    assert fpr_for_threshold(table, "thor", threshold_for_fpr(table, "thor", 0.02)) == pytest.approx(0.02)
    with pytest.raises(ValueError, match="calibrat"):
        threshold_for_fpr(table, "thor", 0.5)  # outside the table: no extrapolation
    with pytest.raises(ValueError, match="no healthy calibration"):
        threshold_for_fpr({"id": "x"}, "thor", 0.05)
    with pytest.raises(ValueError, match="between 0 and 1"):
        threshold_for_fpr(table, "thor", 5)
    assert resolve_threshold("value", 0.123456789, None, "thor") == 0.123456789
    # per-preset, per-backend records of uad.calibration: the run's own record is used
    rec = lambda t1, t5: {"thresholds": {"0.001": 3 * t1, "0.01": t1, "0.05": t5}}  # noqa: E731
    new = {"id": "n", "calibration": {"thor": {"presets": {"fast": {"ssim-fallback": rec(0.5, 0.2),
                                                                     "lpips": rec(0.9, 0.4)},
                                                            "paper": {"ssim-fallback": rec(0.7, 0.3)}}}}}
    assert resolve_threshold("calibrated", None, new, "thor", "fast", "ssim-fallback") == 0.5
    assert resolve_threshold("calibrated", None, new, "thor", "fast", "lpips") == 0.9
    assert resolve_threshold("calibrated", None, new, "thor", "paper") == 0.7  # its only backend
    assert resolve_threshold("fpr", 0.05, new, "thor", "paper", "ssim-fallback") == pytest.approx(0.3)
    assert threshold_for_fpr(new, "thor", 0.03, "fast", "ssim-fallback") == pytest.approx(0.35)
    assert fpr_for_threshold(new, "thor", 0.35, "fast", "ssim-fallback") == pytest.approx(0.03)
    with pytest.raises(ValueError, match="no healthy calibration"):
        threshold_for_fpr(new, "thor", 0.05, "fast")  # two backends: the run's backend is needed
    presets = {"threshold": {"thor": {"fast": 0.2, "default": 0.3}}}
    assert calibrated_threshold(presets, "thor", "fast") == 0.2
    assert calibrated_threshold(presets, "thor", "paper") == 0.3
    assert calibrated_threshold({"threshold": 0.7}, "anoddpm") == 0.7
    with pytest.raises(ValueError, match="no calibrated"):
        resolve_threshold("calibrated", None, {"id": "x"}, "thor")
    with pytest.raises(ValueError, match="unknown threshold mode"):
        resolve_threshold("magic", 1, bundled, "disyre")


def test_rethreshold_rejects_foreign_nodes(mrml, logic, volume_file):
    node = mrml.load(volume_file)
    with pytest.raises(ValueError, match="not an anomaly heatmap"):
        logic.updateThreshold(node, 0.5)


def test_live_threshold_ignores_calibrations_of_other_weights_or_normalisation():
    """The Slicer side's calibrated threshold and healthy-FPR table refuse a record the engine refuses (other
    weights, or another intensity normalisation than the entry's), without falling back to the entry's
    older one-number threshold."""
    from uad.calibration import normalisation_of

    from UADExtensionLib.thresholding import calibrated_threshold, fpr_for_threshold, healthy_quantiles

    rec = {"thresholds": {"0.01": 0.5, "0.05": 0.2}, "sha256": "ab", "normalisation": normalisation_of({})}
    entry = {"id": "m", "sha256": "ab", "threshold": {"thor": {"fast": 0.5}},
             "calibration": {"thor": {"presets": {"fast": {"ssim-fallback": rec}}}}}
    assert calibrated_threshold(entry, "thor", "fast", "ssim-fallback") == 0.5
    assert fpr_for_threshold(entry, "thor", 0.2, "fast", "ssim-fallback") == pytest.approx(0.05)
    for changed in ({"normalisation": {"clip_max": 2.0}}, {"sha256": "cd"}):
        e = dict(entry, **changed)
        assert calibrated_threshold(e, "thor", "fast", "ssim-fallback") is None
        assert calibrated_threshold(e, "thor", "fast") is None  # the preset's only record, also refused
        assert healthy_quantiles(e, "thor", "fast", "ssim-fallback") == []
