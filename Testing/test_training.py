"""Training pipeline: a few steps on phantoms, resume, export as a model, detect with it."""

import json

import numpy as np
import SimpleITK as sitk
import torch

from uad.networks import tiny_unet_config
from uad.training import TrainConfig, default_config, export_run, train
from uad.zoo import find_model, load_model


def _cfg(**kw):
    base = dict(method="anoddpm", image_size=32, steps=3, batch_size=4, val_every=2, val_batches=1,
                checkpoint_every=2, pool_size=2, seed=0,
                model_overrides={"networks": {"denoiser": tiny_unet_config((8, 16, 16))}})
    base.update(kw)
    return TrainConfig.from_dict(base)


def test_train_resume_export_detect(tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(_cfg(), run, device="cpu", progress=False)
    log = (run / "log.csv").read_text().strip().splitlines()
    assert len(log) == 1 + 3
    state = json.loads((run / "state.json").read_text())
    assert state["step"] == 3 and np.isfinite(state["best_val"])
    w1 = (run / "model.safetensors").read_bytes()

    # resume to 5 steps: the log grows, the weights change, the step counter continues
    train(_cfg(steps=5), run, resume=True, device="cpu", progress=False)
    log = (run / "log.csv").read_text().strip().splitlines()
    assert [int(r.split(",")[0]) for r in log[1:]] == [1, 2, 3, 4, 5]
    assert json.loads((run / "state.json").read_text())["step"] == 5
    assert (run / "model.safetensors").read_bytes() != w1

    models = tmp_path / "models"
    entry = export_run(run, models, "my-ddpm", {"threshold": 0.5})
    monkeypatch.setenv("UAD_MODELS_DIR", str(models))
    model = load_model(find_model("my-ddpm"))
    assert model.image_size == 32 and model.threshold == 0.5 and entry["training"]["steps"] == 5

    from uad.pipeline import detect

    arr = np.zeros((12, 40, 40), np.float32)
    zz, yy, xx = np.mgrid[:12, :40, :40]
    inside = ((zz - 6) / 6) ** 2 + ((yy - 20) / 15) ** 2 + ((xx - 20) / 15) ** 2 < 1
    arr[inside] = (100 + 20 * np.sin(xx / 3.0) * np.cos(yy / 4.0))[inside]
    img = sitk.GetImageFromArray(arr)
    res = detect(img, method="anoddpm", model="my-ddpm", device="cpu", params={"steps": 2, "level": 20})
    assert res.anomaly.GetSize() == img.GetSize()


def test_training_loss_decreases_on_fixed_batch():
    """The objective is learnable: 30 Adam steps on one batch reduce it markedly."""
    from uad.methods import get_method_class
    from uad.rng import BatchRNG
    from uad.zoo import build_model

    torch.manual_seed(0)
    cfg = get_method_class("anoddpm").default_model_config(image_size=16)
    cfg["networks"]["denoiser"] = tiny_unet_config((8, 16, 16))
    model = build_model(cfg)
    net = model.net("denoiser").train()
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    x = torch.rand(8, 1, 16, 16)
    losses = []
    for _ in range(30):
        loss = get_method_class("anoddpm").training_loss(model, x, None, BatchRNG.for_slices(0, range(8)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]


def test_default_config_for_weakly_supervised_methods_uses_lesions():
    cfg = default_config("anoddpm")
    assert cfg.lesion_fraction == 0.0
