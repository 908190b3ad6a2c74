"""UADExtensionLogic on a real slicer-core MRML scene (no Slicer application, no Qt, no mocks of MRML).

The scene is set up as in the Slicer application: application logic, colour
logic registered as "Colors", Volumes and Segmentations module logics.  Volumes
are loaded from NIfTI files (written with SimpleITK, oblique, anisotropic, off
origin) through vtkSlicerVolumesLogic.AddArchetypeVolume, like File > Add Data.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "UADExtension"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

slicer = pytest.importorskip("slicer", reason="slicer-core is needed for the MRML tests (pip install slicer-core)")
sitk = pytest.importorskip("SimpleITK")

FAST = {"steps": 3, "level": 50}
SPACING = (0.9, 1.1, 2.5)  # x, y, z mm
ORIGIN = (12.5, -30.25, 7.0)
ANGLE = 0.3  # rotation about z (radians): an oblique in-plane direction


def _direction(angle=ANGLE):
    c, s = math.cos(angle), math.sin(angle)
    return (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)


def _brain_array(shape_zyx=(10, 36, 32), seed=0, lesion=True, dtype=np.int16):
    """Skull-stripped-looking volume: textured ellipsoid, 0 outside, optional bright ball."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape_zyx
    z, y, x = np.meshgrid(np.linspace(-1, 1, nz), np.linspace(-1, 1, ny), np.linspace(-1, 1, nx), indexing="ij")
    r2 = (z / 0.85) ** 2 + (y / 0.85) ** 2 + (x / 0.85) ** 2
    brain = r2 < 1
    img = 400 + 150 * np.cos(3 * np.sqrt(r2)) + 25 * rng.standard_normal(shape_zyx)
    if lesion:
        ball = (z - 0.1) ** 2 + (y + 0.3) ** 2 + (x - 0.3) ** 2 < 0.25 ** 2
        img = np.where(ball & brain, 900, img)
    return np.where(brain, img, 0).astype(dtype)


def _write_volume(path, arr, spacing=SPACING, origin=ORIGIN, direction=None):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction or _direction())
    sitk.WriteImage(img, str(path))
    return path


def _matrix(node):
    from UADExtensionLib.nodes import ijk_to_ras

    return ijk_to_ras(node)


def _ids(scene):
    from UADExtensionLib.nodes import node_ids

    return node_ids(scene)


# -- fixtures -------------------------------------------------------------------
@pytest.fixture
def mrml():
    """A scene with the logics the Slicer application registers (slicer.md section 7.3)."""
    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    app.GetColorLogic().SetMRMLScene(scene)
    app.GetColorLogic().AddDefaultColorNodes()
    colors = slicer.vtkMRMLColorLogic()
    colors.SetMRMLScene(scene)
    colors.SetMRMLApplicationLogic(app)
    app.SetModuleLogic("Colors", colors)
    segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations.SetMRMLScene(scene)
    segmentations.SetMRMLApplicationLogic(app)
    app.SetModuleLogic("Segmentations", segmentations)
    volumes = slicer.vtkSlicerVolumesLogic()
    volumes.SetMRMLScene(scene)
    volumes.SetMRMLApplicationLogic(app)
    app.SetModuleLogic("Volumes", volumes)
    ns = SimpleNamespace(scene=scene, app=app, colors=colors, segmentations=segmentations, volumes=volumes)

    def load(path, name="input"):
        node = volumes.AddArchetypeVolume(str(path), name, 0, None)
        assert node is not None, f"could not load {path}"
        return node

    ns.load = load
    yield ns
    scene.Clear(1)


@pytest.fixture(scope="module")
def volume_file(tmp_path_factory):
    return _write_volume(tmp_path_factory.mktemp("vol") / "brain.nii.gz", _brain_array())


@pytest.fixture(scope="module")
def tiny_model():
    """A tiny random-weight AnoDDPM model (32 x 32), built in memory."""
    import torch

    import uad.networks
    import uad.zoo
    from uad.methods import get_method_class

    config = get_method_class("anoddpm").default_model_config(image_size=32)
    config["networks"]["denoiser"] = uad.networks.tiny_unet_config((8, 16, 16))
    torch.manual_seed(0)
    return uad.zoo.build_model(config, model_id="tiny-logic-test")


@pytest.fixture
def logic(mrml):
    from UADExtensionLib.logic import UADExtensionLogic

    return UADExtensionLogic(mrml.scene, segmentationsLogic=mrml.segmentations)


def _export_segment(mrml, segmentation_node, segment_id, reference):
    """The segment as a label map on ``reference``'s grid: (array, labelmap node); caller removes the node."""
    import vtk

    labelmap = mrml.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "export")
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    assert mrml.segmentations.ExportSegmentsToLabelmapNode(segmentation_node, ids, labelmap, reference)
    arr = np.array(slicer.util.arrayFromVolume(labelmap), copy=True)
    return arr, labelmap


# -- imports ----------------------------------------------------------------------
def test_lib_logic_imports_without_qt_torch_or_pipeline():
    """The adapter must import in plain Python with slicer-core only (and in Slicer before torch exists)."""
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None   # importing torch now raises ImportError
        sys.modules["monai"] = None
        sys.path.insert(0, {str(MODULE_DIR)!r})
        import UADExtensionLib.logic as L
        import UADExtensionLib.nodes, UADExtensionLib.colors, UADExtensionLib.progress, UADExtensionLib.dependencies
        bad = [m for m in ("qt", "ctk", "slicer.app", "uad.pipeline", "uad.methods") if m in sys.modules]
        assert not bad, bad
        print(",".join(L.UADExtensionLogic.availableMethods()))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    # without torch the engine's registry cannot load: the static list, in GUI order
    assert out.stdout.strip().splitlines()[-1] == "thor,autoddpm,pddpm,disyre,wolleb,anoddpm"


def test_available_methods_follow_the_engine_registry():
    from uad.methods import available_methods

    from UADExtensionLib.logic import STATIC_METHODS, UADExtensionLogic

    names = UADExtensionLogic.availableMethods()
    assert sorted(names) == sorted(available_methods())
    known = [m for m in STATIC_METHODS if m in names]
    assert names[:len(known)] == known  # GUI order first, then anything new
    presets, default = UADExtensionLogic.presetsForMethod("anoddpm")
    assert "paper" in presets and "fast" in presets and default in presets
    assert UADExtensionLogic.presetsForMethod("no-such-method") == ([], None)


# -- node <-> SimpleITK -------------------------------------------------------------
def test_volume_node_to_sitk_matches_the_file(mrml, volume_file):
    from UADExtensionLib.nodes import volume_node_to_sitk

    node = mrml.load(volume_file)
    ref = sitk.ReadImage(str(volume_file))
    img = volume_node_to_sitk(node)
    assert img.GetSize() == ref.GetSize() == (32, 36, 10)
    np.testing.assert_allclose(img.GetSpacing(), SPACING, atol=1e-5)
    np.testing.assert_allclose(img.GetOrigin(), ORIGIN, atol=1e-4)
    np.testing.assert_allclose(img.GetDirection(), _direction(), atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(ref))
    # a copy: changing the image does not touch the node
    before = np.array(slicer.util.arrayFromVolume(node), copy=True)
    img[0, 0, 0] = 12345
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), before)
    # RAS = diag(-1,-1,1) LPS: the node's IJK->RAS agrees with the LPS geometry
    m = _matrix(node)
    lps = np.diag([-1, -1, 1.0]) @ m[:3, :3]
    np.testing.assert_allclose(lps, np.array(_direction()).reshape(3, 3) * np.array(SPACING), atol=1e-5)
    np.testing.assert_allclose(np.diag([-1, -1, 1.0]) @ m[:3, 3], ORIGIN, atol=1e-4)


def test_sitk_to_array_on_grid_rejects_other_grids(mrml, volume_file):
    from UADExtensionLib.nodes import sitk_to_array_on_grid, volume_node_to_sitk

    node = mrml.load(volume_file)
    img = volume_node_to_sitk(node)
    np.testing.assert_array_equal(sitk_to_array_on_grid(img, node), slicer.util.arrayFromVolume(node))
    shifted = sitk.Image(img)
    shifted.SetOrigin(tuple(o + 5.0 for o in img.GetOrigin()))
    with pytest.raises(RuntimeError, match="grid"):
        sitk_to_array_on_grid(shifted, node)
    with pytest.raises(RuntimeError, match="size"):
        sitk_to_array_on_grid(img[:, :, :5], node)


# -- process --------------------------------------------------------------------------
def test_process_builds_three_nodes_on_the_input_grid(mrml, logic, volume_file, tiny_model):
    from uad.pipeline import detect

    from UADExtensionLib.colors import HEAT_TABLE_ATTRIBUTE, HEAT_TABLE_KIND
    from UADExtensionLib.nodes import volume_node_to_sitk

    node = mrml.load(volume_file)
    before_array = np.array(slicer.util.arrayFromVolume(node), copy=True)
    before_matrix = _matrix(node)
    n_before = mrml.scene.GetNumberOfNodes()
    calls = []
    result = logic.process(node, method="anoddpm", model=tiny_model, device="cpu", seed=3, params=FAST,
                           batchSize=4, progressCallback=lambda d, t: calls.append((d, t)))
    info = result.info

    # the same run straight through the engine: the nodes carry exactly its arrays
    ref = detect(volume_node_to_sitk(node), method="anoddpm", model=tiny_model, device="cpu", seed=3,
                 params=FAST, batch_size=4)
    rest = slicer.util.arrayFromVolume(result.restorationNode)
    heat = slicer.util.arrayFromVolume(result.heatmapNode)
    np.testing.assert_array_equal(rest, sitk.GetArrayFromImage(ref.restoration))
    np.testing.assert_array_equal(heat, sitk.GetArrayFromImage(ref.anomaly))
    mask = sitk.GetArrayFromImage(ref.mask) > 0
    assert info["threshold"] == pytest.approx(ref.info["threshold"])

    # three new nodes (+ their display nodes and the colour table), all in the scene
    for out in result:
        assert mrml.scene.GetNodeByID(out.GetID()) is out
    assert result.restorationNode.IsA("vtkMRMLScalarVolumeNode")
    assert result.heatmapNode.IsA("vtkMRMLScalarVolumeNode")
    assert result.segmentationNode.IsA("vtkMRMLSegmentationNode")
    assert mrml.scene.GetNumberOfNodes() == n_before + 7  # 3 nodes, 3 display nodes, 1 colour table

    # geometry: same dimensions and IJK->RAS as the input
    dims = node.GetImageData().GetDimensions()
    for out in (result.restorationNode, result.heatmapNode):
        assert out.GetImageData().GetDimensions() == dims
        np.testing.assert_allclose(_matrix(out), before_matrix, atol=1e-9)

    # heatmap display: own heat table, window and transparency threshold
    display = result.heatmapNode.GetDisplayNode()
    color = display.GetColorNode()
    assert color is not None and color.GetAttribute(HEAT_TABLE_ATTRIBUTE) == HEAT_TABLE_KIND
    assert color.GetNumberOfColors() == 256
    assert display.GetApplyThreshold()
    thr = info["threshold"]
    assert display.GetLowerThreshold() == pytest.approx(0.5 * thr, rel=1e-6)
    assert display.GetUpperThreshold() >= float(heat.max())
    assert not display.GetAutoWindowLevel()
    assert display.GetWindowLevelMin() == pytest.approx(0.0, abs=1e-9)
    assert display.GetWindowLevelMax() >= 1.25 * thr * (1 - 1e-6)

    # segmentation: one segment "Anomaly" whose voxels are exactly the mask
    segmentation = result.segmentationNode.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 1
    segment = segmentation.GetSegment(result.segmentId)
    assert segment.GetName() == "Anomaly"
    assert "SCT^52988006^Lesion" in segment.GetTerminology()
    exported, labelmap = _export_segment(mrml, result.segmentationNode, result.segmentId, node)
    assert labelmap.GetImageData().GetDimensions() == dims
    np.testing.assert_allclose(_matrix(labelmap), before_matrix, atol=1e-6)
    assert int(mask.sum()) > 0
    assert int((exported > 0).sum()) == int(mask.sum()) == info["anomalous_voxels"]
    np.testing.assert_array_equal(exported > 0, mask)
    mrml.scene.RemoveNode(labelmap)
    ref_geom = result.segmentationNode.GetNodeReference(result.segmentationNode.GetReferenceImageGeometryReferenceRole())
    assert ref_geom is node

    # progress: batches of 4 slices, ending at the slice count
    total = info["slices"]
    assert calls and calls[-1] == (total, total)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert len(calls) == math.ceil(total / 4)

    # bookkeeping attributes and info
    assert result.heatmapNode.GetAttribute("UAD.role") == "anomaly"
    assert result.segmentationNode.GetAttribute("UAD.method") == "anoddpm"
    assert result.restorationNode.GetAttribute("UAD.inputNodeID") == node.GetID()
    assert result.heatmapNode.GetAttribute("UAD.model") == "tiny-logic-test"
    assert float(result.heatmapNode.GetAttribute("UAD.threshold")) == pytest.approx(thr)
    assert info["model"] == "tiny-logic-test" and info["input"] == "input"

    # the input is untouched
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), before_array)
    np.testing.assert_array_equal(_matrix(node), before_matrix)


def test_restoration_gets_the_input_window_level(mrml, logic, volume_file, tiny_model):
    node = mrml.load(volume_file)
    display = node.GetDisplayNode()
    assert display is not None
    display.AutoWindowLevelOff()
    display.SetWindowLevel(321.0, 456.0)
    result = logic.process(node, model=tiny_model, device="cpu", params=FAST)
    out = result.restorationNode.GetDisplayNode()
    assert not out.GetAutoWindowLevel()
    assert (out.GetWindow(), out.GetLevel()) == pytest.approx((321.0, 456.0))
    assert out.GetColorNodeID() == display.GetColorNodeID()


def test_heat_table_is_shared_and_transparent_at_the_low_end(mrml, logic, volume_file, tiny_model):
    from UADExtensionLib.colors import HEAT_TABLE_ATTRIBUTE, heat_rgba

    node = mrml.load(volume_file)
    first = logic.process(node, model=tiny_model, device="cpu", params=FAST)
    second = logic.process(node, model=tiny_model, device="cpu", params=FAST, seed=1)
    tables = [mrml.scene.GetNthNodeByClass(i, "vtkMRMLColorTableNode")
              for i in range(mrml.scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode"))]
    ours = [t for t in tables if t.GetAttribute(HEAT_TABLE_ATTRIBUTE)]
    assert len(ours) == 1
    assert first.heatmapNode.GetDisplayNode().GetColorNodeID() == ours[0].GetID()
    assert second.heatmapNode.GetDisplayNode().GetColorNodeID() == ours[0].GetID()
    assert first.heatmapNode.GetName() != second.heatmapNode.GetName()  # unique names
    rgba = [0.0] * 4
    ours[0].GetColor(0, rgba)
    assert rgba[3] == pytest.approx(0.0)
    ours[0].GetColor(255, rgba)
    assert rgba[3] == pytest.approx(1.0) and rgba[0] > 0.9 and rgba[1] > 0.9  # bright yellow end
    ramp = heat_rgba()
    assert ramp.shape == (256, 4)
    assert np.all(np.diff(ramp[:, :3].sum(axis=1)) > -1e-9)  # brightness never decreases
    assert np.all(np.diff(ramp[:, 3]) >= 0)


def test_empty_mask_still_gives_an_anomaly_segment(mrml, logic, volume_file, tiny_model):
    node = mrml.load(volume_file)
    result = logic.process(node, model=tiny_model, device="cpu", params=FAST, threshold=1e9)
    assert result.info["anomalous_voxels"] == 0
    segment = result.segmentationNode.GetSegmentation().GetSegment(result.segmentId)
    assert segment.GetName() == "Anomaly"
    exported, labelmap = _export_segment(mrml, result.segmentationNode, result.segmentId, node)
    assert int((exported > 0).sum()) == 0
    assert result.heatmapNode.GetDisplayNode().GetLowerThreshold() == pytest.approx(0.5e9)


def test_brain_mask_node_is_used(mrml, logic, volume_file, tiny_model, tmp_path):
    node = mrml.load(volume_file)
    brain = (_brain_array(lesion=False) > 0).astype(np.uint8)
    brain[:, :, :16] = 0  # only the right half: nothing outside it may be anomalous
    mask_node = mrml.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "brain mask")
    mask_node.CopyOrientation(node)
    slicer.util.updateVolumeFromArray(mask_node, brain)
    result = logic.process(node, model=tiny_model, device="cpu", params=FAST, brainMaskNode=mask_node)
    assert result.info["preprocess"]["brain_mask"] == "given"
    heat = slicer.util.arrayFromVolume(result.heatmapNode)
    assert float(heat[brain == 0].max()) == 0.0
    assert float(heat[brain > 0].max()) > 0.0


def test_outputs_follow_the_input_transform_and_subject_hierarchy(mrml, logic, volume_file, tiny_model):
    import vtk

    node = mrml.load(volume_file)
    transform = mrml.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    m = vtk.vtkMatrix4x4()
    m.SetElement(0, 3, 15.0)
    m.SetElement(2, 3, -4.0)
    transform.SetMatrixTransformToParent(m)
    node.SetAndObserveTransformNodeID(transform.GetID())
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(mrml.scene)
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "patient")
    study = sh.CreateStudyItem(patient, "study")
    sh.CreateItem(study, node)

    result = logic.process(node, model=tiny_model, device="cpu", params=FAST)
    for out in result:
        assert out.GetTransformNodeID() == transform.GetID()
        assert sh.GetItemParent(sh.GetItemByDataNode(out)) == study
    # the transform did not make the import resample: the segment is still the mask, voxel for voxel
    exported, labelmap = _export_segment(mrml, result.segmentationNode, result.segmentId, node)
    heat = slicer.util.arrayFromVolume(result.heatmapNode)
    assert int((exported > 0).sum()) == result.info["anomalous_voxels"] > 0
    assert np.all(heat[exported > 0] > result.info["threshold"])


def test_model_by_id_from_the_zoo(mrml, logic, volume_file, tiny_model, tmp_path, monkeypatch):
    from uad.zoo import save_weights

    digest = save_weights(tiny_model, tmp_path / "tiny.safetensors")
    entry = dict(tiny_model.config, id="tiny-zoo-logic", file="tiny.safetensors", sha256=digest,
                 methods=["anoddpm"], threshold=0.05)
    (tmp_path / "manifest.json").write_text(json.dumps({"models": [entry]}))
    monkeypatch.setenv("UAD_MODELS_DIR", str(tmp_path))
    monkeypatch.setenv("UAD_CACHE_DIR", str(tmp_path / "cache"))
    from UADExtensionLib.logic import UADExtensionLogic

    assert "tiny-zoo-logic" in [e.id for e in UADExtensionLogic.modelsForMethod("anoddpm")]
    assert "tiny-zoo-logic" not in [e.id for e in UADExtensionLogic.modelsForMethod("disyre")]
    node = mrml.load(volume_file)
    result = logic.process(node, method="anoddpm", model="tiny-zoo-logic", device="cpu", params=FAST)
    assert result.info["model"] == "tiny-zoo-logic"
    assert result.info["threshold"] == pytest.approx(0.05)  # the model's calibrated threshold
    assert result.heatmapNode.GetAttribute("UAD.model") == "tiny-zoo-logic"
    heat = slicer.util.arrayFromVolume(result.heatmapNode)
    exported, _ = _export_segment(mrml, result.segmentationNode, result.segmentId, node)
    assert result.info["anomalous_voxels"] == int((exported > 0).sum()) > 0
    assert np.all(heat[exported > 0] > 0.05)  # the mask is the heatmap above the model's threshold


def test_bundled_sample_with_its_brain_mask(mrml, logic, tiny_model):
    """What UADExtensionTest does inside Slicer: the bundled sample, loaded like File > Add Data."""
    from uad.imageio import sample_paths

    paths = sample_paths()
    node = mrml.load(paths["image"], "sample")
    brain_node = mrml.volumes.AddArchetypeVolume(str(paths["brain_mask"]), "sample brain", 1, None)  # 1: label map
    assert brain_node.IsA("vtkMRMLLabelMapVolumeNode")
    before = np.array(slicer.util.arrayFromVolume(node), copy=True)
    result = logic.process(node, method="anoddpm", model=tiny_model, device="cpu", params=FAST, batchSize=32,
                           brainMaskNode=brain_node)
    dims = node.GetImageData().GetDimensions()
    assert dims == (132, 156, 126)
    for out in (result.restorationNode, result.heatmapNode):
        assert out.GetImageData().GetDimensions() == dims
        np.testing.assert_allclose(_matrix(out), _matrix(node), atol=1e-9)
    brain = slicer.util.arrayFromVolume(brain_node) > 0
    heat = slicer.util.arrayFromVolume(result.heatmapNode)
    assert float(heat[~brain].max()) == 0.0 and float(heat[brain].max()) > 0.0
    exported, _ = _export_segment(mrml, result.segmentationNode, result.segmentId, node)
    assert int((exported > 0).sum()) == result.info["anomalous_voxels"] > 0
    assert not (exported[~brain] > 0).any()
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), before)


# -- failures leave the scene as it was ------------------------------------------------
def test_nan_volume_fails_and_leaves_the_scene_unchanged(mrml, logic, tiny_model, tmp_path):
    import uad

    arr = _brain_array(dtype=np.float32)
    arr[4, 10, 10] = np.nan
    node = mrml.load(_write_volume(tmp_path / "nan.nrrd", arr), "nan")  # (NIfTI I/O drops NaN)
    assert np.isnan(slicer.util.arrayFromVolume(node)).sum() == 1
    ids = _ids(mrml.scene)
    with pytest.raises(uad.InputError, match="NaN"):
        logic.process(node, model=tiny_model, device="cpu", params=FAST)
    assert _ids(mrml.scene) == ids


@pytest.mark.parametrize("how", ["callable", "event"])
def test_cancel_leaves_the_scene_unchanged(mrml, logic, volume_file, tiny_model, how):
    import uad

    node = mrml.load(volume_file)
    ids = _ids(mrml.scene)
    calls = []
    if how == "callable":
        cancel = lambda: bool(calls)  # noqa: E731  cancel after the first batch
    else:
        cancel = threading.Event()
    progress = lambda d, t: (calls.append((d, t)), cancel.set() if how == "event" else None)  # noqa: E731
    with pytest.raises(uad.Cancelled):
        logic.process(node, model=tiny_model, device="cpu", params=FAST, batchSize=2, progressCallback=progress,
                      cancel=cancel)
    assert calls[0][0] == 2 and len(calls) == 1  # stopped before the second batch
    assert _ids(mrml.scene) == ids


def test_failure_while_building_nodes_is_rolled_back(mrml, logic, volume_file, tiny_model, monkeypatch):
    from UADExtensionLib.colors import find_heat_color_node
    from UADExtensionLib.logic import UADExtensionLogic

    node = mrml.load(volume_file)
    kept = logic.process(node, model=tiny_model, device="cpu", params=FAST)  # creates the shared heat table
    ids = _ids(mrml.scene)
    original = UADExtensionLogic._addSegmentation

    def failing(self, *args, **kwargs):
        original(self, *args, **kwargs)  # the segmentation node exists now, then something breaks
        raise RuntimeError("disk full")

    monkeypatch.setattr(UADExtensionLogic, "_addSegmentation", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        logic.process(node, model=tiny_model, device="cpu", params=FAST)
    assert _ids(mrml.scene) == ids  # nothing new; the earlier results and the shared table are kept
    for out in kept:
        assert mrml.scene.GetNodeByID(out.GetID()) is out
    monkeypatch.undo()

    # a failing first-ever run removes the colour table it created, too
    for out in kept:
        mrml.scene.RemoveNode(out)
    mrml.scene.RemoveNode(find_heat_color_node(mrml.scene))
    clean = _ids(mrml.scene)
    monkeypatch.setattr(UADExtensionLogic, "_addSegmentation", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        logic.process(node, model=tiny_model, device="cpu", params=FAST)
    assert _ids(mrml.scene) == clean
    assert find_heat_color_node(mrml.scene) is None


def test_invalid_inputs_are_rejected_before_anything_runs(mrml, logic, volume_file, tiny_model):
    import uad

    node = mrml.load(volume_file)
    labelmap = mrml.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    labelmap.CopyOrientation(node)
    slicer.util.updateVolumeFromArray(labelmap, np.ones((10, 36, 32), np.uint8))
    empty = mrml.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    other_scene = slicer.vtkMRMLScene()
    foreign = other_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "foreign")
    slicer.util.updateVolumeFromArray(foreign, _brain_array())
    ids = _ids(mrml.scene)
    for bad, message in ((None, "no input"), (labelmap, "label map"), (empty, "no voxels"),
                         (foreign, "not in this logic's scene")):
        with pytest.raises(uad.InputError, match=message):
            logic.process(bad, model=tiny_model, device="cpu", params=FAST)
    with pytest.raises(uad.UADError, match="preset"):
        logic.process(node, model=tiny_model, device="cpu", preset="no-such-preset")
    assert _ids(mrml.scene) == ids


def test_logic_without_explicit_segmentations_logic(tmp_path, volume_file, tiny_model):
    """Headless with only a scene: the logic gets the segmentation converters registered itself."""
    from UADExtensionLib.logic import UADExtensionLogic

    scene = slicer.vtkMRMLScene()
    volumes = slicer.vtkSlicerVolumesLogic()
    volumes.SetMRMLScene(scene)
    node = volumes.AddArchetypeVolume(str(volume_file), "input", 0, None)
    logic = UADExtensionLogic(scene)
    result = logic.process(node, model=tiny_model, device="cpu", params=FAST)
    assert result.segmentationNode.GetSegmentation().GetSegment(result.segmentId).GetName() == "Anomaly"
    with pytest.raises(RuntimeError, match="no MRML scene"):
        UADExtensionLogic().scene  # noqa: B018  slicer-core has no slicer.mrmlScene


# -- helpers ---------------------------------------------------------------------------------
def test_heat_display_range_numbers():
    from UADExtensionLib.logic import heat_display_range

    a = np.zeros(1000)
    a[:100] = np.linspace(0.01, 1.0, 100)
    r = heat_display_range(a, 0.4)
    assert r["window_min"] == 0.0
    assert r["window_max"] == pytest.approx(np.percentile(a[:100], 99.5))
    assert r["lower"] == pytest.approx(0.2)
    assert r["upper"] >= 1.0
    r = heat_display_range(a, 2.0)  # threshold above the data: window stretched to 1.25 x threshold
    assert r["window_max"] == pytest.approx(2.5) and r["lower"] == pytest.approx(1.0)
    r = heat_display_range(a, None)  # no threshold: transparent below 10 % of the window
    assert r["lower"] == pytest.approx(0.1 * r["window_max"])
    r = heat_display_range(np.zeros(10), None)
    assert r["window_max"] == 1.0 and r["lower"] == pytest.approx(0.1)


def test_progress_tracker_rate_and_eta():
    from UADExtensionLib.progress import ProgressTracker, format_duration

    now = [100.0]
    tracker = ProgressTracker(clock=lambda: now[0])
    assert tracker.eta is None and tracker.text() == "0/0 slices"
    now[0] = 103.0  # model loading: not counted in the rate
    tracker.update(0, 100)
    assert tracker.rate is None and tracker.eta is None
    now[0] = 113.0
    tracker.update(20, 100)
    assert tracker.rate == pytest.approx(2.0)
    assert tracker.eta == pytest.approx(40.0)
    assert tracker.fraction == pytest.approx(0.2)
    assert tracker.text() == "20/100 slices, 2.0 slices/s, about 0:40 left"
    now[0] = 153.0
    tracker.update(100, 100)
    assert tracker.eta == 0.0 and tracker.text().startswith("100/100 slices")
    assert "left" not in tracker.text()
    assert tracker.elapsed == pytest.approx(53.0)
    slow = ProgressTracker(clock=lambda: now[0])
    slow.update(0, 10)
    now[0] += 8.0
    slow.update(2, 10)
    assert slow.text() == "2/10 slices, 4.0 s/slice, about 0:32 left"
    assert format_duration(3725) == "1:02:05" and format_duration(9.4) == "0:09" and format_duration(-3) == "0:00"
