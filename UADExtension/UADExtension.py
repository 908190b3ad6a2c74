"""Anomaly Detection (UAD): unsupervised anomaly detection in brain MRI with diffusion models.

Slicer scripted module: Module, Widget, Logic and Test classes.  This file is the GUI
only; the work is done in ``UADExtensionLib`` (Qt-free, tested with pytest on a
slicer-core scene):

- ``runner``:       background runs of the engine's ``uad detect`` (progress, Cancel, crash)
- ``logic``:        in-process ``process()``, output nodes, jump point, Show 3D
- ``thresholding``: live threshold (calibrated / healthy false-positive rate / value)
- ``installer``:    dependency installation that never changes torch
- ``models``:       model manager (list, verify, import, LPIPS backbone, remove)
- ``devices``:      torch / CUDA / GPU / MPS information, threads, out-of-memory retry

Nothing heavy is imported at module level: torch, MONAI and ``uad.pipeline`` are
imported when needed, after the dependencies were checked.

Python console::

    logic = slicer.util.getModuleLogic("UADExtension")   # or UADExtension.UADExtensionLogic()
    result = logic.process(getNode("UAD T2 tumour phantom"), method="disyre")   # in Slicer's process
    logic.showResult(result)
    logic.updateThreshold(result, 0.02)                                        # live threshold
    from UADExtensionLib.runner import BackgroundRun                            # background process
    result = BackgroundRun(logic, getNode("UAD T2 tumour phantom"), method="disyre").start().wait()
"""

from __future__ import annotations

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

from UADExtensionLib.logic import DEVICES, UADResult, terminology_file_path  # noqa: F401  (UADResult for the console)
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
CONTRIBUTORS = ["UADExtension contributors (open-source project)"]
THRESHOLD_MODE_ITEMS = [("calibrated", "Calibrated (model)"), ("fpr", "Healthy false-positive rate (%)"),
                        ("value", "Value")]
POLL_MS = 200


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
        self.parent.contributors = list(CONTRIBUTORS)
        self.parent.helpText = _(
            "Unsupervised anomaly detection in brain MRI with diffusion models. Select a skull-stripped "
            "brain MRI volume (or give a brain mask), a method (DISYRE, THOR, AutoDDPM, pDDPM, Wolleb et al., "
            "AnoDDPM) and a model, then press Apply. The run happens in a background process (progress, "
            "Cancel); the module then shows a pseudo-healthy restoration, an anomaly heatmap over the input "
            "and an 'Anomaly' segmentation, all on the input's grid. The threshold can be changed afterwards "
            "without running again. Research use only: not for clinical decisions. "
            "Python: <code>logic = slicer.util.getModuleLogic('UADExtension'); "
            "result = logic.process(volumeNode, method='disyre')</code>.")
        self.parent.acknowledgementText = _(
            "Methods re-implemented from their publications: ") + " ".join(
            f"{name}: {ref}" for name, ref in REFERENCES)
        app = getattr(slicer, "app", None)  # absent when the file is imported outside the application
        if app is not None:
            app.connect("startupCompleted()", onStartupCompleted)


def onStartupCompleted():
    registerSampleData()
    loadTerminology()


def loadTerminology():
    """Load the shipped terminology context (category Morphologically Altered Structure, type Lesion...)."""
    try:
        slicer.modules.terminologies.logic().LoadTerminologyFromFile(str(terminology_file_path()))
    except Exception as e:  # the segment keeps its codes; only the terminology browser misses them
        logging.warning(f"UAD: terminology not loaded: {e}")


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
    """GUI of the module: forwards to UADExtensionLib and shows what it reports."""

    PARAMETERS = {  # parameter-node key -> default (strings)
        "Method": "",
        "Model": "",
        "Preset": "",
        "Device": "auto",
        "Seed": "0",
        "BatchSize": "16",
        "ThresholdMode": "calibrated",
        "Threshold": "",
        "Background": "true",
    }

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._updatingGUI = False
        self._run = None          # UADExtensionLib.runner.BackgroundRun in progress
        self._probe = None        # device probe process
        self._probeOut = []
        self._timer = None
        self._sliderMode = None
        self._inProcessCancel = None  # threading.Event while an in-process run is going
        self.lastResult = None

    # -- setup ----------------------------------------------------------------
    def setup(self) -> None:
        import qt

        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/UADExtension.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = UADExtensionLogic()

        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_MS)
        self._timer.connect("timeout()", self._poll)
        self.ui.progressBar.hide()
        self.ui.deviceComboBox.clear()
        for device in DEVICES:
            self.ui.deviceComboBox.addItem(device, device)
        self.ui.thresholdModeComboBox.clear()
        for mode, title in THRESHOLD_MODE_ITEMS:
            self.ui.thresholdModeComboBox.addItem(_(title), mode)
        self._populateMethods()
        from UADExtensionLib.modelspanel import ModelsPanel

        self.models = ModelsPanel(self.ui, slicer.util.tryWithErrorDisplay,
                                  onChanged=lambda: self._populateMethodDependents(self._currentMethod()))

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        for w in (self.ui.inputSelector, self.ui.brainMaskSelector):
            w.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.ui.inputSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onInputChanged)
        self.ui.methodComboBox.connect("currentIndexChanged(int)", self.onMethodChanged)
        for w in (self.ui.modelComboBox, self.ui.presetComboBox, self.ui.deviceComboBox):
            w.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.seedSpinBox.connect("valueChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.batchSizeSpinBox.connect("valueChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.backgroundCheckBox.connect("toggled(bool)", self.updateParameterNodeFromGUI)
        self.ui.thresholdModeComboBox.connect("currentIndexChanged(int)", self.onThresholdModeChanged)
        self.ui.thresholdSliderWidget.connect("valueChanged(double)", self.onThresholdChanged)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.jumpButton.connect("clicked(bool)", self.onJump)
        self.ui.segmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)",
                                             self.ui.show3DButton.setSegmentationNode)
        self.ui.deviceInfoButton.connect("clicked(bool)", self.onDeviceInfo)

        self.initializeParameterNode()
        self.onThresholdModeChanged()

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
        text = self.logic.methodDescription(method)
        if not models:
            text += " " + _("No trained model for this method was found; import one in the Models section.")
        self.ui.methodDescriptionLabel.text = text

    def cleanup(self) -> None:
        self._cancelRun()
        if self._probe is not None:
            self._probe.kill()
        if self._timer is not None:
            self._timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event) -> None:
        self._cancelRun()  # its results would go to a closed scene
        self.lastResult = None
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
        if self._parameterNode is None or self._updatingGUI:
            return
        self._updatingGUI = True
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
            self._selectData(self.ui.thresholdModeComboBox, p.GetParameter("ThresholdMode") or "calibrated")
            self.ui.seedSpinBox.value = int(p.GetParameter("Seed") or 0)
            self.ui.batchSizeSpinBox.value = int(p.GetParameter("BatchSize") or 16)
            self.ui.backgroundCheckBox.checked = slicer.util.toBool(p.GetParameter("Background") or "true")
            self._updateApplyButton()
        finally:
            self._updatingGUI = False

    def updateParameterNodeFromGUI(self, caller=None, event=None) -> None:
        if self._parameterNode is None or self._updatingGUI:
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
            p.SetParameter("Background", "true" if self.ui.backgroundCheckBox.checked else "false")
            p.SetParameter("ThresholdMode", self.ui.thresholdModeComboBox.currentData or "calibrated")
            p.SetParameter("Threshold", repr(float(self.ui.thresholdSliderWidget.value)))
        finally:
            p.EndModify(wasModified)
        self._updateApplyButton()

    def onInputChanged(self, node=None) -> None:
        """A new input: preselect the best measured method for its contrast and say why."""
        if node is None or self._updatingGUI or self._run is not None:
            return
        method, reason = self.logic.defaultChoice(node)
        self._selectData(self.ui.methodComboBox, method)
        self.ui.statusLabel.text = _("Default method: {reason}").format(reason=reason)

    def onMethodChanged(self, index=None) -> None:
        if self._updatingGUI:
            return
        self._populateMethodDependents(self._currentMethod())
        self.updateParameterNodeFromGUI()

    def _updateApplyButton(self) -> None:
        if self._run is not None:
            return
        hasInput = self.ui.inputSelector.currentNode() is not None
        hasModel = self.ui.modelComboBox.currentData is not None
        self.ui.applyButton.enabled = hasInput and hasModel
        self.ui.applyButton.toolTip = (_("Select an input volume.") if not hasInput else
                                       _("No model is available for the selected method.") if not hasModel else
                                       _("Run the anomaly detection."))

    # -- threshold ------------------------------------------------------------------
    def _modelEntry(self):
        return self.logic.modelEntryData(self._currentMethod(), self.ui.modelComboBox.currentData or None)

    def onThresholdModeChanged(self, index=None) -> None:
        """Set the slider's range and unit for the mode (its value is kept while the mode stays), then apply it."""
        mode = self.ui.thresholdModeComboBox.currentData or "calibrated"
        slider = self.ui.thresholdSliderWidget
        modeChanged = mode != self._sliderMode
        self._sliderMode = mode
        wasBlocked = slider.blockSignals(True)
        try:
            slider.enabled = mode != "calibrated"
            if mode == "fpr":
                if modeChanged:
                    slider.suffix = " %"
                    slider.decimals, slider.minimum, slider.maximum, slider.singleStep = 3, 0.001, 50.0, 0.001
                    slider.value = 5.0  # the bundled models' calibration point
            else:
                r = self.logic.thresholdSliderRange(self.lastResult, self._modelEntry(), self._currentMethod())
                keep = float(slider.value)
                slider.suffix = ""
                slider.decimals, slider.minimum, slider.singleStep = 6, 0.0, r["step"]
                slider.maximum = r["maximum"] if modeChanged else max(r["maximum"], keep)
                slider.value = r["value"] if modeChanged or mode == "calibrated" else keep
        finally:
            slider.blockSignals(wasBlocked)
        if not self._updatingGUI:
            self.updateParameterNodeFromGUI()
        self.onThresholdChanged()

    def _thresholdForRun(self):
        """Threshold passed to the next run (None: the engine uses the model's calibrated one)."""
        mode = self.ui.thresholdModeComboBox.currentData or "calibrated"
        if mode == "calibrated":
            return None
        return self.logic.resolveThreshold(mode, self._sliderValue(mode), self._modelEntry(), self._currentMethod(),
                                           self.ui.presetComboBox.currentData or None)

    def _sliderValue(self, mode):
        v = float(self.ui.thresholdSliderWidget.value)
        return v / 100.0 if mode == "fpr" else v

    def onThresholdChanged(self, value=None) -> None:
        """Live threshold: re-make the segment of the last result from its heatmap (no inference)."""
        if self._updatingGUI:
            return
        mode = self.ui.thresholdModeComboBox.currentData or "calibrated"
        result = self.lastResult
        if result is None or result.heatmapNode.GetScene() is None:
            self.ui.thresholdInfoLabel.text = _("Applies to the next run.")
            return
        entry = self.logic.modelEntryData(result.info.get("method", ""), result.info.get("model"))
        try:
            t = self.logic.resolveThreshold(mode, self._sliderValue(mode), entry, result.info.get("method", ""),
                                            result.info.get("preset"), result.info.get("perceptual_backend"))
            n = self.logic.updateThreshold(result, t)
        except (ValueError, RuntimeError) as e:
            self.ui.thresholdInfoLabel.text = str(e)
            return
        self.ui.thresholdInfoLabel.text = self.logic.thresholdText(t, n, entry, result.info.get("method", ""),
                                                                   result.info.get("preset"),
                                                                   result.info.get("perceptual_backend"))

    # -- run ----------------------------------------------------------------------
    def _setRunning(self, running: bool) -> None:
        for w in (self.ui.inputsCollapsibleButton, self.ui.methodCollapsibleButton, self.ui.advancedCollapsibleButton,
                  self.ui.outputsCollapsibleButton, self.ui.modelsCollapsibleButton):
            w.enabled = not running
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        self.ui.applyButton.toolTip = _("Stop the run now (the scene is left as it was).") if running else \
            _("Run the anomaly detection.")
        self.ui.applyButton.enabled = True
        if running:
            self.ui.progressBar.setRange(0, 0)  # busy until the first slices report
            self.ui.progressBar.show()
            self.ui.warningsLabel.text = ""
        else:
            self.ui.progressBar.hide()
            self._updateApplyButton()

    def onApplyButton(self) -> None:
        if self._inProcessCancel is not None:  # Cancel of an in-process run: stops after the current batch
            self._inProcessCancel.set()
            self.ui.applyButton.enabled = False
            self.ui.statusLabel.text = _("Cancelling after the current batch of slices...")
            return
        if self._run is not None:
            self._cancelRun()
            self.ui.statusLabel.text = _("Cancelled; nothing was added to the scene.")
            return
        with slicer.util.tryWithErrorDisplay(_("Anomaly detection failed."), waitCursor=False):
            self.ui.statusLabel.text = _("Checking Python packages...")
            slicer.app.processEvents()
            if not self.logic.setupPythonRequirements():
                self.ui.statusLabel.text = _("The required Python packages are not installed.")
                return
            self._start(device=self.ui.deviceComboBox.currentData or "auto")

    def _runArguments(self, device: str) -> dict:
        return dict(
            method=self._currentMethod(), model=self.ui.modelComboBox.currentData or None, device=device,
            preset=self.ui.presetComboBox.currentData or None, seed=int(self.ui.seedSpinBox.value),
            threshold=self._thresholdForRun(), batchSize=int(self.ui.batchSizeSpinBox.value),
            brainMaskNode=self.ui.brainMaskSelector.currentNode(),
            restorationVolume=self.ui.restorationSelector.currentNode(),
            heatmapVolume=self.ui.heatmapSelector.currentNode(),
            anomalySegmentation=self.ui.segmentationSelector.currentNode())

    def _start(self, device: str) -> None:
        inputVolume = self.ui.inputSelector.currentNode()
        kwargs = self._runArguments(device)
        if not self.ui.backgroundCheckBox.checked:  # in Slicer's process (blocks between batches)
            self._runInProcess(inputVolume, kwargs)
            return
        from UADExtensionLib.runner import BackgroundRun

        self._run = BackgroundRun(self.logic, inputVolume, **kwargs)
        self._setRunning(True)
        self.ui.statusLabel.text = _("Starting the engine (loading PyTorch and the model)...")
        try:
            self._run.start()
        except Exception:
            self._run = None
            self._setRunning(False)
            raise
        self._timer.start()

    def _runInProcess(self, inputVolume, kwargs) -> None:
        import threading

        from uad import Cancelled

        from UADExtensionLib.progress import ProgressTracker

        tracker = ProgressTracker()
        self._inProcessCancel = threading.Event()
        self._setRunning(True)

        def progress(done, total):
            tracker.update(done, total)
            self._showProgress(tracker)
            slicer.app.processEvents()  # lets Cancel be clicked between batches

        try:
            result = self.logic.process(inputVolume, progressCallback=progress, cancel=self._inProcessCancel, **kwargs)
        except Cancelled:
            self.ui.statusLabel.text = _("Cancelled; nothing was added to the scene.")
            return
        finally:
            self._inProcessCancel = None
            self._setRunning(False)
        self._showResult(result, inputVolume)

    def _showProgress(self, tracker) -> None:
        if tracker.total:
            self.ui.progressBar.setRange(0, max(1, int(tracker.total)))
            self.ui.progressBar.setValue(int(tracker.done))
            self.ui.statusLabel.text = tracker.text()

    def _poll(self) -> None:
        if self._probe is not None:
            self._pollProbe()
        run = self._run
        if run is None:
            if self._probe is None:
                self._timer.stop()
            return
        try:
            running = run.poll()
        except Exception as e:  # loading the results failed: reported, scene unchanged
            running = False
            run.state, run.error = "failed", str(e)
        self._showProgress(run.tracker)
        if run.warnings:
            self.ui.warningsLabel.text = _("Engine warnings:") + "\n" + "\n".join("- " + w for w in run.warnings)
        if running:
            return
        self._run = None
        if self._probe is None:
            self._timer.stop()
        self._setRunning(False)
        if run.state == "done":
            self._showResult(run.result, run.inputVolumeNode)
        elif run.state == "failed":
            self.ui.statusLabel.text = _("Failed: {error}").format(error=run.error)
            if run.failureKind == "no_kernel_image" and run.device != "cpu" and slicer.util.confirmYesNoDisplay(
                    _("The installed PyTorch cannot run on this GPU (no kernel image). Run on the CPU instead?")):
                self._start(device="cpu")
            else:
                slicer.util.errorDisplay(_("Anomaly detection failed: {error}").format(error=run.error))

    def _cancelRun(self) -> None:
        if self._run is not None:
            self._run.cancel()
            self._run = None
            self._setRunning(False)

    def _showResult(self, result, inputVolume) -> None:
        self.lastResult = result
        self.logic.showResult(result, inputVolume)
        # the output selectors keep the user's choice ("Create new" stays new: results are never
        # overwritten unless an output node was picked); Show 3D follows the new segmentation
        self.ui.show3DButton.setSegmentationNode(result.segmentationNode)
        self.ui.jumpButton.enabled = True
        self.ui.statusLabel.text = self.logic.resultText(result)
        warnings = result.info.get("warnings") or []
        self.ui.warningsLabel.text = (_("Engine warnings:") + "\n" + "\n".join("- " + w for w in warnings)) if warnings else ""
        self.onThresholdModeChanged()

    def onJump(self) -> None:
        if self.lastResult is not None:
            self.logic.jumpToMostAnomalous(self.lastResult)

    # -- device information ------------------------------------------------------------
    def onDeviceInfo(self) -> None:
        from UADExtensionLib.devices import probe_command
        from UADExtensionLib.runner import BackgroundProcess, python_executable

        if self._probe is not None:
            return
        self.ui.deviceInfoLabel.text = _("Probing PyTorch in a separate process...")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        self._probe = BackgroundProcess(probe_command(python_executable()), env=env)
        self._probe.start()
        self._probeOut = []
        self._timer.start()

    def _pollProbe(self) -> None:
        from UADExtensionLib.devices import describe, parse_probe_output

        self._probeOut += [line for stream, line in self._probe.lines()]
        if not self._probe.finished():
            return
        self._probeOut += [line for stream, line in self._probe.lines()]
        self._probe = None
        try:
            self.ui.deviceInfoLabel.text = describe(parse_probe_output("\n".join(self._probeOut)))
        except ValueError:
            self.ui.deviceInfoLabel.text = _("The probe failed:") + " " + " ".join(self._probeOut[-3:])


#
# UADExtensionLogic
#


class UADExtensionLogic(ScriptedLoadableModuleLogic, _UADExtensionCoreLogic):
    """The Qt-free ``UADExtensionLib.logic.UADExtensionLogic`` with Slicer's parameter node,
    dependency installation and slice-view display.

    ``process(...)``, ``processNodes``, ``updateThreshold``, ``mostAnomalousPoint`` and
    ``show3D`` are inherited (see ``UADExtensionLib.logic``)::

        logic = UADExtensionLogic()
        result = logic.process(volumeNode, method="disyre", device="auto", seed=0)
    """

    def __init__(self, scene=None, segmentationsLogic=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        _UADExtensionCoreLogic.__init__(self, scene=scene, segmentationsLogic=segmentationsLogic)

    def setDefaultParameters(self, parameterNode) -> None:
        defaults = dict(UADExtensionWidget.PARAMETERS)
        if not parameterNode.GetParameter("Method"):
            defaults["Method"] = self.defaultMethod()
        for key, value in defaults.items():
            if not parameterNode.GetParameter(key):
                parameterNode.SetParameter(key, value)

    # -- dependencies -------------------------------------------------------------
    def setupPythonRequirements(self, askConfirmation: bool = True) -> bool:
        """Make sure torch and the engine's packages are importable; True when they are.

        torch comes from the PyTorch extension (PyTorchUtils picks the CUDA build); the
        rest is installed by ``UADExtensionLib.installer`` with a constraint file pinning
        the installed torch (it cannot change).  Nothing is installed in testing mode.
        Asks first unless ``askConfirmation`` is False; returns False when declined.
        """
        from UADExtensionLib import installer

        def confirm(text, details=""):
            return slicer.util.confirmOkCancelDisplay(_(text), detailedText=details or None)

        # PyTorchUtils installs torch (light-the-torch picks the CUDA build); pip_install never gets torch
        return installer.ensure_requirements(
            slicer, askConfirmation, confirm=confirm,
            installTorch=lambda: installer.install_torch_with_pytorch_extension(slicer))

    # -- display ------------------------------------------------------------------
    def showResult(self, result, inputVolumeNode=None, foregroundOpacity: float = 0.5, jump: bool = True) -> None:
        """Input as background, heatmap as foreground, segment outline, colour legend, views on the anomaly."""
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
        if jump:
            self.jumpToMostAnomalous(result)

    def jumpToMostAnomalous(self, result) -> None:
        point = self.mostAnomalousPoint(result)
        slicer.modules.markups.logic().JumpSlicesToLocation(point[0], point[1], point[2], True)


#
# UADExtensionTest
#


class UADExtensionTest(ScriptedLoadableModuleTest):
    """Runs the bundled sample end to end on the CPU with a tiny random-weight model (no download,
    seconds), in Slicer's process and in a background process.  Skips cleanly when torch or the
    engine's packages are absent: nothing is ever installed by the test."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        from UADExtensionLib import dependencies as deps

        if deps.torch_missing() or deps.missing_requirements():
            self.delayDisplay("UAD self-test skipped: torch or the engine's Python packages are not installed "
                              "(nothing is installed in testing mode)")
            return
        self.setUp()
        self.test_ProcessSample()
        self.setUp()
        self.test_BackgroundRunAndLiveThreshold()

    def _loadSample(self):
        from uad.imageio import sample_paths

        return slicer.util.loadVolume(str(sample_paths()["image"]))

    def test_ProcessSample(self):
        import numpy as np

        from UADExtensionLib.selftest import process_in_slicer

        self.delayDisplay("Anomaly detection on the bundled sample (in Slicer's process)")
        logic = UADExtensionLogic()
        volume = self._loadSample()
        before = slicer.util.arrayFromVolume(volume).copy()
        result = process_in_slicer(logic, volume)
        self.assertEqual(result.heatmapNode.GetImageData().GetDimensions(), volume.GetImageData().GetDimensions())
        self.assertEqual(result.segmentationNode.GetSegmentation().GetSegment(result.segmentId).GetName(), "Anomaly")
        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(volume), before))
        logic.showResult(result, volume)
        self.delayDisplay("Test passed")

    def test_BackgroundRunAndLiveThreshold(self):
        import numpy as np

        from UADExtensionLib.selftest import run_in_background

        self.delayDisplay("Background run on the bundled sample, then a live threshold")
        logic = UADExtensionLogic()
        volume = self._loadSample()
        run, result = run_in_background(logic, volume)
        self.assertEqual(run.tracker.done, run.tracker.total)
        heat = slicer.util.arrayFromVolume(result.heatmapNode)
        t = float(np.percentile(heat[heat > 0], 99))
        self.assertEqual(logic.updateThreshold(result, t), int((heat > t).sum()))
        logic.showResult(result, volume)
        self.delayDisplay("Test passed")
