"""Model zoo: manifest, checksums, safetensors weights.

A model is data: a manifest entry says which methods a weights file serves, the
network configs, the noise schedule, the input resolution and normalisation,
what it was trained on, its sha256 and its calibrated anomaly threshold.
Weights are safetensors (no pickle, so loading never runs code from the file).

Search order for manifests: ``$UAD_MODELS_DIR`` (os.pathsep-separated), the
repository's / extension's ``models/`` folder, the per-user cache
(``$UAD_CACHE_DIR`` or ``~/.cache/uad``)/models.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import ModelError

MANIFEST = "manifest.json"


def _candidate_dirs() -> list[Path]:
    dirs: list[Path] = []
    env = os.environ.get("UAD_MODELS_DIR")
    if env:
        dirs += [Path(p) for p in env.split(os.pathsep) if p]
    here = Path(__file__).resolve()
    # <repo>/UADExtension/uad/zoo.py -> <repo>/models ; installed extension: <module>/Resources/models
    dirs += [here.parents[2] / "models", here.parents[1] / "Resources" / "models"]
    dirs.append(user_cache_dir() / "models")
    seen, out = set(), []
    for d in dirs:
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


def user_cache_dir() -> Path:
    return Path(os.environ.get("UAD_CACHE_DIR", Path.home() / ".cache" / "uad"))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class ModelEntry:
    """One manifest entry plus the folder its relative paths are resolved from."""

    data: dict
    root: Path

    @property
    def id(self) -> str:
        return self.data["id"]

    @property
    def methods(self) -> list[str]:
        return list(self.data.get("methods", []))

    @property
    def contrast(self) -> str | None:
        return self.data.get("contrast")

    @property
    def weights_path(self) -> Path:
        return (self.root / self.data["file"]).resolve()

    @property
    def card_path(self) -> Path | None:
        c = self.data.get("card")
        return (self.root / c).resolve() if c else None

    def summary(self) -> str:
        return (f"{self.id:32s} methods={','.join(self.methods):24s} contrast={self.contrast or '-':5s} "
                f"size={self.data.get('image_size')}  {self.data.get('description', '')}")


def list_models(dirs: list[Path] | None = None) -> list[ModelEntry]:
    """All manifest entries found (first occurrence of an id wins)."""
    out: dict[str, ModelEntry] = {}
    for d in dirs or _candidate_dirs():
        m = d / MANIFEST
        if not m.is_file():
            continue
        try:
            data = json.loads(m.read_text())
        except json.JSONDecodeError as e:
            raise ModelError(f"model manifest {m} is not valid JSON: {e}") from None
        for entry in data.get("models", []):
            if entry.get("id") and entry["id"] not in out:
                out[entry["id"]] = ModelEntry(entry, d)
    return list(out.values())


def find_model(model_id: str | None = None, method: str | None = None, contrast: str | None = None) -> ModelEntry:
    """Entry by id, or the first model serving ``method`` (preferring ``contrast``)."""
    entries = list_models()
    if model_id:
        for e in entries:
            if e.id == model_id:
                return e
        known = ", ".join(e.id for e in entries) or "none"
        raise ModelError(f"no model with id {model_id!r} (known: {known}); see 'uad models'")
    cands = [e for e in entries if method is None or method in e.methods]
    if contrast:
        same = [e for e in cands if (e.contrast or "").upper() == contrast.upper()]
        cands = same or cands
    if not cands:
        raise ModelError(f"no model is available for method {method!r}; train one with 'uad train' "
                         f"or import one with 'uad models import'")
    return cands[0]


def verify(entry: ModelEntry) -> str:
    """Check the weights file against the manifest sha256; returns the digest."""
    p = entry.weights_path
    if not p.is_file():
        raise ModelError(f"model {entry.id}: weights file {p} is missing")
    digest = sha256_file(p)
    expected = entry.data.get("sha256")
    if not expected:
        raise ModelError(f"model {entry.id}: the manifest has no sha256 for {p.name}; refusing to load it")
    if digest != expected:
        raise ModelError(f"model {entry.id}: checksum mismatch for {p} (expected {expected[:12]}..., "
                         f"got {digest[:12]}...); the file was modified or is corrupt")
    return digest


@dataclass
class Model:
    """Networks plus everything a method needs to know about them."""

    id: str
    config: dict
    networks: dict[str, Any] = field(default_factory=dict)

    @property
    def image_size(self) -> int:
        return int(self.config.get("image_size", 64))

    @property
    def schedule(self) -> dict:
        return dict(self.config.get("schedule", {}))

    @property
    def noise(self) -> str:
        return self.config.get("noise", "gaussian")

    @property
    def threshold(self) -> float | None:
        """The calibrated threshold when it is one number (per-method dicts: ``uad.pipeline.model_threshold``)."""
        t = self.config.get("threshold")
        return float(t) if isinstance(t, (int, float)) else None

    @property
    def intensity_range(self) -> tuple[float, float]:
        r = self.config.get("intensity_range", [-1.0, 1.0])
        return float(r[0]), float(r[1])

    @property
    def normalisation(self) -> dict:
        return dict(self.config.get("normalisation", {}))

    def to(self, device) -> "Model":
        for k, net in self.networks.items():
            self.networks[k] = net.to(device).eval()
        return self

    def net(self, role: str):
        if role not in self.networks:
            raise ModelError(f"model {self.id} has no {role!r} network (has: {', '.join(self.networks)})")
        return self.networks[role]


def build_model(config: dict, state: dict | None = None, model_id: str = "unsaved") -> Model:
    """Networks from a config dict, optionally filled from a flat ``role.param`` state dict."""
    from .networks import build_network

    nets = {}
    for role, net_cfg in config.get("networks", {}).items():
        net = build_network(net_cfg)
        if state is not None:
            prefix = role + "."
            sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if not sub:
                raise ModelError(f"model {model_id}: weights have no tensors for network {role!r}")
            missing, unexpected = net.load_state_dict(sub, strict=False)
            if missing or unexpected:
                raise ModelError(f"model {model_id}: weights do not match the {role!r} network config "
                                 f"({len(missing)} missing, {len(unexpected)} unexpected tensors)")
        net.eval()
        nets[role] = net
    return Model(model_id, dict(config), nets)


def save_weights(model: Model, path: str | os.PathLike) -> str:
    """Write all networks to one safetensors file; returns its sha256."""
    from safetensors.torch import save_file

    flat = {}
    for role, net in model.networks.items():
        for k, v in net.state_dict().items():
            flat[f"{role}.{k}"] = v.detach().cpu().contiguous()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(flat, str(path), metadata={"uad_model": model.id})
    return sha256_file(path)


def load_model(model: str | ModelEntry | None = None, method: str | None = None,
               contrast: str | None = None, device="cpu") -> Model:
    """Verify and load a model by id / entry (or the default model of ``method``)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    entry = model if isinstance(model, ModelEntry) else find_model(model, method, contrast)
    verify(entry)
    try:
        state = load_file(str(entry.weights_path))
    except (SafetensorError, OSError) as e:
        raise ModelError(f"model {entry.id}: {entry.weights_path} is not a valid safetensors file ({e})") from None
    m = build_model(entry.data, state, entry.id)
    return m.to(device)
