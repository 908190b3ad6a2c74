"""A given method without a model (`uad detect --method M`, `detect(method=M)`, the Slicer Logic) runs that
method's bundled model for the scan's contrast.

Found by running ``make demo`` (``uad detect --sample --method disyre``): it ran ``disyre-flair-phantom`` on
the T2 sample (AP 0.013 instead of 0.89), because the default model was the first of the method in the
manifest, whatever the scan's contrast.
"""
from __future__ import annotations

import argparse

import pytest

from uad import cli
from uad.pipeline import resolve_model

try:  # the real-MRML fixture of the Logic tests (slicer-core)
    from test_logic import mrml  # noqa: F401
except pytest.skip.Exception:  # slicer-core missing: only the engine tests run
    @pytest.fixture
    def mrml():
        pytest.skip("slicer-core is needed for the MRML tests")


@pytest.fixture
def bundled_zoo(tmp_path, monkeypatch):  # the bundled models only (user cache empty, no $UAD_MODELS_DIR)
    monkeypatch.delenv("UAD_MODELS_DIR", raising=False)
    monkeypatch.setenv("UAD_CACHE_DIR", str(tmp_path / "cache"))


def _args(**kw):
    return argparse.Namespace(**{"model": None, "contrast": None, "preset": None, **kw})


@pytest.mark.parametrize("contrast, expected", [("T2", "disyre-t2-phantom"), ("FLAIR", "disyre-flair-phantom"),
                                                ("T1", "disyre-t1-phantom")])
def test_given_method_gets_its_model_for_the_scan_contrast(bundled_zoo, contrast, expected):
    said = []
    name, model_id, preset = cli._choose_method(_args(), "disyre", None, "scan.nii.gz", None, said.append,
                                                (contrast, "metadata / file name", contrast))
    assert (name, model_id, preset) == ("disyre", expected, None)
    # the same for the models shared across methods: THOR on FLAIR runs a FLAIR DDPM (of the two bundled, the
    # one measured better for THOR), not a T2 one
    from uad.zoo import find_model

    thor_model = cli._choose_method(_args(), "thor", None, "s.nii.gz", None, said.append,
                                    ("FLAIR", "--contrast", "FLAIR (given)"))[1]
    assert thor_model in ("ddpm-flair-phantom", "ddpm-flair-simplex")
    assert find_model(thor_model).contrast == "FLAIR"
    assert thor_model == find_model(method="thor", contrast="FLAIR").id


def test_given_model_and_unknown_contrast_keep_the_old_choice(bundled_zoo):
    # --model wins over the contrast
    assert cli._choose_method(_args(model="disyre-flair-phantom"), "disyre", None, "s.nii.gz", None, print,
                              ("T2", "--contrast", "T2 (given)"))[1] == "disyre-flair-phantom"
    # a contrast with no model (or none found) falls back to the method's first model on disk
    first = cli._choose_method(_args(), "disyre", None, "s.nii.gz", None, print, ("PD", "--contrast", "PD"))[1]
    assert first == cli._choose_method(_args(), "disyre", None, "s.nii.gz", None, print, (None, "", "?"))[1]


def test_detect_default_model_follows_the_given_contrast(bundled_zoo):
    assert resolve_model(None, "disyre", "cpu", contrast="T2").id == "disyre-t2-phantom"
    assert resolve_model(None, "disyre", "cpu", contrast="T1").id == "disyre-t1-phantom"



def test_volume_contrast_reads_the_node_name():
    import SimpleITK as sitk

    from UADExtensionLib.logic import volume_contrast

    img = sitk.Image(8, 8, 4, sitk.sitkFloat32)
    assert volume_contrast(img, "sub-01_FLAIR") == "FLAIR"
    assert volume_contrast(img, "case_T2_axial") == "T2"


def test_logic_default_model_follows_the_volume_contrast(bundled_zoo, mrml, tmp_path):  # noqa: F811
    from test_logic import _brain_array, _write_volume

    from UADExtensionLib.logic import UADExtensionLogic

    path = _write_volume(tmp_path / "brain.nii.gz", _brain_array())
    node = mrml.load(path, name="case_T1")  # not the first disyre model of the manifest (FLAIR)
    logic = UADExtensionLogic(mrml.scene, segmentationsLogic=mrml.segmentations)
    result = logic.process(node, method="disyre", device="cpu", preset="fast", batchSize=4)
    assert result.info["model"] == "disyre-t1-phantom"
