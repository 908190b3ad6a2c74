"""Shared pytest fixtures.

* ``tiny_zoo``: a model folder with tiny random-weight models, with
  ``$UAD_MODELS_DIR`` pointing at it and ``$UAD_CACHE_DIR`` at an empty folder
  (so no user or repository model is picked by default).  Entries:
  ``tiny-test`` (anoddpm/thor/autoddpm denoiser, 32 x 32, no threshold) and
  ``tiny-test-thr`` (the same weights, threshold 0.123).
* ``tiny_model``: the ``tiny-test`` model loaded (a ``uad.zoo.Model``).
* ``make_volume``: a factory of synthetic skull-stripped "brain" volumes
  (smooth ellipsoid with texture and optional bright lesion) on any grid.
* ``fast_params``: method parameters that keep the diffusion chains short.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO / "UADExtension") not in sys.path:  # the package is installed editable; this is a fallback
    sys.path.insert(0, str(_REPO / "UADExtension"))

TINY_ID = "tiny-test"
TINY_THR_ID = "tiny-test-thr"
TINY_SIZE = 32
FAST_PARAMS = {"level": 20, "steps": 3, "sampler": "ddim"}


def tiny_model_config(image_size: int = TINY_SIZE) -> dict:
    from uad.networks import tiny_unet_config

    return {
        "methods": ["anoddpm", "thor", "autoddpm"],
        "contrast": "T2",
        "image_size": image_size,
        "intensity_range": [-1.0, 1.0],
        "noise": "gaussian",
        "schedule": {"num_train_timesteps": 1000, "schedule": "linear_beta", "beta_start": 1e-4,
                     "beta_end": 2e-2, "prediction_type": "epsilon", "clip_sample": True},
        "networks": {"denoiser": tiny_unet_config((8, 16, 16))},
        "normalisation": {"lower": 1.0, "upper": 99.0},
        "threshold": None,
        "description": "tiny random-weight test model",
    }


@pytest.fixture(scope="session")
def tiny_zoo_dir(tmp_path_factory) -> Path:
    import torch

    from uad.zoo import build_model, save_weights

    root = tmp_path_factory.mktemp("zoo")
    torch.manual_seed(0)
    cfg = tiny_model_config()
    model = build_model(cfg, model_id=TINY_ID)
    digest = save_weights(model, root / "tiny.safetensors")
    entry = dict(cfg, id=TINY_ID, file="tiny.safetensors", sha256=digest)
    entry_thr = dict(entry, id=TINY_THR_ID, threshold=0.123)
    (root / "manifest.json").write_text(json.dumps({"models": [entry, entry_thr]}, indent=2))
    return root


@pytest.fixture
def tiny_zoo(tiny_zoo_dir, tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("UAD_MODELS_DIR", str(tiny_zoo_dir))
    monkeypatch.setenv("UAD_CACHE_DIR", str(tmp_path / "uad-cache"))
    # the bundled models in <repo>/models are not part of this test zoo
    monkeypatch.setattr("uad.zoo.bundled_dirs", lambda: [])
    return tiny_zoo_dir


@pytest.fixture
def tiny_model(tiny_zoo):
    from uad.zoo import load_model

    return load_model(TINY_ID)


def load_script(relpath: str):
    """A script of the repository (``benchmarks/...py``, ``scripts/...py``) imported as a module by its path."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / relpath
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


#: what torchrun sets for its processes; a run outside torchrun must not inherit them
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "UAD_DIST_BACKEND")


def subprocess_env(tmp_path: Path, **extra) -> dict:
    """The environment of a ``uad`` subprocess (plain or under torchrun): one thread, an empty cache and
    model folder in ``tmp_path``, none of torchrun's variables inherited, Gloo on the loopback interface;
    ``extra`` (e.g. ``UAD_MODELS_DIR``) overrides."""
    env = dict(os.environ, OMP_NUM_THREADS="1", UAD_CACHE_DIR=str(tmp_path / "cache"),
               UAD_MODELS_DIR=str(tmp_path / "no-models"))
    for k in DIST_VARS:
        env.pop(k, None)
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # stay on the loopback interface
    env.update({k: str(v) for k, v in extra.items()})
    return env


@contextlib.contextmanager
def coarse_registration(**affine):
    """``uad.registration.AFFINE_DEFAULTS`` with ``affine`` (e.g. ``iterations=(40, 20)``) in place of the
    production settings while the block runs: for tests of the chain's steps and geometry, not of the
    registration's accuracy (``Testing/test_chain.py`` and ``benchmarks/bench_skullstrip.py`` measure that)."""
    from uad import registration

    unknown = set(affine) - set(registration.AFFINE_DEFAULTS)
    assert not unknown, f"not a registration setting: {sorted(unknown)}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(registration, "AFFINE_DEFAULTS", dict(registration.AFFINE_DEFAULTS, **affine))
        yield


def one_error_line(capsys, rc) -> str:
    """A failed CLI call (exit 1) printed exactly one 'uad: error: ' line and no traceback; that line."""
    out, err = capsys.readouterr()
    assert rc == 1, (out, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("uad: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty private zoo: no bundled models, no $UAD_MODELS_DIR, the user cache in tmp_path (its models folder)."""
    monkeypatch.setattr("uad.zoo.bundled_dirs", lambda: [])
    monkeypatch.delenv("UAD_MODELS_DIR", raising=False)
    monkeypatch.setenv("UAD_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"


@pytest.fixture
def fast_params() -> dict:
    return dict(FAST_PARAMS)


def synthetic_brain(shape_zyx=(16, 40, 36), spacing=(1.2, 1.0, 3.0), lesion=True, seed=0,
                    dtype=np.float32, scale=1000.0):
    """(image, lesion, brain) numpy arrays (z, y, x): an ellipsoid brain with smooth texture, 0 outside.

    ``spacing`` is (x, y, z) in mm (SimpleITK order); the ellipsoid is round in
    physical units.  The lesion is a bright ball inside the brain.
    """
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    nz, ny, nx = shape_zyx
    sx, sy, sz = spacing
    z, y, x = np.meshgrid((np.arange(nz) - (nz - 1) / 2) * sz, (np.arange(ny) - (ny - 1) / 2) * sy,
                          (np.arange(nx) - (nx - 1) / 2) * sx, indexing="ij")
    rz, ry, rx = 0.42 * nz * sz, 0.42 * ny * sy, 0.42 * nx * sx
    r2 = (z / rz) ** 2 + (y / ry) ** 2 + (x / rx) ** 2
    brain = r2 <= 1.0
    texture = ndimage.gaussian_filter(rng.standard_normal(shape_zyx), sigma=(1.0, 2.0, 2.0))
    texture /= texture.std() + 1e-8
    img = 0.5 + 0.2 * np.cos(3.0 * np.sqrt(r2)) + 0.05 * texture
    ventricles = ((z / (0.4 * rz)) ** 2 + (y / (0.25 * ry)) ** 2 + ((np.abs(x) - 0.2 * rx) / (0.12 * rx)) ** 2) < 1
    img = np.where(ventricles, 0.85, img)
    les = np.zeros(shape_zyx, bool)
    if lesion:
        c = (0.1 * rz, -0.3 * ry, 0.35 * rx)
        les = ((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) <= (0.22 * min(rx, ry, rz)) ** 2
        les &= brain
        img = np.where(les, 1.0, img)
    img = np.where(brain, np.clip(img, 0.05, None), 0.0) * scale
    return img.astype(dtype), les.astype(np.uint8), brain.astype(np.uint8)


@pytest.fixture
def make_volume():
    """``make_volume(shape_zyx, spacing, origin, direction, lesion, seed, dtype)`` -> (image, lesion, brain) sitk."""
    import SimpleITK as sitk

    def make(shape_zyx=(16, 40, 36), spacing=(1.2, 1.0, 3.0), origin=(0.0, 0.0, 0.0), direction=None,
             lesion=True, seed=0, dtype=np.float32):
        arrs = synthetic_brain(shape_zyx, spacing, lesion, seed, dtype)
        out = []
        for a in arrs:
            im = sitk.GetImageFromArray(a)
            im.SetSpacing([float(s) for s in spacing])
            im.SetOrigin([float(o) for o in origin])
            if direction is not None:
                im.SetDirection([float(d) for d in np.asarray(direction, float).ravel()])
            out.append(im)
        return tuple(out)

    return make


@pytest.fixture(autouse=True, scope="session")
def _few_threads():
    """The test machines are shared: keep torch to one thread unless told otherwise."""
    if "OMP_NUM_THREADS" not in os.environ:
        try:
            import torch

            torch.set_num_threads(1)
        except ImportError:  # pragma: no cover
            pass
    yield
