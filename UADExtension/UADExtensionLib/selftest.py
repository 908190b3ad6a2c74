"""Helpers of the module's self-test (UADExtensionTest): a tiny random-weight model, no download."""

from __future__ import annotations

import json
import os

SELFTEST_MODEL_ID = "uad-selftest"


def tiny_zoo(folder):
    """Write a model folder with a tiny random-weight AnoDDPM model (id ``uad-selftest``); returns the Model."""
    import torch

    import uad.networks
    import uad.zoo
    from uad.methods import get_method_class

    config = get_method_class("anoddpm").default_model_config(image_size=32)
    config["networks"]["denoiser"] = uad.networks.tiny_unet_config((8, 16, 16))
    torch.manual_seed(0)
    model = uad.zoo.build_model(config, model_id=SELFTEST_MODEL_ID)
    digest = uad.zoo.save_weights(model, os.path.join(folder, "selftest.safetensors"))
    entry = dict(config, id=SELFTEST_MODEL_ID, file="selftest.safetensors", sha256=digest)
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump({"models": [entry]}, f)
    return model


FAST = {"steps": 3, "level": 50}


def process_in_slicer(logic, volume):
    """In-process run of the tiny model on ``volume`` (CPU, a few seconds)."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        model = tiny_zoo(folder)
    return logic.process(volume, method="anoddpm", model=model, device="cpu", seed=0, params=FAST)


def run_in_background(logic, volume, timeout: float = 600):
    """(run, result): the tiny model through ``BackgroundRun`` (the child finds it via $UAD_MODELS_DIR)."""
    import tempfile

    from .runner import BackgroundRun

    with tempfile.TemporaryDirectory() as folder:
        tiny_zoo(folder)
        old = os.environ.get("UAD_MODELS_DIR")
        os.environ["UAD_MODELS_DIR"] = folder
        try:
            run = BackgroundRun(logic, volume, method="anoddpm", model=SELFTEST_MODEL_ID, device="cpu",
                                params=FAST, batchSize=8)
            result = run.start().wait(timeout=timeout)
        finally:
            if old is None:
                os.environ.pop("UAD_MODELS_DIR", None)
            else:
                os.environ["UAD_MODELS_DIR"] = old
    return run, result
