"""The module's Widget driven end to end with Qt stood in (no Slicer application), on a real slicer-core scene.

Only the Qt widgets, ``slicer.app`` and a few application-only ``slicer.util`` display helpers are stood
in; the MRML scene, the Segmentations logic, the background runner (the real ``uad detect`` in a child
process) and the live threshold are real.  The widget names come from the real .ui file, so a widget
the code uses but the .ui lacks fails here.
"""

from __future__ import annotations

import importlib
import sys
import time
import types
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from test_logic import mrml, volume_file  # noqa: F401  (fixtures)
from test_slicer_module import UI_FILE, _slicer_app_standins

slicer = pytest.importorskip("slicer")


class FakeWidget:
    """Enough of QWidget / QComboBox / QSlider / qMRMLNodeComboBox / QTableWidget for the module's code."""

    def __init__(self, name="", cls=""):
        self._name, self._cls = name, cls
        self._slots = {}
        self._items = []  # combo: [text, data]
        self._index = -1
        self._node = None
        self._blocked = False
        self._rows = {}
        self.text = ""
        self.toolTip = ""
        self.enabled = True
        self.checked = False
        self.value = 0.0
        self.minimum, self.maximum, self.decimals, self.singleStep, self.suffix = 0.0, 1.0, 2, 0.01, ""
        self.visible = True

    # signals
    def connect(self, signal, slot):
        self._slots.setdefault(signal, []).append(slot)

    def emit(self, signal, *args):
        if not self._blocked:
            for slot in self._slots.get(signal, []):
                slot(*args)

    def blockSignals(self, block):
        old, self._blocked = self._blocked, bool(block)
        return old

    # combo box
    def clear(self):
        self._items, self._index = [], -1

    def addItem(self, text, data=None):
        self._items.append([text, data])
        if self._index < 0:
            self._index = 0
            self.emit("currentIndexChanged(int)", 0)

    def setItemData(self, index, value, role=None):
        pass

    @property
    def count(self):
        return len(self._items)

    @property
    def currentData(self):
        return self._items[self._index][1] if 0 <= self._index < len(self._items) else None

    def findData(self, data):
        return next((i for i, (_, d) in enumerate(self._items) if d == data), -1)

    def setCurrentIndex(self, i):
        if i != self._index:
            self._index = i
            self.emit("currentIndexChanged(int)", i)

    # node selector
    def currentNode(self):
        return self._node

    def setCurrentNode(self, node):
        if node is not self._node:
            self._node = node
            self.emit("currentNodeChanged(vtkMRMLNode*)", node)

    @property
    def currentNodeID(self):
        return self._node.GetID() if self._node is not None else None

    # table
    def setRowCount(self, n):
        self._rows = {}

    def setItem(self, i, j, item):
        self._rows[(i, j)] = item

    def item(self, i, j):
        return self._rows.get((i, j))

    def currentRow(self):
        return 0 if self._rows else -1

    def horizontalHeader(self):
        return FakeWidget()

    # slider / progress / misc
    def setValue(self, v):
        self.value = v

    def show(self):
        self.visible = True

    def hide(self):
        self.visible = False

    def __getattr__(self, name):  # any other Qt method: a no-op
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *a, **k: None


class FakeTimer:
    def __init__(self):
        self.active = False
        self.slots = []

    def setInterval(self, ms):
        pass

    def connect(self, signal, slot):
        self.slots.append(slot)

    def start(self):
        self.active = True

    def stop(self):
        self.active = False

    def isActive(self):
        return self.active

    def fire(self):
        for s in self.slots:
            s()


class FakeItem:
    def __init__(self, text):
        self._text = text

    def text(self):
        return self._text

    def setToolTip(self, tip):
        pass


def _fake_qt():
    qt = types.ModuleType("qt")
    qt.QTimer = FakeTimer
    qt.QTableWidgetItem = FakeItem
    qt.Qt = SimpleNamespace(ToolTipRole=3)
    return qt


@pytest.fixture
def widget(mrml, tiny_zoo, monkeypatch):  # noqa: F811
    """The module's widget after setup(), on a real slicer-core scene with the tiny test zoo."""
    calls = SimpleNamespace(layers=[], jumps=[], legends=[], errors=[])
    monkeypatch.setitem(sys.modules, "qt", _fake_qt())
    standins = _slicer_app_standins()
    standins.ScriptedLoadableModuleWidget.setup = lambda self: None
    standins.ScriptedLoadableModuleWidget.cleanup = lambda self: None
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", standins)
    monkeypatch.delitem(sys.modules, "UADExtension", raising=False)
    names = {w.get("name"): w.get("class") for w in ET.parse(UI_FILE).getroot().iter("widget")}
    ui_root = FakeWidget("UADExtension")
    ui = SimpleNamespace(**{n: FakeWidget(n, c) for n, c in names.items()})
    monkeypatch.setattr(slicer, "mrmlScene", mrml.scene, raising=False)
    monkeypatch.setattr(slicer, "app", SimpleNamespace(testingEnabled=lambda: False, processEvents=lambda: None,
                                                      connect=lambda *a: None), raising=False)
    monkeypatch.setattr(slicer, "modules", SimpleNamespace(
        segmentations=SimpleNamespace(logic=lambda: mrml.segmentations),
        markups=SimpleNamespace(logic=lambda: SimpleNamespace(
            JumpSlicesToLocation=lambda *a: calls.jumps.append(a))),
        colors=SimpleNamespace(logic=lambda: SimpleNamespace(
            AddDefaultColorLegendDisplayNode=lambda n: calls.legends.append(n)))), raising=False)
    monkeypatch.setattr(slicer.util, "loadUI", lambda path: ui_root, raising=False)
    monkeypatch.setattr(slicer.util, "childWidgetVariables", lambda w: ui, raising=False)
    monkeypatch.setattr(slicer.util, "setSliceViewerLayers", lambda **k: calls.layers.append(k), raising=False)
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda *a, **k: calls.errors.append(a), raising=False)

    import contextlib

    @contextlib.contextmanager
    def tryWithErrorDisplay(message="", show=True, waitCursor=False):
        try:
            yield
        except Exception as e:
            calls.errors.append((message, str(e)))
            raise

    monkeypatch.setattr(slicer.util, "tryWithErrorDisplay", tryWithErrorDisplay, raising=False)
    module = importlib.import_module("UADExtension")
    module.UADExtensionLogic.getParameterNode = lambda self: _parameter_node(mrml.scene)
    w = module.UADExtensionWidget(SimpleNamespace(isEntered=True))
    w.layout = SimpleNamespace(addWidget=lambda x: None)
    w.resourcePath = lambda rel: str(Path(module.__file__).parent / "Resources" / rel)
    w.setup()
    yield SimpleNamespace(w=w, ui=ui, calls=calls, module=module)
    w.cleanup()
    sys.modules.pop("UADExtension", None)


_PARAM = {}


def _parameter_node(scene):
    node = _PARAM.get(id(scene))
    if node is None or node.GetScene() is not scene:
        node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "UADExtension")
        _PARAM[id(scene)] = node
    return node


def _pump(w, timeout=300):
    deadline = time.monotonic() + timeout
    while w._timer.isActive() and time.monotonic() < deadline:
        w._timer.fire()
        time.sleep(0.05)
    assert not w._timer.isActive(), "the run did not finish"


def _choose_tiny_anoddpm_run(ui, mrml, volume_file, batch_size, background):
    """Load the test volume and set the widget to AnoDDPM-fast with the tiny thresholded model on the CPU."""
    node = mrml.load(volume_file)
    ui.inputSelector.setCurrentNode(node)
    ui.methodComboBox.setCurrentIndex(ui.methodComboBox.findData("anoddpm"))
    ui.modelComboBox.setCurrentIndex(ui.modelComboBox.findData("tiny-test-thr"))
    ui.deviceComboBox.setCurrentIndex(ui.deviceComboBox.findData("cpu"))
    ui.presetComboBox.setCurrentIndex(ui.presetComboBox.findData("fast"))
    ui.batchSizeSpinBox.value = batch_size
    ui.backgroundCheckBox.checked = background
    return node


def test_widget_runs_in_the_background_then_thresholds_live_and_cancels(widget, mrml, volume_file):  # noqa: F811
    from UADExtensionLib.logic import UADExtensionLogic

    w, ui, calls = widget.w, widget.ui, widget.calls
    assert ui.methodComboBox.currentData == "thor"  # the tiny zoo serves thor/anoddpm/autoddpm; no DISYRE model
    assert {ui.modelsTableWidget.item(i, 0).text() for i in range(2)} == {"tiny-test", "tiny-test-thr"}
    node = _choose_tiny_anoddpm_run(ui, mrml, volume_file, batch_size=4, background=True)
    assert ui.applyButton.enabled
    w.onApplyButton()
    assert w._run is not None and ui.applyButton.text == "Cancel" and w._timer.isActive()
    _pump(w)
    assert calls.errors == [], calls.errors
    r = w.lastResult
    assert r is not None and r.info["background_process"] and r.info["threshold"] == pytest.approx(0.123)
    assert "Done in" in ui.statusLabel.text and "background process" in ui.statusLabel.text
    assert ui.applyButton.text == "Apply" and not ui.progressBar.visible
    assert calls.layers[-1]["foreground"] is r.heatmapNode and calls.legends[-1] is r.heatmapNode
    assert len(calls.jumps) == 1 and np.allclose(calls.jumps[0][:3], UADExtensionLogic.mostAnomalousPoint(w.logic, r))

    # live threshold, value mode: the segment follows the slider, no inference
    import uad.pipeline

    real_detect = uad.pipeline.detect
    uad.pipeline.detect = lambda *a, **k: pytest.fail("inference during a threshold change")
    try:
        ui.thresholdModeComboBox.setCurrentIndex(ui.thresholdModeComboBox.findData("value"))
        assert ui.thresholdSliderWidget.enabled and ui.thresholdSliderWidget.decimals == 6
        heat = slicer.util.arrayFromVolume(r.heatmapNode)
        for t in (float(np.percentile(heat[heat > 0], 90)), float(np.percentile(heat[heat > 0], 99))):
            ui.thresholdSliderWidget.value = t
            ui.thresholdSliderWidget.emit("valueChanged(double)", t)
            assert f"{int((heat > t).sum())} anomalous voxels" in ui.thresholdInfoLabel.text
        ui.thresholdModeComboBox.setCurrentIndex(ui.thresholdModeComboBox.findData("calibrated"))
        assert not ui.thresholdSliderWidget.enabled
        assert f"{int((heat > 0.123).sum())} anomalous voxels" in ui.thresholdInfoLabel.text
        ui.thresholdModeComboBox.setCurrentIndex(ui.thresholdModeComboBox.findData("fpr"))
        assert "no healthy calibration" in ui.thresholdInfoLabel.text  # the tiny model has none: said, not guessed
    finally:
        uad.pipeline.detect = real_detect

    # Cancel right after Apply: the process is killed, nothing is added
    ui.thresholdModeComboBox.setCurrentIndex(ui.thresholdModeComboBox.findData("calibrated"))
    ids = [mrml.scene.GetNthNode(i).GetID() for i in range(mrml.scene.GetNumberOfNodes())]
    w.onApplyButton()
    run = w._run
    w.onApplyButton()  # the button is Cancel now
    assert w._run is None and run.state == "cancelled" and run.process.returncode() is not None
    assert "Cancelled" in ui.statusLabel.text and ui.applyButton.text == "Apply"
    assert [mrml.scene.GetNthNode(i).GetID() for i in range(mrml.scene.GetNumberOfNodes())] == ids


def test_widget_in_process_run_and_its_cancel(widget, mrml, volume_file, monkeypatch):  # noqa: F811
    w, ui = widget.w, widget.ui
    node = _choose_tiny_anoddpm_run(ui, mrml, volume_file, batch_size=2, background=False)
    ids = [mrml.scene.GetNthNode(i).GetID() for i in range(mrml.scene.GetNumberOfNodes())]
    clicks = []

    def process_events():  # the user clicks Cancel (the Apply button) once the run shows progress
        if not clicks and ui.applyButton.text == "Cancel":
            clicks.append(ui.progressBar.value)
            w.onApplyButton()

    monkeypatch.setattr(slicer.app, "processEvents", process_events)
    w.onApplyButton()
    assert clicks == [2] and "Cancelled" in ui.statusLabel.text  # after the first batch of 2 slices and ui.applyButton.text == "Apply"
    assert w.lastResult is None and w._inProcessCancel is None
    assert [mrml.scene.GetNthNode(i).GetID() for i in range(mrml.scene.GetNumberOfNodes())] == ids
    clicks.append("done")  # no more clicks: a full in-process run
    w.onApplyButton()
    r = w.lastResult
    assert r is not None and not r.info.get("background_process") and "Slicer's process" in ui.statusLabel.text
    assert r.info["threshold"] == pytest.approx(0.123)
