"""Spatial perceptual-distance maps for THOR and AutoDDPM.

Both methods weight their residuals with a per-pixel perceptual distance
between the input slice and a reconstruction.  Two backends compute it:

``"lpips-squeeze"``
    Real LPIPS (Zhang et al. 2018) through the ``lpips`` package:
    ``lpips.LPIPS(net='squeeze', spatial=True, lpips=True)`` with the calibrated
    linear heads that ship inside the package, on top of torchvision's ImageNet
    SqueezeNet 1.1 trunk.  The gray [0, 1] slices are replicated to 3 channels
    and passed with ``normalize=True`` (the package maps them to [-1, 1] once;
    the reference code mapped to [-1, 1] *and* set ``normalize=True``, so its
    network saw [-3, 1]).

    The trunk weights are *never downloaded* here.  They are read from the
    first existing file of

    1. the path given to :func:`set_lpips_backbone` (or ``backbone=`` arguments),
    2. ``$UAD_LPIPS_BACKBONE``,
    3. torch's hub cache, ``torch.hub.get_dir()/checkpoints/squeezenet1_1-b8a52dc0.pth``
       (where ``torchvision.models.squeezenet1_1(weights="DEFAULT")`` puts it),
    4. the uad cache, ``~/.cache/uad/lpips/squeezenet1_1-b8a52dc0.pth``
       (``$UAD_CACHE_DIR/lpips/...``).

    When the file carries torchvision's name, its sha256 must start with the
    8 hex digits in the name (torchvision's own convention).

``"ssim-fallback"``
    Used when no trunk weights are available (a warning says so once).  A
    multi-scale structural dissimilarity: at scales 1, 1/2 and 1/4 (2x2 and 4x4
    average pooling) the local SSIM with an 11-tap Gaussian window (sigma 1.5,
    C1 = 0.01^2, C2 = 0.03^2 for a data range of 1) gives ``DSSIM = (1 - SSIM) / 2``
    in [0, 1]; the three maps are brought back to full resolution (bilinear) and
    averaged.  Like the LPIPS map it is 0 for identical images, grows with
    structural difference, lies mostly in [0, 1] and is deterministic; unlike
    LPIPS it is not calibrated on human judgements, so thresholds tuned on
    LPIPS (AutoDDPM's 0.13) must be re-tuned for it.

``perceptual_backend()`` says which backend ``"auto"`` resolves to, and the
methods record it in their outputs' ``extras``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import ModelError
from .morphology import gaussian_kernel1d

log = logging.getLogger(__name__)

BACKBONE_ENV = "UAD_LPIPS_BACKBONE"
LPIPS_BACKEND = "lpips-squeeze"
FALLBACK_BACKEND = "ssim-fallback"
_DEFAULT_FILENAME = "squeezenet1_1-b8a52dc0.pth"

__all__ = [
    "BACKBONE_ENV", "LPIPS_BACKEND", "FALLBACK_BACKEND", "LPIPSMap", "SSIMDissimilarity",
    "backbone_filename", "backbone_candidates", "find_backbone", "set_lpips_backbone",
    "get_perceptual", "perceptual_backend", "perceptual_map", "reset",
]

_lock = threading.Lock()
_state: dict = {"backbone": None, "auto": None, "warned": False}
_modules: dict = {}


# ---------------------------------------------------------------------------
# where the SqueezeNet trunk weights are looked for
# ---------------------------------------------------------------------------
def backbone_filename() -> str:
    """The file name torchvision gives the ImageNet SqueezeNet 1.1 weights."""
    try:
        from torchvision.models import SqueezeNet1_1_Weights

        return os.path.basename(SqueezeNet1_1_Weights.IMAGENET1K_V1.url)
    except Exception:  # older / newer torchvision layouts
        return _DEFAULT_FILENAME


def backbone_candidates() -> list[Path]:
    """Where the trunk weights are looked for, in order (user-set path first)."""
    out: list[Path] = []
    if _state["backbone"] is not None:
        out.append(Path(_state["backbone"]))
    env = os.environ.get(BACKBONE_ENV)
    if env:
        out.append(Path(env).expanduser())
    name = backbone_filename()
    try:
        out.append(Path(torch.hub.get_dir()) / "checkpoints" / name)
    except Exception:
        pass
    from .zoo import user_cache_dir

    out.append(user_cache_dir() / "lpips" / name)
    return out


def find_backbone(path: str | os.PathLike | None = None) -> Path | None:
    """The trunk weights file to use: ``path`` if given (it must exist), else the first candidate found."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise ModelError(f"LPIPS backbone weights {p} not found")
        return p
    for p in backbone_candidates():
        if p.is_file():
            return p
    return None


def set_lpips_backbone(path: str | os.PathLike | None) -> None:
    """Use this SqueezeNet 1.1 ImageNet weights file for LPIPS (None: back to the search order).

    The file is what ``torchvision.models.squeezenet1_1(weights="IMAGENET1K_V1")``
    downloads (``squeezenet1_1-b8a52dc0.pth``, 4.7 MB); fetch it on a machine with
    internet access and copy it here.
    """
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise ModelError(f"LPIPS backbone weights {p} not found")
        _load_trunk_state(p)  # fail now, not in the middle of a run
        path = p
    with _lock:
        _state["backbone"] = path
        _state["auto"] = None
        _state["warned"] = False
        _modules.clear()


def reset() -> None:
    """Forget the user-set path, the resolved backend, the warning flag and the cached networks."""
    with _lock:
        _state.update({"backbone": None, "auto": None, "warned": False})
        _modules.clear()


def _load_trunk_state(path: Path) -> dict:
    m = re.fullmatch(r"squeezenet1_1-([0-9a-f]{8,})\.pth", path.name)
    if m:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if not h.hexdigest().startswith(m.group(1)):
            raise ModelError(f"LPIPS backbone weights {path}: sha256 does not match the file name "
                             f"(corrupt or partial download)")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling problem is a bad file for the user
        raise ModelError(f"LPIPS backbone weights {path} cannot be read ({e})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not any(str(k).startswith("features.") for k in state):
        raise ModelError(f"LPIPS backbone weights {path}: not a torchvision SqueezeNet state dict")
    return state


# ---------------------------------------------------------------------------
# backends
# ---------------------------------------------------------------------------
def _gray3(x: torch.Tensor) -> torch.Tensor:
    if x.ndim != 4:
        raise ValueError(f"expected (B, C, H, W) images, got shape {tuple(x.shape)}")
    x = x.float().clamp(0, 1)
    if x.shape[1] == 1:
        return x.expand(-1, 3, -1, -1)
    if x.shape[1] == 3:
        return x
    raise ValueError(f"expected 1 or 3 channels, got {x.shape[1]}")


class LPIPSMap(nn.Module):
    """Spatial LPIPS-SqueezeNet distance between two batches of [0, 1] images, (B, 1, H, W).

    ``backbone``: the ImageNet SqueezeNet 1.1 weights file (required unless
    ``pnet_rand=True``, which leaves the trunk random: only for tests of the code
    path, the distances are then meaningless).  Nothing is downloaded.
    The images must be at least 32 x 32 px (SqueezeNet's pooling).
    """

    name = LPIPS_BACKEND

    def __init__(self, backbone: str | os.PathLike | None = None, pnet_rand: bool = False):
        super().__init__()
        import lpips

        trunk = None
        if not pnet_rand:
            if backbone is None:
                raise ModelError("LPIPS needs the SqueezeNet 1.1 ImageNet weights file (backbone=...)")
            trunk = _load_trunk_state(Path(backbone))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's 'pretrained' deprecation notice
            # pnet_rand=True builds the trunk with pretrained=False: no download is attempted
            self.lpips = lpips.LPIPS(net="squeeze", spatial=True, pretrained=True, lpips=True,
                                     pnet_rand=True, eval_mode=True, verbose=False)
        if trunk is not None:
            self._load_trunk(trunk)
        self.pretrained_trunk = trunk is not None
        self.backbone = None if backbone is None else str(backbone)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def _load_trunk(self, state: dict) -> None:
        # lpips splits torchvision's ``features`` Sequential into slice1..slice7, keeping the
        # layer indices as module names: features.<i>.<rest> -> slice<k>.<i>.<rest>
        owner = {}
        net = self.lpips.net
        for k in range(1, net.N_slices + 1):
            for name in getattr(net, f"slice{k}")._modules:
                owner[name] = k
        mapped = {}
        for key, v in state.items():
            parts = str(key).split(".", 2)
            if parts[0] != "features" or len(parts) < 3:
                continue  # the classifier is not used by LPIPS
            if parts[1] not in owner:
                raise ModelError(f"LPIPS backbone weights: unexpected tensor {key}")
            mapped[f"slice{owner[parts[1]]}.{parts[1]}.{parts[2]}"] = v
        missing, unexpected = net.load_state_dict(mapped, strict=False)
        if missing or unexpected:
            raise ModelError(f"LPIPS backbone weights do not fit SqueezeNet 1.1 "
                             f"({len(missing)} missing, {len(unexpected)} unexpected tensors)")

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if min(a.shape[-2:]) < 32:
            raise ValueError(f"LPIPS-SqueezeNet needs images of at least 32 x 32 px, got {tuple(a.shape[-2:])}")
        with torch.no_grad():
            d = self.lpips(_gray3(a), _gray3(b), normalize=True)
        return d.to(a.dtype if a.is_floating_point() else torch.float32)


class SSIMDissimilarity(nn.Module):
    """Multi-scale structural dissimilarity map ``mean_s (1 - SSIM_s) / 2``, (B, 1, H, W), mostly in [0, 1].

    See the module docstring.  Deterministic and weight-free; per image and channel
    (channels are averaged).
    """

    name = FALLBACK_BACKEND

    def __init__(self, sigma: float = 1.5, scales: tuple[int, ...] = (1, 2, 4), c1: float = 0.01 ** 2,
                 c2: float = 0.03 ** 2):
        super().__init__()
        self.sigma, self.scales, self.c1, self.c2 = float(sigma), tuple(int(s) for s in scales), c1, c2

    def _dssim(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        k = gaussian_kernel1d(self.sigma, truncate=3.5, device=a.device, dtype=a.dtype)  # 11 taps at 1.5
        r = (k.numel() - 1) // 2
        n, c, h, w = a.shape

        def filt(z):
            z = F.pad(z.reshape(n * c, 1, h, w), (r, r, r, r), mode="replicate")
            z = F.conv2d(z, k.view(1, 1, -1, 1))
            return F.conv2d(z, k.view(1, 1, 1, -1)).reshape(n, c, h, w)

        mu_a, mu_b = filt(a), filt(b)
        s_aa = filt(a * a) - mu_a * mu_a
        s_bb = filt(b * b) - mu_b * mu_b
        s_ab = filt(a * b) - mu_a * mu_b
        num = (2 * mu_a * mu_b + self.c1) * (2 * s_ab + self.c2)
        den = (mu_a * mu_a + mu_b * mu_b + self.c1) * (s_aa + s_bb + self.c2)
        ssim = num / den
        return ((1 - ssim) / 2).clamp(0, 1).mean(1, keepdim=True)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape != b.shape or a.ndim != 4:
            raise ValueError(f"expected two (B, C, H, W) batches of the same shape, got {tuple(a.shape)} "
                             f"and {tuple(b.shape)}")
        dtype = a.dtype if a.is_floating_point() else torch.float32
        # float64: the local variances are differences of nearly equal means (cancellation in float32);
        # Apple's MPS has no float64
        work = torch.float32 if a.device.type == "mps" else torch.float64
        a, b = a.to(work).clamp(0, 1), b.to(work).clamp(0, 1)
        h, w = a.shape[-2:]
        maps = []
        for s in self.scales:
            if s > 1 and min(h, w) // s < 4:
                continue
            if s > 1:
                m = self._dssim(F.avg_pool2d(a, s), F.avg_pool2d(b, s))
                m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
            else:
                m = self._dssim(a, b)
            maps.append(m)
        return torch.stack(maps).mean(0).to(dtype)


# ---------------------------------------------------------------------------
# selection and caching
# ---------------------------------------------------------------------------
def _fallback_message(reason: str) -> str:
    where = ", ".join(str(p) for p in backbone_candidates()) or "(no candidate paths)"
    return (f"LPIPS (SqueezeNet) is not available: {reason}. THOR / AutoDDPM use the '{FALLBACK_BACKEND}' "
            f"perceptual map instead (multi-scale 1 - SSIM, Gaussian window; deterministic, not calibrated "
            f"like LPIPS, so re-tune mask thresholds). To use real LPIPS, put torchvision's ImageNet "
            f"SqueezeNet 1.1 weights ({backbone_filename()}) at one of: {where}; or set ${BACKBONE_ENV}, or "
            f"call uad.perceptual.set_lpips_backbone(path).")


def _resolve_auto() -> tuple[str, Path | None]:
    """(backend name, weights path) that 'auto' uses; warns once when falling back."""
    key = tuple(str(p) for p in backbone_candidates())  # re-resolve when the search paths change
    with _lock:
        if _state["auto"] is not None and _state["auto"][0] == key:
            return _state["auto"][1]
    reason = None
    path = None
    try:
        path = find_backbone()
    except ModelError as e:
        reason = str(e)
    if path is not None:
        try:
            _load_trunk_state(path)
            result = (LPIPS_BACKEND, path)
        except ModelError as e:
            reason, result = str(e), (FALLBACK_BACKEND, None)
    else:
        reason = reason or "the ImageNet SqueezeNet 1.1 weights were not found (nothing is downloaded)"
        result = (FALLBACK_BACKEND, None)
    with _lock:
        _state["auto"] = (key, result)
        if result[0] == FALLBACK_BACKEND and not _state["warned"]:
            _state["warned"] = True
            log.warning(_fallback_message(reason))
    return result


def perceptual_backend(backend: str = "auto") -> str:
    """The backend name (``"lpips-squeeze"`` or ``"ssim-fallback"``) that ``backend`` resolves to."""
    b = _normalise(backend)
    if b == "auto":
        return _resolve_auto()[0]
    return LPIPS_BACKEND if b == "lpips" else FALLBACK_BACKEND


def _normalise(backend: str) -> str:
    b = str(backend).lower()
    aliases = {"auto": "auto", "lpips": "lpips", LPIPS_BACKEND: "lpips", "ssim": "ssim",
               FALLBACK_BACKEND: "ssim"}
    if b not in aliases:
        raise ValueError(f"unknown perceptual backend {backend!r}; use 'auto', 'lpips' or 'ssim'")
    return aliases[b]


def get_perceptual(backend: str = "auto", device: torch.device | str = "cpu",
                   backbone: str | os.PathLike | None = None) -> nn.Module:
    """A cached perceptual-distance module on ``device``: ``module(a, b) -> (B, 1, H, W)``.

    ``backend``: "auto" (LPIPS when the trunk weights are found, else the SSIM
    fallback, with a warning once), "lpips" (error when the weights are missing)
    or "ssim".  ``backbone``: an explicit trunk weights file (for "auto"/"lpips").
    """
    b = _normalise(backend)
    device = torch.device(device)
    path = None
    if b in ("auto", "lpips") and backbone is not None:
        path, b = find_backbone(backbone), "lpips"
    elif b == "auto":
        name, path = _resolve_auto()
        b = "lpips" if name == LPIPS_BACKEND else "ssim"
    elif b == "lpips":
        path = find_backbone()
        if path is None:
            where = ", ".join(str(p) for p in backbone_candidates())
            raise ModelError(f"LPIPS was requested but the ImageNet SqueezeNet 1.1 weights "
                             f"({backbone_filename()}) were not found at: {where}; set ${BACKBONE_ENV} or "
                             f"call uad.perceptual.set_lpips_backbone(path), or use the 'ssim' backend")
    key = (b, str(path), str(device))
    with _lock:
        mod = _modules.get(key)
    if mod is None:
        mod = (LPIPSMap(path) if b == "lpips" else SSIMDissimilarity()).to(device).eval()
        with _lock:
            _modules[key] = mod
    return mod


def perceptual_map(a: torch.Tensor, b: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Per-pixel perceptual distance between two (B, 1, H, W) batches in [0, 1], on their device."""
    return get_perceptual(backend, a.device)(a, b)
