"""Outputs: reused output nodes, lists of inputs, jump point, 3D surface, terminology from the shipped context."""

from __future__ import annotations

import numpy as np
import pytest

from test_logic import FAST, _ids, mrml, tiny_model, volume_file  # noqa: F401  (fixtures)

slicer = pytest.importorskip("slicer")


@pytest.fixture
def logic(mrml):  # noqa: F811
    from UADExtensionLib.logic import UADExtensionLogic

    return UADExtensionLogic(mrml.scene, segmentationsLogic=mrml.segmentations)


def test_output_nodes_are_reused(mrml, logic, volume_file, tiny_model):
    node = mrml.load(volume_file)
    first = logic.process(node, model=tiny_model, device="cpu", params=FAST, seed=0)
    n = mrml.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    nseg = mrml.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    second = logic.process(node, model=tiny_model, device="cpu", params=FAST, seed=5,
                           restorationVolume=first.restorationNode, heatmapVolume=first.heatmapNode,
                           anomalySegmentation=first.segmentationNode)
    assert second.restorationNode is first.restorationNode and second.heatmapNode is first.heatmapNode
    assert second.segmentationNode is first.segmentationNode
    assert mrml.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == n
    assert mrml.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == nseg
    assert second.segmentationNode.GetSegmentation().GetNumberOfSegments() == 1
    assert second.heatmapNode.GetAttribute("UAD.seed") == "5"
    import uad

    with pytest.raises(uad.InputError, match="different nodes"):
        logic.process(node, model=tiny_model, device="cpu", params=FAST, restorationVolume=first.heatmapNode,
                      heatmapVolume=first.heatmapNode)
    with pytest.raises(uad.InputError, match="not a vtkMRMLSegmentationNode"):
        logic.process(node, model=tiny_model, device="cpu", params=FAST, anomalySegmentation=first.heatmapNode)


def test_process_a_list_of_nodes(mrml, logic, volume_file, tiny_model):
    a, b = mrml.load(volume_file, "a"), mrml.load(volume_file, "b")
    results = logic.processNodes([a, b], model=tiny_model, device="cpu", params=FAST)
    assert [r.info["input"] for r in results] == ["a", "b"]
    assert results[0].heatmapNode is not results[1].heatmapNode
    assert np.array_equal(slicer.util.arrayFromVolume(results[0].heatmapNode),
                          slicer.util.arrayFromVolume(results[1].heatmapNode))  # same voxels, same seed
    with pytest.raises(ValueError, match="cannot be shared"):
        logic.processNodes([a, b], model=tiny_model, heatmapVolume=results[0].heatmapNode)


def test_jump_point_show3d_and_terminology(mrml, logic, volume_file, tiny_model):
    from UADExtensionLib.logic import SEGMENT_TERMINOLOGY, TERMINOLOGY_CONTEXT, terminology_file_path
    from UADExtensionLib.nodes import ijk_to_ras

    node = mrml.load(volume_file)
    result = logic.process(node, model=tiny_model, device="cpu", params=FAST)
    heat = np.zeros(slicer.util.arrayFromVolume(result.heatmapNode).shape, np.float32)
    heat[2:5, 5:9, 6:10] = 1.0  # the largest component...
    heat[3, 7, 8] = 3.0         # ...with its strongest voxel
    heat[7, 30, 25] = 10.0      # a stronger single voxel elsewhere (a small component)
    slicer.util.updateVolumeFromArray(result.heatmapNode, heat)
    assert logic.updateThreshold(result, 0.5) == 3 * 4 * 4 + 1
    expected = ijk_to_ras(node) @ np.array([8, 7, 3, 1.0])
    n_nodes = mrml.scene.GetNumberOfNodes()
    assert np.allclose(logic.mostAnomalousPoint(result), expected[:3], atol=1e-6)
    assert mrml.scene.GetNumberOfNodes() == n_nodes  # the temporary export leaves nothing behind
    logic.updateThreshold(result, 100.0)  # empty segment: the maximum of the map
    expected = ijk_to_ras(node) @ np.array([25, 30, 7, 1.0])
    assert np.allclose(logic.mostAnomalousPoint(result), expected[:3], atol=1e-6)

    logic.updateThreshold(result, 0.5)
    logic.show3D(result)
    surface = result.segmentationNode.GetSegmentation().GetSegment(result.segmentId).GetRepresentation("Closed surface")
    assert surface is not None and surface.GetNumberOfPoints() > 0
    assert result.segmentationNode.GetDisplayNode().GetVisibility3D()

    terms = slicer.vtkSlicerTerminologiesModuleLogic()
    assert terms.LoadTerminologyFromFile(str(terminology_file_path())) == TERMINOLOGY_CONTEXT
    segment = result.segmentationNode.GetSegmentation().GetSegment(result.segmentId)
    import vtk

    ref = vtk.reference("")
    assert segment.GetTag(segment.GetTerminologyEntryTagName(), ref)
    tag = str(ref)
    assert tag == SEGMENT_TERMINOLOGY
    entry = slicer.vtkSlicerTerminologyEntry()
    assert terms.DeserializeTerminologyEntry(tag, entry)
    assert entry.GetCategoryObject().GetCodeValue() == "49755003"  # Morphologically Altered Structure
    category = slicer.vtkSlicerTerminologyCategory()
    assert terms.GetNthCategoryInTerminology(TERMINOLOGY_CONTEXT, 0, category)
    assert category.GetCodeValue() == entry.GetCategoryObject().GetCodeValue()
    codes = []
    for i in range(terms.GetNumberOfTypesInTerminologyCategory(TERMINOLOGY_CONTEXT, category)):
        t = slicer.vtkSlicerTerminologyType()
        terms.GetNthTypeInTerminologyCategory(TERMINOLOGY_CONTEXT, category, i, t)
        codes.append((t.GetCodingSchemeDesignator(), t.GetCodeValue(), t.GetCodeMeaning()))
    assert ("SCT", "52988006", "Lesion") == codes[0] and ("SCT", "4147007", "Mass") in codes
    assert (entry.GetTypeObject().GetCodingSchemeDesignator(), entry.GetTypeObject().GetCodeValue(),
            entry.GetTypeObject().GetCodeMeaning()) == codes[0]


def test_engine_warnings_are_kept_in_the_result(mrml, logic, volume_file, tiny_model, monkeypatch):
    import logging

    import uad.pipeline

    real = uad.pipeline.detect

    def detect(*a, **k):
        logging.getLogger("uad.perceptual").warning("LPIPS (SqueezeNet) is not available: SSIM fallback")
        return real(*a, **k)

    monkeypatch.setattr(uad.pipeline, "detect", detect)
    node = mrml.load(volume_file)
    result = logic.process(node, model=tiny_model, device="cpu", params=FAST)
    assert "LPIPS (SqueezeNet) is not available: SSIM fallback" in result.info["warnings"]


def test_every_volume_of_a_sequence(mrml, logic, volume_file, tiny_model):
    import vtk

    node = mrml.load(volume_file)
    arr = np.array(slicer.util.arrayFromVolume(node), copy=True)
    seq = mrml.scene.AddNewNodeByClass("vtkMRMLSequenceNode", "series")
    seq.SetIndexName("time")
    seq.SetIndexUnit("s")
    for value, scale in (("0", 1.0), ("10", 1.5)):
        item = slicer.vtkMRMLScalarVolumeNode()
        item.CopyOrientation(node)
        slicer.util.updateVolumeFromArray(item, (arr * scale).astype(arr.dtype))
        seq.SetDataNodeAtValue(item, value)
    item0 = np.array(slicer.util.arrayFromVolume(seq.GetNthDataNode(0)), copy=True)
    before = _ids(mrml.scene)
    out = logic.processSequence(seq, model=tiny_model, device="cpu", params=FAST)
    added = [i for i in _ids(mrml.scene) if i not in before]
    assert sorted(mrml.scene.GetNodeByID(i).GetClassName() for i in added
                  if not mrml.scene.GetNodeByID(i).IsA("vtkMRMLColorTableNode")) == ["vtkMRMLSequenceNode"] * 3
    for role in ("restoration", "anomaly", "segmentation"):
        s = out[role]
        assert s.GetNumberOfDataNodes() == 2 and [s.GetNthIndexValue(i) for i in range(2)] == ["0", "10"]
        assert s.GetIndexName() == "time" and s.GetIndexUnit() == "s"
    assert out["segmentation"].GetNthDataNode(1).IsA("vtkMRMLSegmentationNode")
    # item 0 equals a plain run on the same volume; the input sequence is unchanged
    ref = logic.process(node, model=tiny_model, device="cpu", params=FAST)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(out["anomaly"].GetNthDataNode(0)),
                                  slicer.util.arrayFromVolume(ref.heatmapNode))
    assert np.array_equal(slicer.util.arrayFromVolume(seq.GetNthDataNode(0)), item0)
    m0, m1 = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    out["anomaly"].GetNthDataNode(1).GetIJKToRASMatrix(m0)
    node.GetIJKToRASMatrix(m1)
    assert all(abs(m0.GetElement(r, c) - m1.GetElement(r, c)) < 1e-9 for r in range(4) for c in range(4))
