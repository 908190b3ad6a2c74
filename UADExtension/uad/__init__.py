"""uad: unsupervised anomaly detection in brain MRI with diffusion models.

The Qt-free engine of the UADExtension Slicer module.  It imports without
Slicer; heavy dependencies (torch, monai, SimpleITK) are imported by the
submodules that need them, so ``import uad`` itself is cheap.

Plain-Python use::

    import SimpleITK as sitk
    from uad.pipeline import detect
    result = detect(sitk.ReadImage("t2.nii.gz"), method="anoddpm", model="anoddpm-t2-phantom")
    sitk.WriteImage(result.anomaly, "anomaly.nii.gz")
"""

__version__ = "0.1.0"


class UADError(Exception):
    """An error whose message is meant for the user, one line, no traceback needed."""


class InputError(UADError):
    """The input image cannot be processed (wrong dimension, empty, NaN, not an image...)."""


class ModelError(UADError):
    """A model cannot be found, verified or loaded."""


class Cancelled(UADError):
    """The run was cancelled by the caller; nothing was written."""
