"""The preprocessing chain: invertible steps, the model's preprocessing profile, skull-stripped detection,
N4, registration to MNI152, and its inverse onto the input's exact grid."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

import uad
import uad.pipeline
from conftest import coarse_registration
from uad.postprocess import to_volumes
from uad.preprocess import (DEFAULT_PROFILE, BiasCorrection, detect_skull_stripped, n4_bias_field, preprocess,
                            profile_settings)

S = 32
#: small registration settings: these tests check the geometry of the chain, not registration accuracy
FAST_REG = {"iterations": (20, 10), "shrink": (4, 2), "smoothing_mm": (4.0, 2.0), "sampling": 0.05}


def _arr(img):
    return sitk.GetArrayFromImage(img)


# -- profile ---------------------------------------------------------------------------------------
def test_profile_defaults_and_validation(tiny_model):
    from uad.pipeline import preprocessing_profile

    assert profile_settings(None) == DEFAULT_PROFILE
    assert DEFAULT_PROFILE == {"registration": "auto", "deoblique": False, "spacing_mm": None,
                               "skull_strip": "auto", "bias_correction": "auto", "square": "crop", "pad_value": "min",
                               "intensity": "brain-percentile", "slice_range": None}
    p = profile_settings({"registration": "mni152", "spacing_mm": 1, "skull_strip": False, "square": "pad",
                          "pad_value": 0.0, "intensity": "image-percentile", "slice_range": [0.35, 0.65]})
    assert p["registration"] == "mni152" and p["spacing_mm"] == 1.0 and p["slice_range"] == [0.35, 0.65]
    bad = [{"registration": "talairach"}, {"skull_strip": "maybe"}, {"square": "stretch"},
           {"slice_range": [0.7, 0.3]}, {"slice_range": [0, 2]}, {"intensity": "zscore"}, {"pad_value": "max"},
           {"spacing_mm": 0.0}, {"bias_corection": True}]
    for b in bad:
        with pytest.raises(ValueError):
            profile_settings(b)
    # the model's manifest entry is read, with an override on top
    assert preprocessing_profile(tiny_model) == DEFAULT_PROFILE
    tiny_model.config["preprocessing"] = {"square": "pad"}
    assert preprocessing_profile(tiny_model)["square"] == "pad"
    assert preprocessing_profile(tiny_model, {"slice_range": [0.4, 0.6]})["slice_range"] == [0.4, 0.6]


def test_detect_rejects_a_bad_profile(tiny_model, fast_params, make_volume):
    img, _, _ = make_volume()
    tiny_model.config["preprocessing"] = {"squar": "pad"}
    with pytest.raises(uad.ModelError, match="unknown preprocessing key"):
        uad.pipeline.detect(img, model=tiny_model, device="cpu", params=fast_params)


# -- the chain ---------------------------------------------------------------------------------------
def test_default_chain_steps_and_inverse_order(make_volume):
    img, _, brain = make_volume()
    st = preprocess(img, S)
    names = [s.name for s in st.steps]
    assert names == ["reorient", "brain_mask", "normalise", "select_slices", "in_plane"]
    assert [r["step"] for r in st.info["steps"]] == names
    assert st.info["skull_stripped"]["value"] is True and st.info["skull_stripped"]["source"] == "detected"
    # the inverses are replayed in reverse order: each sees its own output shape
    seen = []
    for s in st.steps:
        orig = s.inverse

        def spy(maps, s=s, orig=orig):
            seen.append((s.name, next(iter(maps.values())).shape))
            return orig(maps)

        s.inverse = spy
    out = st.invert({"anomaly": st.slices.copy()})
    assert [n for n, _ in seen] == names[::-1]
    assert seen[0][1] == (len(st), S, S)  # in_plane gets model-resolution slices
    assert seen[1][1][1:] == st.brain.shape[1:] and seen[1][1][0] == len(st)  # select_slices: N full slices
    assert out["anomaly"].shape == _arr(img).shape


def test_pad_to_square_and_slice_range(make_volume):
    img, _, brain = make_volume((20, 40, 30), (1.0, 1.0, 2.0))
    b = _arr(brain) > 0
    st = preprocess(img, S, profile={"square": "pad", "slice_range": [0.25, 0.75]})
    # pad: the whole slice (40 x 30 mm) padded to a 40 mm square
    assert st.fov_mm == pytest.approx(40.0)
    kk = np.flatnonzero(b.any(axis=(1, 2)))
    lo, hi = kk[0] + 0.25 * (kk[-1] - kk[0]), kk[0] + 0.75 * (kk[-1] - kk[0])
    assert np.array_equal(st.indices, kk[(kk >= lo) & (kk <= hi)])
    rest, anom = to_volumes(st, st.slices, np.ones_like(st.slices))
    a, r, x = _arr(anom), _arr(rest), _arr(img)
    outside = np.ones(len(b), bool)
    outside[st.indices] = False
    assert np.all(a[outside] == 0) and a[st.indices][b[st.indices]].min() > 0.9
    assert np.array_equal(r[outside], x[outside])  # unprocessed slices: the input


def test_image_percentile_and_unmasked_input(make_volume):
    img, _, brain = make_volume()
    x = _arr(img)
    st = preprocess(img, S, profile={"intensity": "image-percentile", "skull_strip": False},
                    normalisation={"lower": 0.0, "upper": 99.5})
    assert st.lower == pytest.approx(np.percentile(x, 0.0)) and st.upper == pytest.approx(np.percentile(x, 99.5))
    with_mask = preprocess(img, S)
    assert st.lower != with_mask.lower


def test_detect_skull_stripped_on_brains_and_heads(make_volume):
    from uad.phantoms import make_phantom

    img, _, _ = make_volume()
    assert detect_skull_stripped(_arr(img), img.GetSpacing())[0] is True
    brain_only = make_phantom(2, "T2", spacing=4.0)
    ok, ev = detect_skull_stripped(_arr(brain_only.image), brain_only.image.GetSpacing())
    assert ok is True and ev["background_at_minimum"] == 1.0
    head = make_phantom(2, "T2", spacing=4.0, head=True)
    ok, ev = detect_skull_stripped(_arr(head.image), head.image.GetSpacing())
    assert ok is False and ev["background_at_minimum"] < 0.5 and ev["foreground_ml"] > 2900


def test_n4_removes_a_bias_field_and_its_inverse_puts_it_back(make_volume):
    img, _, brain = make_volume((16, 48, 48), (2.0, 2.0, 3.0), lesion=False)
    x = _arr(img)
    b = _arr(brain) > 0
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in x.shape], indexing="ij")
    field = np.exp(0.25 * i + 0.15 * j - 0.1 * k).astype(np.float32)
    biased = sitk.GetImageFromArray((x * field).astype(np.float32))
    biased.CopyInformation(img)
    est = n4_bias_field(biased, voxel_mm=4.0)
    corrected = (x * field) / est
    # the corrected brain is flatter: its left-right intensity trend is mostly gone

    def trend(v):
        return np.polyfit(i[b], v[b], 1)[0]

    assert abs(trend(corrected)) < 0.35 * abs(trend(x * field))
    # fitted to the brain alone, it flattens the brain at least as well
    est_brain = n4_bias_field(biased, voxel_mm=4.0, mask=b)
    assert abs(trend((x * field) / est_brain)) < 0.35 * abs(trend(x * field))
    st = preprocess(biased, S, bias_correction=True)
    names = [s.name for s in st.steps]
    assert names.index("bias_correction") == names.index("brain_mask") + 1  # after the mask it is fitted to
    n4 = st.steps[names.index("bias_correction")]
    assert isinstance(n4, BiasCorrection) and n4.field.shape == x.shape
    # the restoration comes back in the input's (biased) units: the inverse multiplies the field back
    rest, _ = to_volumes(st, st.slices, st.slices)
    r = _arr(rest)
    inner = b & (x > np.percentile(x[b], 5)) & (x < np.percentile(x[b], 95))
    rel = np.median(np.abs(r[inner] - (x * field)[inner]) / (x * field)[inner])
    assert rel < 0.08
    off = preprocess(biased, S, bias_correction=False)
    assert "bias_correction" not in [s.name for s in off.steps]


def test_registration_round_trip_onto_the_input_grid():
    """Registration to MNI152 (small iterations), inference grid = template, results on the input grid."""
    from uad.phantoms import make_phantom, resample_phantom
    from uad.registration import mni152

    base = make_phantom(7, "T1", "tumour", spacing=3.0)
    ph = resample_phantom(base, spacing=(3.0, 3.0, 4.0), rotation_deg=(0.0, 0.0, 12.0), flip=(True, False, False))
    img = ph.image
    st = preprocess(img, S, brain_mask=ph.brain_mask, profile={"registration": "mni152", "spacing_mm": 3.0},
                    registration_options=FAST_REG)
    assert [s.name for s in st.steps] == ["reorient", "brain_mask", "register", "normalise", "select_slices",
                                          "in_plane"]
    from uad.preprocess import canonical_view, orientation_of

    t1, tb = mni152(3.0)
    assert st.brain.shape == _arr(t1).shape  # the working volume is the template grid (canonical voxel order)
    tbm = np.asarray(canonical_view(_arr(tb) > 0, *orientation_of(tb)))
    dice = 2 * (st.brain & tbm).sum() / (st.brain.sum() + tbm.sum())
    assert dice > 0.85  # the brain landed on the template's brain
    rest, anom = to_volumes(st, st.slices, st.slices)
    # one 3-D step: the way back streams (template grid whole, then onto the input a slab at a time) and gives the
    # whole-volume inverse's result
    assert st.streamable
    ref_r, ref_a = _compose_whole(st, st.slices, st.slices)
    assert np.array_equal(_arr(rest), ref_r.astype(np.float32)) and np.array_equal(_arr(anom), ref_a.astype(np.float32))
    for out in (rest, anom):
        assert out.GetSize() == img.GetSize() and out.GetOrigin() == img.GetOrigin()
        assert out.GetDirection() == img.GetDirection() and out.GetSpacing() == img.GetSpacing()
    x, r = _arr(img), _arr(rest)
    b = _arr(ph.brain_mask) > 0
    assert np.corrcoef(x[b], r[b])[0, 1] > 0.9
    # a lesion map carried into template space comes back on the lesion
    les = _arr(ph.lesion_mask) > 0
    lst = preprocess(sitk.Cast(ph.lesion_mask, sitk.sitkFloat32), S, brain_mask=ph.brain_mask,
                     profile={"registration": "mni152", "spacing_mm": 3.0}, registration_options=FAST_REG,
                     normalisation={"lower": 0.0, "upper": 100.0}, skull_stripped=True)
    _, back = to_volumes(lst, lst.slices, lst.slices)
    got = _arr(back) > 0.5
    assert 2 * (got & les).sum() / (got.sum() + les.sum()) > 0.6


@pytest.fixture
def _coarse_registration():
    # the steps the overrides select are tested here, not the registration's accuracy: coarse levels
    with coarse_registration(**FAST_REG):
        yield


def test_skull_stripped_and_bias_overrides(tiny_model, fast_params, make_volume, tmp_path, capsys,
                                           _coarse_registration):
    from uad.cli import main

    img, _, brain = make_volume()
    r = uad.pipeline.detect(img, model=tiny_model, device="cpu", params=fast_params, skull_stripped=False,
                            brain_mask=brain)
    pre = r.info["preprocess"]
    assert pre["skull_stripped"] == {"value": False, "source": "told"}
    # N4 auto: on; a head (told) is registered ("auto"), and N4 runs on the template's grid after it
    assert [s["step"] for s in pre["steps"]][1:4] == ["brain_mask", "register", "bias_correction"]
    assert pre["brain_mask"] == "given"  # a given mask is never replaced by the stripper
    assert np.array_equal(_arr(r.brain_mask), _arr(brain))
    r2 = uad.pipeline.detect(img, model=tiny_model, device="cpu", params=fast_params, skull_stripped=False,
                             brain_mask=brain, bias_correction=False)
    assert "bias_correction" not in [s["step"] for s in r2.info["preprocess"]["steps"]]
    inp = tmp_path / "v.nii.gz"
    sitk.WriteImage(img, str(inp))
    rc = main(["detect", str(inp), "-o", str(tmp_path / "o"), "--model", "tiny-test", "--device", "cpu",
               "--no-progress", "--skull-stripped", "yes", "--bias-correction", "yes", "--param", "steps=2",
               "--param", "level=20"])
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "o" / "v_brainmask.nii.gz").is_file()
    with pytest.raises(SystemExit):
        main(["detect", str(inp), "-o", str(tmp_path / "o"), "--skull-stripped", "maybe"])


# -- the lean way back -------------------------------------------------------------------------------
def _compose_whole(st, rest, anom):
    """The whole-volume composition (every inverse at once, then restoration = input outside): the reference
    of the streamed way back."""
    rest = np.clip(rest, 0.0, 1.0)
    maps = st.invert({"restoration": rest, "anomaly": anom, "valid": np.ones_like(anom)})
    use = st.brain_mask_array() & (maps["valid"] > 0.5)
    x = _arr(st.reference).astype(np.float32)
    return np.where(use, maps["restoration"], x), np.where(use, np.maximum(maps["anomaly"], 0.0), 0.0)


@pytest.mark.parametrize("case", ["axial", "permuted", "oblique", "slice_range", "int16", "deoblique"])
def test_streamed_way_back_equals_the_whole_volume_inverse(make_volume, case):
    from scipy.spatial.transform import Rotation

    kw = {}
    direction = None
    if case == "permuted":  # sagittal-like storage: canonical k is the input's x axis, reversed
        direction = np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], float)
    if case in ("oblique", "deoblique"):
        direction = Rotation.from_euler("xyz", [14, 0, 9], degrees=True).as_matrix()
    if case == "deoblique":  # a 3-D resampling step: streamed through its inverse a slab at a time
        kw["profile"] = {"deoblique": True}
    if case == "slice_range":
        kw["profile"] = {"slice_range": [0.3, 0.7], "square": "pad"}
    img, _, _ = make_volume((18, 40, 34), (1.2, 1.0, 3.0), direction=direction,
                            dtype=np.int16 if case == "int16" else np.float32)
    before = _arr(img).copy()
    st = preprocess(img, S, **kw)
    assert st.streamable
    assert ("deoblique" in [x.name for x in st.steps]) == (case == "deoblique")
    rng = np.random.default_rng(0)
    rest = rng.random(st.slices.shape, dtype=np.float32)
    anom = rng.random(st.slices.shape, dtype=np.float32) - 0.1
    r, a = to_volumes(st, rest, anom)
    ref_r, ref_a = _compose_whole(st, rest, anom)
    assert np.array_equal(_arr(r), ref_r.astype(np.float32)) and np.array_equal(_arr(a), ref_a.astype(np.float32))
    for out in (r, a):
        assert out.GetSize() == img.GetSize() and out.GetDirection() == img.GetDirection()
        assert out.GetOrigin() == img.GetOrigin() and out.GetSpacing() == img.GetSpacing()
    assert np.array_equal(_arr(img), before)  # the input is never written


def test_paste_canonical_slices_every_orientation():
    """Canonical slices pasted in chunks land where unorient_array puts them, for all 48 axis orders."""
    import itertools

    from uad.preprocess import canonical_view, orientation_of, paste_canonical_slices, unorient_array

    rng = np.random.default_rng(1)
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product([1, -1], repeat=3):
            m = np.zeros((3, 3))
            for ax, (p, sg) in enumerate(zip(perm, signs)):
                m[p, ax] = sg
            img = sitk.Image([5, 6, 7], sitk.sitkFloat32)
            img.SetDirection(m.ravel().tolist())
            permute, flip = orientation_of(img)
            canon = rng.random(canonical_view(np.zeros((7, 6, 5)), permute, flip).shape).astype(np.float32)
            for k0 in range(0, canon.shape[0], 2):
                paste_canonical_slices(img, canon[k0:k0 + 2], k0, permute, flip)
            assert np.array_equal(_arr(img), unorient_array(canon, permute, flip)), (perm, signs)
            # and the oriented grid is DICOMOrient's
            o = sitk.DICOMOrient(img, "LPS")
            assert np.array_equal(_arr(o), canon)


def test_array_view_keeps_the_image_alive_and_is_read_only():
    import gc

    from uad.imageio import array_view

    v = array_view(sitk.GetImageFromArray(np.arange(60, dtype=np.float32).reshape(3, 4, 5)))[::-1].T
    gc.collect()
    _ = [np.full(1000, 7.0) for _ in range(50)]  # would reuse freed memory if the image were gone
    assert v[2, 1, 0] == 2 * 20 + 1 * 5 + 2 and v[0, 0, 2] == 0  # v[i, j, k] = a[2 - k, j, i]
    with pytest.raises(ValueError):
        v[0, 0, 0] = 1.0


def test_skull_strip_core_margin_slabs_equal_the_whole_distance_transform():
    from scipy import ndimage

    from uad.preprocess import deeper_than

    rng = np.random.default_rng(2)
    for shape, sampling in [((40, 20, 24), (1.0, 1.0, 1.3)), ((13, 30, 30), (4.0, 0.9, 0.9)),
                            ((70, 16, 16), (0.7, 1.2, 1.2))]:
        m = ndimage.gaussian_filter(rng.random(shape), 2.5) > 0.5
        ref = ndimage.distance_transform_edt(m, sampling=sampling) > 3.0
        assert np.array_equal(deeper_than(m, 3.0, sampling), ref)


def test_detect_mask_false_computes_no_mask_and_inf_means_the_same(tiny_model, fast_params, make_volume):
    img, _, _ = make_volume()
    full = uad.pipeline.detect(img, model=tiny_model, device="cpu", params=fast_params, threshold=0.02)
    bare = uad.pipeline.detect(img, model=tiny_model, device="cpu", params=fast_params, mask=False)
    old = uad.pipeline.detect(img, model=tiny_model, device="cpu", params=fast_params, threshold=float("inf"))
    assert full.mask is not None and _arr(full.mask).sum() > 0
    for r in (bare, old):
        assert r.mask is None and r.info["threshold"] is None and "mask=False" in r.info["threshold_source"]
        assert np.array_equal(_arr(r.anomaly), _arr(full.anomaly))
        assert np.array_equal(_arr(r.brain_mask), _arr(full.brain_mask))
    for bad in (float("nan"), -1.0):
        with pytest.raises(uad.UADError, match="threshold must be a finite number"):
            uad.pipeline.detect(img, model=tiny_model, device="cpu", params=fast_params, threshold=bad)
    with pytest.raises(uad.UADError, match="threshold must be a finite number"):
        uad.pipeline.check_threshold(float("inf"))  # what the CLI calls: --threshold inf stays refused


def test_threshold_mask_slabs_and_component_box_equal_the_plain_formula():
    from scipy import ndimage

    from uad.postprocess import threshold_mask

    def plain(a, t, n_min):
        m = a > t
        if n_min > 1 and m.any():
            lab, n = ndimage.label(m, structure=np.ones((3,) * m.ndim, bool))
            keep = np.bincount(lab.ravel()) >= n_min
            keep[0] = False
            m = keep[lab]
        return m.astype(np.uint8)

    rng = np.random.default_rng(0)
    for shape, n_min in [((40, 24, 20), 0), ((40, 24, 20), 5), ((7, 30, 33), 20), ((30, 41), 3)]:
        a = ndimage.gaussian_filter(rng.random(shape), 1.0).astype(np.float32)
        t = float(np.quantile(a, 0.9))
        assert np.array_equal(threshold_mask(a, t, n_min), plain(a, t, n_min))
        if a.ndim == 3:
            img = sitk.GetImageFromArray(a)
            img.SetSpacing((1.5, 1.0, 2.0))
            out = threshold_mask(img, t, n_min)
            assert out.GetPixelID() == sitk.sitkUInt8 and out.GetSpacing() == img.GetSpacing()
            assert np.array_equal(_arr(out), plain(a, t, n_min))


def test_strip_margin_core_a_slab_at_a_time_equals_the_whole():
    """The brain deeper than the stripper's margin, kept as bits and asked slab after slab on the way back, is
    the whole-volume EDT answer."""
    from scipy import ndimage

    from uad.preprocess import STRIP_MARGIN_MM, BrainMask, Reorient, _Work

    rng = np.random.default_rng(3)
    blob = ndimage.gaussian_filter(rng.random((70, 40, 36)), 4) > 0.5
    img = sitk.GetImageFromArray(blob.astype(np.float32))
    img.SetSpacing((1.0, 1.2, 0.8))
    w = _Work(image=img)
    Reorient().forward(w)
    bm = BrainMask(given=sitk.Cast(img, sitk.sitkUInt8))
    bm.forward(w)
    assert bm.core() is None  # a given mask: no margin
    bm.source, bm.margin = "skull strip (test)", True  # a stripper's mask: the margin applies
    bm.compute_core()
    assert bm._packed.nbytes <= w.brain.size // 8 + 70 * 40  # bits, not bytes
    whole = bm.core()
    ref = ndimage.distance_transform_edt(w.brain, sampling=bm.sampling) > STRIP_MARGIN_MM
    assert np.array_equal(whole, ref) and 0 < whole.sum() < w.brain.sum()
    for chunk in (1, 5, 32, 70):
        got = np.concatenate([bm.core(slice(k, min(70, k + chunk))) for k in range(0, 70, chunk)])
        assert np.array_equal(got, ref), chunk


def test_stripper_cleanup_on_the_box_and_axial_slices_of_any_voxel_order():
    """``skullstrip._cleanup`` (bounding box, 16-bit labels) equals the whole-volume reference, and fills the
    holes of the patient's axial slices whatever the voxel order."""
    from scipy import ndimage

    from uad.preprocess import fill_holes_per_slice
    from uad.skullstrip import _axial_axis, _cleanup

    rng = np.random.default_rng(5)
    m = np.zeros((40, 50, 44), bool)
    m[8:30, 10:40, 12:36] = ndimage.gaussian_filter(rng.random((22, 30, 24)), 2) > 0.45
    m[2:4, 2:4, 2:4] = True  # a smaller component
    lab, _ = ndimage.label(m)
    counts = np.bincount(lab.ravel())
    counts[0] = 0
    big = ndimage.binary_fill_holes(lab == np.argmax(counts))
    for axis in range(3):
        ref = np.moveaxis(fill_holes_per_slice(np.moveaxis(big, axis, 0)), 0, axis)
        assert np.array_equal(_cleanup(m, axis), ref), axis
    img = sitk.Image(8, 9, 10, sitk.sitkUInt8)
    assert _axial_axis(img) == 0  # identity direction: array axis 0 is z
    img.SetDirection((0, 0, 1, 1, 0, 0, 0, 1, 0))  # index axis j points to z: array axis 1 (k, j, i)
    assert _axial_axis(img) == 1


def test_registration_is_bit_identical_with_any_number_of_threads():
    """The affine registration computes its metric on one thread: the same transform with 1 or 2 ITK threads
    (ITK's multi-threaded Mattes metric adds partial sums in an order that depends on the thread count)."""
    from uad.phantoms import make_phantom
    from uad.registration import mni152, register_affine

    ph = make_phantom(11, "T2", "tumour", spacing=3.0)
    moving = sitk.Cast(ph.image, sitk.sitkFloat32) * sitk.Cast(ph.brain_mask, sitk.sitkFloat32)
    fixed, _ = mni152(3.0)
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    params = []
    try:
        for n in (1, 2):
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)
            tx, _ = register_affine(fixed, moving, **FAST_REG)
            params.append(tx.GetParameters() + tx.GetFixedParameters())
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)
    assert params[0] == params[1]


def test_grid_respaced_keeps_the_box_and_masks_resample_one_way():
    from uad.preprocess import Grid
    from uad.skullstrip import _iso_grid

    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    g = Grid((37, 41, 13), (0.9, 1.1, 4.0), (10.0, -20.0, 5.0), tuple(q.ravel()))

    def box(grid):  # physical positions of the outer corners of the voxels
        d = np.asarray(grid.direction).reshape(3, 3)
        c = np.array([[i, j, k] for i in (-0.5, grid.size[0] - 0.5) for j in (-0.5, grid.size[1] - 0.5)
                      for k in (-0.5, grid.size[2] - 0.5)])
        return np.asarray(grid.origin) + (c * np.asarray(grid.spacing)) @ d.T

    r = g.respaced(2.0)
    assert r.size == (17, 23, 26) and r.direction == g.direction  # round(33.3 / 2), round(45.1 / 2), 52 / 2
    assert np.allclose(box(r), box(g), atol=1e-9)  # fit: exactly the same box
    loose = g.respaced(2.0, fit=False)
    assert loose.spacing == (2.0, 2.0, 2.0) and np.allclose(box(loose)[0], box(g)[0], atol=1e-9)
    # the skull strippers' RAS grid is the same computation on DICOMOrient's RAS grid (reference: the voxels oriented)
    img = g.image(np.zeros(g.size[::-1], np.uint8))
    ras = sitk.DICOMOrient(img, "RAS")
    ref = _iso_grid(img, 1.5)
    d = np.asarray(ras.GetDirection()).reshape(3, 3)
    n = np.maximum(np.round(np.asarray(ras.GetSize()) * np.asarray(ras.GetSpacing()) / 1.5).astype(int), 1)
    corner = np.asarray(ras.GetOrigin()) - d @ (np.asarray(ras.GetSpacing()) / 2.0)
    assert ref.size == tuple(int(v) for v in n) and ref.direction == ras.GetDirection()
    assert ref.spacing == (1.5, 1.5, 1.5) and np.allclose(ref.origin, corner + d @ np.full(3, 0.75), atol=1e-9)
    # masks: 0/255 in 8 bits, kept above one half = the float interpolation > 0.5 away from the rounding band
    yy, xx = np.mgrid[:41, :37]
    m = np.broadcast_to(((yy - 20) ** 2 + (xx - 18) ** 2 < 150)[None], (13, 41, 37)).astype(np.uint8)
    mask = g.image(np.ascontiguousarray(m))
    tx = sitk.Euler3DTransform((10.0, -20.0, 5.0), 0.05, 0.0, 0.1, (0.7, -0.3, 0.2))
    got = r.resample_mask(mask, tx)
    f = r.resample(mask, tx)
    assert got.dtype == bool and got.shape == f.shape
    band = np.abs(f - 0.5) <= 1.0 / 255
    assert np.array_equal(got[~band], f[~band] > 0.5) and got.sum() > 100
    assert np.array_equal(g.resample_mask(mask), m > 0)  # onto its own grid: unchanged


def test_registration_mask_runs_with_its_default_levels():
    """The T2 stripper's affine has three levels of its own (the chain's default has two): it passes its own
    smoothing per level (a shorter default list stopped every T2 head with an error)."""
    from uad import skullstrip
    from uad.phantoms import make_phantom

    ph = make_phantom(12, "T2", "tumour", spacing=4.0, head=True)
    opts = {"affine_iterations": (3, 3, 3), "bspline_iterations": 2, "voxel_mm": 4.0}
    assert len(opts["affine_iterations"]) == len(skullstrip.REGISTRATION_MASK_OPTIONS["affine_iterations"])
    m = skullstrip.registration_mask(ph.image, opts)
    truth = _arr(ph.brain_mask) > 0
    assert m.shape == truth.shape and 2 * (m & truth).sum() / (m.sum() + truth.sum()) > 0.7
