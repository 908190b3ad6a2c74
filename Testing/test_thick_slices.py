"""Thick-slice augmentation of the training phantoms (``uad.phantoms.thick_slice_profile``,
``thick_slice_draw``, ``TrainingSliceSource(thick_fraction=...)``, ``TrainConfig.thick_slice_fraction``).

A thick-slice scan resampled onto the model's grid is a box-profile average across the slice followed by
linear interpolation between slice centres; the models trained without it flag that blur as anomalous
(the 4 mm head phantoms of issue 8)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from uad.phantoms import THICK_SLICE_AXES, TrainingSliceSource, thick_slice_draw, thick_slice_profile


def reference_profile(a: np.ndarray, axis: int, u: float, offset: float, k: int = 8) -> np.ndarray:
    """An independent computation of the same definition with ``scipy.ndimage.map_coordinates``."""
    a = np.moveaxis(a.astype(np.float64), axis, 0)
    n = a.shape[0]
    grid = np.indices(a.shape[1:], dtype=np.float64)
    # slice centres offset + j * u, enough of them to bracket every index
    j = np.arange(int(np.floor(-offset / u)) - 1, int(np.ceil((n - 1 - offset) / u)) + 2)
    centres = offset + j * u

    def sample(z: float) -> np.ndarray:
        zc = np.full(a.shape[1:], min(max(z, 0.0), n - 1.0))
        return ndimage.map_coordinates(a, np.concatenate([zc[None], grid]), order=1, mode="nearest")

    sub = ((np.arange(k) + 0.5) / k - 0.5) * u
    thick = np.stack([np.mean([sample(c + d) for d in sub], axis=0) for c in centres])
    out = np.empty_like(a)
    for i in range(n):
        q = (i - centres[0]) / u
        j0 = int(np.floor(q))
        w = q - j0
        out[i] = thick[j0] * (1 - w) + thick[j0 + 1] * w
    return np.moveaxis(out, 0, axis)


@pytest.mark.parametrize("axis,u,offset", [(0, 2.5, 0.7), (1, 3.0, 0.0), (2, 1.6, 1.2)])
def test_profile_matches_reference_computation(axis, u, offset):
    a = np.random.default_rng(1).random((23, 17, 11)).astype(np.float32)
    got = thick_slice_profile(a, axis, u, offset)
    assert got.shape == a.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, reference_profile(a, axis, u, offset), atol=1e-5)


def test_profile_invariants():
    rng = np.random.default_rng(0)
    a = rng.random((40, 12, 9)).astype(np.float32)
    np.testing.assert_array_equal(thick_slice_profile(a, 0, 1.0), a)  # 1-voxel slices: the input
    ramp = np.broadcast_to(np.arange(40, dtype=np.float32)[:, None, None], (40, 4, 4))
    np.testing.assert_allclose(thick_slice_profile(ramp, 0, 3.0, 1.0)[4:-4], ramp[4:-4], atol=1e-4)  # linear kept
    const = np.full((20, 5, 5), 7.0, np.float32)
    np.testing.assert_allclose(thick_slice_profile(const, 2, 4.0, 2.0), const, atol=1e-5)
    # white noise across 4-voxel slices: averaged, so its std falls (by ~2 for a box of 4, more with interpolation)
    t = thick_slice_profile(a, 0, 4.0, 0.0)
    assert t.std() < 0.55 * a.std()
    # only along the chosen axis: a pattern constant along axis 0 is left alone when slicing along axis 0
    stripes = np.broadcast_to(rng.random((1, 12, 9)).astype(np.float32), (40, 12, 9))
    np.testing.assert_allclose(thick_slice_profile(stripes, 0, 5.0, 3.0), stripes, atol=1e-5)
    # and blurred along another axis
    assert np.abs(thick_slice_profile(stripes, 1, 5.0, 3.0) - stripes).max() > 0.1
    # an edge is spread over about one slice thickness
    step = np.zeros((40, 3, 3), np.float32)
    step[20:] = 1.0
    s = thick_slice_profile(step, 0, 4.0, 0.5)[:, 1, 1]
    assert s[:14].max() == 0.0 and s[27:].min() == 1.0 and 0.0 < s[20] < 1.0
    with pytest.raises(ValueError):
        thick_slice_profile(a, 0, 0.5)


def test_draw_is_deterministic_and_follows_fraction_axes_and_range():
    assert all(thick_slice_draw(s, 0.0) is None for s in range(50))
    assert all(thick_slice_draw(s, 1.0) is not None for s in range(50))
    draws = [thick_slice_draw(s, 0.5, (3.0, 6.0)) for s in range(2000)]
    assert draws == [thick_slice_draw(s, 0.5, (3.0, 6.0)) for s in range(2000)]
    on = [d for d in draws if d is not None]
    assert abs(len(on) / 2000 - 0.5) < 0.05
    axes = np.array([d[0] for d in on])
    for ax, p in THICK_SLICE_AXES:
        assert abs((axes == ax).mean() - p) < 0.05
    t = np.array([d[1] for d in on])
    assert t.min() >= 3.0 and t.max() <= 6.0 and abs(t.mean() - 4.5) < 0.15
    assert all(0.0 <= d[2] < 1.0 for d in on)


def _axial_neighbour_difference(src: TrainingSliceSource) -> float:
    e = src.pool[0]
    return float(np.abs(np.diff(e.slices, axis=0)).mean())


def test_training_source_thick_phantoms():
    kw = dict(contrast="T1", image_size=32, pool_size=1, spacing=3.0, prefetch=False)
    seed = next(s for s in range(100) if (d := thick_slice_draw(s, 1.0)) is not None and d[0] == 0)  # axial draw
    plain = TrainingSliceSource(seed=seed, **kw).fill()
    thick = TrainingSliceSource(seed=seed, thick_fraction=1.0, thick_mm=(12.0, 12.0), **kw).fill()
    # the same anatomy, blurred across the axial slices: neighbouring slices more alike
    assert _axial_neighbour_difference(thick) < 0.7 * _axial_neighbour_difference(plain)
    assert thick.describe().endswith(", 100% acquired with 12-12 mm thick slices")
    assert "thick" not in plain.describe()
    x, m, _ = thick.sample_batch(8, np.random.default_rng(0))
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0 and (x[~m] == 0).all()
    # fraction 0 is the source as before (identical slices)
    same = TrainingSliceSource(seed=seed, thick_fraction=0.0, **kw).fill()
    np.testing.assert_array_equal(same.pool[0].slices, plain.pool[0].slices)
    with pytest.raises(ValueError):
        TrainingSliceSource(thick_fraction=1.5)
    with pytest.raises(ValueError):
        TrainingSliceSource(thick_mm=(4.0, 2.0))


def test_paired_twin_gets_the_lesion_phantoms_acquisition():
    s = next(s for s in range(200) if thick_slice_draw(s, 1.0)[0] == 0)
    kw = dict(contrast="T2", image_size=32, pool_size=1, spacing=3.0, prefetch=False, seed=s)
    src = TrainingSliceSource(lesion="tumour", lesion_fraction=1.0, paired=True, thick_fraction=1.0, **kw).fill()
    e = src.pool[0]
    assert e.labels.sum() > 0
    # the healthy twin is the healthy phantom of the same seed with the same thick-slice acquisition
    healthy_thick = TrainingSliceSource(thick_fraction=1.0, **kw).fill().pool[0].slices
    healthy_plain = TrainingSliceSource(**kw).fill().pool[0].slices
    n = len(healthy_thick)
    np.testing.assert_array_equal(e.slices[-n:], healthy_thick)
    assert e.labels[-n:].sum() == 0
    assert healthy_thick.shape != healthy_plain.shape or not np.array_equal(healthy_thick, healthy_plain)
