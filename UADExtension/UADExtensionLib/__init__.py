"""Qt-free MRML adapter of the UADExtension module.

Everything here imports with plain Slicer Python or with the headless
``slicer-core`` wheel: no ``qt``, ``ctk``, ``slicer.app``, ``slicer.mrmlScene``
or ``slicer.modules`` at import time.  The scene (and, optionally, the
Segmentations module logic) is passed in by the caller.

- ``nodes``:        volume node <-> SimpleITK image (RAS <-> LPS), output volume nodes
- ``colors``:       the heat colour table used for the anomaly map
- ``progress``:     slices done / total -> progress text with ETA
- ``dependencies``: which Python packages the engine needs at run time
- ``logic``:        ``UADExtensionLogic`` (``process`` -> restoration, heatmap, segmentation)

The submodules are imported on demand (``from UADExtensionLib.logic import
UADExtensionLogic``) so that importing this package costs nothing.
"""
