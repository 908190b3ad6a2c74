"""Headless slice rendering (vtkMRMLSliceLogic) of a result: heatmap over the input, segment outline, legend."""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
sitk = pytest.importorskip("SimpleITK")


def test_render_shows_heatmap_and_outline_where_they_are(tmp_path):
    from UADExtensionLib.logic import UADExtensionLogic
    from UADExtensionLib.rendering import compose_figure, headless_scene, render_result, render_slice

    scene, app, logics = headless_scene()
    logic = UADExtensionLogic(scene, segmentationsLogic=logics["Segmentations"])
    z, y, x = np.meshgrid(np.arange(20), np.arange(64), np.arange(64), indexing="ij")
    img = sitk.GetImageFromArray((300 + 2 * x).astype(np.float32))  # grey ramp
    img.SetSpacing((1.0, 1.0, 2.0))
    path = tmp_path / "in.nrrd"
    sitk.WriteImage(img, str(path))
    node = logics["Volumes"].AddArchetypeVolume(str(path), "input", 0, None)
    ball = ((x - 40) ** 2 + (y - 24) ** 2 + ((z - 10) * 2) ** 2) < 10 ** 2
    heat = sitk.GetImageFromArray(np.where(ball, 1.0, 0.0).astype(np.float32))
    heat.CopyInformation(img)
    mask = sitk.GetImageFromArray(ball.astype(np.uint8))
    mask.CopyInformation(img)
    result = logic.buildOutputs(node, img, heat, mask, {"threshold": 0.5, "threshold_source": "explicit"},
                                method="test")
    n_before = scene.GetNumberOfNodes()
    views, t = render_result(logic, app, result, node, size=128)
    assert scene.GetNumberOfNodes() == n_before and t == 0.5  # temporary view and label nodes removed
    axial = views[0].astype(int)
    plain = render_slice(app, node, size=128).astype(int)  # background only
    assert axial.shape == plain.shape == (128, 128, 4)
    differs = np.abs(axial[..., :3] - plain[..., :3]).sum(-1) > 30
    # the coloured region is where the ball is, and nowhere far from it
    ys, xs = np.nonzero(differs)
    assert differs.sum() > 100
    cy, cx = ys.mean(), xs.mean()
    # background only is grey (R == G == B); the overlay is not
    assert np.all(plain[..., 0] == plain[..., 1])
    r, g, b = (axial[..., i] for i in range(3))
    outline = (g > r + 60) & (g > b + 30)  # the segment's green outline
    inside = differs & ~outline
    assert outline.sum() > 20 and inside.sum() > 20
    # the outline surrounds the filled part: its centroid is the region's centroid, and it lies farther out
    oy, ox = np.nonzero(outline)
    iy, ix = np.nonzero(inside)
    assert abs(oy.mean() - cy) < 6 and abs(ox.mean() - cx) < 6
    assert np.hypot(oy - cy, ox - cx).mean() > np.hypot(iy - cy, ix - cx).mean()
    fig = compose_figure(views, result.heatmapNode, "test", t)
    assert fig.size[0] > 3 * 128 and fig.size[1] > 128
    fig.save(tmp_path / "fig.png")
