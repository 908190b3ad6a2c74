"""Import the authors' published checkpoints (THOR, AutoDDPM, Wolleb et al.) into the model zoo.

    uad models import-reference thor brain_Gaussian.pt [--id ID] [--noise gaussian|simplex]
                                [--input-range auto|0,1|-1,1] [--slice-range LO,HI|all]
    uad models import-reference autoddpm latest_model.pt [...]
    uad models import-reference wolleb DIFFUSION.pt --classifier CLASSIFIER.pt [--id ID] [--num-heads 1]

    from uad.reference import import_reference
    entry = import_reference("thor", "brain_Simplex.pt", noise="simplex")   # -> zoo.ModelEntry
    uad.pipeline.detect(image, method="thor", model=entry.id)

What the published files are
----------------------------
THOR (``ci-ber/THOR_DDPM``: ``brain_Gaussian.pt``, ``brain_Simplex.pt``) and AutoDDPM
(``ci-ber/autoDDPM``: ``latest_model.pt``) saved ``{'model_weights': state_dict,
'optimizer_weights': ..., 'epoch': ...}``.  The state dict holds the denoiser under
``unet.``, a verbatim copy of MONAI GenerativeModels' ``DiffusionModelUNet`` (THOR's
also holds its LPIPS module under ``l_pips_sq.``, dropped here: ``uad.perceptual``
provides LPIPS).  The network is 2-D, 1 -> 1 channel, channels (128, 256, 256),
attention (False, True, True), one res block, 256 head channels, 32 norm groups,
eps 1e-6; the scheduler DDPM, 1000 steps, linear beta 1e-4 .. 0.02, epsilon
prediction, x0 clipped to [-1, 1], "fixed_small" variance.

How it is converted
-------------------
1. ``torch.load(..., weights_only=True)``: a checkpoint that needs code to unpickle
   (a class, a function, a ``__reduce__`` payload) is refused with ``ModelError``
   before anything from it runs.
2. The ``unet.`` tensors are checked against the exact set of names that the
   GenerativeModels network of that architecture has (architecture read from
   the tensor shapes); any missing or unexpected tensor is an error naming them.
3. MONAI's ``DiffusionModelUNet.load_old_state_dict`` maps the old names (attention
   ``to_q/k/v``, the up-sampler's ``conv``) onto MONAI's network built with
   ``include_fc=False``: GenerativeModels' attention block created its output
   projection ``proj_attn`` but never applied it, so those tensors are dropped and
   the projection is left out (with the default ``include_fc=True`` outputs differ
   by a few per cent).  Every loaded tensor is compared with its source.
4. The weights are written as safetensors into the user cache with a manifest
   entry (network config, scheduler, noise, intensity range, preprocessing profile,
   method parameters, sha256) and a generated model card; ``uad.zoo.import_models``
   does the copy, checks and the manifest update, so the model is then an ordinary
   zoo model (``uad detect --model ID``, ``uad.pipeline.detect``, the Slicer module).

Input range (``--input-range auto``)
------------------------------------
THOR's trainer mapped images to [-1, 1] but its inference fed [0, 1] until a 2026
fix, AutoDDPM used [0, 1] throughout, so a THOR file's convention is uncertain.
``auto`` measures the network's denoising error on noised healthy phantom slices
(``measure_input_ranges``) under each convention and keeps the lower.

Wolleb et al.
-------------
The guided-diffusion ``UNetModel`` and ``EncoderUNetModel`` classifier (plain state dicts)
are converted by ``uad.guided_diffusion`` (``import_wolleb``): a key map of our own onto
MONAI's ``DiffusionModelUNet``, and a classifier implementation with the reference's
parameter layout.  The model takes 4 co-registered contrasts; the volume pipeline reads one,
so it runs through the Method API (see ``MULTICHANNEL_NOTE``).

Preprocessing profile
---------------------
T1 registered to MNI152 at 1 mm, axial slices, not skull-stripped, no bias
correction, padded to square with the image minimum, resized to 128, intensities
scaled to [0, 1] by an image percentile; restricted to a central axial slab (the
networks saw mid-axial slices only).  Written into the entry's ``preprocessing``
(see ``reference_profile``); applying it is ``uad.preprocess``'s job.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Sequence

from . import ModelError, UADError

# ----------------------------------------------------------------------------- what the authors published
SOURCES = {
    "thor": {
        "title": "THOR (Bercea et al., MICCAI 2024)",
        "repository": "https://github.com/ci-ber/THOR_DDPM",
        "also": "https://github.com/compai-lab/2024-miccai-bercea-thor",
        "files": {
            "gaussian": ("brain_Gaussian.pt", "https://www.dropbox.com/scl/fi/55cl3821vw1jp3jim2da2/"
                                              "brain_Gaussian.pt?rlkey=pz99o0x3g6vi3siwtvfpb0oyo&dl=1"),
            "simplex": ("brain_Simplex.pt", "https://www.dropbox.com/scl/fi/d8olm81iynd4lbsjt0fgm/"
                                            "brain_Simplex.pt?rlkey=onmyjogb3ej7uibs7r4poy4w8&dl=1"),
        },
        "license": "none stated (the source repositories carry no licence file: all rights reserved by the "
                   "authors; ask them before redistributing)",
        "license_id": "NOASSERTION",
        "trained_on": "IXI T1, mid-axial slices (Clinica t1-linear, MNI152NLin2009cSym 1 mm)",
    },
    "autoddpm": {
        "title": "AutoDDPM (Bercea et al., ICML IMLH workshop 2023)",
        "repository": "https://github.com/ci-ber/autoDDPM",
        "also": None,
        "files": {"gaussian": ("latest_model.pt", "https://www.dropbox.com/s/ooq7vdp9fp4ufag/"
                                                  "latest_model.pt.zip?dl=0 (unzip it first)")},
        "license": "GPL-3.0 (licence of the source repository ci-ber/autoDDPM)",
        "license_id": "GPL-3.0",
        "trained_on": "IXI T1 mid-axial slices (the repository also uses fastMRI for thresholds)",
    },
    "wolleb": {
        "title": "Wolleb et al. (MICCAI 2022)",
        "repository": "https://github.com/JuliaWolleb/diffusion-anomaly",
        "also": None,
        "files": {"gaussian": ("diffusion model + classifier (BraTS2020)",
                               "Dropbox links in issue #7 of JuliaWolleb/diffusion-anomaly")},
        "license": "MIT (licence of the source repository JuliaWolleb/diffusion-anomaly)",
        "license_id": "MIT",
        "trained_on": "BraTS2020 axial slices, 4 co-registered contrasts (t1, t1ce, t2, flair), 240 x 240 padded "
                      "to 256, each channel scaled to [0, 1]; healthy and tumour slices with image labels",
    },
}

#: Method parameters of the released configs (``method_params`` of the manifest entry).
THOR_PARAMS = {"gaussian": {"level": 350, "harmonization": [300, 150, 50]},
               "simplex": {"level": 250, "harmonization": [200, 150, 100, 50]}}
AUTODDPM_PARAMS = {"level": 200, "inpaint_level": 50, "resample": 5, "threshold": 0.13}

#: The published network (GenerativeModels DiffusionModelUNet arguments, MONAI names).
PAPER_ARCHITECTURE = {"spatial_dims": 2, "in_channels": 1, "out_channels": 1, "channels": [128, 256, 256],
                      "attention_levels": [False, True, True], "num_res_blocks": 1, "num_head_channels": 256,
                      "norm_num_groups": 32, "norm_eps": 1e-6}

REFERENCE_SCHEDULE = {"num_train_timesteps": 1000, "schedule": "linear_beta", "beta_start": 1e-4,
                      "beta_end": 2e-2, "prediction_type": "epsilon", "clip_sample": True, "clip_min": -1.0,
                      "clip_max": 1.0, "variance_type": "fixed_small"}

#: Simplex noise of the reference (3-D fixed-depth octaves 6 / persistence 0.8 / frequency 64 px at
#: 128 px, raw amplitude: std about 0.46, not rescaled to unit variance).  The entry carries the
#: options the engine's ``simplex`` noise takes (``noise_options``, see ``uad.noise.options_for``).
REFERENCE_SIMPLEX = {"kind": "simplex", "octaves": 6, "persistence": 0.8, "frequency": 64.0, "variant": "3d",
                     "normalise": "none"}
REFERENCE_SIMPLEX_OPTIONS = {k: v for k, v in REFERENCE_SIMPLEX.items() if k != "kind"}

DEFAULT_SLICE_RANGE = (0.35, 0.65)
IMAGE_SIZE = 128
MIDAXIAL_WARNING = ("the authors trained this network on mid-axial slices only; inference is restricted to the "
                    "central axial slab {lo:.2f}-{hi:.2f} of the brain's axial extent (other slices get anomaly 0); "
                    "re-import with --slice-range all to run every slice (out of the training distribution)")

_PREFIX = "unet."
_DROP_PREFIXES = ("l_pips_sq.",)
_CHECKPOINT_KEYS = ("model_weights", "optimizer_weights", "epoch")
METHODS = ("thor", "autoddpm", "wolleb")


# ----------------------------------------------------------------------------- loading
def read_checkpoint(path: str | os.PathLike) -> dict:
    """``torch.load(path, weights_only=True)`` on the CPU; anything needing code to unpickle is refused."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{p}: no such checkpoint file")
    if zipfile.is_zipfile(p) and not _is_torch_zip(p):
        raise ModelError(f"{p}: this is a zip archive, not a PyTorch checkpoint (the Dropbox download is "
                         f"zipped: unzip it and import the .pt file inside)")
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = " ".join(str(e).split())
        if "GLOBAL" not in text and "global" not in text:  # not a code reference: a damaged / foreign file
            detail = text.split("WeightsUnpickler error:")[-1].split("Check the documentation")[0].strip()
            raise ModelError(f"{p}: not a readable PyTorch checkpoint ({detail[:200] or 'unpickling failed'})") \
                from None
        what = re.search(r"(unsupported GLOBAL [^ ]+|Unsupported global: [^ ]+)", text)
        raise ModelError(f"{p}: refused: the checkpoint needs code to unpickle "
                         f"({what.group(1) if what else 'a Python object beyond tensors and plain containers'}), "
                         f"and loading it would run that code. Nothing from it was executed.") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise ModelError(f"{p}: not a readable PyTorch checkpoint ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]})") from None
    if not isinstance(obj, dict):
        raise ModelError(f"{p}: the checkpoint holds a {type(obj).__name__}, not a dict of tensors")
    return obj


def _is_torch_zip(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("data.pkl") for n in z.namelist())
    except zipfile.BadZipFile:
        return False


def unet_state_dict(checkpoint: dict, name: str = "checkpoint") -> tuple[dict, dict]:
    """(denoiser tensors without the ``unet.`` prefix, report) from a THOR / AutoDDPM checkpoint.

    Accepts the ``{'model_weights': ..., 'optimizer_weights': ..., 'epoch': ...}`` layout or a bare
    state dict; ``l_pips_sq.`` tensors are dropped; anything else outside ``unet.`` is an error.
    """
    import torch

    report: dict = {"layout": "bare state dict", "dropped": {}, "epoch": None}
    state = checkpoint
    if "model_weights" in checkpoint:
        report["layout"] = "{'model_weights', 'optimizer_weights', 'epoch'}"
        state = checkpoint["model_weights"]
        report["epoch"] = _plain(checkpoint.get("epoch"))
        extra = sorted(set(checkpoint) - set(_CHECKPOINT_KEYS))
        if extra:
            report["ignored_entries"] = extra
        if not isinstance(state, dict):
            raise ModelError(f"{name}: 'model_weights' is a {type(state).__name__}, not a state dict")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ModelError(f"{name}: the state dict has non-tensor entries: {_names(bad)}")
    out, other = {}, []
    prefixed = any(k.startswith(_PREFIX) for k in state)
    for k, v in state.items():
        drop = next((d for d in _DROP_PREFIXES if k.startswith(d)), None)
        if drop is not None:
            report["dropped"][drop] = report["dropped"].get(drop, 0) + 1
        elif prefixed and k.startswith(_PREFIX):
            out[k[len(_PREFIX):]] = v
        elif prefixed:
            other.append(k)
        else:
            out[k] = v
    if other:
        raise ModelError(f"{name}: unexpected tensors outside 'unet.': {_names(other)}")
    if not out:
        raise ModelError(f"{name}: no denoiser tensors (expected keys starting with 'unet.')")
    return out, report


def _plain(v):
    import torch

    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else None
    return v if isinstance(v, (int, float, str)) or v is None else str(v)


def _names(keys: Sequence[str], n: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def key_mismatch(missing: Sequence[str], unexpected: Sequence[str], n: int = 12) -> str:
    """The state-dict key check's message: "N missing tensor(s): a, b; M unexpected tensor(s): c" (names
    sorted, at most ``n`` of each); "" when nothing is missing or unexpected.  Shared by the THOR /
    AutoDDPM importer and ``uad.guided_diffusion`` (Wolleb's UNet and classifier)."""
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing tensor(s): {_names(missing, n)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensor(s): {_names(unexpected, n)}")
    return "; ".join(parts)


# ----------------------------------------------------------------------------- architecture
def infer_architecture(state: dict, name: str = "checkpoint") -> dict:
    """The GenerativeModels UNet arguments (MONAI names) read from the tensor shapes.

    channels / in / out channels / attention levels / res blocks come from the tensors;
    the head width cannot be read from weights: the released configs use one head of the
    deepest width (256), kept here as ``channels[-1]``; norm groups 32 and eps 1e-6 as released.
    """
    try:
        w_in = state["conv_in.conv.weight"]
        w_out = state["out.2.conv.weight"]
    except KeyError as e:
        raise ModelError(f"{name}: not a GenerativeModels DiffusionModelUNet (missing tensor {e.args[0]})") from None
    if w_in.ndim != 4:
        raise ModelError(f"{name}: only 2-D networks are supported (conv_in has {w_in.ndim - 2} spatial dims)")
    levels = sorted({int(m.group(1)) for k in state for m in [re.match(r"down_blocks\.(\d+)\.", k)] if m})
    if not levels or levels != list(range(len(levels))):
        raise ModelError(f"{name}: cannot read the down blocks of the network")
    channels, attention, res = [], [], set()
    for i in levels:
        n_res = len({int(m.group(1)) for k in state
                     for m in [re.match(rf"down_blocks\.{i}\.resnets\.(\d+)\.", k)] if m})
        w = state.get(f"down_blocks.{i}.resnets.0.conv1.conv.weight")
        if w is None or n_res == 0:
            raise ModelError(f"{name}: down block {i} has no res blocks")
        channels.append(int(w.shape[0]))
        attention.append(any(k.startswith(f"down_blocks.{i}.attentions.") for k in state))
        res.add(n_res)
    if len(res) != 1:
        raise ModelError(f"{name}: differing numbers of res blocks per level are not supported ({sorted(res)})")
    return {"type": "DiffusionModelUNet", "spatial_dims": 2, "in_channels": int(w_in.shape[1]),
            "out_channels": int(w_out.shape[0]), "channels": channels, "attention_levels": attention,
            "num_res_blocks": res.pop(), "num_head_channels": channels[-1], "norm_num_groups": 32,
            "norm_eps": 1e-6, "include_fc": False}


def architecture_differences(config: dict) -> list[str]:
    """Where ``config`` differs from the published architecture (empty for the released files)."""
    return [f"{k} {config.get(k)!r} (published: {v!r})" for k, v in PAPER_ARCHITECTURE.items()
            if config.get(k) != v]


def expected_old_keys(net: torch.nn.Module) -> tuple[set, set]:
    """(every tensor name the GenerativeModels network has, the unused attention projections among them).

    Derived from the MONAI network built with ``include_fc=False``: MONAI's ``X.attn.to_q`` was
    ``X.to_q``, its up-sampler ``postconv`` was ``conv``, and each attention block also had
    ``X.proj_attn`` (created, never applied).
    """
    keys, unused = set(), set()
    for k in net.state_dict():
        old = k.replace(".attn.to_", ".to_").replace(".postconv.", ".conv.")
        keys.add(old)
        if k.endswith(".attn.to_k.weight"):
            block = k[: -len(".attn.to_k.weight")]
            for s in ("weight", "bias"):
                unused.add(f"{block}.proj_attn.{s}")
    return keys | unused, unused


def convert_unet(state: dict, config: dict, name: str = "checkpoint") -> torch.nn.Module:
    """A MONAI ``DiffusionModelUNet`` (``include_fc=False``) holding the GenerativeModels tensors ``state``."""
    import torch
    from .networks import build_network

    net = build_network(config)
    expected, unused = expected_old_keys(net)
    given = set(state)
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        raise ModelError(f"{name}: the state dict does not match the GenerativeModels DiffusionModelUNet of "
                         f"architecture channels={config['channels']}, attention={config['attention_levels']}: "
                         + key_mismatch(missing, unexpected))
    ref = net.state_dict()
    old = {k: v for k, v in state.items()}
    shapes = []
    for k, v in ref.items():
        src = k.replace(".attn.to_", ".to_").replace(".postconv.", ".conv.")
        if tuple(old[src].shape) != tuple(v.shape):
            shapes.append(f"{src} {tuple(old[src].shape)} (expected {tuple(v.shape)})")
    if shapes:
        raise ModelError(f"{name}: tensors of another shape: {_names(shapes, 6)}")
    with contextlib.redirect_stdout(io.StringIO()):  # MONAI prints progress
        net.load_old_state_dict(dict(old))
    loaded = net.state_dict()
    for k, v in loaded.items():  # every MONAI tensor equals its source
        src = k.replace(".attn.to_", ".to_").replace(".postconv.", ".conv.")
        if not torch.equal(v, state[src].to(v.dtype)):
            raise ModelError(f"{name}: tensor {src} was not loaded into {k}")
    return net.eval()


# ----------------------------------------------------------------------------- profile
def reference_profile(slice_range: Sequence[float] | None = DEFAULT_SLICE_RANGE) -> dict:
    """The ``preprocessing`` entry of these checkpoints (the shared preprocessing-profile contract)."""
    return {"registration": "mni152", "spacing_mm": 1.0, "skull_strip": False, "bias_correction": False,
            "square": "pad", "pad_value": "min", "intensity": "image-percentile",
            "slice_range": None if slice_range is None else [float(slice_range[0]), float(slice_range[1])]}


#: Intensity scaling: the image's minimum -> 0, a high percentile -> 1 (the released PNGs were
#: saturated at about the 98th percentile of the head), clipped.
REFERENCE_NORMALISATION = {"lower": 0.0, "upper": 98.0, "clip": True}


def parse_slice_range(text) -> tuple[float, float] | None:
    if text is None:
        return DEFAULT_SLICE_RANGE
    if isinstance(text, (tuple, list)):
        lo, hi = (float(v) for v in text)
    else:
        t = str(text).strip().lower()
        if t in ("all", "none", "full"):
            return None
        try:
            lo, hi = (float(v) for v in t.split(","))
        except ValueError:
            raise UADError(f"--slice-range expects LO,HI (fractions of the axial extent) or 'all', got {text!r}") \
                from None
    if not 0.0 <= lo < hi <= 1.0:
        raise UADError(f"slice range must satisfy 0 <= LO < HI <= 1, got {lo}, {hi}")
    return lo, hi


def parse_input_range(text) -> tuple[float, float] | str | None:
    if text is None:
        return None
    if isinstance(text, (tuple, list)):
        return float(text[0]), float(text[1])
    t = str(text).strip().lower().replace(" ", "")
    if t == "auto":
        return "auto"
    if t in ("0,1", "[0,1]"):
        return 0.0, 1.0
    if t in ("-1,1", "[-1,1]"):
        return -1.0, 1.0
    raise UADError(f"--input-range must be auto, 0,1 or -1,1, got {text!r}")


def healthy_slices(image_size: int = IMAGE_SIZE, n: int = 6, seed: int = 0,
                   slice_range: Sequence[float] | None = DEFAULT_SLICE_RANGE,
                   spacing: float | None = None) -> tuple[np.ndarray, list[str]]:
    """(n, S, S) healthy T1 phantom slices in [0, 1] prepared like the checkpoints' training data.

    A T1 phantom (``uad.phantoms.make_phantom``, a head when the phantoms support ``head=True``)
    on its MNI152 grid, axial slices spread over ``slice_range`` of the brain's axial extent, padded
    to square with the image
    minimum, resized to S with anti-aliasing, the image minimum -> 0 and its 98th percentile -> 1.
    Returns the slices and the list of approximations made.
    """
    import numpy as np
    import SimpleITK as sitk
    from scipy import ndimage

    from .phantoms import make_phantom

    notes = ["no registration: the phantom is generated on the MNI152 1 mm grid (with a small random "
             "affine and elastic deformation), so it is already in template space"]
    sp = spacing
    try:
        ph = make_phantom(int(seed), "T1", spacing=sp, head=True)
    except TypeError:
        ph = make_phantom(int(seed), "T1", spacing=sp)
        notes.append("skull-stripped phantom: these phantoms have no scalp or skull, the training images had")
    img = sitk.DICOMOrient(ph.image, "LPS")
    arr = sitk.GetArrayFromImage(img).astype(np.float32)  # (K, J, I)
    brain_k = np.flatnonzero(sitk.GetArrayFromImage(sitk.DICOMOrient(ph.brain_mask, "LPS")).any(axis=(1, 2)))
    k0, k1 = (int(brain_k[0]), int(brain_k[-1])) if brain_k.size else (0, arr.shape[0] - 1)
    lo, hi = slice_range if slice_range is not None else (0.0, 1.0)
    ks = np.unique(np.round(k0 + np.linspace(lo, hi, int(n) + 2)[1:-1] * (k1 - k0)).astype(int))
    vmin = float(arr.min())
    vmax = float(np.percentile(arr, REFERENCE_NORMALISATION["upper"]))
    if vmax <= vmin:
        vmax = float(arr.max())
    out = []
    for k in ks:
        s = arr[k]
        side = max(s.shape)
        pad = [((side - s.shape[0]) // 2, side - s.shape[0] - (side - s.shape[0]) // 2),
               ((side - s.shape[1]) // 2, side - s.shape[1] - (side - s.shape[1]) // 2)]
        s = np.pad(s, pad, mode="constant", constant_values=vmin)
        zoom = image_size / side
        if zoom < 1:
            s = ndimage.gaussian_filter(s, sigma=max(0.0, (1 / zoom - 1) / 2), mode="nearest")
        s = ndimage.zoom(s, zoom, order=1, mode="nearest", grid_mode=True)[:image_size, :image_size]
        s = np.clip((s - vmin) / (vmax - vmin), 0.0, 1.0)
        out.append(s.astype(np.float32))
    return np.stack(out), notes


def measure_input_ranges(net: torch.nn.Module, slices01: np.ndarray | torch.Tensor, schedule: dict | None = None,
                         timesteps: Sequence[int] = (25, 100, 200, 350), seed: int = 0,
                         noise: str = "gaussian", batch_size: int = 8) -> dict[str, float]:
    """Mean absolute denoising error (in [0, 1] units) of ``net`` under the [0, 1] and [-1, 1] conventions.

    For each convention the slices are mapped to that range, noised to every timestep in
    ``timesteps`` with the same noise (seeded), the network predicts the noise, and the
    one-step estimate of the clean image (clipped like the sampler does) is compared with the
    input in [0, 1].  The convention the network was trained with gives the lower error.
    Returns ``{"0,1": err, "-1,1": err}``.
    """
    import numpy as np
    import torch
    from .diffusion import Diffusion
    from .networks import call_unet
    from .noise import make_noise
    from .rng import BatchRNG

    d = Diffusion(schedule or REFERENCE_SCHEDULE)
    x01 = torch.as_tensor(np.asarray(slices01, np.float32))
    if x01.ndim == 3:
        x01 = x01[:, None]
    dev = next(net.parameters()).device
    x01 = x01.to(dev)
    out = {}
    for key, (lo, hi) in (("0,1", (0.0, 1.0)), ("-1,1", (-1.0, 1.0))):
        total, count = 0.0, 0
        for t in timesteps:
            t = int(t)
            for b0 in range(0, x01.shape[0], batch_size):
                xb = x01[b0:b0 + batch_size]
                rng = BatchRNG.for_slices(int(seed) + 7919 * t, list(range(b0, b0 + xb.shape[0])), dev)
                eps = make_noise(noise, rng, xb.shape[1:],
                                 **(REFERENCE_SIMPLEX_OPTIONS if noise == "simplex" else {})).to(xb)
                x_m = xb * (hi - lo) + lo
                x_t = d.q_sample(x_m, t, eps)
                with torch.inference_mode():
                    pred = call_unet(net, x_t, t)
                x0, _ = d.split_prediction(pred, t, x_t)
                x0_01 = ((x0 - lo) / (hi - lo)).clamp(0, 1)
                total += float((x0_01 - xb).abs().sum())
                count += xb.numel()
        out[key] = total / max(count, 1)
    return out


# ----------------------------------------------------------------------------- import
def default_model_id(method: str, noise: str) -> str:
    return f"{method}-ixi-t1-{noise}" if method == "thor" else f"{method}-ixi-t1"


def _guess_noise(method: str, path: Path) -> str:
    if method == "thor" and "simplex" in path.name.lower():
        return "simplex"
    return "gaussian"


def build_entry(method: str, net_config: dict, noise: str, input_range: Sequence[float],
                slice_range: Sequence[float] | None, source: dict, checks: list[str]) -> dict:
    """The manifest entry of an imported reference checkpoint (without file / sha256)."""
    src = SOURCES[method]
    if method == "thor":
        methods = ["thor", "autoddpm", "anoddpm"]
        params = {"thor": dict(THOR_PARAMS[noise]), "autoddpm": dict(AUTODDPM_PARAMS),
                  "anoddpm": {"level": THOR_PARAMS[noise]["level"], "variance": "fixed_small"}}
    else:
        methods = ["autoddpm", "thor", "anoddpm"]
        params = {"autoddpm": dict(AUTODDPM_PARAMS), "thor": dict(THOR_PARAMS[noise]),
                  "anoddpm": {"level": AUTODDPM_PARAMS["level"], "variance": "fixed_small"}}
    noise_kind = REFERENCE_SIMPLEX["kind"] if noise == "simplex" else "gaussian"
    entry = {
        "methods": methods,
        "contrast": "T1",
        "image_size": IMAGE_SIZE,
        "intensity_range": [float(input_range[0]), float(input_range[1])],
        "noise": noise_kind,
        "schedule": dict(REFERENCE_SCHEDULE),
        "networks": {"denoiser": dict(net_config)},
        "normalisation": dict(REFERENCE_NORMALISATION),
        "preprocessing": reference_profile(slice_range),
        "method_params": params,
        "threshold": None,
        "license": src["license_id"],
        "description": f"{src['title']}: the authors' published weights ({source['file']}), imported",
        "source": {**source, "repository": src["repository"], "license": src["license"],
                   "trained_on": src["trained_on"]},
        "checks": list(checks),
    }
    if noise == "simplex":
        entry["noise_options"] = dict(REFERENCE_SIMPLEX_OPTIONS)
    return entry


def import_reference(method: str, path: str | os.PathLike, model_id: str | None = None, noise: str | None = None,
                     input_range=None, slice_range=DEFAULT_SLICE_RANGE, log: Callable[[str], None] | None = None,
                     range_slices: np.ndarray | None = None):
    """Convert a THOR / AutoDDPM checkpoint into a user-cache zoo model; returns its ``zoo.ModelEntry``.

    ``noise``: gaussian | simplex (default: simplex when the file name says so, for THOR);
    ``input_range``: "auto" (measure), (0, 1) or (-1, 1); default auto for THOR, (0, 1) for
    AutoDDPM (its trainer and inference used [0, 1]); ``slice_range``: fractions of the axial
    extent kept for inference, or None for every slice.  ``range_slices``: the healthy [0, 1]
    slices used by ``auto`` (default: ``healthy_slices``).  The input file is only read.
    """
    import numpy as np
    import torch
    from . import zoo

    log = log or (lambda s: None)
    method = str(method).lower()
    if method not in METHODS:
        raise UADError(f"import-reference: unknown method {method!r} (thor, autoddpm or wolleb)")
    if method == "wolleb":
        raise UADError("import-reference wolleb needs the classifier too: use import_wolleb(diffusion_file, "
                       "classifier_file) or 'uad models import-reference wolleb FILE --classifier FILE'")
    path = Path(path)
    noise = (noise or _guess_noise(method, path)).lower()
    if noise not in ("gaussian", "simplex"):
        raise UADError(f"--noise must be gaussian or simplex, got {noise!r}")
    if method == "autoddpm" and noise == "simplex":
        log("note: the AutoDDPM release was trained with Gaussian noise only; importing with simplex noise as asked")
    rng_choice = parse_input_range(input_range)
    if rng_choice is None:
        rng_choice = "auto" if method == "thor" else (0.0, 1.0)
    if slice_range is not None:
        slice_range = parse_slice_range(slice_range)
    model_id = zoo.check_model_id(model_id or default_model_id(method, noise))

    original_sha = zoo.sha256_file(path) if path.is_file() else None
    ckpt = read_checkpoint(path)
    state, report = unet_state_dict(ckpt, path.name)
    del ckpt
    config = infer_architecture(state, path.name)
    net = convert_unet(state, config, path.name)
    n_src = len(state)
    n_unused = sum(1 for k in state if ".proj_attn." in k)
    diffs = architecture_differences(config)
    checks = [f"loaded with torch.load(weights_only=True): no code from the file was run",
              f"layout {report['layout']}; epoch {report['epoch']}",
              f"{n_src} denoiser tensors under 'unet.': every tensor of the GenerativeModels DiffusionModelUNet "
              f"present, none unexpected; {n_src - n_unused} mapped onto MONAI's DiffusionModelUNet by "
              f"load_old_state_dict and compared equal after loading",
              f"{n_unused} attention output projections (proj_attn, created but never applied by "
              f"GenerativeModels) dropped; network built with include_fc=False"]
    for pre, cnt in report["dropped"].items():
        checks.append(f"{cnt} tensors under '{pre}' (the training LPIPS module) dropped")
    if diffs:
        checks.append("architecture differs from the published one: " + "; ".join(diffs))
        log("warning: architecture differs from the published one: " + "; ".join(diffs))
    else:
        checks.append("architecture equals the published one (channels 128-256-256, attention F-T-T, 1 res block, "
                      "256 head channels, 32 groups, eps 1e-6)")

    size = IMAGE_SIZE
    with torch.inference_mode():
        probe = net(torch.zeros(1, config["in_channels"], size, size), timesteps=torch.tensor([10]))
    if not torch.isfinite(probe).all():
        raise ModelError(f"{path.name}: the network's output on a zero image is not finite")
    checks.append(f"forward pass on a {size} x {size} image finite")

    if rng_choice == "auto":
        if range_slices is None:
            range_slices, notes = healthy_slices(size, slice_range=slice_range)
        else:
            notes = ["healthy slices given by the caller"]
        noise_kind = REFERENCE_SIMPLEX["kind"] if noise == "simplex" else "gaussian"
        errs = measure_input_ranges(net, range_slices, noise=noise_kind)
        best = min(errs, key=errs.get)
        rng_choice = (0.0, 1.0) if best == "0,1" else (-1.0, 1.0)
        msg = (f"input range: denoising error on {len(range_slices)} noised healthy T1 phantom slices "
               f"(mean |x0_hat - x| in [0,1] units, t = 25/100/200/350): [0,1] {errs['0,1']:.4f}, "
               f"[-1,1] {errs['-1,1']:.4f} -> [{best}]")
        log(msg)
        log("  (phantom slices prepared as the profile says, approximations: " + "; ".join(notes) + ")")
        checks.append(msg + "; approximations: " + "; ".join(notes))
    else:
        checks.append(f"input range [{rng_choice[0]:g}, {rng_choice[1]:g}] given (not measured)")

    source = {"file": path.name, "sha256": original_sha, "epoch": report["epoch"],
              "published": SOURCES[method]["files"].get(noise, next(iter(SOURCES[method]["files"].values())))[1]}
    entry = build_entry(method, config, noise, rng_choice, slice_range, source, checks)
    if slice_range is not None:
        log("warning: " + MIDAXIAL_WARNING.format(lo=slice_range[0], hi=slice_range[1]))

    return _import_converted(model_id, entry, {"denoiser": net}, model_card, log)


def _import_converted(model_id: str, entry: dict, networks: dict, card: Callable[[dict], str], log):
    """Write the converted networks, their entry and card to a temporary folder and import it with
    ``zoo.import_models`` (checksum, id and atomic-move rules of any import); the new ``ModelEntry``."""
    from . import zoo
    from .zoo import Model, save_weights

    with tempfile.TemporaryDirectory(prefix="uad-reference-") as tmp:
        tmp = Path(tmp)
        digest = save_weights(Model(model_id, entry, networks), tmp / "model.safetensors")
        entry = dict(entry, id=model_id, file="model.safetensors", sha256=digest, card="README.md")
        (tmp / "README.md").write_text(card(entry))
        (tmp / "model.json").write_text(json.dumps(entry, indent=2, default=float))
        imported = zoo.import_models(tmp / "model.json", model_id=model_id, log=log)
    return imported[0]


def model_card(entry: dict) -> str:
    """The generated model card of an imported reference checkpoint."""
    src = entry["source"]
    method = entry["methods"][0]
    prof = entry["preprocessing"]
    sr = prof.get("slice_range")
    lines = [f"# Model card: {entry['id']}", "",
             f"The authors' published weights of {SOURCES[method]['title']}, converted by "
             f"`uad models import-reference {method}`.", "",
             "## Source", "",
             f"- File: `{src['file']}` (sha256 `{src.get('sha256')}`), epoch {src.get('epoch')}",
             f"- Published at: {src.get('published')}",
             f"- Source repository: {src['repository']}",
             f"- Licence of the source repository: {src['license']}",
             f"- Trained on: {src['trained_on']}", "",
             "## Network and sampler", "",
             f"- MONAI DiffusionModelUNet {json.dumps(entry['networks']['denoiser'])}",
             f"- Scheduler: {json.dumps(entry['schedule'])}",
             f"- Noise: {entry['noise']}" + (f" {json.dumps(entry.get('noise_options'))}" if entry.get('noise_options')
                                             else ""),
             f"- Input intensity range of the network: {entry['intensity_range']}",
             f"- Method parameters: {json.dumps(entry['method_params'])}", "",
             "## Preprocessing", "",
             f"- Profile: {json.dumps(prof)}",
             f"- Normalisation: {json.dumps(entry['normalisation'])}",
             "- T1, registered to MNI152 at 1 mm, axial slices, not skull-stripped, no bias correction, padded to "
             "square with the image minimum, 128 x 128, intensities to [0, 1] by an image percentile.",
             ("- Warning: " + MIDAXIAL_WARNING.format(lo=sr[0], hi=sr[1])) if sr else
             "- Warning: trained on mid-axial slices only; this import runs every slice (out of distribution "
             "away from the middle).", "",
             "## What was checked", ""]
    lines += [f"- {c}" for c in entry.get("checks", [])]
    lines += ["", "## Caveats", "",
              "- No threshold calibrated: detection falls back to the 99th percentile of the in-brain anomaly map "
              "unless `--threshold` is given; calibrate on healthy scans of your site.",
              "- THOR's released trainer computed its loss on `(pred + 1) / 2` (methods.md section 3.3); a file "
              "trained that way predicts a shifted noise and restores poorly, whatever the input range.",
              "- AutoDDPM's masking threshold 0.13 was tuned on the authors' data and LPIPS scaling; re-tune it "
              "(`--param threshold=...`) on healthy data.",
              f"- sha256 of the converted safetensors: `{entry.get('sha256')}`", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- Wolleb et al.
WOLLEB_PARAMS = {"level": 500, "scale": 100.0}
WOLLEB_CONTRASTS = ["t1", "t1ce", "t2", "flair"]
MULTICHANNEL_NOTE = ("the volume pipeline (uad detect, pipeline.detect, the Slicer module) reads one contrast; this "
                     "4-contrast model runs through the Method API on (B, 4, 256, 256) slices "
                     "(uad.methods.build_method('wolleb', uad.zoo.load_model(ID)))")


def _guided_state(obj: dict, name: str) -> dict:
    """The tensors of a guided-diffusion checkpoint (a plain state dict; a 'module.' prefix is removed)."""
    import torch

    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ModelError(f"{name}: a guided-diffusion checkpoint is a plain state dict; non-tensor entries: "
                         f"{_names(bad)}")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def import_wolleb(diffusion_file: str | os.PathLike, classifier_file: str | os.PathLike, model_id: str | None = None,
                  num_heads: int = 1, classifier_config: dict | None = None,
                  log: Callable[[str], None] | None = None):
    """Convert Wolleb et al.'s guided-diffusion UNet + classifier into a user-cache zoo model.

    The UNet maps onto MONAI's ``DiffusionModelUNet`` (``uad.guided_diffusion``; the
    learned-variance half of its output is dropped: DDIM uses epsilon only), the classifier
    loads into ``GuidedEncoderUNet`` (the reference's parameter layout).  ``num_heads``: the
    UNet's attention heads (not visible in the weights; the released flags use 1);
    ``classifier_config``: overrides of the classifier flags (``guided_diffusion.WOLLEB_CLASSIFIER``).
    """
    import torch

    from . import zoo
    from .guided_diffusion import WOLLEB_CLASSIFIER, convert_guided_unet, load_guided_classifier

    log = log or (lambda s: None)
    model_id = zoo.check_model_id(model_id or "wolleb-brats2020")
    dpath, cpath = Path(diffusion_file), Path(classifier_file)
    sha = {p.name: zoo.sha256_file(p) for p in (dpath, cpath) if p.is_file()}
    dstate = _guided_state(read_checkpoint(dpath), dpath.name)
    cstate = _guided_state(read_checkpoint(cpath), cpath.name)
    unet, ucfg = convert_guided_unet(dstate, dpath.name, num_heads=num_heads)
    clf, ccfg = load_guided_classifier(cstate, cpath.name, dict(WOLLEB_CLASSIFIER, **(classifier_config or {})))
    if ucfg["in_channels"] != ccfg["in_channels"]:
        raise ModelError(f"the UNet takes {ucfg['in_channels']} channels but the classifier "
                         f"{ccfg['in_channels']}: not a pair")
    size = int(ccfg["image_size"])
    c = ucfg["in_channels"]
    with torch.inference_mode():
        t = torch.tensor([10])
        probe = unet(torch.zeros(1, c, size, size), timesteps=t, class_labels=torch.tensor([0]))
        logits = clf(torch.zeros(1, c, size, size), timesteps=t)
    if not (torch.isfinite(probe).all() and torch.isfinite(logits).all()):
        raise ModelError("the converted networks' outputs on a zero image are not finite")
    checks = ["both files loaded with torch.load(weights_only=True): no code from them was run",
              f"diffusion UNet: {len(dstate)} tensors, every one mapped onto MONAI's DiffusionModelUNet by "
              f"uad.guided_diffusion's key map (attention qkv split into to_q/to_k/to_v, {num_heads} head(s)), "
              f"none missing or unexpected; channels {ucfg['channels']}, attention {ucfg['attention_levels']}, "
              f"{ucfg['num_res_blocks']} res blocks, {ucfg.get('num_class_embeds', 0)} classes",
              "learned-variance output channels dropped (DDIM sampling uses epsilon only)"
              if ucfg.get("learned_variance_dropped") else "no learned-variance channels",
              f"classifier: {len(cstate)} tensors loaded into GuidedEncoderUNet with strict names and shapes "
              f"(image {size}, width {ccfg['model_channels']}, {ccfg['num_res_blocks']} res blocks per level)",
              f"forward passes on a {size} x {size} x {c}-channel image finite",
              "not checked here: the pipeline's multi-contrast input; " + MULTICHANNEL_NOTE]
    unet_cfg = {k: v for k, v in ucfg.items() if k != "learned_variance_dropped"}
    entry = {
        "methods": ["wolleb"],
        "contrast": "+".join(WOLLEB_CONTRASTS[:c]) if c == 4 else f"{c}-channel",
        "channels": WOLLEB_CONTRASTS[:c] if c == 4 else None,
        "image_size": size,
        "intensity_range": [0.0, 1.0],
        "noise": "gaussian",
        "labels": {"0": "healthy", "1": "anomalous"},
        "schedule": {**{k: v for k, v in REFERENCE_SCHEDULE.items() if k != "variance_type"},
                     "variance_type": "learned_range (dropped: DDIM)"},
        "networks": {"denoiser": unet_cfg, "classifier": ccfg},
        "normalisation": {"lower": 1.0, "upper": 99.0, "clip": True},
        "preprocessing": {"registration": None, "spacing_mm": None, "skull_strip": "auto",
                          "bias_correction": False, "square": "pad", "pad_value": 0.0,
                          "intensity": "brain-percentile", "slice_range": None},
        "method_params": {"wolleb": dict(WOLLEB_PARAMS)},
        "threshold": None,
        "license": SOURCES["wolleb"]["license_id"],
        "description": "Wolleb et al. (MICCAI 2022): the authors' published BraTS2020 diffusion model and "
                       "classifier, imported",
        "source": {"files": sorted(sha), "sha256": sha, "repository": SOURCES["wolleb"]["repository"],
                   "license": SOURCES["wolleb"]["license"], "trained_on": SOURCES["wolleb"]["trained_on"],
                   "published": SOURCES["wolleb"]["files"]["gaussian"][1]},
        "checks": checks,
    }
    log("note: " + MULTICHANNEL_NOTE)
    return _import_converted(model_id, entry, {"denoiser": unet, "classifier": clf}, wolleb_card, log)


def wolleb_card(entry: dict) -> str:
    src = entry["source"]
    lines = [f"# Model card: {entry['id']}", "",
             "The authors' published weights of Wolleb et al., Diffusion Models for Medical Anomaly Detection "
             "(MICCAI 2022), converted by `uad models import-reference wolleb`.", "",
             "## Source", ""]
    lines += [f"- File: `{f}` (sha256 `{src['sha256'][f]}`)" for f in src["files"]]
    lines += [f"- Published at: {src['published']}", f"- Source repository: {src['repository']}",
              f"- Licence of the source repository: {src['license']}", f"- Trained on: {src['trained_on']}", "",
              "## Networks and sampler", "",
              f"- Denoiser: MONAI DiffusionModelUNet {json.dumps(entry['networks']['denoiser'])}",
              f"- Classifier: GuidedEncoderUNet {json.dumps(entry['networks']['classifier'])}",
              f"- Scheduler: {json.dumps(entry['schedule'])}",
              f"- Input: channels {entry.get('channels')}, each in [0, 1]; labels 0 = healthy, 1 = tumour",
              f"- Method parameters: {json.dumps(entry['method_params'])} (L = 500, s = 100)", "",
              "## Preprocessing", "",
              f"- Profile: {json.dumps(entry['preprocessing'])}",
              "- BraTS slices are skull-stripped and co-registered (SRI24, 1 mm); the authors' group drops the "
              "lowest 80 and top 26 axial slices, clips the 1st / 99th percentiles and scales each contrast to "
              "[0, 1]; 240 x 240 slices zero-padded to 256.", "",
              "## What was checked", ""]
    lines += [f"- {c}" for c in entry.get("checks", [])]
    lines += ["", "## Caveats", "", f"- {MULTICHANNEL_NOTE}.",
              "- No threshold calibrated (the paper used Otsu's threshold per image).",
              f"- sha256 of the converted safetensors: `{entry.get('sha256')}`", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI
def cmd_import_reference(args) -> int:
    if str(args.method).lower() == "wolleb":
        if not args.classifier:
            raise UADError("import-reference wolleb needs the classifier checkpoint too: --classifier FILE")
        entry = import_wolleb(args.file, args.classifier, model_id=args.id, num_heads=args.num_heads, log=print)
        print(f"  use it from Python: uad.methods.build_method('wolleb', uad.zoo.load_model('{entry.id}'))")
        return 0
    if args.classifier:
        raise UADError("--classifier is only for wolleb")
    entry = import_reference(args.method, args.file, model_id=args.id, noise=args.noise,
                             input_range=args.input_range, slice_range=parse_slice_range(args.slice_range),
                             log=print)
    first = entry.methods[0]
    print(f"  use it with: uad detect INPUT --model {entry.id} --method {first} -o OUTDIR")
    return 0


def add_models_cli(models_subparsers) -> None:
    """Add ``import-reference`` to the ``uad models`` sub-parsers."""
    p = models_subparsers.add_parser(
        "import-reference", help="convert the authors' published THOR / AutoDDPM / Wolleb checkpoints into a model",
        description="Converts a THOR (brain_Gaussian.pt, brain_Simplex.pt) or AutoDDPM (latest_model.pt) "
                    "checkpoint, or Wolleb et al.'s diffusion model + classifier (--classifier), "
                    "into a safetensors model in the user cache. The file is loaded with "
                    "torch.load(weights_only=True): one that needs code to unpickle is refused.")
    p.add_argument("method", metavar="METHOD", help="thor, autoddpm or wolleb")
    p.add_argument("file", metavar="FILE", help="the downloaded .pt checkpoint (unzipped); wolleb: the diffusion "
                                               "model")
    p.add_argument("--classifier", default=None, metavar="FILE", help="wolleb: the classifier checkpoint")
    p.add_argument("--num-heads", type=int, default=1, help="wolleb: attention heads of the diffusion UNet "
                                                            "(not stored in the weights; default 1 as released)")
    p.add_argument("--id", default=None, help="model id (default: thor-ixi-t1-NOISE / autoddpm-ixi-t1 / wolleb-brats2020)")
    p.add_argument("--noise", default=None, choices=("gaussian", "simplex"),
                   help="noise the network was trained with (default: simplex if the file name says so, "
                        "else gaussian)")
    p.add_argument("--input-range", default=None, metavar="auto|0,1|-1,1",
                   help="intensity range the network expects (default: auto for THOR = measured on healthy "
                        "phantom slices; 0,1 for AutoDDPM); write --input-range=-1,1 (with '=') for [-1, 1]")
    p.add_argument("--slice-range", default=None, metavar="LO,HI|all",
                   help="central axial slab kept for inference, as fractions of the brain's axial extent "
                        f"(default {DEFAULT_SLICE_RANGE[0]},{DEFAULT_SLICE_RANGE[1]}; 'all' = every slice)")
    p.set_defaults(func=cmd_import_reference)
