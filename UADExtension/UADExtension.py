"""Anomaly Detection (UAD): unsupervised anomaly detection in brain MRI with diffusion models.

Slicer scripted module: Module, Widget, Logic and Test classes.  The work is
done by the Qt-free engine ``uad`` (torch, MONAI) through the Qt-free MRML
adapter ``UADExtensionLib.logic``; this file only adds the GUI, dependency
installation and the Slicer-specific display.

Nothing heavy is imported at module level: torch, MONAI and ``uad.pipeline``
are imported when the user presses Apply, after the dependencies were checked
(and, with the user's consent, installed).

Python console::

    logic = slicer.util.getModuleLogic("UADExtension")   # or UADExtension.UADExtensionLogic()
    result = logic.process(getNode("MRBrainTumor1"), method="thor")
    logic.showResult(result)
"""

from __future__ import annotations

import importlib
import logging
import os

import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

try:  # Slicer >= 5.4
    from slicer.i18n import tr as _
    from slicer.i18n import translate
except ImportError:  # pragma: no cover - older Slicer
    def _(text):
        return text

    def translate(context, text):
        return text

from UADExtensionLib.logic import DEVICES, UADResult  # noqa: F401  (UADResult re-exported for the console)
from UADExtensionLib.logic import UADExtensionLogic as _UADExtensionCoreLogic

REFERENCES = [
    ("THOR", "C. I. Bercea, B. Wiestler, D. Rueckert, J. A. Schnabel. Diffusion Models with Implicit Guidance "
             "for Medical Anomaly Detection. MICCAI 2024."),
    ("AutoDDPM", "C. I. Bercea, M. Neumayr, D. Rueckert, J. A. Schnabel. Mask, Stitch, and Re-Sample: Enhancing "
                 "Robustness and Generalizability in Anomaly Detection through Automatic Diffusion Models. "
                 "ICML 2023 Workshop on Interpretable ML in Healthcare."),
    ("pDDPM", "F. Behrendt, D. Bhattacharya, J. Krüger, R. Opfer, A. Schlaefer. Patched Diffusion Models for "
              "Unsupervised Anomaly Detection in Brain MRI. MIDL 2023."),
    ("DISYRE", "S. Naval Marimont, V. Siomos, M. Baugh, C. Tzelepis, B. Kainz, G. Tarroni. DISYRE: "
               "Diffusion-Inspired SYnthetic REstoration for Unsupervised Anomaly Detection. ISBI 2024."),
    ("Wolleb et al.", "J. Wolleb, F. Bieder, R. Sandkühler, P. C. Cattin. Diffusion Models for Medical Anomaly "
                      "Detection. MICCAI 2022."),
    ("AnoDDPM", "J. Wyatt, A. Leach, S. M. Schmon, C. G. Willcocks. AnoDDPM: Anomaly Detection with Denoising "
                "Diffusion Probabilistic Models using Simplex Noise. CVPR Workshops 2022."),
    ("MONAI Generative", "W. H. L. Pinaya et al. Generative AI for Medical Imaging: extending the MONAI "
                         "Framework. arXiv:2307.15208, 2023."),
]


#
# UADExtension
#


class UADExtension(ScriptedLoadableModule):
    """Module description shown in the Slicer GUI."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Anomaly Detection (UAD)")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []  # PyTorch (extension dependency) is only needed when running
        self.parent.contributors = ["UADExtension developers"]
        self.parent.helpText = _(
            "Unsupervised anomaly detection in brain MRI with diffusion models. Select a skull-stripped "
            "brain MRI volume (or give a brain mask), a method (THOR, AutoDDPM, pDDPM, DISYRE, Wolleb et al., "
            "AnoDDPM) and a model, then press Apply. The module creates a pseudo-healthy restoration, an "
            "anomaly heatmap (shown over the input) and an 'Anomaly' segmentation, all on the input's grid. "
            "Research use only: not for clinical decisions. "
            "Python: <code>logic = slicer.util.getModuleLogic('UADExtension'); "
            "result = logic.process(volumeNode, method='thor')</code>.")
        self.parent.acknowledgementText = _(
            "Methods re-implemented from their publications: ") + " ".join(
            f"{name}: {ref}" for name, ref in REFERENCES)
        app = getattr(slicer, "app", None)  # absent when the file is imported outside the application
        if app is not None:
            app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """Offer the bundled synthetic T2 tumour phantom in the Sample Data module (no download: a file:// URI)."""
    try:
        import SampleData
        from uad.imageio import sample_paths

        image = sample_paths()["image"]
        icon = os.path.join(os.path.dirname(__file__), "Resources", "Icons", "UADExtension.png")
        checksum = "SHA256:" + slicer.util.computeChecksum("SHA256", str(image))  # a changed file replaces the cached copy
        SampleData.SampleDataLogic.registerCustomSampleDataSource(
            category="Anomaly detection (UAD)",
            sampleName="UADT2TumourPhantom",
            uris=image.resolve().as_uri(),
            fileNames=image.name,
            nodeNames="UAD T2 tumour phantom",
            thumbnailFileName=icon,
            loadFileType="VolumeFile",
            checksums=checksum,
        )
    except Exception as e:  # never break Slicer's startup for a sample
        logging.warning(f"UAD: sample data not registered: {e}")


#
# UADExtensionWidget
#


class UADExtensionWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI of the module."""

    PARAMETERS = {  # parameter-node key -> default (strings)
        "Method": "thor",
        "Model": "",
        "Preset": "",
        "Device": "auto",
        "Seed": "0",
        "BatchSize": "16",
        "OverrideThreshold": "false",
        "Threshold": "0.1",
    }

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._updatingGUIFromParameterNode = False
        self._running = False
        self._cancelRequested = False
        self._tracker = None
        self.lastResult = None

    # -- setup ----------------------------------------------------------------
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/UADExtension.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = UADExtensionLogic()

        self.ui.progressBar.hide()
        self.ui.deviceComboBox.clear()
        for device in DEVICES:
            self.ui.deviceComboBox.addItem(device, device)
        self._populateMethods()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.inputSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.ui.brainMaskSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.ui.methodComboBox.connect("currentIndexChanged(int)", self.onMethodChanged)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.presetComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.seedSpinBox.connect("valueChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.batchSizeSpinBox.connect("valueChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.thresholdOverrideCheckBox.connect("toggled(bool)", self.updateParameterNodeFromGUI)
        self.ui.thresholdSliderWidget.connect("valueChanged(double)", self.updateParameterNodeFromGUI)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)

        self.initializeParameterNode()

    def _populateMethods(self) -> None:
        combo = self.ui.methodComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for name in self.logic.availableMethods():
            combo.addItem(self.logic.methodTitle(name), name)
        combo.blockSignals(wasBlocked)
        self._populateMethodDependents(self._currentMethod())

    def _currentMethod(self) -> str:
        return self.ui.methodComboBox.currentData or ""

    def _populateMethodDependents(self, method: str) -> None:
        """Model and preset lists of ``method``."""
        import qt

        models = self.logic.modelsForMethod(method)
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        if models:
            combo.addItem(_("(default model for the method)"), "")
            for entry in models:
                combo.addItem(entry.id, entry.id)
                combo.setItemData(combo.count - 1, entry.data.get("description", ""), qt.Qt.ToolTipRole)
        else:
            combo.addItem(_("(no model installed for this method)"), None)
        combo.blockSignals(wasBlocked)

        presets, default = self.logic.presetsForMethod(method)
        combo = self.ui.presetComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        combo.addItem(_("(method default: {preset})").format(preset=default) if default else _("(method default)"), "")
        for preset in presets:
            combo.addItem(preset, preset)
        combo.blockSignals(wasBlocked)

        self.ui.methodDescriptionLabel.text = self._methodDescription(method, bool(models))

    def _methodDescription(self, method: str, hasModels: bool) -> str:
        try:
            from uad.methods import get_method_class

            cls = get_method_class(method)
            text = f"{cls.title} ({cls.reference})" if cls.reference else cls.title
        except Exception:  # engine not installed yet
            text = self.logic.methodTitle(method)
        if not hasModels:
            text += " " + _("No trained model for this method was found; train or import one (see the documentation).")
        return text

    def cleanup(self) -> None:
        self._cancelRequested = True
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event) -> None:
        if self._running:
            self._cancelRequested = True
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # -- parameter node ---------------------------------------------------------
    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.GetNodeReference("InputVolume"):
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume and not firstVolume.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.SetNodeReferenceID("InputVolume", firstVolume.GetID())

    def setParameterNode(self, inputParameterNode) -> None:
        if inputParameterNode:
            self.logic.setDefaultParameters(inputParameterNode)
        if self._parameterNode is not None:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode is not None:
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self.updateGUIFromParameterNode()

    @staticmethod
    def _selectData(combo, data) -> None:
        index = combo.findData(data)
        if index >= 0:
            combo.setCurrentIndex(index)

    def updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        if self._parameterNode is None or self._updatingGUIFromParameterNode:
            return
        self._updatingGUIFromParameterNode = True
        try:
            p = self._parameterNode
            self.ui.inputSelector.setCurrentNode(p.GetNodeReference("InputVolume"))
            self.ui.brainMaskSelector.setCurrentNode(p.GetNodeReference("BrainMask"))
            method = p.GetParameter("Method")
            if method and method != self._currentMethod():
                self._selectData(self.ui.methodComboBox, method)
                self._populateMethodDependents(self._currentMethod())
            self._selectData(self.ui.modelComboBox, p.GetParameter("Model"))
            self._selectData(self.ui.presetComboBox, p.GetParameter("Preset"))
            self._selectData(self.ui.deviceComboBox, p.GetParameter("Device") or "auto")
            self.ui.seedSpinBox.value = int(p.GetParameter("Seed") or 0)
            self.ui.batchSizeSpinBox.value = int(p.GetParameter("BatchSize") or 16)
            self.ui.thresholdOverrideCheckBox.checked = slicer.util.toBool(p.GetParameter("OverrideThreshold") or "false")
            self.ui.thresholdSliderWidget.value = float(p.GetParameter("Threshold") or 0.1)
            self._updateApplyButton()
        finally:
            self._updatingGUIFromParameterNode = False

    def updateParameterNodeFromGUI(self, caller=None, event=None) -> None:
        if self._parameterNode is None or self._updatingGUIFromParameterNode:
            return
        p = self._parameterNode
        wasModified = p.StartModify()
        try:
            p.SetNodeReferenceID("InputVolume", self.ui.inputSelector.currentNodeID)
            p.SetNodeReferenceID("BrainMask", self.ui.brainMaskSelector.currentNodeID)
            p.SetParameter("Method", self._currentMethod())
            p.SetParameter("Model", self.ui.modelComboBox.currentData or "")
            p.SetParameter("Preset", self.ui.presetComboBox.currentData or "")
            p.SetParameter("Device", self.ui.deviceComboBox.currentData or "auto")
            p.SetParameter("Seed", str(self.ui.seedSpinBox.value))
            p.SetParameter("BatchSize", str(self.ui.batchSizeSpinBox.value))
            p.SetParameter("OverrideThreshold", "true" if self.ui.thresholdOverrideCheckBox.checked else "false")
            p.SetParameter("Threshold", repr(float(self.ui.thresholdSliderWidget.value)))
        finally:
            p.EndModify(wasModified)
        self._updateApplyButton()

    def onMethodChanged(self, index=None) -> None:
        if self._updatingGUIFromParameterNode:
            return
        self._populateMethodDependents(self._currentMethod())
        self.updateParameterNodeFromGUI()

    def _updateApplyButton(self) -> None:
        if self._running:
            return
        hasInput = self.ui.inputSelector.currentNode() is not None
        hasModel = self.ui.modelComboBox.currentData is not None
        self.ui.applyButton.enabled = hasInput and hasModel
        if not hasInput:
            self.ui.applyButton.toolTip = _("Select an input volume.")
        elif not hasModel:
            self.ui.applyButton.toolTip = _("No model is available for the selected method.")
        else:
            self.ui.applyButton.toolTip = _("Run the anomaly detection.")

    # -- run ----------------------------------------------------------------------
    def _setRunning(self, running: bool) -> None:
        self._running = running
        for w in (self.ui.inputsCollapsibleButton, self.ui.methodCollapsibleButton, self.ui.advancedCollapsibleButton):
            w.enabled = not running
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        self.ui.applyButton.toolTip = _("Stop after the current batch of slices.") if running else _("Run the anomaly detection.")
        self.ui.applyButton.enabled = True
        if running:
            self.ui.progressBar.setRange(0, 0)  # busy until the first batch reports
            self.ui.progressBar.show()
        else:
            self.ui.progressBar.hide()
            self._updateApplyButton()

    def onApplyButton(self) -> None:
        if self._running:
            self._cancelRequested = True
            self.ui.applyButton.enabled = False
            self.ui.statusLabel.text = _("Cancelling after the current batch of slices...")
            return
        with slicer.util.tryWithErrorDisplay(_("Anomaly detection failed."), waitCursor=False):
            self.ui.statusLabel.text = _("Checking Python packages...")
            slicer.app.processEvents()
            if not self.logic.setupPythonRequirements():
                self.ui.statusLabel.text = _("The required Python packages are not installed.")
                return
            self._run()

    def _run(self) -> None:
        from uad import Cancelled

        from UADExtensionLib.progress import ProgressTracker

        inputVolume = self.ui.inputSelector.currentNode()
        override = self.ui.thresholdOverrideCheckBox.checked
        self._cancelRequested = False
        self._tracker = ProgressTracker()
        self._setRunning(True)
        self.ui.statusLabel.text = _("Loading the model and preparing the slices...")
        slicer.app.processEvents()
        try:
            result = self.logic.process(
                inputVolume,
                method=self._currentMethod(),
                model=self.ui.modelComboBox.currentData or None,
                device=self.ui.deviceComboBox.currentData or "auto",
                preset=self.ui.presetComboBox.currentData or None,
                seed=int(self.ui.seedSpinBox.value),
                threshold=float(self.ui.thresholdSliderWidget.value) if override else None,
                batchSize=int(self.ui.batchSizeSpinBox.value),
                brainMaskNode=self.ui.brainMaskSelector.currentNode(),
                progressCallback=self._onProgress,
                cancel=lambda: self._cancelRequested,
            )
        except Cancelled:
            self.ui.statusLabel.text = _("Cancelled; nothing was added to the scene.")
            return
        except Exception as e:
            self.ui.statusLabel.text = _("Failed: {error}").format(error=" ".join(str(e).split()))
            raise
        finally:
            self._setRunning(False)
        self.lastResult = result
        self.logic.showResult(result, inputVolume)
        info = result.info
        self.ui.statusLabel.text = _(
            "Done in {seconds:.1f} s: {voxels} anomalous voxels (threshold {threshold:.4g}, {source}); "
            "{slices} slices on {device}.").format(
            seconds=info.get("elapsed_total_s", 0.0), voxels=info.get("anomalous_voxels", 0),
            threshold=float(info.get("threshold") or 0.0), source=info.get("threshold_source", ""),
            slices=info.get("slices", "?"), device=info.get("device", "?"))
        if not override and info.get("threshold") is not None:  # start point for a manual override
            threshold = float(info["threshold"])
            slider = self.ui.thresholdSliderWidget
            slider.maximum = max(slider.maximum, 2.0 * threshold)
            slider.value = threshold

    def _onProgress(self, done: int, total: int) -> None:
        tracker = self._tracker
        tracker.update(done, total)
        self.ui.progressBar.setRange(0, max(1, int(total)))
        self.ui.progressBar.setValue(int(done))
        self.ui.statusLabel.text = tracker.text()
        slicer.app.processEvents()  # keeps the GUI alive and lets Cancel be clicked


#
# UADExtensionLogic
#


class UADExtensionLogic(ScriptedLoadableModuleLogic, _UADExtensionCoreLogic):
    """The Qt-free ``UADExtensionLib.logic.UADExtensionLogic`` with Slicer's parameter node,
    dependency installation and slice-view display.

    ``process(...)`` is inherited (see ``UADExtensionLib.logic``)::

        logic = UADExtensionLogic()
        result = logic.process(volumeNode, method="thor", device="auto", seed=0)
    """

    def __init__(self, scene=None, segmentationsLogic=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        _UADExtensionCoreLogic.__init__(self, scene=scene, segmentationsLogic=segmentationsLogic)

    def setDefaultParameters(self, parameterNode) -> None:
        defaults = dict(UADExtensionWidget.PARAMETERS)
        if not parameterNode.GetParameter("Method"):  # prefer a method that has a trained model
            withModel = [m for m in self.availableMethods() if self.modelsForMethod(m)]
            if withModel:
                defaults["Method"] = withModel[0]
        for key, value in defaults.items():
            if not parameterNode.GetParameter(key):
                parameterNode.SetParameter(key, value)

    # -- dependencies -------------------------------------------------------------
    def setupPythonRequirements(self, askConfirmation: bool = True) -> bool:
        """Make sure torch and the engine's packages are importable; True when they are.

        torch comes from the PyTorch extension (PyTorchUtils picks the CUDA build);
        the rest is pip-installed.  Asks first unless ``askConfirmation`` is False or
        Slicer runs in testing mode; returns False when the user declines.
        """
        from UADExtensionLib import dependencies as deps

        needTorch = deps.torch_missing()
        missing = deps.missing_requirements()
        if not needTorch and not missing:
            return True
        what = ([f"torch{deps.TORCH_REQUIREMENT}, torchvision{deps.TORCHVISION_REQUIREMENT} (through the PyTorch "
                 "extension)"] if needTorch else []) + missing
        if askConfirmation and not slicer.app.testingEnabled():
            if not slicer.util.confirmOkCancelDisplay(
                    _("Anomaly detection needs Python packages that are not installed yet. Install them now? "
                      "This can take several minutes."),
                    detailedText="\n".join(what)):
                return False
        if needTorch:
            self._installTorch(deps)
        if missing:
            logging.info(f"UAD: installing {' '.join(missing)}")
            slicer.util.pip_install(missing)
            importlib.invalidate_caches()
            still = deps.missing_requirements()
            if still:
                raise RuntimeError(_("These Python packages could not be installed: {packages}. "
                                     "Restart Slicer and try again.").format(packages=", ".join(still)))
        return True

    @staticmethod
    def _installTorch(deps) -> None:
        if not hasattr(slicer.modules, "pytorchutils"):
            raise RuntimeError(_("This module needs the PyTorch extension: install 'PyTorch' from the "
                                 "Extensions Manager, restart Slicer and try again."))
        import PyTorchUtils

        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if torchLogic.torchInstalled() and not deps.torch_satisfied():
            raise RuntimeError(_("The installed PyTorch is older than {version}; upgrade it in the PyTorch Utils "
                                 "module and restart Slicer.").format(version=deps.TORCH_REQUIREMENT))
        logging.info("UAD: installing torch and torchvision through PyTorchUtils")
        torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=deps.TORCH_REQUIREMENT,
                                torchvisionVersionRequirement=deps.TORCHVISION_REQUIREMENT)
        importlib.invalidate_caches()
        if deps.torch_missing():
            raise RuntimeError(_("PyTorch could not be installed; install it in the PyTorch Utils module, "
                                 "restart Slicer and try again."))

    # -- display ------------------------------------------------------------------
    def showResult(self, result, inputVolumeNode=None, foregroundOpacity: float = 0.5) -> None:
        """Input as background, heatmap as foreground, segmentation visible, colour legend."""
        if inputVolumeNode is None:
            inputVolumeNode = self.scene.GetNodeByID(result.heatmapNode.GetAttribute("UAD.inputNodeID") or "")
        slicer.util.setSliceViewerLayers(background=inputVolumeNode, foreground=result.heatmapNode,
                                         foregroundOpacity=foregroundOpacity, fit=True)
        display = result.segmentationNode.GetDisplayNode()
        if display is not None:
            display.SetVisibility(True)
        try:
            slicer.modules.colors.logic().AddDefaultColorLegendDisplayNode(result.heatmapNode)
        except Exception as e:  # colour legends are cosmetic
            logging.debug(f"UAD: no colour legend: {e}")


#
# UADExtensionTest
#


class UADExtensionTest(ScriptedLoadableModuleTest):
    """Runs the logic on the bundled sample inside Slicer with a tiny random-weight model
    (no download, seconds on a CPU), so the factory machines test the whole path."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ProcessSample()
        self.setUp()
        self.test_CancelLeavesSceneUnchanged()

    @staticmethod
    def _tinyModel():
        import torch

        import uad.networks
        import uad.zoo
        from uad.methods import get_method_class

        config = get_method_class("anoddpm").default_model_config(image_size=32)
        config["networks"]["denoiser"] = uad.networks.tiny_unet_config((8, 16, 16))
        torch.manual_seed(0)
        return uad.zoo.build_model(config, model_id="tiny-random-test")

    def _loadSample(self):
        from uad.imageio import sample_paths

        return slicer.util.loadVolume(str(sample_paths()["image"]))

    def test_ProcessSample(self):
        import numpy as np

        self.delayDisplay("Anomaly detection on the bundled sample")
        logic = UADExtensionLogic()
        self.assertTrue(logic.setupPythonRequirements(askConfirmation=False))
        volume = self._loadSample()
        before = slicer.util.arrayFromVolume(volume).copy()
        result = logic.process(volume, method="anoddpm", model=self._tinyModel(), device="cpu", seed=0,
                               params={"steps": 3, "level": 50})
        inputMatrix = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(inputMatrix)
        for node in (result.restorationNode, result.heatmapNode):
            self.assertEqual(node.GetImageData().GetDimensions(), volume.GetImageData().GetDimensions())
            m = vtk.vtkMatrix4x4()
            node.GetIJKToRASMatrix(m)
            for r in range(4):
                for c in range(4):
                    self.assertAlmostEqual(m.GetElement(r, c), inputMatrix.GetElement(r, c), places=6)
        self.assertIsNotNone(result.heatmapNode.GetDisplayNode().GetColorNode())
        segment = result.segmentationNode.GetSegmentation().GetSegment(result.segmentId)
        self.assertEqual(segment.GetName(), "Anomaly")
        labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        slicer.modules.segmentations.logic().ExportAllSegmentsToLabelmapNode(
            result.segmentationNode, labelmap, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
        self.assertEqual(int((slicer.util.arrayFromVolume(labelmap) > 0).sum()), result.info["anomalous_voxels"])
        slicer.mrmlScene.RemoveNode(labelmap)
        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(volume), before))
        logic.showResult(result, volume)
        self.delayDisplay("Test passed")

    def test_CancelLeavesSceneUnchanged(self):
        from uad import Cancelled

        self.delayDisplay("A cancelled run adds nothing")
        logic = UADExtensionLogic()
        self.assertTrue(logic.setupPythonRequirements(askConfirmation=False))
        volume = self._loadSample()
        count = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(Cancelled):
            logic.process(volume, method="anoddpm", model=self._tinyModel(), device="cpu",
                          params={"steps": 3, "level": 50}, cancel=lambda: True)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), count)
        self.delayDisplay("Test passed")
