"""Volume nodes <-> SimpleITK images, and scene bookkeeping helpers.

Slicer stores a volume as voxels (numpy order k, j, i) plus an IJK->RAS
matrix; SimpleITK (like ITK and NIfTI readers) uses LPS physical space with
spacing, origin and a direction matrix.  The two conversions here are exact
inverses: RAS = diag(-1, -1, 1) . LPS.

Nothing in this module imports qt or reads ``slicer.mrmlScene``.
"""

from __future__ import annotations

import numpy as np
import vtk

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def _input_error(message: str) -> Exception:
    try:
        from uad import InputError
    except ImportError:  # engine not importable: still give a clear message
        return ValueError(message)
    return InputError(message)


def ijk_to_ras(node) -> np.ndarray:
    """The node's 4x4 IJK->RAS matrix as a numpy array."""
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)


def volume_array(node) -> np.ndarray:
    """A *copy* of the node's voxels (k, j, i); the node is never modified."""
    import slicer.util

    image = node.GetImageData() if node is not None else None
    if image is None or image.GetNumberOfPoints() == 0:
        name = node.GetName() if node is not None else "None"
        raise _input_error(f"volume {name!r} has no voxels")
    if image.GetNumberOfScalarComponents() != 1:
        raise _input_error(f"volume {node.GetName()!r} has {image.GetNumberOfScalarComponents()} components; "
                           "a scalar (single-channel) volume is needed")
    return np.array(slicer.util.arrayFromVolume(node), copy=True)


def lps_geometry(node) -> tuple[tuple, tuple, tuple]:
    """(spacing, origin, direction) of the node's grid in LPS, SimpleITK conventions."""
    m = ijk_to_ras(node)
    lin = _RAS_TO_LPS @ m[:3, :3]
    spacing = np.linalg.norm(lin, axis=0)
    if np.any(spacing <= 0) or not np.all(np.isfinite(lin)):
        raise _input_error(f"volume {node.GetName()!r} has a degenerate IJK to RAS matrix")
    direction = lin / spacing
    origin = _RAS_TO_LPS @ m[:3, 3]
    return tuple(float(s) for s in spacing), tuple(float(o) for o in origin), tuple(float(d) for d in direction.ravel())


def volume_node_to_sitk(node):
    """SimpleITK image with the node's voxels (copied) and geometry (LPS)."""
    import SimpleITK as sitk

    arr = volume_array(node)
    spacing, origin, direction = lps_geometry(node)
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def sitk_to_array_on_grid(image, reference_node, what: str = "output") -> np.ndarray:
    """Voxels of ``image`` (k, j, i), after checking that it lies on ``reference_node``'s grid."""
    import SimpleITK as sitk

    ref_dims = tuple(reference_node.GetImageData().GetDimensions())
    if tuple(image.GetSize()) != ref_dims:
        raise RuntimeError(f"{what} has size {tuple(image.GetSize())}, the input volume {ref_dims}")
    spacing, origin, direction = lps_geometry(reference_node)
    scale = max(max(abs(s) for s in spacing), 1e-12)
    if (not np.allclose(image.GetSpacing(), spacing, rtol=1e-4, atol=1e-6 * scale)
            or not np.allclose(image.GetOrigin(), origin, rtol=0, atol=1e-3 * scale)
            or not np.allclose(image.GetDirection(), direction, rtol=0, atol=1e-4)):
        raise RuntimeError(f"{what} is not on the input volume's grid")
    return sitk.GetArrayFromImage(image)


def set_volume_from_array(node, array: np.ndarray, reference_node) -> None:
    """Deep-copy ``array`` (k, j, i) into ``node`` with ``reference_node``'s geometry and transform."""
    import slicer.util

    node.CopyOrientation(reference_node)  # origin, spacing, IJK->RAS directions
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array))
    transform_id = reference_node.GetTransformNodeID()
    if transform_id:
        node.SetAndObserveTransformNodeID(transform_id)


def node_ids(scene) -> list[str]:
    """IDs of all nodes of the scene, in scene order."""
    nodes = scene.GetNodes()
    out = []
    for i in range(nodes.GetNumberOfItems()):
        n = nodes.GetItemAsObject(i)
        if n is not None:
            out.append(n.GetID())
    return out


def remove_nodes_not_in(scene, keep_ids) -> list[str]:
    """Remove (newest first) every node whose ID is not in ``keep_ids``; returns the removed IDs."""
    keep = set(keep_ids)
    removed = []
    for node_id in reversed(node_ids(scene)):
        if node_id in keep:
            continue
        node = scene.GetNodeByID(node_id)
        if node is not None:  # removing a node may already have removed its display/storage nodes
            scene.RemoveNode(node)
            removed.append(node_id)
    return removed
