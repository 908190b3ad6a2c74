"""Registration to nilearn's MNI152 2009 template (SimpleITK, Mattes mutual information).

``mni152(spacing_mm)`` gives the template T1 (brain-extracted, as nilearn ships it)
and its brain mask on an isotropic grid covering the template's box (1 mm: the
template grid itself).  ``register_affine(fixed, moving)`` runs a rigid then an
affine registration (multi-resolution, random sampling with a fixed seed, computed on
one thread: bit-identical whatever the number of cores, see ``single_threaded``) and
returns the ``sitk.AffineTransform`` that maps fixed points to moving points, i.e.
the transform ``sitk.Resample(moving, fixed, T)`` needs.  Mutual information makes it
work across contrasts (T1, T2, FLAIR onto the T1 template).  ``register_deformable``
adds a B-spline stage on top of an affine.

The preprocessing chain registers the *brain* (the input masked by its brain
mask) to the brain template, so the skull of an unprocessed scan does not pull
the registration (see ``uad.preprocess.Register``).
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import SimpleITK as sitk

#: The template resolution (mm) the preprocessing chain's affine registration is computed at
#: (``uad.preprocess.Register``; its result is applied on the template grid of the model, 1 mm by default).
#: An affine transform has 12 parameters: at 2 mm the transforms of four acquisitions of one head agree as
#: well as at 1 mm (T1, FLAIR within 0.2 mm of the 1 mm agreement; T2 better), in a fifth of the time and a
#: third of the memory (``benchmarks/bench_registration.py``; README, "Registration at 2 mm").
REGISTRATION_MM = 2.0

#: Defaults of ``register_affine``, for a fixed image of ``REGISTRATION_MM`` voxels: levels at 4 and 2 mm
#: (tests pass smaller iteration counts).
AFFINE_DEFAULTS = {"iterations": (200, 100), "shrink": (2, 1), "smoothing_mm": (4.0, 2.0),
                   "sampling": 0.1, "bins": 32, "seed": 12345}


@functools.lru_cache(maxsize=4)
def mni152(spacing_mm: float | None = None) -> tuple[sitk.Image, sitk.Image]:
    """(T1 float32, brain mask uint8) of nilearn's MNI152 2009 template at ``spacing_mm`` (None / 1 = 1 mm).

    Cached: do not modify the returned images.
    """
    from .phantoms import _output_grid, _template, template_images

    imgs = template_images()
    t1, brain = imgs["t1"], imgs["brain"]
    if spacing_mm is None or abs(float(spacing_mm) - float(t1.GetSpacing()[0])) < 1e-6:
        return t1, brain
    t = _template()
    size, sp, origin = _output_grid(t, float(spacing_mm))
    sigma = [max(0.0, (float(spacing_mm) ** 2 - s ** 2)) ** 0.5 / 2.3548 for s in t1.GetSpacing()]
    smooth = sitk.SmoothingRecursiveGaussian(t1, sigma) if max(sigma) > 0 else t1
    ref = sitk.Image([int(v) for v in size], sitk.sitkUInt8)
    ref.SetSpacing([float(v) for v in sp])
    ref.SetOrigin([float(v) for v in origin])
    ref.SetDirection(t1.GetDirection())
    t1s = sitk.Resample(smooth, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    bs = sitk.Resample(sitk.Cast(brain, sitk.sitkFloat32), ref, sitk.Transform(), sitk.sitkLinear, 0.0,
                       sitk.sitkFloat32)
    return t1s, sitk.Cast(bs > 0.5, sitk.sitkUInt8)


@contextlib.contextmanager
def single_threaded():
    """SimpleITK on one thread while the block (or the decorated function) runs (the registrations): ITK's multi-threaded metric,
    initialiser and scales estimator add partial sums in an order that depends on the number of threads,
    so the transform would differ in its last digits from one machine to another."""
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


def _method(bins: int, sampling: float, seed: int, shrink, smoothing_mm, fixed_mask=None):
    r = sitk.ImageRegistrationMethod()
    r.SetMetricAsMattesMutualInformation(numberOfHistogramBins=int(bins))
    r.SetMetricSamplingStrategy(r.RANDOM)
    r.SetMetricSamplingPercentage(float(sampling), int(seed))
    r.SetInterpolator(sitk.sitkLinear)
    r.SetShrinkFactorsPerLevel([int(s) for s in shrink])
    r.SetSmoothingSigmasPerLevel([float(s) for s in smoothing_mm])
    r.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    if fixed_mask is not None:
        r.SetMetricFixedMask(fixed_mask)
    return r


def _levels(iterations, shrink, smoothing_mm):
    n = len(shrink)
    its = list(iterations) if isinstance(iterations, (list, tuple)) else [int(iterations)] * n
    if len(its) != n or len(smoothing_mm) != n:
        raise ValueError("registration: iterations, shrink and smoothing_mm need one value per level")
    return its


@single_threaded()
def register_affine(fixed: sitk.Image, moving: sitk.Image, iterations=None, shrink=None, smoothing_mm=None,
                    sampling=None, bins=None, seed=None, fixed_mask: sitk.Image | None = None,
                    rigid_only: bool = False) -> tuple[sitk.AffineTransform, float]:
    """Rigid then affine registration, Mattes MI; (transform fixed -> moving, final metric value).

    ``iterations``: per resolution level (or one number for all levels); the
    rigid and the affine stage each run them.  Images are cast to float32.  Computed on one thread
    (``single_threaded``): the same transform on any machine.
    """
    d = AFFINE_DEFAULTS
    shrink = tuple(shrink or d["shrink"])
    smoothing_mm = tuple(smoothing_mm or d["smoothing_mm"])[:len(shrink)]
    its = _levels(iterations if iterations is not None else d["iterations"][:len(shrink)], shrink, smoothing_mm)
    sampling = float(sampling if sampling is not None else d["sampling"])
    bins = int(bins or d["bins"])
    seed = int(d["seed"] if seed is None else seed)
    f = sitk.Cast(fixed, sitk.sitkFloat32)
    m = sitk.Cast(moving, sitk.sitkFloat32)
    if fixed_mask is not None:
        fixed_mask = sitk.Cast(fixed_mask, sitk.sitkUInt8)
    rigid = sitk.CenteredTransformInitializer(f, m, sitk.Euler3DTransform(),
                                              sitk.CenteredTransformInitializerFilter.MOMENTS)
    rigid = sitk.Euler3DTransform(rigid)
    metric = 0.0
    for stage in (("rigid",) if rigid_only else ("rigid", "affine")):
        if stage == "rigid":
            tx = rigid
        else:
            tx = sitk.AffineTransform(3)
            tx.SetCenter(rigid.GetCenter())
            tx.SetMatrix(rigid.GetMatrix())
            tx.SetTranslation(rigid.GetTranslation())
        for level, n_it in enumerate(its):
            r = _method(bins, sampling, seed, shrink[level:level + 1], smoothing_mm[level:level + 1], fixed_mask)
            r.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=int(n_it),
                                                       relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8)
            r.SetOptimizerScalesFromPhysicalShift()
            r.SetInitialTransform(tx, inPlace=True)
            r.Execute(f, m)
            metric = float(r.GetMetricValue())
        if stage == "rigid":
            rigid = tx
    if rigid_only:
        out = sitk.AffineTransform(3)
        out.SetCenter(rigid.GetCenter())
        out.SetMatrix(rigid.GetMatrix())
        out.SetTranslation(rigid.GetTranslation())
        return out, metric
    return tx, metric


@single_threaded()
def register_deformable(fixed: sitk.Image, moving: sitk.Image, affine: sitk.Transform, mesh_mm: float = 40.0,
                        iterations: int = 30, shrink=(4, 2), smoothing_mm=(3.0, 1.5), sampling: float = 0.1,
                        bins: int = 32, seed: int = 12345, fixed_mask: sitk.Image | None = None) -> sitk.Transform:
    """A B-spline (``mesh_mm`` control-point spacing) on top of ``affine``, Mattes MI, L-BFGS-B.

    Returns a composite transform fixed -> moving (affine, then the B-spline in moving... applied first
    in fixed space), for ``sitk.Resample(moving, fixed, T)``.  Computed on one thread, as ``register_affine``.
    """
    f = sitk.Cast(fixed, sitk.sitkFloat32)
    m = sitk.Cast(moving, sitk.sitkFloat32)
    extent = np.array(f.GetSize()) * np.array(f.GetSpacing())
    mesh = [max(1, int(round(e / float(mesh_mm)))) for e in extent]
    bs = sitk.BSplineTransformInitializer(f, mesh, order=3)
    r = _method(bins, sampling, seed, shrink, smoothing_mm[:len(shrink)],
                sitk.Cast(fixed_mask, sitk.sitkUInt8) if fixed_mask is not None else None)
    r.SetMovingInitialTransform(affine)
    r.SetInitialTransform(bs, inPlace=True)
    r.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=int(iterations),
                           maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=4 * int(iterations))
    r.Execute(f, m)
    comp = sitk.CompositeTransform(3)
    comp.AddTransform(affine)
    comp.AddTransform(bs)
    return comp
