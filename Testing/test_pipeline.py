"""Volume pipeline: orientation, preprocessing, back-projection, detect()."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk

import uad
import uad.pipeline
from uad.postprocess import apply_method_postprocess, threshold_mask, to_volumes
from uad.preprocess import (CANONICAL_ORIENTATION, _resample_inplane, compute_brain_mask, orient_array,
                            orientation_of, preprocess, unorient_array)

S = 32


def _rot_z(deg):
    a = np.deg2rad(deg)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])


# name -> (shape_zyx, spacing xyz, origin, direction 3x3 (columns = index axes))
GEOMETRIES = {
    "lps_3mm_slices": ((16, 40, 36), (1.2, 1.0, 3.0), (0.0, 0.0, 0.0), np.eye(3)),
    "ras_flipped_origin": ((16, 40, 36), (1.0, 1.0, 3.0), (120.5, 98.0, -40.25), np.diag([-1.0, -1.0, 1.0])),
    "sagittal_permuted": ((30, 34, 12), (1.0, 1.1, 3.5), (-10.0, 20.0, 30.0),
                          np.array([[0, 0, 1.0], [1.0, 0, 0], [0, -1.0, 0]])),
    "oblique_anisotropic": ((14, 36, 30), (0.9, 1.4, 3.0), (5.0, -7.0, 11.0), _rot_z(20.0)),
}


def _same_grid(a: sitk.Image, b: sitk.Image):
    assert a.GetSize() == b.GetSize()
    assert a.GetSpacing() == b.GetSpacing()
    assert a.GetOrigin() == b.GetOrigin()
    assert a.GetDirection() == b.GetDirection()


def _geom_volume(make_volume, name, lesion=True, dtype=np.float32):
    shape, spacing, origin, direction = GEOMETRIES[name]
    return make_volume(shape, spacing, origin, direction, lesion=lesion, dtype=dtype)


# -- orientation ------------------------------------------------------------------------------------
def test_orientation_helpers_match_dicomorient_for_all_axis_orders():
    arr = np.random.default_rng(0).standard_normal((3, 4, 5)).astype(np.float32)
    n = 0
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product([1.0, -1.0], repeat=3):
            d = np.zeros((3, 3))
            for col, (row, sg) in enumerate(zip(perm, signs)):
                d[row, col] = sg
            img = sitk.GetImageFromArray(arr)
            img.SetDirection(d.ravel().tolist())
            permute, flip = orientation_of(img)
            ref = sitk.GetArrayFromImage(sitk.DICOMOrient(img, CANONICAL_ORIENTATION))
            mine = orient_array(arr, permute, flip)
            assert np.array_equal(mine, ref)
            assert np.array_equal(unorient_array(mine, permute, flip), arr)
            n += 1
    assert n == 48


def test_canonical_orientation_is_lps_identity():
    img = sitk.Image([4, 5, 6], sitk.sitkFloat32)
    img.SetDirection(np.diag([-1.0, -1.0, 1.0]).ravel().tolist())  # RAS index order
    out = sitk.DICOMOrient(img, CANONICAL_ORIENTATION)
    assert np.allclose(out.GetDirection(), np.eye(3).ravel())


# -- preprocessing ------------------------------------------------------------------------------------
def test_preprocess_contract(make_volume):
    img, les, brain = make_volume((16, 40, 36), (1.2, 1.0, 3.0))
    stack = preprocess(img, S)
    n = len(stack)
    assert stack.slices.shape == (n, S, S) and stack.slices.dtype == np.float32
    assert stack.masks.shape == (n, S, S) and stack.masks.dtype == bool
    assert stack.slices.min() >= 0.0 and stack.slices.max() <= 1.0
    assert np.all(stack.slices[~stack.masks] == 0)
    # kept slices are exactly the slices that contain brain
    b = sitk.GetArrayFromImage(brain) > 0
    assert np.array_equal(stack.indices, np.flatnonzero(b.any(axis=(1, 2))))
    # automatic brain mask of a skull-stripped volume recovers the brain
    assert np.array_equal(stack.brain_mask_array(), b)
    # brain percentiles 1 -> 0 and 99 -> 1
    vals = sitk.GetArrayFromImage(img)[b]
    assert stack.lower == pytest.approx(np.percentile(vals, 1.0))
    assert stack.upper == pytest.approx(np.percentile(vals, 99.0))
    # square isotropic field of view covering the brain with margin
    assert stack.step[0] * 1.0 == pytest.approx(stack.step[1] * 1.2)
    assert stack.fov_mm == pytest.approx(40 * 1.0 * 0.84 * 1.1, rel=0.1)
    assert stack.fov_mm >= 36 * 0.84 * 1.2


def test_preprocess_normalisation_is_configurable(make_volume):
    img, _, brain = make_volume()
    stack = preprocess(img, S, normalisation={"lower": 5, "upper": 95, "margin": 0.2, "unknown": 1})
    vals = sitk.GetArrayFromImage(img)[sitk.GetArrayFromImage(brain) > 0]
    assert stack.lower == pytest.approx(np.percentile(vals, 5))
    assert stack.upper == pytest.approx(np.percentile(vals, 95))
    wide = preprocess(img, S)
    assert stack.fov_mm == pytest.approx(wide.fov_mm * 1.4 / 1.1)
    with pytest.raises(ValueError):
        preprocess(img, S, normalisation={"lower": 99, "upper": 1})


def test_preprocess_given_brain_mask_and_other_grid(make_volume):
    img, _, brain = make_volume()
    b = sitk.GetArrayFromImage(brain).copy()
    b[:, :, : b.shape[2] // 2] = 0  # half brain
    half = sitk.GetImageFromArray(b)
    half.CopyInformation(img)
    st = preprocess(img, S, brain_mask=half)
    assert np.array_equal(st.brain_mask_array(), b > 0)
    # the same mask on a 2x finer grid is resampled onto the image grid
    fine = sitk.Resample(half, [2 * s for s in half.GetSize()], sitk.Transform(), sitk.sitkNearestNeighbor,
                         half.GetOrigin(), [s / 2 for s in half.GetSpacing()], half.GetDirection(), 0,
                         half.GetPixelID())
    st2 = preprocess(img, S, brain_mask=fine)
    agree = (st2.brain_mask_array() == (b > 0)).mean()
    assert agree > 0.97
    with pytest.raises(uad.InputError):
        empty = sitk.Image(img.GetSize(), sitk.sitkUInt8)
        empty.CopyInformation(img)
        preprocess(img, S, brain_mask=empty)


def test_compute_brain_mask_largest_component_and_holes():
    a = np.zeros((10, 30, 30), np.float32)
    a[2:8, 5:25, 5:25] = 100.0
    a[4:6, 12:18, 12:18] = 0.0  # a dark hole inside the brain
    a[0, 0, 0:3] = 100.0  # a speck of noise
    m = compute_brain_mask(a)
    assert m[4, 14, 14] and not m[0, 0, 1]
    assert m.sum() == 6 * 20 * 20


# -- back-projection: geometry for every orientation ---------------------------------------------------
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_round_trip_maps_back_to_the_input_voxels(make_volume, geometry):
    img, les, brain = _geom_volume(make_volume, geometry)
    arr = sitk.GetArrayFromImage(img)
    b = sitk.GetArrayFromImage(brain) > 0
    stack = preprocess(img, S)
    assert stack.info["orientation"] == "LPS"
    # an identity "method": restoration = the normalised input
    rest, anom = to_volumes(stack, stack.slices, stack.slices[:, None])
    for out in (rest, anom):
        _same_grid(out, img)
    r, a = sitk.GetArrayFromImage(rest), sitk.GetArrayFromImage(anom)
    assert np.array_equal(r[~b], arr[~b])
    assert np.all(a[~b] == 0)
    # textured content lands on the same voxels (a flip or transpose would decorrelate it)
    assert np.corrcoef(r[b], arr[b])[0, 1] > 0.9
    assert np.corrcoef(a[b], arr[b])[0, 1] > 0.9
    # restoration is in the input's units
    inner = b & (arr > stack.lower) & (arr < stack.upper)
    assert np.median(np.abs(r[inner] - arr[inner])) < 0.1 * (stack.upper - stack.lower)
    # a lesion map at model resolution comes back on the lesion
    l_can = orient_array(sitk.GetArrayFromImage(les).astype(np.float32), stack.permute, stack.flip)
    l_slices = _resample_inplane(l_can[stack.indices], stack.center, stack.step, S)
    _, back = to_volumes(stack, stack.slices, l_slices)
    got = sitk.GetArrayFromImage(back) > 0.5
    truth = sitk.GetArrayFromImage(les) > 0
    dice = 2 * (got & truth).sum() / (got.sum() + truth.sum())
    assert dice > 0.75


def test_to_volumes_rejects_wrong_shapes(make_volume):
    img, _, _ = make_volume()
    stack = preprocess(img, S)
    with pytest.raises(ValueError):
        to_volumes(stack, stack.slices[:-1], stack.slices)


# -- method post-processing and thresholding ------------------------------------------------------------
def test_apply_method_postprocess():
    a = np.zeros((3, 12, 12), np.float32)
    m = np.zeros((3, 12, 12), bool)
    m[:, 2:10, 2:10] = True
    a[m] = 1.0
    a[1, 6, 6] = 50.0  # a lone spike
    out = apply_method_postprocess(a, m, {"erode_mask_iterations": 1})
    assert out[0, 2, 5] == 0 and out[0, 3, 5] == 1  # border ring removed in each slice
    assert out[0].sum() == 36 and out[2].sum() == 36  # erosion is per slice (not through z)
    med = apply_method_postprocess(a, m, {"median_size": 3})
    assert med[1, 6, 6] == 1.0  # spike removed
    assert np.array_equal(apply_method_postprocess(a, m, {}), a)
    assert apply_method_postprocess(a, m, {"min_component_size": 5}).sum() == a.sum()
    with pytest.raises(ValueError):
        apply_method_postprocess(a, m, {"blur": 2})


def test_threshold_mask_keeps_grid_and_drops_small_components():
    arr = np.zeros((5, 10, 10), np.float32)
    arr[1:4, 1:4, 1:4] = 2.0  # 27 voxels
    arr[4, 8, 8] = 3.0  # 1 voxel
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.0, 2.0, 3.0))
    img.SetOrigin((4.0, 5.0, 6.0))
    m = threshold_mask(img, 1.0)
    _same_grid(m, img)
    assert m.GetPixelID() == sitk.sitkUInt8
    assert sitk.GetArrayFromImage(m).sum() == 28
    assert sitk.GetArrayFromImage(threshold_mask(img, 1.0, min_component_size=2)).sum() == 27
    assert threshold_mask(arr, 2.5).sum() == 1


# -- detect -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_detect_outputs_on_input_grid(tiny_model, fast_params, make_volume, geometry):
    img, _, brain = _geom_volume(make_volume, geometry, dtype=np.int16)
    before = sitk.GetArrayFromImage(img).copy()
    geom_before = (img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection())
    res = uad.pipeline.detect(img, model=tiny_model, device="cpu", params=fast_params)
    for out in (res.restoration, res.anomaly, res.mask, res.brain_mask):
        _same_grid(out, img)
    # the input is untouched
    assert np.array_equal(sitk.GetArrayFromImage(img), before)
    assert (img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection()) == geom_before
    b = sitk.GetArrayFromImage(brain) > 0
    r = sitk.GetArrayFromImage(res.restoration)
    a = sitk.GetArrayFromImage(res.anomaly)
    assert np.array_equal(r[~b], before[~b].astype(np.float32))
    assert np.all(a[~b] == 0) and a.min() >= 0 and a[b].max() > 0
    assert res.mask.GetPixelID() == sitk.sitkUInt8
    mk = sitk.GetArrayFromImage(res.mask)
    assert set(np.unique(mk)) <= {0, 1}
    assert np.array_equal(mk > 0, a > res.info["threshold"])
    info = res.info
    assert info["method"] == "anoddpm" and info["model"] == "tiny-test" and info["device"] == "cpu"
    assert info["nfe_per_slice"] == 3
    assert info["network_evaluations"] == 3 * info["slices"]
    assert info["params"]["level"] == 20 and info["preset"] == "stochastic"  # anoddpm's default
    assert info["seconds"] > 0


def test_detect_seed_determinism_and_batch_independence(tiny_model, fast_params, make_volume):
    img, _, _ = make_volume()
    run = lambda **kw: uad.pipeline.detect(img, model=tiny_model, device="cpu",
                                          params=dict(fast_params, sampler="ddpm", steps=None, level=4), **kw)
    a1 = run(seed=7, batch_size=8)
    a2 = run(seed=7, batch_size=8)
    b1 = run(seed=7, batch_size=1)
    c = run(seed=8, batch_size=8)
    x = sitk.GetArrayFromImage(a1.anomaly)
    assert np.array_equal(x, sitk.GetArrayFromImage(a2.anomaly))
    assert np.array_equal(sitk.GetArrayFromImage(a1.restoration), sitk.GetArrayFromImage(a2.restoration))
    np.testing.assert_allclose(sitk.GetArrayFromImage(b1.anomaly), x, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sitk.GetArrayFromImage(b1.restoration), sitk.GetArrayFromImage(a1.restoration),
                               rtol=1e-4, atol=1e-3)
    assert not np.allclose(sitk.GetArrayFromImage(c.anomaly), x, atol=1e-4)


def test_detect_progress_and_cancel(tiny_model, fast_params, make_volume):
    img, _, _ = make_volume()
    calls = []
    res = uad.pipeline.detect(img, model=tiny_model, device="cpu", params=fast_params, batch_size=10,
                              progress=lambda d, t: calls.append((d, t)))
    n = res.info["slices"]
    assert calls == [(min(k, n), n) for k in range(10, n + 10, 10)]
    seen = []
    with pytest.raises(uad.Cancelled):
        uad.pipeline.detect(img, model=tiny_model, device="cpu", params=fast_params, batch_size=10,
                            progress=lambda d, t: seen.append(d), cancel=lambda: len(seen) >= 1)
    assert seen == [10]  # stopped between batches


def test_detect_threshold_sources(tiny_zoo, fast_params, make_volume):
    img, _, brain = make_volume()
    b = sitk.GetArrayFromImage(brain) > 0
    fb = uad.pipeline.detect(img, device="cpu", params=fast_params)  # default model of the method
    assert fb.info["model"] == "tiny-test"
    assert fb.info["threshold_source"].startswith("fallback") and "uncalibrated" in fb.info["threshold_source"]
    a = sitk.GetArrayFromImage(fb.anomaly)
    assert fb.info["threshold"] == pytest.approx(np.percentile(a[b], 99.0))
    assert abs((a[b] > fb.info["threshold"]).mean() - 0.01) < 0.005
    md = uad.pipeline.detect(img, model="tiny-test-thr", device="cpu", params=fast_params)
    assert md.info["threshold"] == pytest.approx(0.123) and md.info["threshold_source"] == "model"
    ex = uad.pipeline.detect(img, model="tiny-test-thr", device="cpu", params=fast_params, threshold=0.5)
    assert ex.info["threshold"] == 0.5 and ex.info["threshold_source"] == "explicit"
    assert np.array_equal(sitk.GetArrayFromImage(ex.mask) > 0, sitk.GetArrayFromImage(ex.anomaly) > 0.5)


def test_model_threshold_per_method_and_preset(tiny_model):
    from uad.pipeline import model_threshold

    tiny_model.config["threshold"] = {"anoddpm": {"fast": 0.2, "default": 0.3}, "thor": 0.4}
    assert model_threshold(tiny_model, "anoddpm", "fast") == 0.2
    assert model_threshold(tiny_model, "anoddpm", "paper") == 0.3
    assert model_threshold(tiny_model, "thor", "paper") == 0.4
    assert model_threshold(tiny_model, "autoddpm", "paper") is None


def test_detect_with_given_brain_mask(tiny_model, fast_params, make_volume):
    img, _, brain = make_volume()
    b = sitk.GetArrayFromImage(brain).copy()
    b[:8] = 0
    m = sitk.GetImageFromArray(b)
    m.CopyInformation(img)
    res = uad.pipeline.detect(img, model=tiny_model, device="cpu", params=fast_params, brain_mask=m)
    assert np.array_equal(sitk.GetArrayFromImage(res.brain_mask), b)
    a = sitk.GetArrayFromImage(res.anomaly)
    assert np.all(a[:8] == 0) and a[8:].max() > 0
    assert np.array_equal(sitk.GetArrayFromImage(res.restoration)[:8], sitk.GetArrayFromImage(img)[:8])


def test_detect_errors(tiny_zoo, tiny_model, fast_params, make_volume):
    img, _, _ = make_volume()
    with pytest.raises(uad.UADError, match="unknown method"):
        uad.pipeline.detect(img, method="nope", model=tiny_model, device="cpu")
    with pytest.raises(uad.UADError, match="unknown parameter"):
        uad.pipeline.detect(img, model=tiny_model, device="cpu", params={"bogus": 1})
    with pytest.raises(uad.UADError, match="preset"):
        uad.pipeline.detect(img, model=tiny_model, device="cpu", preset="nope")
    with pytest.raises(uad.ModelError, match="no model with id"):
        uad.pipeline.detect(img, model="missing-model", device="cpu")
    tiny_model.config["methods"] = ["thor"]
    with pytest.raises(uad.ModelError, match="does not serve"):
        uad.pipeline.detect(img, model=tiny_model, device="cpu", params=fast_params)
    with pytest.raises(uad.InputError):
        uad.pipeline.detect(sitk.Image([10, 10], sitk.sitkFloat32), model=tiny_model, device="cpu")


def test_resolve_device():
    import torch

    from uad.pipeline import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda"
    else:
        with pytest.raises(uad.UADError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(uad.UADError):
        resolve_device("tpu-9000")


# -- imageio --------------------------------------------------------------------------------------------
def test_validate_in_memory_images(make_volume):
    from uad.imageio import validate

    img, _, _ = make_volume()
    validate(img)
    arr = sitk.GetArrayFromImage(img)
    bad = {
        "NaN": np.where(np.arange(arr.size).reshape(arr.shape) == 5, np.nan, arr).astype(np.float32),
        "infinite": np.where(np.arange(arr.size).reshape(arr.shape) == 5, np.inf, arr).astype(np.float32),
        "all voxels are zero": np.zeros_like(arr),
        "constant": np.full_like(arr, 3.0),
    }
    for msg, a in bad.items():
        with pytest.raises(uad.InputError, match=msg) as e:
            validate(sitk.GetImageFromArray(a), name="x")
        assert "\n" not in str(e.value)
    with pytest.raises(uad.InputError, match="2-D"):
        validate(sitk.Image([5, 5], sitk.sitkFloat32))
    with pytest.raises(uad.InputError, match="4-D"):
        validate(sitk.JoinSeries([img, img]))
    with pytest.raises(uad.InputError, match="components"):
        validate(sitk.Image([5, 5, 5], sitk.sitkVectorFloat32, 2))
    with pytest.raises(uad.InputError, match="slice"):
        validate(sitk.GetImageFromArray(np.random.rand(1, 8, 8)))


def test_read_image_squeezes_singleton_time_and_names(tmp_path, make_volume, monkeypatch):
    from uad.imageio import read_image, sample_paths, stem

    img, _, _ = make_volume()
    p = tmp_path / "series.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([img]), str(p))
    r = read_image(p)
    assert r.GetDimension() == 3 and r.GetSize() == img.GetSize()
    assert stem("/a/b/T2.nii.gz") == "T2" and stem("x.nrrd") == "x" and stem("y.mha") == "y"
    assert stem("plain") == "plain"
    with pytest.raises(uad.InputError, match="folder"):
        read_image(tmp_path)
    (tmp_path / "e.nii.gz").write_bytes(b"")
    with pytest.raises(uad.InputError, match="empty"):
        read_image(tmp_path / "e.nii.gz")
    # sample data: found through $UAD_SAMPLE_DIR (the bundled files live in Resources/SampleData)
    monkeypatch.setenv("UAD_SAMPLE_DIR", str(tmp_path))
    sitk.WriteImage(img, str(tmp_path / "sample_T2_tumour.nii.gz"))
    paths = sample_paths()
    assert paths["image"] == tmp_path / "sample_T2_tumour.nii.gz" and "lesion" not in paths


# -- overview -------------------------------------------------------------------------------------------
def test_overview_picks_most_anomalous_slices(tmp_path, make_volume):
    from uad.overview import select_slices, write_overview

    img, les, brain = make_volume(direction=np.diag([-1.0, -1.0, 1.0]))
    anom_arr = sitk.GetArrayFromImage(les).astype(np.float32)
    anom = sitk.GetImageFromArray(anom_arr)
    anom.CopyInformation(img)
    ks = write_overview(tmp_path / "o.png", img, img, anom, les, n_slices=2, brain_mask=brain, title="t")
    sums = anom_arr.sum(axis=(1, 2))  # the z axis is the axial axis here (RAS direction -> LPS keeps z)
    assert ks == sorted(int(k) for k in np.argsort(-sums, kind="mergesort")[:2])
    assert select_slices(anom_arr, 1) == [int(np.argmax(sums))]
    from matplotlib.image import imread

    png = imread(str(tmp_path / "o.png"))
    assert png.shape[0] > 300 and png.shape[1] > 4 * 200  # 2 rows x 4 columns
