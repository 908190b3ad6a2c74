"""Skull-stripping-error augmentation of the training phantoms (``uad.phantoms.perturbed_brain_mask``,
``strip_error_draw``, ``TrainingSliceSource(strip_fraction=...)``, ``TrainConfig.strip_error_fraction``).

On a clinical scan the brain mask comes from a skull stripper or a registered template mask (brain-mask Dice
0.92-0.98 on the head phantoms): it takes in some of the bright CSF rim and leaves out some cortex, and the
normalisation percentiles are taken over it.  The models trained on true masks only read those boundary errors
as anomalies (T2 head seed 201: false positives deep in the white matter with the registration mask, none with
the true mask); this augmentation shows them such masks in training."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from uad.phantoms import TrainingSliceSource, make_phantom, perturbed_brain_mask, strip_error_draw


def _sphere(shape=(40, 44, 48), radius_mm=24.0, spacing=(2.0, 1.5, 1.0)):
    c = [(n - 1) / 2.0 for n in shape]
    zz, yy, xx = np.indices(shape, dtype=np.float64)
    r = np.sqrt(((zz - c[0]) * spacing[0]) ** 2 + ((yy - c[1]) * spacing[1]) ** 2 + ((xx - c[2]) * spacing[2]) ** 2)
    return r, r <= radius_mm


@pytest.mark.parametrize("amplitude", [2.0, 5.0])
def test_perturbed_mask_stays_within_the_amplitude_of_the_boundary(amplitude):
    spacing = (2.0, 1.5, 1.0)
    r, ball = _sphere(spacing=spacing)
    m = perturbed_brain_mask(ball, spacing, amplitude, seed=3)
    assert m.dtype == bool and m.shape == ball.shape
    # every change lies within amplitude (+ half the coarsest voxel, the discrete boundary) of the sphere's surface
    slack = amplitude + 0.5 * max(spacing) + 1e-6
    assert (r[m & ~ball] <= 24.0 + slack).all() and (r[ball & ~m] >= 24.0 - slack).all()
    # a ball well inside is kept, the far outside stays out
    assert m[r <= 24.0 - slack].all() and not m[r > 24.0 + slack].any()
    # the boundary moves both ways, and farther with a larger amplitude
    added, removed = int((m & ~ball).sum()), int((ball & ~m).sum())
    assert added > 0 and removed > 0
    small = perturbed_brain_mask(ball, spacing, amplitude / 2.0, seed=3)
    assert (small ^ ball).sum() < (m ^ ball).sum()


def test_perturbed_mask_is_smooth_deterministic_and_seeded():
    spacing = (1.5, 1.5, 1.5)
    r, ball = _sphere(spacing=spacing)
    a = perturbed_brain_mask(ball, spacing, 4.0, seed=7)
    np.testing.assert_array_equal(a, perturbed_brain_mask(ball, spacing, 4.0, seed=7))
    assert not np.array_equal(a, perturbed_brain_mask(ball, spacing, 4.0, seed=8))
    np.testing.assert_array_equal(perturbed_brain_mask(ball, spacing, 0.0, seed=7), ball)
    # a smooth displacement (15 mm correlation length): the new mask is one blob without holes
    lab, n = ndimage.label(a)
    assert n == 1 and np.array_equal(ndimage.binary_fill_holes(a), a)
    # the displacement field varies over the surface: its radius ranges over several mm
    shell = a & ~ndimage.binary_erosion(a)
    assert np.ptp(r[shell]) > 3.0


def test_draw_is_deterministic_and_follows_fraction_and_range():
    assert all(strip_error_draw(s, 0.0) is None for s in range(50))
    assert all(strip_error_draw(s, 1.0) is not None for s in range(50))
    draws = [strip_error_draw(s, 0.5, (2.0, 6.0)) for s in range(2000)]
    assert draws == [strip_error_draw(s, 0.5, (2.0, 6.0)) for s in range(2000)]
    on = np.array([d for d in draws if d is not None])
    assert abs(len(on) / 2000 - 0.5) < 0.05
    assert on.min() >= 2.0 and on.max() <= 6.0 and abs(on.mean() - 4.0) < 0.15


def test_strip_builds_a_head_and_strips_it_with_the_perturbed_mask():
    src = TrainingSliceSource(contrast="T2", image_size=32, pool_size=1, spacing=3.0, prefetch=False,
                              strip_fraction=1.0, strip_mm=(6.0, 6.0))
    seed = 5
    head = make_phantom(seed, "T2", "tumour", spacing=3.0, head=True)
    out = src._strip(head, seed, 6.0)
    truth = sitk.GetArrayFromImage(head.brain_mask) > 0
    mask = sitk.GetArrayFromImage(out.brain_mask) > 0
    img = sitk.GetArrayFromImage(out.image)
    np.testing.assert_array_equal(mask, perturbed_brain_mask(truth, (3.0, 3.0, 3.0), 6.0, seed))
    assert (img[~mask] == 0).all()
    # inside the mask: the head's voxels, the true brain's and the tissue outside it that the mask took in
    np.testing.assert_array_equal(img[mask], sitk.GetArrayFromImage(head.image)[mask])
    assert (img[mask & ~truth] > 0).mean() > 0.9
    assert out.meta["strip_error"]["added_voxels"] == int((mask & ~truth).sum()) > 0
    assert out.meta["strip_error"]["removed_voxels"] == int((truth & ~mask).sum()) > 0
    les = sitk.GetArrayFromImage(out.lesion_mask) > 0
    assert les.any() and not (les & ~mask).any() and out.head_mask is None


def test_training_source_with_strip_errors():
    kw = dict(contrast="T2", image_size=32, pool_size=1, spacing=3.0, prefetch=False, seed=11)
    plain = TrainingSliceSource(**kw).fill()
    strip = TrainingSliceSource(strip_fraction=1.0, **kw).fill()
    assert strip.describe().endswith(", 100% skull-stripped with masks off by up to 2-6 mm")
    assert "skull" not in plain.describe()
    x, m, _ = strip.sample_batch(8, np.random.default_rng(0))
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0 and (x[~m] == 0).all()
    # the same anatomy, another brain mask
    a, b = plain.pool[0], strip.pool[0]
    assert a.masks.shape != b.masks.shape or not np.array_equal(a.masks, b.masks)
    # fraction 0 is the source as before (identical slices)
    same = TrainingSliceSource(strip_fraction=0.0, **kw).fill()
    np.testing.assert_array_equal(same.pool[0].slices, a.slices)
    # a healthy twin is the healthy phantom of its seed, stripped with the same perturbed mask
    paired = TrainingSliceSource(lesion="tumour", lesion_fraction=1.0, paired=True, strip_fraction=1.0, **kw).fill()
    n = len(b.slices)
    np.testing.assert_array_equal(paired.pool[0].slices[-n:], b.slices)
    np.testing.assert_array_equal(paired.pool[0].masks[-n:], b.masks)
    assert paired.pool[0].labels[:-n].sum() > 0 and paired.pool[0].labels[-n:].sum() == 0
    with pytest.raises(ValueError):
        TrainingSliceSource(strip_fraction=-0.1)
    with pytest.raises(ValueError):
        TrainingSliceSource(strip_mm=(0.0, 2.0))
