"""The heat colour table of the anomaly map.

Slicer's file-based tables (``vtkMRMLColorTableNodeFileInferno.txt``...) are
loaded from files the application ships; the headless ``slicer-core`` wheel
has none of them, and a missing ID silently leaves a display node without a
colour node.  So the module builds its own user table, the same in the
application and headless: an inferno-like ramp whose lowest entries fade in
from transparent, so that low scores never hide the anatomy.
"""

from __future__ import annotations

import numpy as np

HEAT_TABLE_NAME = "UAD Inferno"
HEAT_TABLE_ATTRIBUTE = "UAD.ColorTable"  # attribute marking tables this module owns
HEAT_TABLE_KIND = "heat"
NUMBER_OF_COLORS = 256
FADE_IN = 0.1  # fraction of the ramp over which alpha rises from 0 to 1

# Inferno (van der Walt & Smith, matplotlib) sampled at 0, 0.1, ..., 1.
_INFERNO = np.array([
    [0.0015, 0.0005, 0.0139],
    [0.0874, 0.0446, 0.2248],
    [0.2582, 0.0386, 0.4065],
    [0.4163, 0.0902, 0.4329],
    [0.5783, 0.1480, 0.4044],
    [0.7357, 0.2159, 0.3302],
    [0.8650, 0.3168, 0.2261],
    [0.9545, 0.4687, 0.0999],
    [0.9876, 0.6453, 0.0399],
    [0.9644, 0.8438, 0.2734],
    [0.9884, 0.9984, 0.6449],
])


def heat_rgba(n: int = NUMBER_OF_COLORS, fade_in: float = FADE_IN) -> np.ndarray:
    """(n, 4) RGBA in [0, 1]: inferno-like colours, alpha 0 -> 1 over the first ``fade_in``."""
    x = np.linspace(0.0, 1.0, n)
    knots = np.linspace(0.0, 1.0, len(_INFERNO))
    rgb = np.stack([np.interp(x, knots, _INFERNO[:, c]) for c in range(3)], axis=1)
    alpha = np.clip(x / fade_in, 0.0, 1.0) if fade_in > 0 else np.ones(n)
    return np.concatenate([rgb, alpha[:, None]], axis=1)


def find_heat_color_node(scene):
    """The module's heat table already in ``scene``, or None."""
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLColorTableNode")
        if node is not None and node.GetAttribute(HEAT_TABLE_ATTRIBUTE) == HEAT_TABLE_KIND:
            return node
    return None


def create_heat_color_node(scene, name: str = HEAT_TABLE_NAME):
    """Add a new user colour table with the heat ramp to ``scene``."""
    import slicer

    node = slicer.vtkMRMLColorTableNode()
    node.SetName(name)
    node.SetTypeToUser()
    node.SetNumberOfColors(NUMBER_OF_COLORS)
    node.SetAttribute(HEAT_TABLE_ATTRIBUTE, HEAT_TABLE_KIND)
    node.SetDescription("Anomaly heat map (inferno-like, transparent at the low end)")
    for i, (r, g, b, a) in enumerate(heat_rgba()):
        node.SetColor(i, float(r), float(g), float(b), float(a))
    node.GetLookupTable().SetRange(0, NUMBER_OF_COLORS - 1)
    scene.AddNode(node)
    return node


def get_or_create_heat_color_node(scene):
    """(node, created): the existing heat table of the scene, or a new one."""
    node = find_heat_color_node(scene)
    if node is not None:
        return node, False
    return create_heat_color_node(scene), True
