"""Which Python packages the engine needs at run time inside Slicer.

Slicer itself brings numpy, SimpleITK and vtk.  torch is installed through the
PyTorch extension (``PyTorchUtils``, which picks the right CUDA build); the
other packages through ``slicer.util.pip_install``.  This module only *checks*
(no Slicer, no Qt): the installing happens in ``UADExtension.py`` when the user
presses Apply, never at import.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re

# torch and torchvision come from the PyTorch extension (light-the-torch picks the CUDA build).
TORCH_REQUIREMENT = ">=2.1"
TORCHVISION_REQUIREMENT = ">=0.16"
TORCH_PACKAGES = {"torch", "torchvision"}

# (import name, pip requirement) of everything else the engine imports while detecting.
# Testing/test_slicer_module.py checks that this covers the imports of uad.pipeline and the methods.
REQUIREMENTS: list[tuple[str, str]] = [
    ("monai", "monai>=1.4"),
    ("einops", "einops>=0.6"),  # MONAI's attention blocks need it
    ("safetensors", "safetensors>=0.4"),
    ("scipy", "scipy>=1.10"),
    ("lpips", "lpips>=0.1.4"),  # perceptual maps of THOR / AutoDDPM (needs torchvision)
    ("tqdm", "tqdm>=4.60"),  # download progress of the model zoo
    ("nibabel", "nibabel>=4.0"),  # NIfTI integrity checks of uad.imageio (truncation, NaN, sheared sform)
    ("PIL", "pillow>=9.0"),  # the ownership marker of the overview PNG (uad.imageio.mark_png)
    ("deepbet", "deepbet>=1.0.2"),  # skull stripping of unprocessed heads (uad.skullstrip)
    ("nilearn", "nilearn>=0.10"),  # the MNI152 template (registration, registration-based brain mask)
]

# Top-level modules Slicer always ships (never pip-installed by this module).
SLICER_BUNDLED = {"numpy", "SimpleITK", "vtk", "slicer", "vtkmodules"}


def _version_tuple(text: str) -> tuple[int, ...]:
    nums = []
    for part in text.split("."):
        m = re.match(r"\d+", part)
        if not m:
            break
        nums.append(int(m.group()))
    return tuple(nums)


def requirement_name_and_minimum(requirement: str) -> tuple[str, str | None]:
    """'monai>=1.4' -> ('monai', '1.4'); 'einops' -> ('einops', None)."""
    m = re.match(r"^\s*([A-Za-z0-9_.\-\[\]]+)\s*(?:>=\s*([0-9][0-9A-Za-z.]*))?\s*$", requirement)
    if not m:
        raise ValueError(f"unsupported requirement {requirement!r} (use 'name' or 'name>=version')")
    return re.sub(r"\[.*\]", "", m.group(1)), m.group(2)


def is_satisfied(import_name: str, requirement: str, find_spec=importlib.util.find_spec,
                 version=importlib.metadata.version) -> bool:
    """True when ``import_name`` is importable and its distribution meets the minimum version."""
    try:
        if find_spec(import_name) is None:
            return False
    except (ImportError, ValueError):
        return False
    dist, minimum = requirement_name_and_minimum(requirement)
    if minimum is None:
        return True
    try:
        installed = version(dist)
    except importlib.metadata.PackageNotFoundError:
        return True  # importable but not pip-managed (e.g. built into Slicer): accept it
    return _version_tuple(installed) >= _version_tuple(minimum)


def missing_requirements(requirements=None, **kwargs) -> list[str]:
    """pip requirements (other than torch) that are missing or too old."""
    reqs = REQUIREMENTS if requirements is None else requirements
    return [req for name, req in reqs if not is_satisfied(name, req, **kwargs)]


def torch_satisfied(find_spec=importlib.util.find_spec, version=importlib.metadata.version) -> bool:
    return is_satisfied("torch", "torch" + TORCH_REQUIREMENT, find_spec=find_spec, version=version)


def torch_missing(find_spec=importlib.util.find_spec, version=importlib.metadata.version) -> bool:
    """True when torch or torchvision is missing or too old (both come from the PyTorch extension)."""
    return not (torch_satisfied(find_spec, version) and
                is_satisfied("torchvision", "torchvision" + TORCHVISION_REQUIREMENT, find_spec=find_spec,
                             version=version))
