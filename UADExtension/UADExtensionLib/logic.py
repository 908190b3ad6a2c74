"""UADExtensionLogic: volume node in, restoration / heatmap / segmentation nodes out.

Qt-free and singleton-free, so it runs in the Slicer application and headless
on a ``slicer-core`` scene alike::

    logic = UADExtensionLogic(scene)            # in Slicer: UADExtensionLogic() uses slicer.mrmlScene
    result = logic.process(volumeNode, method="anoddpm", preset="fast", seed=0)
    result.heatmapNode, result.segmentationNode, result.info["threshold"]

``process`` converts the node to a SimpleITK image (voxels copied, geometry
IJK->RAS converted to LPS), runs ``uad.pipeline.detect`` and turns the three
returned images into nodes on the input's grid.  It is transactional: if
detection fails or is cancelled nothing is added, and if building the nodes
fails every node added so far (display nodes and colour table included) is
removed again, so the scene is exactly as before.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .devices import bounded_torch_threads, collect_engine_warnings, detect_halving_batch_on_oom
from .nodes import node_ids, remove_nodes_not_in, set_volume_from_array, sitk_to_array_on_grid, volume_node_to_sitk

# Display order in the GUI; the engine's registry (uad.methods) is the truth when importable.
METHOD_TITLES = {
    "thor": "THOR",
    "autoddpm": "AutoDDPM",
    "pddpm": "pDDPM",
    "disyre": "DISYRE",
    "wolleb": "Wolleb et al. (classifier guidance)",
    "anoddpm": "AnoDDPM",
}
STATIC_METHODS = list(METHOD_TITLES)
DEVICES = ["auto", "cuda", "mps", "cpu"]

SEGMENT_NAME = "Anomaly"
SEGMENT_COLOR = (0.2, 1.0, 0.4)
# Terminology: category "Morphologically Altered Structure" (SCT 49755003), type "Lesion"
# (SCT 52988006), region Brain (SCT 12738006).  Slicer's own lists have the category but not
# this type, so the module ships the context below (Resources/Terminology, loaded at startup
# by UADExtension.py); it also offers Mass, Neoplasm and Edema for the user to pick.
TERMINOLOGY_CONTEXT = "Segmentation category and type - UADExtension"
TERMINOLOGY_FILE = "SegmentationCategoryTypeModifier-UADExtension.term.json"
SEGMENT_TERMINOLOGY = (TERMINOLOGY_CONTEXT +
                       "~SCT^49755003^Morphologically Altered Structure"
                       "~SCT^52988006^Lesion~^^"
                       "~Anatomic codes - DICOM master list~SCT^12738006^Brain~^^")


def terminology_file_path():
    """The shipped terminology context (``Resources/Terminology/...term.json`` of the module)."""
    from pathlib import Path

    return Path(__file__).resolve().parent.parent / "Resources" / "Terminology" / TERMINOLOGY_FILE


ATTR_PREFIX = "UAD."


def volume_contrast(image, name: str | None = None, brain_mask=None) -> str | None:
    """The contrast of a volume as ``uad detect`` resolves it without ``--contrast``
    (``uad.selection.resolve_contrast``: the image metadata or the node name, else the guess); None when
    it cannot say (then the method's first model is used, as before)."""
    try:
        from uad.selection import resolve_contrast

        return resolve_contrast(None, image, name, brain_mask)[0]
    except Exception as e:  # noqa: BLE001 - an unusual volume: no contrast, the method's first model
        logging.info("UAD: contrast not resolved (%s)", e)
        return None


@dataclass
class UADResult:
    """What ``process`` created."""

    restorationNode: Any
    heatmapNode: Any
    segmentationNode: Any
    info: dict = field(default_factory=dict)
    segmentId: str = ""

    def __iter__(self):  # restoration, heatmap, segmentation = logic.process(...)
        return iter((self.restorationNode, self.heatmapNode, self.segmentationNode))


def _cancel_function(cancel) -> Callable[[], bool] | None:
    """Accept None, a callable or anything with ``is_set()`` (threading.Event)."""
    if cancel is None:
        return None
    if hasattr(cancel, "is_set"):
        return cancel.is_set
    if callable(cancel):
        return cancel
    raise TypeError("cancel must be a callable, an object with is_set(), or None")


def heat_display_range(anomaly: np.ndarray, threshold: float | None) -> dict:
    """Window and transparency threshold of the heatmap display.

    The window spans 0 .. the 99.5th percentile of the positive scores, stretched
    so that the segmentation threshold sits at most at 80 % of it.  Scores
    below half the segmentation threshold (or, without one, below 10 % of the
    window) are transparent.
    """
    a = np.asarray(anomaly, dtype=np.float64)
    positive = a[np.isfinite(a) & (a > 0)]
    t = float(threshold) if threshold is not None and np.isfinite(threshold) and threshold > 0 else None
    vmax = float(np.percentile(positive, 99.5)) if positive.size else 0.0
    if t is not None:
        vmax = max(vmax, 1.25 * t)
    if not vmax > 0:
        vmax = 1.0
    lower = 0.5 * t if t is not None else 0.1 * vmax
    data_max = float(positive.max()) if positive.size else 0.0
    upper = max(data_max, vmax) * (1 + 1e-6) + 1e-12
    return {"window_min": 0.0, "window_max": vmax, "lower": lower, "upper": upper}


class UADExtensionLogic:
    """Runs detection on a volume node and builds the output nodes.

    ``scene``: the MRML scene (default: ``slicer.mrmlScene`` at call time).
    ``segmentationsLogic``: a ``vtkSlicerSegmentationsModuleLogic`` (default:
    the application's; headless one is created on the scene, which also
    registers the segmentation converters that creating segments needs).
    """

    def __init__(self, scene=None, segmentationsLogic=None):
        self._scene = scene
        self._segmentationsLogic = segmentationsLogic
        self._ownSegmentationsLogic = None

    # -- scene and helpers --------------------------------------------------
    @property
    def scene(self):
        if self._scene is not None:
            return self._scene
        import slicer

        scene = getattr(slicer, "mrmlScene", None)
        if scene is None:
            raise RuntimeError("no MRML scene: outside the Slicer application pass one, "
                               "UADExtensionLogic(scene=vtkMRMLScene())")
        return scene

    @property
    def segmentationsLogic(self):
        """The Segmentations module logic used to import the mask.

        Given -> that one; in the application -> ``slicer.modules.segmentations.logic()``;
        headless -> a ``vtkSlicerSegmentationsModuleLogic`` created on the scene, but only
        when no segmentations logic registered the segmentation converters yet
        (a second one would register every segmentation node class twice).
        """
        if self._segmentationsLogic is not None:
            return self._segmentationsLogic
        import slicer

        modules = getattr(slicer, "modules", None)
        if modules is not None and hasattr(modules, "segmentations") and \
                self._scene in (None, getattr(slicer, "mrmlScene", None)):
            return modules.segmentations.logic()
        if self._ownSegmentationsLogic is not None and self._ownSegmentationsLogic.GetMRMLScene() is self.scene:
            return self._ownSegmentationsLogic
        factory = slicer.vtkSegmentationConverterFactory.GetInstance()
        if factory.ConstructRepresentationObjectByRepresentation("Binary labelmap") is not None:
            return slicer.vtkSlicerSegmentationsModuleLogic  # converters registered: the static import suffices
        own = slicer.vtkSlicerSegmentationsModuleLogic()
        own.SetMRMLScene(self.scene)
        self._ownSegmentationsLogic = own
        return own

    @staticmethod
    def availableMethods() -> list[str]:
        """Method names: the engine's registry when it imports, else the static list."""
        try:
            from uad.methods import available_methods

            names = list(available_methods())
        except Exception as e:  # torch / monai not installed yet (or broken): the GUI still lists the methods
            logging.debug(f"UAD: engine registry not importable ({e}); using the static method list")
            return list(STATIC_METHODS)
        ordered = [m for m in STATIC_METHODS if m in names]
        return ordered + [m for m in names if m not in ordered]

    @staticmethod
    def methodTitle(method: str) -> str:
        return METHOD_TITLES.get(method, method)

    @staticmethod
    def presetsForMethod(method: str) -> tuple[list[str], str | None]:
        """(preset names, default preset) of ``method``; ([], None) when the engine is not importable."""
        try:
            from uad.methods import get_method_class

            cls = get_method_class(method)
        except Exception:  # engine not importable, or unknown method
            return [], None
        return list(cls.presets), cls.default_preset

    @staticmethod
    def modelsForMethod(method: str | None = None) -> list:
        """Model-zoo entries (``uad.zoo.ModelEntry``) serving ``method`` (all when None)."""
        try:
            from uad.zoo import list_models

            entries = list_models()
        except Exception as e:  # missing engine, unreadable manifest: no models to offer
            logging.warning(f"UAD: cannot list models: {e}")
            return []
        return [e for e in entries if method is None or method in e.methods]

    # -- defaults -------------------------------------------------------------
    def defaultMethod(self, contrast: str | None = None) -> str:
        """The method the GUI preselects (one small function, so the engine's method selection can replace it).

        Today: DISYRE when a model serves it (it measures best on the bundled sample and
        phantoms, see README), else the first method in display order that has a model,
        else DISYRE.  ``contrast`` (e.g. "T2") restricts the models considered when given.
        """
        models = self.modelsForMethod(None)
        if contrast:
            same = [e for e in models if str(e.contrast or "").upper() == str(contrast).upper()]
            models = same or models
        served = {m for e in models for m in e.methods}
        if "disyre" in served:
            return "disyre"
        for m in self.availableMethods():
            if m in served:
                return m
        return "disyre"

    def defaultChoice(self, volumeNode=None, contrast: str | None = None) -> tuple[str, str]:
        """(method, reason) the GUI preselects for an input: the engine's ``uad.selection.default_choice``
        (the method whose bundled model measured best on the held-out set for the input's contrast,
        ``contrast`` or guessed from the volume), else ``defaultMethod(contrast)`` when the engine has no
        measured choice (no volume, no measurements, engine not installed yet)."""
        if volumeNode is not None or contrast:
            try:
                from uad.selection import default_choice

                from .nodes import volume_node_to_sitk

                image = volume_node_to_sitk(volumeNode) if volumeNode is not None and not contrast else None
                choice, ctext = default_choice(image, contrast)
                if choice.method in self.availableMethods():
                    return choice.method, f"contrast {ctext}; {choice.method}: {choice.reason}"
            except Exception as e:  # noqa: BLE001 - engine missing or no measurement: the static rule below
                logging.info("UAD: no measured default method (%s)", e)
        method = self.defaultMethod(contrast)
        return method, f"{method}: no held-out measurement for this input; the best-measuring method with a model"

    def methodDescription(self, method: str) -> str:
        """'Title (reference)' from the engine's registry, or the title when the engine is not importable."""
        try:
            from uad.methods import get_method_class

            cls = get_method_class(method)
            return f"{cls.title} ({cls.reference})" if cls.reference else cls.title
        except Exception:  # engine not installed yet
            return self.methodTitle(method)

    def modelEntryData(self, method: str, modelId: str | None = None) -> dict | None:
        """The manifest entry (dict) of ``modelId``, or of the method's default model; None if unknown."""
        try:
            from uad.zoo import find_model

            return dict(find_model(modelId, method=None if modelId else method).data)
        except Exception:
            return None

    # -- threshold helpers (the GUI's slider) -------------------------------------
    @staticmethod
    def resolveThreshold(mode: str, value, entry: dict | None, method: str, preset: str | None = None,
                         backend: str | None = None) -> float:
        """Score threshold for a mode ("calibrated", "fpr" with a rate in [0, 1], "value"), from the
        model's calibration of the run's method, preset and perceptual backend."""
        from .thresholding import resolve_threshold

        return resolve_threshold(mode, value, entry, method, preset, backend)

    @staticmethod
    def thresholdSliderRange(result, entry: dict | None, method: str) -> dict:
        """Slider maximum, step and start value for the "value" mode (6 significant decimals)."""
        from .thresholding import calibrated_threshold

        value = None
        top = 0.0
        if result is not None and result.heatmapNode is not None and result.heatmapNode.GetImageData() is not None:
            import slicer.util

            heat = np.asarray(slicer.util.arrayFromVolume(result.heatmapNode))
            top = float(heat.max()) if heat.size else 0.0
            t = result.heatmapNode.GetAttribute(ATTR_PREFIX + "threshold")
            value = float(t) if t else None
        if value is None and entry is not None:
            value = calibrated_threshold(entry, method)
        if value is None or not np.isfinite(value):
            value = 0.1
        maximum = max(top, 2.0 * value, 1e-6)
        step = 10.0 ** np.floor(np.log10(maximum / 1000.0))
        return {"maximum": float(maximum), "step": float(step), "value": float(value)}

    @staticmethod
    def thresholdText(threshold: float, voxels: int, entry: dict | None, method: str, preset: str | None = None,
                      backend: str | None = None) -> str:
        from .thresholding import calibrated_threshold, fpr_for_threshold

        text = f"threshold {threshold:.6g}: {voxels} anomalous voxels"
        if entry is not None:
            cal = calibrated_threshold(entry, method, preset, backend)
            if cal is not None:
                text += f"; calibrated {cal:.6g}"
            fpr = fpr_for_threshold(entry, method, threshold, preset, backend)
            if fpr is not None:
                text += f"; healthy false-positive rate {100 * fpr:.3g} %"
        return text

    @staticmethod
    def resultText(result) -> str:
        info = result.info
        where = "a background process" if info.get("background_process") else "Slicer's process"
        thr = info.get("threshold")
        return (f"Done in {float(info.get('elapsed_total_s') or 0.0):.1f} s in {where}: "
                f"{info.get('anomalous_voxels', 0)} anomalous voxels (threshold "
                f"{float(thr) if thr is not None else float('nan'):.6g}, {info.get('threshold_source', '')}); "
                f"{info.get('slices', '?')} slices on {info.get('device', '?')}, batch {info.get('batch_size', '?')}.")

    # -- the run --------------------------------------------------------------
    def process(self, inputVolumeNode, method: str = "anoddpm", model=None, device: str = "auto",
                preset: str | None = None, seed: int = 0, threshold: float | None = None,
                params: dict | None = None, progressCallback: Callable[[int, int], Any] | None = None,
                cancel=None, brainMaskNode=None, batchSize: int = 16, namePrefix: str | None = None,
                restorationVolume=None, heatmapVolume=None, anomalySegmentation=None,
                threads: int | None = None, precision: str = "fp32") -> UADResult:
        """Detect anomalies in ``inputVolumeNode`` in this process; returns a ``UADResult``.

        ``model``: a model id, a ``uad.zoo.Model`` or None (the method's default model).
        ``progressCallback(done, total)``: slices finished.  ``cancel``: a callable
        (or threading.Event) polled between batches; raises ``uad.Cancelled``.
        ``brainMaskNode``: optional brain mask volume (label map) on the input grid.
        ``restorationVolume`` / ``heatmapVolume`` / ``anomalySegmentation``: existing
        nodes to overwrite (None: new nodes).  ``threads``: torch CPU threads during
        the run (default ``default_thread_count()``, one core left to Slicer).
        Out of GPU memory halves the batch and retries (``info["batch_size"]``).
        ``precision``: fp32 (default), bf16 or fp16 autocast of the networks only (``info["precision"]``).
        The input node and its voxels are never modified.
        (``UADExtensionLib.runner.BackgroundRun`` does the same in a separate process.)
        """
        scene = self.scene
        self._checkInput(inputVolumeNode, scene, "input volume")
        if brainMaskNode is not None:
            self._checkInput(brainMaskNode, scene, "brain mask", allowLabelmap=True)
        self._checkOutputs(scene, restorationVolume, heatmapVolume, anomalySegmentation)
        method = str(method).lower()
        start = time.perf_counter()

        image = volume_node_to_sitk(inputVolumeNode)
        brain_mask = volume_node_to_sitk(brainMaskNode) if brainMaskNode is not None else None

        from uad.pipeline import detect  # heavy (torch): imported only when running

        # the method's default model (model None) is its model for this volume's contrast, as on the CLI
        contrast = volume_contrast(image, inputVolumeNode.GetName(), brain_mask) if model is None else None
        with bounded_torch_threads(threads), collect_engine_warnings() as warnings:
            det, batchSize = detect_halving_batch_on_oom(
                detect, image, method=method, model=model, device=device, seed=seed, batch_size=batchSize,
                preset=preset, params=params, threshold=threshold, brain_mask=brain_mask,
                progress=progressCallback, cancel=_cancel_function(cancel), precision=precision,
                contrast=contrast)
        info = dict(det.info or {})
        model_id = getattr(model, "id", None) or info.get("model") or (model if isinstance(model, str) else None)
        info.setdefault("model", model_id)
        info["warnings"] = list(dict.fromkeys(list((info.get("preprocess") or {}).get("warnings", [])) + warnings))
        result = self.buildOutputs(inputVolumeNode, det.restoration, det.anomaly, det.mask, info, method=method,
                                   preset=preset, seed=seed, threshold=threshold, namePrefix=namePrefix,
                                   restorationVolume=restorationVolume, heatmapVolume=heatmapVolume,
                                   anomalySegmentation=anomalySegmentation)
        result.info["elapsed_total_s"] = time.perf_counter() - start
        return result

    def processNodes(self, inputVolumeNodes, **kwargs) -> list:
        """``process`` every node of a list (or of a sequence's volumes, passed as a list); one result each."""
        for key in ("restorationVolume", "heatmapVolume", "anomalySegmentation"):
            if kwargs.get(key) is not None:
                raise ValueError(f"{key} cannot be shared by several inputs")
        return [self.process(node, **kwargs) for node in list(inputVolumeNodes)]

    def processSequence(self, sequenceNode, namePrefix: str | None = None, **kwargs) -> dict:
        """``process`` every volume of a sequence; returns {"restoration", "anomaly", "segmentation"} sequences.

        The output sequences have the input's index name, unit and values.  Each item is run
        on a temporary copy of the volume (the sequence and its items are not modified); all
        temporary nodes are removed, and on failure or cancel everything created is removed.
        """
        import slicer.util

        scene = self.scene
        if sequenceNode is None or not sequenceNode.IsA("vtkMRMLSequenceNode"):
            from uad import InputError

            raise InputError("not a sequence node")
        for key in ("restorationVolume", "heatmapVolume", "anomalySegmentation"):
            if kwargs.get(key) is not None:
                raise ValueError(f"{key} cannot be used with a sequence")
        prefix = namePrefix or sequenceNode.GetName() or "sequence"
        before = node_ids(scene)
        try:
            outputs = {}
            for role in ("restoration", "anomaly", "segmentation"):
                seq = scene.AddNewNodeByClass("vtkMRMLSequenceNode", scene.GenerateUniqueName(f"{prefix} {role}"))
                seq.SetIndexName(sequenceNode.GetIndexName())
                seq.SetIndexUnit(sequenceNode.GetIndexUnit())
                seq.SetIndexType(sequenceNode.GetIndexType())
                outputs[role] = seq
            keep = node_ids(scene)
            for i in range(sequenceNode.GetNumberOfDataNodes()):
                data = sequenceNode.GetNthDataNode(i)
                value = sequenceNode.GetNthIndexValue(i)
                if data is None or not data.IsA("vtkMRMLScalarVolumeNode"):
                    from uad import InputError

                    raise InputError(f"item {value!r} of {sequenceNode.GetName()!r} is not a scalar volume")
                item = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(f"{prefix} {value}"))
                item.CopyOrientation(data)
                slicer.util.updateVolumeFromArray(item, np.array(slicer.util.arrayFromVolume(data), copy=True))
                result = self.process(item, namePrefix=f"{prefix} [{value}]", **kwargs)
                outputs["restoration"].SetDataNodeAtValue(result.restorationNode, value)
                outputs["anomaly"].SetDataNodeAtValue(result.heatmapNode, value)
                outputs["segmentation"].SetDataNodeAtValue(result.segmentationNode, value)
                remove_nodes_not_in(scene, keep)  # the item and its outputs (copied into the sequences)
        except BaseException:
            remove_nodes_not_in(scene, before)
            raise
        return outputs

    def buildOutputs(self, inputVolumeNode, restoration, anomaly, mask, info: dict, method: str,
                     preset: str | None = None, seed: int = 0, threshold: float | None = None,
                     namePrefix: str | None = None, restorationVolume=None, heatmapVolume=None,
                     anomalySegmentation=None) -> UADResult:
        """Nodes from the engine's three images (SimpleITK images on the input grid); transactional.

        Shared by ``process`` (in-process detection) and the background runner
        (images read back from the ``uad detect`` output files), so both give equal nodes.
        """
        scene = self.scene
        # Validate every output before touching the scene.
        if inputVolumeNode.GetScene() is not scene:
            from uad import InputError

            raise InputError(f"the input volume {inputVolumeNode.GetName()!r} was removed from the scene during the run")
        restoration = sitk_to_array_on_grid(restoration, inputVolumeNode, "restoration")
        anomaly = sitk_to_array_on_grid(anomaly, inputVolumeNode, "anomaly map")
        mask = sitk_to_array_on_grid(mask, inputVolumeNode, "anomaly mask") > 0

        info = dict(info or {})
        thr = info.get("threshold", threshold)
        info.setdefault("method", method)
        info.setdefault("threshold", thr)
        info["input"] = inputVolumeNode.GetName()
        info["anomalous_voxels"] = int(mask.sum())
        prefix = namePrefix or inputVolumeNode.GetName() or "volume"
        model_id = info.get("model")
        post = info.get("postprocess") or {}

        before = node_ids(scene)
        try:
            restorationNode = self._addRestoration(scene, inputVolumeNode, restoration,
                                                   f"{prefix} restoration ({method})", restorationVolume)
            heatmapNode = self._addHeatmap(scene, inputVolumeNode, anomaly, thr, f"{prefix} anomaly ({method})",
                                           heatmapVolume)
            segmentationNode, segmentId = self._addSegmentation(scene, inputVolumeNode, mask,
                                                                f"{prefix} anomaly segmentation ({method})",
                                                                anomalySegmentation)
            attrs = {"method": method, "model": str(model_id or ""), "preset": str(info.get("preset", preset) or ""),
                     "seed": str(seed), "threshold": "" if thr is None else repr(float(thr)),
                     "thresholdSource": str(info.get("threshold_source", "")),
                     "minComponentSize": str(int(post.get("min_component_size") or 0)),
                     "inputNodeID": inputVolumeNode.GetID(), "segmentID": segmentId,
                     "heatmapNodeID": heatmapNode.GetID(), "segmentationNodeID": segmentationNode.GetID()}
            for role, node in (("restoration", restorationNode), ("anomaly", heatmapNode),
                               ("segmentation", segmentationNode)):
                node.SetAttribute(ATTR_PREFIX + "role", role)
                for k, v in attrs.items():
                    node.SetAttribute(ATTR_PREFIX + k, v)
        except BaseException:
            removed = remove_nodes_not_in(scene, before)
            logging.error(f"UAD: building the output nodes failed; removed {len(removed)} node(s) again")
            raise
        self._placeInSubjectHierarchy(scene, inputVolumeNode, (restorationNode, heatmapNode, segmentationNode))
        logging.info(f"UAD: {method} on {prefix!r}: {info['anomalous_voxels']} anomalous voxels, threshold {thr}")
        return UADResult(restorationNode, heatmapNode, segmentationNode, info, segmentId)

    @staticmethod
    def _checkOutputs(scene, restorationVolume, heatmapVolume, anomalySegmentation) -> None:
        from uad import InputError

        for node, cls, what in ((restorationVolume, "vtkMRMLScalarVolumeNode", "restoration volume"),
                                (heatmapVolume, "vtkMRMLScalarVolumeNode", "heatmap volume"),
                                (anomalySegmentation, "vtkMRMLSegmentationNode", "anomaly segmentation")):
            if node is None:
                continue
            if not node.IsA(cls) or node.IsA("vtkMRMLLabelMapVolumeNode"):
                raise InputError(f"the {what} output {node.GetName()!r} is a {node.GetClassName()}, not a {cls}")
            if node.GetScene() is not scene:
                raise InputError(f"the {what} output {node.GetName()!r} is not in this logic's scene")
        given = [n for n in (restorationVolume, heatmapVolume) if n is not None]
        if len(given) == 2 and given[0] is given[1]:
            raise InputError("the restoration and heatmap outputs must be different nodes")

    # -- display helpers (Qt-free; the widget calls them) --------------------------------
    def mostAnomalousPoint(self, result) -> tuple[float, float, float]:
        """World RAS of the strongest score inside the largest anomalous component (or of the maximum).

        The GUI jumps the slice views there (``JumpSlicesToLocation``).
        """
        import slicer.util
        from scipy import ndimage

        from .nodes import ijk_to_ras

        heat = np.asarray(slicer.util.arrayFromVolume(result.heatmapNode), dtype=np.float64)
        mask = self._segmentArray(result)
        region = None
        if mask is not None and mask.any():
            lab, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
            sizes = np.bincount(lab.ravel())
            sizes[0] = 0
            region = lab == int(np.argmax(sizes))
        scores = np.where(region, heat, -np.inf) if region is not None else heat
        k, j, i = np.unravel_index(int(np.argmax(scores)), heat.shape)
        ras = ijk_to_ras(result.heatmapNode) @ np.array([i, j, k, 1.0])
        transform = result.heatmapNode.GetParentTransformNode()
        if transform is not None:
            import vtk

            m = vtk.vtkMatrix4x4()
            if transform.GetMatrixTransformToWorld(m):
                ras = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)]) @ ras
        return float(ras[0]), float(ras[1]), float(ras[2])

    def _segmentArray(self, result):
        """The result's segment as a (k, j, i) bool array on the heatmap grid (None if it is gone)."""
        import vtk

        import slicer.util

        seg = result.segmentationNode
        if seg is None or seg.GetSegmentation().GetSegment(result.segmentId) is None:
            return None
        scene = self.scene
        before = node_ids(scene)
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", scene.GenerateUniqueName("UAD temporary export"))
        try:
            ids = vtk.vtkStringArray()
            ids.InsertNextValue(result.segmentId)
            if not self.segmentationsLogic.ExportSegmentsToLabelmapNode(seg, ids, labelmap, result.heatmapNode):
                return None
            return np.array(slicer.util.arrayFromVolume(labelmap), copy=True) > 0
        finally:
            remove_nodes_not_in(scene, before)  # the label map and the display / colour nodes the export added

    @staticmethod
    def show3D(result, show: bool = True) -> None:
        """Closed-surface representation of the anomaly segment, visible in 3D views."""
        seg = result.segmentationNode
        if show:
            seg.CreateClosedSurfaceRepresentation()
        display = seg.GetDisplayNode()
        if display is not None:
            display.SetVisibility3D(bool(show))

    # -- live threshold ------------------------------------------------------------
    def updateThreshold(self, result_or_heatmap, threshold: float) -> int:
        """Re-threshold the existing heatmap into its segment (no inference); returns the voxel count.

        ``result_or_heatmap``: a ``UADResult`` or the heatmap node of one.  The
        method's connected-component filter (``minComponentSize``) is applied as in
        the run, so a run with ``threshold=t`` and ``updateThreshold(result, t)``
        give the same segment.  The heatmap's transparency follows the threshold.
        """
        from .thresholding import rethreshold

        heatmapNode = getattr(result_or_heatmap, "heatmapNode", result_or_heatmap)
        return rethreshold(self, heatmapNode, float(threshold))

    # -- building blocks ------------------------------------------------------
    @staticmethod
    def _checkInput(node, scene, what: str, allowLabelmap: bool = False) -> None:
        from uad import InputError

        if node is None:
            raise InputError(f"no {what} selected")
        if not node.IsA("vtkMRMLScalarVolumeNode"):
            raise InputError(f"{what} {node.GetName()!r} is a {node.GetClassName()}, not a scalar volume")
        if node.IsA("vtkMRMLLabelMapVolumeNode") and not allowLabelmap:
            raise InputError(f"{what} {node.GetName()!r} is a label map, not an MR image")
        if node.GetScene() is not scene:
            raise InputError(f"{what} {node.GetName()!r} is not in this logic's scene")

    @staticmethod
    def _addRestoration(scene, inputNode, array, name, node=None):
        if node is None:
            node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(name))
        set_volume_from_array(node, array, inputNode)
        node.CreateDefaultDisplayNodes()
        display, inputDisplay = node.GetDisplayNode(), inputNode.GetDisplayNode()
        if display is not None and inputDisplay is not None and inputDisplay.IsA("vtkMRMLScalarVolumeDisplayNode"):
            if inputDisplay.GetColorNodeID():
                display.SetAndObserveColorNodeID(inputDisplay.GetColorNodeID())
            if inputDisplay.GetWindow() > 0:  # same grey levels as the input, so the two compare directly
                display.AutoWindowLevelOff()
                display.SetWindowLevel(inputDisplay.GetWindow(), inputDisplay.GetLevel())
        return node

    @staticmethod
    def _addHeatmap(scene, inputNode, array, threshold, name, node=None):
        from .colors import get_or_create_heat_color_node

        if node is None:
            node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(name))
        set_volume_from_array(node, np.asarray(array, dtype=np.float32), inputNode)
        node.CreateDefaultDisplayNodes()
        colorNode, _ = get_or_create_heat_color_node(scene)
        r = heat_display_range(array, threshold)
        display = node.GetDisplayNode()
        display.SetAndObserveColorNodeID(colorNode.GetID())
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(r["window_min"], r["window_max"])
        display.AutoThresholdOff()
        display.SetThreshold(r["lower"], r["upper"])
        display.ApplyThresholdOn()
        display.SetInterpolate(True)
        return node

    def _addSegmentation(self, scene, inputNode, mask, name, node=None):
        segLogic = self.segmentationsLogic  # before any segment exists (registers the converters headless)
        if node is None:
            node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", scene.GenerateUniqueName(name))
        else:
            node.GetSegmentation().RemoveAllSegments()  # a reused output: its segments are replaced
        transform_id = inputNode.GetTransformNodeID()
        if transform_id:
            node.SetAndObserveTransformNodeID(transform_id)
        node.CreateDefaultDisplayNodes()
        node.SetReferenceImageGeometryParameterFromVolumeNode(inputNode)
        node.SetNodeReferenceID(node.GetReferenceImageGeometryReferenceRole(), inputNode.GetID())
        segmentation = node.GetSegmentation()
        segmentId = segmentation.AddEmptySegment(SEGMENT_NAME, SEGMENT_NAME, list(SEGMENT_COLOR))
        if not segmentId:
            raise RuntimeError("could not create the anomaly segment")

        self.importMaskIntoSegment(node, segmentId, mask, inputNode)

        segment = segmentation.GetSegment(segmentId)
        segment.SetName(SEGMENT_NAME)
        segment.SetColor(*SEGMENT_COLOR)
        segment.SetTag(segment.GetTerminologyEntryTagName(), SEGMENT_TERMINOLOGY)
        display = node.GetDisplayNode()
        if display is not None:
            display.SetOpacity2DFill(0.15)
            display.SetOpacity2DOutline(1.0)
        return node, segmentId

    def importMaskIntoSegment(self, segmentationNode, segmentId, mask, referenceNode) -> None:
        """Replace the voxels of segment ``segmentId`` by ``mask`` (k, j, i on ``referenceNode``'s grid)."""
        import vtk

        scene = self.scene
        segLogic = self.segmentationsLogic
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", scene.GenerateUniqueName("UAD temporary mask"))
        try:
            set_volume_from_array(labelmap, np.asarray(mask, dtype=np.uint8), referenceNode)
            ids = vtk.vtkStringArray()
            ids.InsertNextValue(segmentId)
            if not segLogic.ImportLabelmapToSegmentationNode(labelmap, segmentationNode, ids):
                raise RuntimeError("importing the anomaly mask into the segmentation failed")
        finally:
            scene.RemoveNode(labelmap)

    @staticmethod
    def _placeInSubjectHierarchy(scene, inputNode, nodes) -> None:
        """Put the outputs next to the input (its study) when the scene has a subject hierarchy."""
        try:
            sh = scene.GetFirstNodeByClass("vtkMRMLSubjectHierarchyNode")
            if sh is None:
                return
            inputItem = sh.GetItemByDataNode(inputNode)
            if not inputItem:
                return
            parent = sh.GetItemParent(inputItem)
            for node in nodes:
                item = sh.GetItemByDataNode(node)
                if item:
                    sh.SetItemParent(item, parent)
                else:
                    sh.CreateItem(parent, node)
        except Exception as e:  # cosmetic: never fail a finished run because of it
            logging.warning(f"UAD: could not place the outputs in the subject hierarchy: {e}")
