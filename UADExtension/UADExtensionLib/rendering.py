"""Headless picture of a result as Slicer's slice view composes it (used for the extension's screenshot).

The slice image comes from ``vtkMRMLSliceLogic``, the same reslice-and-blend pipeline that
feeds Slicer's slice views: the input as background with its window/level, the heatmap as
foreground through its own colour table, window and transparency threshold, at the
foreground opacity, and the anomaly segment as a label layer drawn as an outline
(``SetUseLabelOutline``).  What is *not* Slicer's own is the colour legend beside it (drawn
with Pillow from the heatmap's colour table and window) and the text: the Qt view widget
and its OpenGL annotations need a display.

    python -m UADExtensionLib.rendering -o Screenshot.png [--method disyre] [--model ID] [--device cpu]

runs the bundled sample through the background runner (``uad detect`` in a subprocess),
loads the nodes into a slicer-core scene and writes the picture (slicer-core, Pillow).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

ORIENTATIONS = ("Axial", "Sagittal", "Coronal")


def headless_scene():
    """(scene, applicationLogic, logics) set up as the Slicer application does (Colors, Volumes, Segmentations)."""
    import slicer

    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    app.GetColorLogic().SetMRMLScene(scene)
    app.GetColorLogic().AddDefaultColorNodes()
    logics = {}
    for name, cls in (("Colors", slicer.vtkMRMLColorLogic), ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
                      ("Volumes", slicer.vtkSlicerVolumesLogic)):
        lg = cls()
        lg.SetMRMLScene(scene)
        lg.SetMRMLApplicationLogic(app)
        app.SetModuleLogic(name, lg)
        logics[name] = lg
    return scene, app, logics


def _label_layer(logic, result):
    """A label map of the anomaly segment with a one-entry colour table in the segment's colour."""
    import slicer
    import slicer.util

    from .nodes import set_volume_from_array

    scene = logic.scene
    mask = logic._segmentArray(result)
    if mask is None:
        return None, None
    colors = slicer.vtkMRMLColorTableNode()
    colors.SetTypeToUser()
    colors.SetNumberOfColors(2)
    colors.SetColor(0, 0.0, 0.0, 0.0, 0.0)
    r, g, b = result.segmentationNode.GetSegmentation().GetSegment(result.segmentId).GetColor()
    colors.SetColor(1, r, g, b, 1.0)
    colors.SetName("UAD outline colours")
    scene.AddNode(colors)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "UAD outline")
    set_volume_from_array(labelmap, mask.astype(np.uint8), result.heatmapNode)
    labelmap.CreateDefaultDisplayNodes()
    labelmap.GetDisplayNode().SetAndObserveColorNodeID(colors.GetID())
    return labelmap, colors


def render_slice(app, background, foreground=None, label=None, foreground_opacity: float = 0.5,
                 orientation: str = "Axial", center_ras=None, size: int = 512, outline: bool = True) -> np.ndarray:
    """(size, size, 4) uint8 RGBA of one slice view, top row first."""
    import slicer
    from vtk.util.numpy_support import vtk_to_numpy

    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {ORIENTATIONS}")
    from .nodes import node_ids, remove_nodes_not_in

    scene = app.GetMRMLScene()
    before = node_ids(scene)
    sliceNode = scene.AddNewNodeByClass("vtkMRMLSliceNode", "UAD render view")
    sliceLogic = slicer.vtkMRMLSliceLogic()
    try:
        sliceNode.SetLayoutName("UADRender")
        sliceNode.SetOrientation(orientation)
        sliceNode.SetDimensions(int(size), int(size), 1)
        sliceNode.SetUseLabelOutline(bool(outline))
        sliceLogic.SetMRMLApplicationLogic(app)
        sliceLogic.SetMRMLScene(scene)
        sliceLogic.SetSliceNode(sliceNode)
        comp = sliceLogic.GetSliceCompositeNode()
        comp.SetBackgroundVolumeID(background.GetID())
        comp.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
        comp.SetForegroundOpacity(float(foreground_opacity))
        comp.SetLabelVolumeID(label.GetID() if label is not None else None)
        comp.SetLabelOpacity(1.0)
        sliceLogic.FitSliceToAll()
        if center_ras is not None:
            sliceNode.JumpSliceByOffsetting(*[float(c) for c in center_ras])
        producer = sliceLogic.GetImageDataConnection().GetProducer()
        producer.Update()
        image = producer.GetOutputDataObject(0)
        w, h, _ = image.GetDimensions()
        rgba = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(h, w, -1)
        return np.ascontiguousarray(rgba[::-1, :, :4]).astype(np.uint8)
    finally:
        sliceLogic.SetMRMLScene(None)
        remove_nodes_not_in(scene, before)  # the view, its composite / display nodes


def legend_colors(heatmapNode, n: int = 256) -> tuple[np.ndarray, float, float]:
    """(n, 4) RGBA of the heatmap's colour table over its display window, and the window's (min, max)."""
    display = heatmapNode.GetDisplayNode()
    table = display.GetColorNode().GetLookupTable()
    lo, hi = display.GetWindowLevelMin(), display.GetWindowLevelMax()
    k = table.GetNumberOfTableValues()
    idx = np.clip(np.round(np.linspace(0, k - 1, n)).astype(int), 0, k - 1)
    rgba = np.array([table.GetTableValue(int(i)) for i in idx])
    return rgba, float(lo), float(hi)


def compose_figure(views: list, heatmapNode, title: str, threshold: float | None = None):
    """The slice views side by side with a colour legend (Pillow image)."""
    from PIL import Image, ImageDraw, ImageFont

    h = views[0].shape[0]
    legend_w, pad, top = 110, 8, 34
    width = sum(v.shape[1] for v in views) + pad * (len(views) + 1) + legend_w
    canvas = Image.new("RGB", (width, h + top + pad), (24, 24, 28))
    x = pad
    for v in views:
        canvas.paste(Image.fromarray(v[..., :3]), (x, top))
        x += v.shape[1] + pad
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    draw.text((pad, 10), title, fill=(235, 235, 235), font=font)
    rgba, lo, hi = legend_colors(heatmapNode)
    bar_top, bar_h, bar_x = top + 20, h - 60, x + 10
    for i in range(bar_h):
        c = rgba[int((bar_h - 1 - i) / max(1, bar_h - 1) * (len(rgba) - 1))]
        draw.line([(bar_x, bar_top + i), (bar_x + 22, bar_top + i)],
                  fill=tuple(int(255 * c[j] * c[3] + 40 * (1 - c[3])) for j in range(3)))
    draw.text((bar_x, top + 2), "anomaly", fill=(235, 235, 235), font=font)
    for frac in (0.0, 0.5, 1.0):
        y = bar_top + int((1 - frac) * (bar_h - 1))
        draw.line([(bar_x + 22, y), (bar_x + 27, y)], fill=(235, 235, 235))
        draw.text((bar_x + 30, y - 5), f"{lo + frac * (hi - lo):.3g}", fill=(235, 235, 235), font=font)
    if threshold is not None and hi > lo and lo <= threshold <= hi:
        y = bar_top + int((1 - (threshold - lo) / (hi - lo)) * (bar_h - 1))
        draw.line([(bar_x - 4, y), (bar_x + 26, y)], fill=(51, 255, 102), width=2)
        draw.text((bar_x - 8, y - 16), "threshold", fill=(51, 255, 102), font=font)
    return canvas


def render_result(logic, app, result, inputNode, size: int = 384, foreground_opacity: float = 0.5):
    """(views, threshold): axial, sagittal and coronal views through the most anomalous point."""
    from .nodes import node_ids, remove_nodes_not_in

    center = logic.mostAnomalousPoint(result)
    before = node_ids(logic.scene)
    try:
        label, _colors = _label_layer(logic, result)
        views = [render_slice(app, inputNode, result.heatmapNode, label, foreground_opacity, o, center, size)
                 for o in ORIENTATIONS]
    finally:
        remove_nodes_not_in(logic.scene, before)
    t = result.heatmapNode.GetAttribute("UAD.threshold")
    return views, (float(t) if t else None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m UADExtensionLib.rendering", description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--method", default="disyre")
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=384)
    args = parser.parse_args(argv)

    from uad.imageio import sample_paths

    from .logic import UADExtensionLogic
    from .runner import BackgroundRun

    scene, app, logics = headless_scene()
    logic = UADExtensionLogic(scene, segmentationsLogic=logics["Segmentations"])
    paths = sample_paths()
    node = logics["Volumes"].AddArchetypeVolume(str(paths["image"]), "UAD T2 tumour phantom", 0, None)
    node.GetDisplayNode().AutoWindowLevelOn()
    mask_node = None
    if "brain_mask" in paths:
        mask_node = logics["Volumes"].AddArchetypeVolume(str(paths["brain_mask"]), "brain mask", 1, None)
    run = BackgroundRun(logic, node, method=args.method, model=args.model, device=args.device, brainMaskNode=mask_node)
    result = run.start().wait()
    views, t = render_result(logic, app, result, node, size=args.size)
    info = result.info
    title = (f"3D Slicer slice views (headless vtkMRMLSliceLogic): {info.get('method')} / {info.get('model')} on the "
             f"bundled T2 sample - heatmap over the input, anomaly segment outline; "
             f"{run.tracker.total} slices in {info.get('elapsed_total_s', 0):.0f} s (background process)")
    compose_figure(views, result.heatmapNode, title, t).save(args.output)
    print(f"wrote {args.output}: threshold {t:.6g} ({info.get('threshold_source')}), "
          f"{info.get('anomalous_voxels')} anomalous voxels")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
