"""Model manager: the logic behind the module's "Models" section (the GUI only shows its rows).

Everything goes through the engine's model zoo (``uad.zoo``), so the GUI, the
``uad models`` command and scripts see the same models:

- ``list_rows()``: id, methods, contrast, resolution, calibrated threshold, where it lives, status;
- ``verify_model(id)``: sha256 of the weights checked and the network built from them;
- ``import_model_file(path, id)``: a ``.safetensors`` file (with its ``.json`` entry beside it,
  or the id of a known entry whose sha256 it must match), a model folder with a
  ``manifest.json``, or a training run folder -- the offline route for hospitals without
  internet access;
- ``import_lpips_backbone(path)``: torchvision's ImageNet SqueezeNet 1.1 weights for the
  perceptual maps of THOR / AutoDDPM (checked, then copied into the user cache where the
  engine looks for them);
- ``remove_model(id)``: user-cache models only (bundled ones are refused);
- ``models_folder()``: the per-user folder (for "Open model folder").

No Qt.  torch is needed only by ``verify_model`` and ``import_*`` (they load the weights).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path


@dataclass
class ModelRow:
    id: str
    methods: list
    contrast: str
    resolution: str
    threshold: str
    location: str
    status: str
    removable: bool
    description: str

    @property
    def methodsText(self) -> str:
        return ", ".join(self.methods) or "-"


def list_rows() -> list[ModelRow]:
    """One row per model the zoo knows (bundled, $UAD_MODELS_DIR and the user cache)."""
    from uad.zoo import USER_CACHE, list_models

    rows = []
    for e in list_models():
        size = e.data.get("image_size")
        rows.append(ModelRow(
            id=e.id, methods=e.methods, contrast=str(e.contrast or "-"),
            resolution=f"{size} x {size}" if size else "-", threshold=e.threshold_text, location=e.location,
            status=e.status or "ready", removable=e.location == USER_CACHE,
            description=str(e.data.get("description", ""))))
    return rows


def verify_model(model_id: str) -> str:
    """Check the weights' sha256 and build the network; returns the sha256 (raises ``ModelError``)."""
    from uad.zoo import find_model, load_model, verify

    entry = find_model(model_id)
    digest = verify(entry)
    load_model(entry)
    return digest


def import_model_file(path, model_id: str | None = None, log=None) -> list[str]:
    """Copy a model into the user cache (checksums verified, weights loaded once); the ids imported."""
    from uad.zoo import import_models

    p = Path(path)
    if not p.exists():
        from uad import ModelError

        raise ModelError(f"{p}: no such file or folder")
    return [e.id for e in import_models(p, model_id=model_id or None, log=log)]


def reference_method_for(path) -> str:
    """THOR or AutoDDPM from a published checkpoint's file name (``brain_Gaussian.pt`` / ``brain_Simplex.pt``
    are THOR's, ``latest_model.pt`` AutoDDPM's); ``ValueError`` when the name says neither."""
    name = Path(path).name.lower()
    if name.startswith("brain_") or "thor" in name:
        return "thor"
    if "latest_model" in name or "autoddpm" in name:
        return "autoddpm"
    raise ValueError(f"{Path(path).name}: not a known THOR (brain_Gaussian.pt, brain_Simplex.pt) or AutoDDPM "
                     f"(latest_model.pt) checkpoint name; import it with 'uad models import-reference METHOD FILE'")


def import_reference_checkpoint(path, method: str | None = None, model_id: str | None = None, log=None) -> str:
    """Convert the authors' THOR / AutoDDPM checkpoint into a user-cache model (``uad.reference``); its id.

    ``method``: thor | autoddpm (default: from the file name).  The file is only read, with
    ``torch.load(weights_only=True)``; a checkpoint that needs code to unpickle is refused.
    """
    from uad.reference import import_reference

    p = Path(path)
    if not p.is_file():
        from uad import ModelError

        raise ModelError(f"{p}: no such file")
    entry = import_reference(method or reference_method_for(p), p, model_id=model_id or None, log=log)
    return entry.id


def remove_model(model_id: str, log=None) -> Path:
    from uad.zoo import remove_model as _remove

    return _remove(model_id, log=log)


def models_folder() -> Path:
    """The per-user model folder (created so that it can be opened)."""
    from uad.zoo import user_models_dir

    d = user_models_dir()
    d.mkdir(parents=True, exist_ok=True)
    return d


def lpips_backbone_target() -> Path:
    """Where the engine looks for an imported LPIPS backbone (user cache, torchvision's file name)."""
    from uad.perceptual import backbone_filename
    from uad.zoo import user_cache_dir

    return user_cache_dir() / "lpips" / backbone_filename()


def import_lpips_backbone(path) -> Path:
    """Check the SqueezeNet 1.1 weights file (readable, and sha256 prefix when named by torchvision), copy it."""
    from uad import perceptual

    src = Path(path).expanduser()
    perceptual.find_backbone(src)  # exists (ModelError otherwise)
    perceptual._load_trunk_state(src)  # the engine's own check: readable state dict, sha256 prefix in the name
    target = lpips_backbone_target()
    target.parent.mkdir(parents=True, exist_ok=True)
    if src.resolve() != target.resolve():
        tmp = target.with_name(target.name + ".part")
        shutil.copyfile(src, tmp)
        tmp.replace(target)
    perceptual.reset()  # re-resolve: the next run uses real LPIPS
    return target
