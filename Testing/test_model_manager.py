"""Model manager logic of the module (UADExtensionLib.models) on a tiny test zoo."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import TINY_ID, TINY_THR_ID


def test_list_verify_import_remove(tiny_zoo, tmp_path):
    import uad
    from UADExtensionLib import models

    rows = {r.id: r for r in models.list_rows()}
    assert set(rows) == {TINY_ID, TINY_THR_ID}
    r = rows[TINY_THR_ID]
    assert r.methods == ["anoddpm", "thor", "autoddpm"] and r.contrast == "T2" and r.resolution == "32 x 32"
    assert r.threshold == "0.123" and r.status == "ready" and not r.removable
    assert rows[TINY_ID].threshold == "-"
    assert len(models.verify_model(TINY_ID)) == 64

    # offline import: a weights file with its entry beside it
    src = tmp_path / "offline"
    src.mkdir()
    shutil.copyfile(tiny_zoo / "tiny.safetensors", src / "hospital.safetensors")
    entry = next(m for m in json.loads((tiny_zoo / "manifest.json").read_text())["models"] if m["id"] == TINY_ID)
    entry = dict(entry, id="hospital-t2", file="hospital.safetensors")
    (src / "hospital.json").write_text(json.dumps(entry))
    before = (src / "hospital.safetensors").read_bytes()
    assert models.import_model_file(src / "hospital.safetensors") == ["hospital-t2"]
    assert (src / "hospital.safetensors").read_bytes() == before  # the user's file is untouched
    rows = {r.id: r for r in models.list_rows()}
    assert rows["hospital-t2"].removable and rows["hospital-t2"].location == "user cache"
    assert models.verify_model("hospital-t2") == models.verify_model(TINY_ID)
    folder = models.models_folder()
    assert folder.is_dir() and any(folder.rglob("*.safetensors"))

    # a corrupted copy fails verification with a clear error
    copy = next(p for p in folder.rglob("*.safetensors"))
    data = bytearray(copy.read_bytes())
    data[-1] ^= 0xFF
    copy.write_bytes(bytes(data))
    with pytest.raises(uad.ModelError, match="checksum mismatch"):
        models.verify_model("hospital-t2")

    models.remove_model("hospital-t2")
    assert "hospital-t2" not in {r.id for r in models.list_rows()} and not copy.exists()
    with pytest.raises(uad.ModelError, match="cannot be removed"):
        models.remove_model(TINY_ID)  # not a user-cache model
    with pytest.raises(uad.ModelError, match="no such file"):
        models.import_model_file(tmp_path / "missing.safetensors")


def test_import_lpips_backbone(tiny_zoo, tmp_path):
    import torch

    import uad
    from uad import perceptual
    from UADExtensionLib import models

    good = tmp_path / "squeeze.pth"
    torch.save({"features.0.weight": torch.zeros(2, 3, 3, 3), "features.0.bias": torch.zeros(2)}, good)
    target = models.import_lpips_backbone(good)
    assert target == models.lpips_backbone_target() and target.read_bytes() == good.read_bytes()
    assert target in perceptual.backbone_candidates() and perceptual.find_backbone() is not None
    bad = tmp_path / "notes.pth"
    torch.save({"classifier.weight": torch.zeros(1)}, bad)
    with pytest.raises(uad.ModelError, match="SqueezeNet"):
        models.import_lpips_backbone(bad)
    with pytest.raises(uad.ModelError, match="not found"):
        models.import_lpips_backbone(tmp_path / "nothing.pth")
    perceptual.reset()


def test_import_the_authors_checkpoint_from_the_model_manager(tmp_path, monkeypatch):
    """A THOR-layout checkpoint (GenerativeModels UNet, random weights) becomes a user-cache model that
    the manager lists; the method comes from the file name; a code-carrying pickle is refused."""
    pytest.importorskip("generative")
    import torch
    import uad.zoo as zoo
    from UADExtensionLib import models
    from test_reference import _reference_unet, _save_checkpoint

    monkeypatch.setattr(zoo, "bundled_dirs", lambda: [])
    monkeypatch.delenv("UAD_MODELS_DIR", raising=False)
    monkeypatch.setenv("UAD_CACHE_DIR", str(tmp_path / "cache"))
    assert models.reference_method_for("x/brain_Simplex.pt") == "thor"
    assert models.reference_method_for("latest_model.pt") == "autoddpm"
    with pytest.raises(ValueError, match="not a known"):
        models.reference_method_for("weights.pt")
    ckpt = _save_checkpoint(_reference_unet(seed=2), tmp_path / "latest_model.pt", "autoddpm")
    before = ckpt.read_bytes()
    mid = models.import_reference_checkpoint(ckpt, model_id="auto-gui")
    assert mid == "auto-gui" and ckpt.read_bytes() == before  # the user's file is only read
    row = [r for r in models.list_rows() if r.id == "auto-gui"][0]
    assert row.methods[0] == "autoddpm" and row.contrast == "T1" and row.resolution == "128 x 128"
    assert models.verify_model("auto-gui")

    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    bad = tmp_path / "brain_Gaussian.pt"
    torch.save({"model_weights": {}, "x": Payload()}, bad)
    with pytest.raises(Exception, match="(?i)unpickl|weights_only|refus"):
        models.import_reference_checkpoint(bad)
