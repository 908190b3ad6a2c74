"""The training options of the phantom augmentations (``TrainConfig.thick_slice_fraction`` / ``thick_slice_mm``,
``strip_error_fraction`` / ``strip_error_mm``; ``uad train --thick-slices`` / ``--strip-errors``): both are a
fraction of the phantoms and a [low, high] mm range, validated, read from the CLI and recorded by training the
same way (``Testing/test_thick_slices.py`` and ``Testing/test_strip_errors.py`` test the augmentations)."""

from __future__ import annotations

import argparse
import json

import pytest

from uad import UADError
from uad.training import TrainConfig, add_cli, config_from_args, default_config

# (field prefix, CLI option, training-record key, default mm range)
AUGMENTATIONS = [("thick_slice", "--thick-slices", "thick_slices", [3.0, 6.0]),
                 ("strip_error", "--strip-errors", "strip_errors", [2.0, 6.0])]


@pytest.mark.parametrize("prefix,option,record,default_mm", AUGMENTATIONS)
def test_config_and_cli(tmp_path, prefix, option, record, default_mm):
    frac, mm = f"{prefix}_fraction", f"{prefix}_mm"
    assert getattr(TrainConfig(), frac) == 0.0 and getattr(TrainConfig(), mm) == default_mm
    cfg = default_config("disyre", **{frac: 0.5, mm: [2, 5]})
    assert getattr(cfg, frac) == 0.5 and getattr(cfg, mm) == [2.0, 5.0]
    for bad in ({frac: 2}, {frac: "half"}, {frac: True}, {mm: [5, 2]}, {mm: [3]}, {mm: [0, 1]},
                {frac: 0.5, "data": str(tmp_path)}):
        with pytest.raises(UADError):
            TrainConfig.from_dict({"method": "disyre", **bad})
    # a saved config of an older run (without the augmentation's fields) still loads, with the augmentation off
    old = {k: v for k, v in TrainConfig(method="disyre").__dict__.items() if not k.startswith(prefix)}
    assert getattr(TrainConfig.from_dict(old), frac) == 0.0
    p = argparse.ArgumentParser()
    add_cli(p.add_subparsers())
    args = p.parse_args(["train", "--method", "disyre", "-o", str(tmp_path / "r"), option, "0.25"])
    assert getattr(config_from_args(args), frac) == 0.25


def test_training_records_the_augmentations(tmp_path):
    from uad.networks import tiny_unet_config
    from uad.training import train

    base = dict(method="anoddpm", image_size=32, steps=2, batch_size=2, val_every=2, val_batches=1,
                checkpoint_every=2, pool_size=1, seed=0,
                model_overrides={"networks": {"denoiser": tiny_unet_config((8, 16, 16))}})
    for prefix, _, record, default_mm in AUGMENTATIONS:
        train(TrainConfig.from_dict({**base, f"{prefix}_fraction": 1.0}), tmp_path / prefix, device="cpu",
              progress=False)
        rec = json.loads((tmp_path / prefix / "model.json").read_text())["training"]
        assert rec[record] == {"fraction": 1.0, "mm": default_mm}
        assert not ({r for _, _, r, _ in AUGMENTATIONS} - {record}) & set(rec)  # only the augmentation used
    train(TrainConfig.from_dict(base), tmp_path / "plain", device="cpu", progress=False)
    rec = json.loads((tmp_path / "plain" / "model.json").read_text())["training"]
    assert not {r for _, _, r, _ in AUGMENTATIONS} & set(rec)
