"""Qt-free Slicer side of the UADExtension module (tested with pytest on a slicer-core scene).

Everything here imports with plain Slicer Python or with the headless
``slicer-core`` wheel: no ``qt``, ``ctk``, ``slicer.app``, ``slicer.mrmlScene``
or ``slicer.modules`` at import time (``modelspanel`` imports Qt inside its
methods and is used only by the GUI).  The scene (and, optionally, the
Segmentations module logic) is passed in by the caller.

- ``logic``:        ``UADExtensionLogic`` (``process`` / ``buildOutputs`` -> restoration, heatmap,
                    segmentation; lists, sequences, live threshold, jump point, Show 3D)
- ``runner``:       ``BackgroundRun``: ``uad detect`` in a separate process (progress, Cancel, crashes)
- ``thresholding``: threshold modes (calibrated / healthy false-positive rate / value), re-thresholding
- ``installer``:    pip plan and command that cannot change torch; the Apply-time requirement flow
- ``models``:       model manager (list, verify, import, LPIPS backbone, remove, folder)
- ``devices``:      torch threads, out-of-memory retry, failure kinds, torch / CUDA / GPU / MPS probe
- ``rendering``:    headless slice-view picture of a result (vtkMRMLSliceLogic)
- ``nodes``:        volume node <-> SimpleITK image (RAS <-> LPS), output volume nodes
- ``colors``:       the heat colour table used for the anomaly map
- ``progress``:     slices done / total -> progress text with rate and ETA
- ``dependencies``: which Python packages the engine needs at run time
- ``modelspanel``, ``selftest``: the GUI's Models section; helpers of the module's self-test

The submodules are imported on demand (``from UADExtensionLib.logic import
UADExtensionLogic``) so that importing this package costs nothing.
"""
