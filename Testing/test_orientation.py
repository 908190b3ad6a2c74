"""Orientation: the opt-in ``deoblique`` profile step (an oblique volume resampled onto the LPS axes)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from uad.phantoms import make_phantom, resample_phantom
from uad.postprocess import to_volumes
from uad.preprocess import oblique_angle_deg, preprocess, profile_settings

S = 64


def _a(img):
    return sitk.GetArrayFromImage(img)


@pytest.fixture(scope="module")
def oblique():
    base = make_phantom(7, "T2", "none", spacing=3.0)
    return resample_phantom(base, spacing=(3.0, 3.0, 4.0), rotation_deg=(15.0, 0.0, 10.0), flip=(True, False, True))


def test_deoblique_works_on_the_lps_axes_and_round_trips(oblique):
    img = oblique.image
    plain = preprocess(img, S, brain_mask=oblique.brain_mask)
    assert "deoblique" not in [s.name for s in plain.steps]  # off by default
    st = preprocess(img, S, brain_mask=oblique.brain_mask, profile={"deoblique": True})
    names = [s.name for s in st.steps]
    assert names == ["reorient", "brain_mask", "deoblique", "normalise", "select_slices", "in_plane"]
    rec = st.info["steps"][2]
    assert abs(rec["angle_deg"] - oblique_angle_deg(plain.oriented_reference.GetDirection())) < 1e-3
    assert 15.0 < rec["angle_deg"] < 25.0
    # the working grid is axis-aligned (LPS) with the canonical spacing
    assert np.allclose(st.oriented_reference.GetDirection(), np.eye(3).ravel())
    assert np.allclose(st.oriented_reference.GetSpacing(), plain.oriented_reference.GetSpacing())
    assert st.streamable  # one 3-D step: the way back streams through its inverse a slab at a time
    # the way back: the input's exact grid, the restoration = the input inside the brain (two linear resamplings)
    rest, anom = to_volumes(st, st.slices, np.ones_like(st.slices))
    for attr in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(rest, attr)() == getattr(img, attr)()
    x, r, b = _a(img), _a(rest), _a(oblique.brain_mask) > 0
    inner = b & (x > np.percentile(x[b], 5)) & (x < np.percentile(x[b], 95))
    assert np.median(np.abs(r[inner] - x[inner]) / x[inner]) < 0.08
    covered = _a(anom) > 0.5
    assert covered[b].mean() > 0.9 and not covered[~b].any()


def test_deoblique_profile_value_checked():
    assert profile_settings({"deoblique": True})["deoblique"] is True
    with pytest.raises(ValueError, match="deoblique"):
        profile_settings({"deoblique": "yes"})
