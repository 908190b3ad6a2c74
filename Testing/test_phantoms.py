"""Tests of uad.phantoms: MNI152-based phantoms, lesions, files, CLI, training slice stream."""

from __future__ import annotations

import argparse
import csv

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from uad import phantoms
from uad.phantoms import (HOLDOUT_SEED_OFFSET, TrainingSliceSource, generate_cohort, make_phantom, nib_to_sitk,
                          template_images, write_phantom)

SP = 2.0  # mm: most tests run on a 2 mm grid to stay fast


def arr(img: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(img)


def same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing())
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-6)
            and np.allclose(a.GetDirection(), b.GetDirection()))


_CACHE: dict = {}


def ph(seed, contrast="T2", lesion="none", spacing=SP):
    """Phantoms shared between tests (generated once per session)."""
    key = (seed, contrast, lesion, spacing)
    if key not in _CACHE:
        _CACHE[key] = make_phantom(seed, contrast, lesion, spacing=spacing, return_tissues=True)
    return _CACHE[key]


# ----------------------------------------------------------------------------- templates / geometry
def test_nibabel_to_sitk_geometry_is_lps():
    import nibabel as nib

    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    aff = np.array([[0.0, 0.0, 2.0, -10.0], [1.5, 0.0, 0.0, 20.0], [0.0, -1.0, 0.0, 5.0], [0, 0, 0, 1]])
    img = nib.Nifti1Image(data, aff)
    s = nib_to_sitk(img)
    assert s.GetSize() == (4, 5, 6)
    np.testing.assert_allclose(s.GetSpacing(), [1.5, 1.0, 2.0])
    for ijk in [(0, 0, 0), (3, 1, 2), (1, 4, 5)]:
        ras = aff @ np.array([*ijk, 1.0])
        lps = np.array([-ras[0], -ras[1], ras[2]])
        np.testing.assert_allclose(s.TransformIndexToPhysicalPoint(ijk), lps, atol=1e-9)
        assert s.GetPixel(ijk) == data[ijk]


def test_template_images_and_csf():
    t = template_images()
    t1, gm, wm, csf, brain = (t[k] for k in ("t1", "gm", "wm", "csf", "brain"))
    assert t1.GetSize() == (197, 233, 189)
    for im in (gm, wm, csf, brain):
        assert same_grid(im, t1)
    # MNI origin (RAS 0,0,0) is LPS (0,0,0); the template's first voxel is at RAS (-98, -134, -72)
    np.testing.assert_allclose(t1.GetOrigin(), [98.0, 134.0, -72.0])
    np.testing.assert_allclose(np.array(t1.GetDirection()).reshape(3, 3), np.diag([-1.0, -1.0, 1.0]))
    b = arr(brain) > 0
    c = arr(csf)
    assert c.min() >= 0 and c.max() <= 1
    np.testing.assert_allclose(c[b], np.clip(1 - arr(gm)[b] - arr(wm)[b], 0, 1), atol=1e-6)
    assert (c[~b] == 0).all()
    # the lateral ventricles (MNI RAS (+-8, -5, 18)) are CSF; RAS -> LPS negates x and y
    for x in (8.0, -8.0):
        idx = t1.TransformPhysicalPointToIndex((-x, 5.0, 18.0))
        assert csf.GetPixel(idx) > 0.8 and wm.GetPixel(idx) < 0.1


def test_one_mm_phantom_on_the_template_grid():
    p = make_phantom(2, "T1", "none")
    t1 = template_images()["t1"]
    for im in (p.image, p.brain_mask, p.lesion_mask):
        assert same_grid(im, t1)
    assert p.image.GetPixelID() == sitk.sitkFloat32
    assert p.brain_mask.GetPixelID() == sitk.sitkUInt8 and p.lesion_mask.GetPixelID() == sitk.sitkUInt8
    a, b = arr(p.image), arr(p.brain_mask) > 0
    assert 1300 < b.sum() / 1000.0 < 2600  # brain volume in ml (template mask ~1.9 l, scaled 0.91 to 1.09)
    assert (a[~b] == 0).all() and (a[b] > 0).mean() > 0.99
    assert arr(p.lesion_mask).sum() == 0 and p.lesion_voxels == 0


def test_coarse_grid_covers_the_template_extent():
    p = ph(1)
    t1 = template_images()["t1"]
    for im in (p.brain_mask, p.lesion_mask, *p.tissues.values()):
        assert same_grid(im, p.image)
    np.testing.assert_allclose(p.image.GetSpacing(), [SP] * 3)
    assert p.image.GetSize() == (99, 117, 95)
    np.testing.assert_allclose(p.image.GetDirection(), t1.GetDirection())
    # voxel edges: the first corner coincides with the template's first corner
    corner = np.array(p.image.GetOrigin()) - np.array(p.image.GetDirection()).reshape(3, 3) @ np.full(3, SP / 2)
    corner_t = np.array(t1.GetOrigin()) - np.array(t1.GetDirection()).reshape(3, 3) @ np.full(3, 0.5)
    np.testing.assert_allclose(corner, corner_t, atol=1e-9)


def test_templates_from_a_folder_without_nilearn_or_nibabel(tmp_path):
    """``$UAD_MNI152_DIR`` (a GPU machine with only wheels carried): the three files nilearn ships, read with
    SimpleITK in a process where nilearn and nibabel cannot be imported, give nilearn's templates and the same
    phantom to the bit."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import nilearn

    src = Path(nilearn.__file__).parent / "datasets" / "data"
    folder = tmp_path / "mni"
    folder.mkdir()
    for name in phantoms.MNI152_FILES.values():
        shutil.copy(src / name, folder / name)
    got = phantoms.templates_from_folder(folder)
    ref = phantoms._nilearn_templates()
    for k in ("t1", "gm", "wm", "brain"):
        np.testing.assert_array_equal(np.asarray(got[k].dataobj), np.asarray(ref[k].dataobj))
        assert np.asarray(got[k].dataobj).dtype == np.asarray(ref[k].dataobj).dtype
        np.testing.assert_allclose(got[k].affine, np.asarray(ref[k].affine), atol=1e-9)
    code = (
        "import sys; sys.modules['nilearn'] = None; sys.modules['nibabel'] = None\n"
        "import numpy as np, SimpleITK as sitk\n"
        "from uad.phantoms import make_phantom\n"
        "p = make_phantom(5, 'T2', 'tumour', spacing=4.0)\n"
        "np.savez(sys.argv[1], image=sitk.GetArrayFromImage(p.image), brain=sitk.GetArrayFromImage(p.brain_mask),"
        " lesion=sitk.GetArrayFromImage(p.lesion_mask))\n")
    env = dict(os.environ, UAD_MNI152_DIR=str(folder), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "p.npz")], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = np.load(tmp_path / "p.npz")
    p = make_phantom(5, "T2", "tumour", spacing=4.0)
    np.testing.assert_array_equal(out["image"], arr(p.image))
    np.testing.assert_array_equal(out["brain"], arr(p.brain_mask))
    np.testing.assert_array_equal(out["lesion"], arr(p.lesion_mask))
    (folder / phantoms.MNI152_FILES["wm"]).unlink()
    with pytest.raises(FileNotFoundError, match="mni_icbm152_wm"):
        phantoms.templates_from_folder(folder)


# ----------------------------------------------------------------------------- determinism
def test_same_seed_identical_arrays():
    a = ph(5, "T2", "tumour")
    b = make_phantom(5, "T2", "tumour", spacing=SP)
    np.testing.assert_array_equal(arr(a.image), arr(b.image))
    np.testing.assert_array_equal(arr(a.brain_mask), arr(b.brain_mask))
    np.testing.assert_array_equal(arr(a.lesion_mask), arr(b.lesion_mask))
    assert a.meta == b.meta


def test_different_seeds_differ():
    a, b = ph(1), ph(3)
    ia, ib = arr(a.image), arr(b.image)
    assert not np.array_equal(ia, ib)
    ma, mb = arr(a.brain_mask) > 0, arr(b.brain_mask) > 0
    dice = 2 * (ma & mb).sum() / (ma.sum() + mb.sum())
    assert 0.8 < dice < 0.995  # same template, different warps
    assert a.meta["rotation_deg"] != b.meta["rotation_deg"]
    t_a, t_b = ph(5, "T2", "tumour"), ph(6, "T2", "tumour")
    assert t_a.meta["lesion_info"]["centre_mni_ras"] != t_b.meta["lesion_info"]["centre_mni_ras"]


def test_one_seed_same_anatomy_in_every_contrast():
    t1, t2 = ph(1, "T1"), ph(1, "T2")
    np.testing.assert_array_equal(arr(t1.brain_mask), arr(t2.brain_mask))
    np.testing.assert_array_equal(arr(t1.tissues["wm"]), arr(t2.tissues["wm"]))
    assert not np.array_equal(arr(t1.image), arr(t2.image))
    # a lesion keeps the healthy anatomy of the seed (ms has no mass effect)
    np.testing.assert_array_equal(arr(ph(3, "T2", "ms").brain_mask), arr(ph(3, "T2", "none").brain_mask))


def test_invalid_arguments():
    with pytest.raises(ValueError):
        make_phantom(0, contrast="PD")
    with pytest.raises(ValueError):
        make_phantom(0, lesion="cyst")
    with pytest.raises(ValueError):
        make_phantom(-1)
    with pytest.raises(ValueError):
        make_phantom(0, spacing=0)


# ----------------------------------------------------------------------------- intensities
def tissue_means(p):
    a = arr(p.image)
    les = ndimage.binary_dilation(arr(p.lesion_mask) > 0, iterations=2)
    out = {}
    for name in ("gm", "wm", "csf"):
        sel = (arr(p.tissues[name]) > 0.9) & ~les & (arr(p.brain_mask) > 0)
        assert sel.sum() > 200, name
        out[name] = float(a[sel].mean())
    return out


@pytest.mark.parametrize("seed", [1, 4])
def test_tissue_contrast_orderings(seed):
    m = tissue_means(ph(seed, "T1"))
    assert m["wm"] > 1.15 * m["gm"] and m["gm"] > 1.5 * m["csf"]
    m = tissue_means(ph(seed, "T2"))
    assert m["csf"] > 1.3 * m["gm"] and m["gm"] > 1.08 * m["wm"]
    m = tissue_means(ph(seed, "FLAIR"))
    assert m["gm"] >= m["wm"] and m["wm"] > 2.5 * m["csf"]


def test_noise_bias_and_partial_volume():
    p = ph(1, "T2")
    a = arr(p.image)
    wm = (arr(p.tissues["wm"]) > 0.95) & (arr(p.brain_mask) > 0)
    v = a[wm]
    cv = v.std() / v.mean()
    assert 0.01 < cv < 0.25  # noise + bias + texture, not a constant
    # partial volume: voxels with mixed GM/WM lie between the pure-tissue means
    m = tissue_means(p)
    g, w = arr(p.tissues["gm"]), arr(p.tissues["wm"])
    mixed = (np.abs(g - 0.5) < 0.15) & (np.abs(w - 0.5) < 0.15)
    assert mixed.sum() > 100
    assert m["wm"] < a[mixed].mean() < m["gm"]


# ----------------------------------------------------------------------------- lesions
@pytest.mark.parametrize("lesion", ["tumour", "stroke", "ms"])
def test_lesions_inside_brain_with_realistic_size(lesion):
    for seed in (5, 6):
        p = ph(seed, "T2", lesion)
        les = arr(p.lesion_mask) > 0
        brain = arr(p.brain_mask) > 0
        assert les.any()
        assert not (les & ~brain).any()
        assert p.lesion_voxels == les.sum()
        ml = les.sum() * SP ** 3 / 1000.0
        assert abs(ml - p.lesion_volume_ml) < 1e-6
        lo, hi = {"tumour": (2.0, 120.0), "stroke": (1.0, 150.0), "ms": (0.05, 12.0)}[lesion]
        assert lo < ml < hi, (seed, ml)


def test_tumour_contrast():
    for seed, contrast in ((5, "T1"), (5, "T2"), (6, "T2"), (5, "FLAIR")):
        p = ph(seed, contrast, "tumour")
        a = arr(p.image)
        les = arr(p.lesion_mask) > 0
        m = tissue_means(p)
        if contrast == "T1":  # hypointense
            assert a[les].mean() < 0.85 * m["wm"]
        elif contrast == "T2":  # oedema hyperintense
            assert a[les].mean() > 1.3 * m["wm"]
            assert a[les].mean() > m["gm"]
        else:  # FLAIR: oedema hyperintense, necrosis fluid-suppressed
            assert a[les].mean() > 1.3 * m["wm"] and a[les].mean() > m["gm"]
            assert np.percentile(a[les], 75) > 1.2 * m["gm"]
        # one mass, inside one hemisphere
        lab, n = ndimage.label(les, structure=np.ones((3, 3, 3)))
        assert np.bincount(lab.ravel())[1:].max() > 0.97 * les.sum()
    # heterogeneous core: the lesion intensities vary more than those of normal white matter
    p = ph(5, "T2", "tumour")
    a = arr(p.image)
    les = arr(p.lesion_mask) > 0
    wm = (arr(p.tissues["wm"]) > 0.95) & ~ndimage.binary_dilation(les, iterations=3)
    assert a[les].std() / a[les].mean() > a[wm].std() / a[wm].mean()


def test_tumour_hemisphere_matches_geometry():
    p = ph(5, "T2", "tumour")
    les = arr(p.lesion_mask) > 0
    k, j, i = np.argwhere(les).mean(0)
    x_lps, y_lps, z = p.image.TransformContinuousIndexToPhysicalPoint((float(i), float(j), float(k)))
    ras_x = p.meta["lesion_info"]["centre_mni_ras"][0]
    assert np.sign(-x_lps) == np.sign(ras_x)  # LPS x = -RAS x
    assert abs(-x_lps - ras_x) < 25.0


def test_stroke_contrast_and_side():
    for seed in (5, 6):
        hyper = ph(seed, "T2", "stroke")
        les = arr(hyper.lesion_mask) > 0
        m2 = tissue_means(hyper)
        assert arr(hyper.image)[les].mean() > 1.25 * m2["gm"]
        if seed == 5:
            hypo = ph(seed, "T1", "stroke")
            np.testing.assert_array_equal(arr(hypo.lesion_mask), arr(hyper.lesion_mask))
            m1 = tissue_means(hypo)
            assert arr(hypo.image)[les].mean() < min(m1["gm"], 0.8 * m1["wm"])
        # on the side the meta says, and reaching the cortex (touches GM)
        k, j, i = np.argwhere(les).mean(0)
        x_lps = hyper.image.TransformContinuousIndexToPhysicalPoint((float(i), float(j), float(k)))[0]
        assert (x_lps < 0) == (hyper.meta["lesion_info"]["hemisphere"] == "right")
        assert (arr(hyper.tissues["gm"])[les] > 0.5).mean() > 0.1


def test_ms_lesions():
    for seed in (5, 6):
        p = ph(seed, "T2", "ms")
        les = arr(p.lesion_mask) > 0
        lab, n = ndimage.label(les, structure=np.ones((3, 3, 3)))
        assert n >= 3
        assert p.meta["lesion_info"]["n_lesions"] >= 4
        assert arr(p.tissues["wm"])[les].mean() > 0.6  # in white matter
        # periventricular: close to CSF-filled ventricles
        vent = arr(p.tissues["csf"]) > 0.8
        dist = ndimage.distance_transform_edt(~vent, sampling=SP)
        assert np.median(dist[les]) < 16.0
        m = tissue_means(p)
        assert arr(p.image)[les].mean() > 1.25 * m["wm"]
        if seed == 5:
            t1 = ph(seed, "T1", "ms")
            assert arr(t1.image)[les].mean() < 0.95 * tissue_means(t1)["wm"]


# ----------------------------------------------------------------------------- files, cohort, CLI
def test_write_phantom_round_trip(tmp_path):
    p = ph(5, "T2", "tumour")
    paths = write_phantom(p, tmp_path, "case")
    assert {k: v.name for k, v in paths.items()} == {
        "image": "case.nii.gz", "brain_mask": "case_brainmask.nii.gz", "lesion": "case_lesion.nii.gz"}
    for key, img in (("image", p.image), ("brain_mask", p.brain_mask), ("lesion", p.lesion_mask)):
        back = sitk.ReadImage(str(paths[key]))
        assert same_grid(back, img)
        assert back.GetPixelID() == img.GetPixelID()
        np.testing.assert_array_equal(arr(back), arr(img))
    paths16 = write_phantom(p, tmp_path / "small", "case", image_dtype="int16")
    back = sitk.ReadImage(str(paths16["image"]))
    assert back.GetPixelID() == sitk.sitkInt16
    assert np.abs(arr(back) - arr(p.image)).max() <= 0.5 + 1e-3
    with pytest.raises(ValueError):
        write_phantom(p, tmp_path, "x", image_dtype="uint8")


def test_generate_cohort_and_csv(tmp_path):
    calls = []
    rows = generate_cohort(tmp_path, 2, contrast="FLAIR", lesion="ms", seed=11, spacing=3.0,
                           progress=lambda i, n, row: calls.append((i, n, row["seed"])))
    assert calls == [(1, 2, 11), (2, 2, 12)]
    assert [r["seed"] for r in rows] == [11, 12]
    with open(tmp_path / "cohort.csv") as f:
        table = list(csv.DictReader(f))
    assert [int(r["seed"]) for r in table] == [11, 12]
    assert all(r["contrast"] == "FLAIR" and r["lesion"] == "ms" for r in table)
    for r, row in zip(table, rows):
        lm = sitk.ReadImage(str(tmp_path / r["lesion_mask"]))
        assert int(arr(lm).sum()) == int(r["lesion_voxels"]) == row["lesion_voxels"] > 0
        img = sitk.ReadImage(str(tmp_path / r["image"]))
        np.testing.assert_allclose(img.GetSpacing(), [3.0] * 3)
        assert (tmp_path / r["brain_mask"]).is_file()


def test_cli_subcommand(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="uad")
    sub = parser.add_subparsers(dest="command")
    phantoms.add_cli(sub)
    args = parser.parse_args(["phantoms", str(tmp_path / "out"), "--n", "1", "--contrast", "t1", "--lesion", "tumour",
                              "--seed", "4", "--spacing", "3"])
    assert args.contrast == "T1" and args.lesion == "tumour" and args.spacing == 3.0
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "phantom_T1_tumour_000004" in out
    assert (tmp_path / "out" / "phantom_T1_tumour_000004_lesion.nii.gz").is_file()
    assert (tmp_path / "out" / "cohort.csv").is_file()
    with pytest.raises(SystemExit):
        parser.parse_args(["phantoms", str(tmp_path), "--lesion", "cyst"])


# ----------------------------------------------------------------------------- head phantoms
HEAD_SP = 2.0  # the 1.5 mm bone tables need voxels this small to be resolved


def head_ph(seed, contrast, lesion="none"):
    key = ("head", seed, contrast, lesion)
    if key not in _CACHE:
        _CACHE[key] = make_phantom(seed, contrast, lesion, spacing=HEAD_SP, head=True)
    return _CACHE[key]


def _shells(p):
    """(brain median, vitreous median, darkest shell median, background) measured on the image."""
    img, b, h = arr(p.image), arr(p.brain_mask) > 0, arr(p.head_mask) > 0
    d = ndimage.distance_transform_edt(~b, sampling=HEAD_SP)
    shells = [np.median(img[h & ~b & (d > r) & (d <= r + HEAD_SP)]) for r in np.arange(0.0, 14.0, HEAD_SP)]
    eye = np.array(p.meta["head"]["eyes_index"][0])  # (i, j, k) of one eyeball's centre
    k, j, i = np.round(eye[::-1]).astype(int)
    vit = np.median(img[k - 1:k + 2, j - 1:j + 2, i - 1:i + 2])
    return float(np.median(img[b])), float(vit), shells, img[~h]


@pytest.mark.parametrize("contrast", ["T1", "T2", "FLAIR"])
def test_head_phantom_wraps_the_same_brain(contrast):
    brain_only = make_phantom(6, contrast, "tumour", spacing=HEAD_SP)
    p = head_ph(6, contrast, "tumour")
    # the ground truth is the brain of the skull-stripped phantom of the same seed
    assert np.array_equal(arr(p.brain_mask), arr(brain_only.brain_mask))
    assert np.array_equal(arr(p.lesion_mask), arr(brain_only.lesion_mask))
    b, h = arr(p.brain_mask) > 0, arr(p.head_mask) > 0
    assert np.all(h[b]) and (h & ~b).sum() > 0.6 * b.sum()  # a head around the brain
    img = arr(p.image)
    # everything outside the brain is filled (head) or noise (background), nothing is exactly zero
    assert (img[~b] == 0).mean() < 0.01
    brain_med, vit, shells, bg = _shells(p)
    # background: Rician (Rayleigh) noise, far below tissue
    assert 0 < np.median(bg) < 0.1 * brain_med and bg.std() > 0
    # a dark skull (cortical bone) between the brain and the scalp, in every contrast
    assert min(shells) < 0.45 * brain_med
    assert max(shells) > 2.0 * min(shells)  # and bright tissue (marrow, fat) around it
    # vitreous humour: bright on T2, dark on T1 and FLAIR
    if contrast == "T2":
        assert vit > 1.2 * brain_med
    else:
        assert vit < 0.5 * brain_med


def test_head_phantom_fat_is_bright_on_t1():
    t1, t2 = head_ph(6, "T1"), head_ph(6, "T2")
    lv1, lv2 = t1.meta["head"]["levels"], t2.meta["head"]["levels"]
    assert lv1["fat"] > lv1["muscle"] > lv1["csf"] > lv1["bone"]
    assert lv2["csf"] > lv2["fat"] > lv2["muscle"] > lv2["bone"]
    # measured: the outer shells (fat) relative to the brain are brighter on T1 than on T2
    r1 = max(_shells(t1)[2]) / _shells(t1)[0]
    r2 = max(_shells(t2)[2][2:]) / _shells(t2)[0]
    assert r1 > r2


def test_resample_phantom_geometry():
    from uad.phantoms import resample_phantom

    p = head_ph(6, "T2")
    r = resample_phantom(p, spacing=(4.0, 4.0, 6.0), rotation_deg=(0.0, 0.0, 20.0), flip=(True, False, False))
    d = np.array(r.image.GetDirection()).reshape(3, 3)
    d0 = np.array(p.image.GetDirection()).reshape(3, 3)
    assert np.allclose(d.T @ d, np.eye(3)) and np.sign(d[0, 0]) == -np.sign(d0[0, 0])  # i axis flipped
    np.testing.assert_allclose(r.image.GetSpacing(), [4.0, 4.0, 6.0])
    vol = lambda m: arr(m).sum() * np.prod(m.GetSpacing())  # noqa: E731
    assert vol(r.brain_mask) == pytest.approx(vol(p.brain_mask), rel=0.05)
    assert vol(r.head_mask) == pytest.approx(vol(p.head_mask), rel=0.05)


def test_cli_head_phantoms(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="uad")
    sub = parser.add_subparsers(dest="command")
    phantoms.add_cli(sub)
    args = parser.parse_args(["phantoms", str(tmp_path), "--contrast", "FLAIR", "--seed", "2", "--spacing", "4",
                              "--head"])  # 4 mm: fast
    assert args.func(args) == 0
    img = sitk.ReadImage(str(tmp_path / "phantom_head_FLAIR_none_000002.nii.gz"))
    bm = sitk.ReadImage(str(tmp_path / "phantom_head_FLAIR_none_000002_brainmask.nii.gz"))
    a, b = arr(img), arr(bm) > 0
    assert (a[~b] > 0).mean() > 0.99  # not skull-stripped
    assert np.array_equal(b, arr(make_phantom(2, "FLAIR", spacing=4.0).brain_mask) > 0)


# ----------------------------------------------------------------------------- training stream
def test_training_slice_source_healthy():
    src = TrainingSliceSource("T2", image_size=32, seed=3, pool_size=2, refresh_every=2, spacing=3.0, prefetch=False)
    g = np.random.default_rng(0)
    x, m, y = src.sample_batch(12, g)
    assert x.shape == (12, 1, 32, 32) and m.shape == (12, 1, 32, 32) and y.shape == (12,)
    assert str(x.dtype) == "torch.float32" and str(m.dtype) == "torch.bool" and str(y.dtype) == "torch.int64"
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0 and float(x.max()) > 0.5
    assert (x[~m] == 0).all()
    assert int(y.sum()) == 0
    # no nearly empty slices: every slice has at least min_brain_fraction of the volume's largest brain area
    for e in src.pool:
        area = e.masks.reshape(len(e.masks), -1).sum(1)
        assert area.min() >= 0.2 * area.max() > 0
    assert src.seeds == [3, 4]
    src.sample_batch(4, g)
    src.sample_batch(4, g)  # third batch: the oldest volume was replaced
    assert src.seeds == [4, 5]


def test_training_slice_source_determinism_and_flip():
    kw = dict(contrast="T1", image_size=32, seed=7, pool_size=2, spacing=3.0)
    a = TrainingSliceSource(flip_probability=0.0, prefetch=False, **kw)
    b = TrainingSliceSource(flip_probability=1.0, prefetch=True, **kw)
    xa, ma, _ = a.sample_batch(6, np.random.default_rng(5))
    xb, mb, _ = b.sample_batch(6, np.random.default_rng(5))
    b.close()
    np.testing.assert_array_equal(xa.numpy()[..., ::-1], xb.numpy())
    np.testing.assert_array_equal(ma.numpy()[..., ::-1], mb.numpy())
    c = TrainingSliceSource(flip_probability=0.0, prefetch=False, **kw)
    xc, _, _ = c.sample_batch(6, np.random.default_rng(5))
    np.testing.assert_array_equal(xa.numpy(), xc.numpy())


def test_training_slice_source_lesions_and_holdout():
    src = TrainingSliceSource("FLAIR", image_size=32, seed=0, pool_size=2, lesion="tumour", lesion_fraction=1.0,
                              holdout=True, spacing=3.0, prefetch=False)
    x, m, y, les = src.sample_batch(48, np.random.default_rng(1), return_lesions=True)
    assert all(s >= HOLDOUT_SEED_OFFSET for s in src.seeds)
    assert all(e.lesion == "tumour" for e in src.pool)
    np.testing.assert_array_equal(y.numpy(), les.flatten(1).any(1).numpy().astype(np.int64))
    assert 0 < int(y.sum()) < 48
    assert not (les & ~m).any()
    # FLAIR tumour: lesion pixels are bright relative to the rest of the brain
    assert float(x[les].mean()) > float(x[m & ~les].mean()) + 0.1
    # the labels come from the lesion masks of the pool volumes
    for e in src.pool:
        np.testing.assert_array_equal(e.labels, e.lesions.reshape(len(e.lesions), -1).any(1))
    # lesion_fraction decides per phantom seed
    half = TrainingSliceSource("T2", seed=0, lesion="ms", lesion_fraction=0.5)
    kinds = [half.phantom_spec(k)[1] for k in range(40)]
    assert set(kinds) == {"none", "ms"} and 10 < kinds.count("ms") < 30
    healthy = TrainingSliceSource("T2", seed=0, lesion="tumour", lesion_fraction=0.0)
    assert {healthy.phantom_spec(k)[1] for k in range(10)} == {"none"}


def test_paired_healthy_twins_remove_the_slice_position_shortcut():
    """paired=True: each lesion phantom's healthy twin (same seed, no lesion) joins the pool with label 0, so
    every lesion slice has a healthy slice of the same anatomy; they differ only around the lesion."""
    kw = dict(image_size=32, seed=0, pool_size=1, lesion="ms", lesion_fraction=1.0, spacing=3.0, prefetch=False)
    plain = TrainingSliceSource("T2", **kw).fill()
    paired = TrainingSliceSource("T2", paired=True, **kw).fill()
    e0, e = plain.pool[0], paired.pool[0]
    n = len(e0.slices)
    assert len(e.slices) > n and e.lesion == "ms" and int(e0.labels.sum()) > 0
    np.testing.assert_array_equal(e.slices[:n], e0.slices)  # the lesion volume as before ...
    np.testing.assert_array_equal(e.labels[:n], e0.labels)
    twin_labels, twin_les = e.labels[n:], e.lesions[n:]
    assert not twin_labels.any() and not twin_les.any()  # ... and its twin: all healthy
    np.testing.assert_array_equal(e.labels, e.lesions.reshape(len(e.lesions), -1).any(1))
    # same anatomy: where the twin has as many slices, each lesion slice differs from its twin mainly at the lesion
    twin = e.slices[n:]
    assert len(twin) == n  # MS lesions leave the brain mask, hence the slice range, as it is
    from scipy import ndimage

    for i in np.flatnonzero(e0.labels)[:4]:
        near = ndimage.binary_dilation(e0.lesions[i], iterations=2)
        diff = np.abs(e0.slices[i] - twin[i])
        assert diff[near].mean() > 3 * diff[~near & e0.masks[i]].mean()
    assert (e.labels == 0).sum() >= (e.labels == 1).sum() * 2  # >= one healthy slice per lesion slice, and more
    assert "healthy twin" in paired.describe()


@pytest.mark.parametrize("head", [False, True])
def test_healthy_counterpart_is_the_ideal_restoration(head):
    """return_healthy: the same head without its lesion and without noise.  The other outputs are unchanged; the
    counterpart differs from the image by noise alone away from the lesion and by the lesion inside it; its
    residual |image - healthy| (an ideal restorer's) finds the FLAIR tumour better than intensity alone; and
    resample_phantom acquires it like the image."""
    from uad.metrics import average_precision
    from uad.phantoms import resample_phantom

    plain = make_phantom(21, "FLAIR", "tumour", spacing=3.0, head=head)
    p = make_phantom(21, "FLAIR", "tumour", spacing=3.0, head=head, return_healthy=True)
    assert plain.healthy is None and same_grid(p.healthy, p.image)
    for name in ("image", "brain_mask", "lesion_mask"):
        assert np.array_equal(arr(getattr(p, name)), arr(getattr(plain, name)))
    img, hl = arr(p.image).astype(np.float64), arr(p.healthy).astype(np.float64)
    b, les = arr(p.brain_mask) > 0, arr(p.lesion_mask) > 0
    sigma = p.meta["noise_sigma"]
    far = b & ~ndimage.binary_dilation(les, iterations=4)
    # away from the lesion: Rician noise of the given sigma on a bright signal (|diff| median ~0.67 sigma)
    assert 0.4 * sigma < np.median(np.abs(img - hl)[far]) < 1.0 * sigma
    assert np.all(hl >= 0) and (hl[b] > 0).all()
    # inside: the FLAIR lesion is many noise levels above the tissue it replaced
    assert np.median((img - hl)[les]) > 8 * sigma
    if head:
        h = arr(p.head_mask) > 0
        assert np.median(np.abs(img - hl)[h & ~b]) < 1.0 * sigma  # the same head around the brain
    r = np.abs(img - hl)
    assert average_precision(r[b], les[b]) > average_precision(img[b], les[b])
    lesion_free = make_phantom(21, "FLAIR", "none", spacing=3.0, head=head, return_healthy=True)
    assert np.median(np.abs(arr(lesion_free.image) - arr(lesion_free.healthy))[b]) < 1.0 * sigma
    q = resample_phantom(p, spacing=(3.0, 3.0, 5.0), rotation_deg=(10.0, 0.0, 0.0))
    assert same_grid(q.healthy, q.image)
    ql, qb = arr(q.lesion_mask) > 0, arr(q.brain_mask) > 0
    assert np.median((arr(q.image) - arr(q.healthy))[ql]) > 8 * sigma
    assert np.median(np.abs(arr(q.image) - arr(q.healthy))[qb & ~ndimage.binary_dilation(ql, iterations=3)]) < sigma
