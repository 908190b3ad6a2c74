"""Training that converges faster: EMA weights, a training timestep range, --init, the learning curve,
stopping at a time limit or on a signal; all resumable from safetensors (issue 7, point 2)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import subprocess_env
from uad import UADError
from uad.networks import tiny_unet_config
from uad.training import (EMA, TRAIN_STATE, TrainConfig, curve_sample, load_train_state, model_config_for,
                          sample_ap, train)
from uad.zoo import build_model, load_weights


def _cfg(**kw) -> TrainConfig:
    base = dict(method="anoddpm", image_size=32, steps=4, batch_size=4, val_every=2, val_batches=1,
                checkpoint_every=2, pool_size=1, seed=0, lr=1e-3,
                model_overrides={"networks": {"denoiser": tiny_unet_config((8, 16, 16))}})
    base.update(kw)
    return TrainConfig.from_dict(base)


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _same(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- EMA
def test_ema_update_follows_the_recursion_with_warmup():
    cfg = model_config_for(_cfg())
    src = build_model(cfg)
    w0 = {k: v.clone() for k, v in src.net("denoiser").state_dict().items()}
    ema = EMA(cfg, src, decay=0.9)
    expect = {k: v.clone() for k, v in w0.items()}
    for n in range(30):
        with torch.no_grad():
            for p in src.net("denoiser").parameters():
                p.add_(0.01 * (n + 1))
        d = min(0.9, (1 + n) / (10 + n))
        assert ema.current_decay() == pytest.approx(d)
        ema.update()
        cur = src.net("denoiser").state_dict()
        for k in expect:
            expect[k] = d * expect[k] + (1 - d) * cur[k] if expect[k].is_floating_point() else cur[k].clone()
    got = ema.model.net("denoiser").state_dict()
    assert ema.updates == 30
    for k in expect:
        torch.testing.assert_close(got[k], expect[k], rtol=1e-5, atol=1e-6)
    # the average lags behind the weights: it is neither the start nor the end point
    k = next(k for k, v in w0.items() if v.is_floating_point() and v.numel() > 1)
    assert not torch.allclose(got[k], w0[k]) and not torch.allclose(got[k], src.net("denoiser").state_dict()[k])


def test_ema_run_resumes_bitwise_like_an_uninterrupted_run(tmp_path):
    """4 steps in one go == 2 steps + --resume to 4: online weights, optimizer, EMA and the logs."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(_cfg(ema_decay=0.8), straight, device="cpu", progress=False, log=None)
    train(_cfg(ema_decay=0.8, steps=2), split, device="cpu", progress=False, log=None)
    names = sorted(p.name for p in split.iterdir())
    assert names == ["best.safetensors", "config.json", "log.csv", "model.json", "model.safetensors", "state.json",
                     TRAIN_STATE]
    train(_cfg(ema_decay=0.8, steps=4), split, resume=True, device="cpu", progress=False, log=None)

    ema_a, ema_b = load_weights(straight / "model.safetensors"), load_weights(split / "model.safetensors")
    (on_a, opt_a), (on_b, opt_b) = load_train_state(straight / TRAIN_STATE), load_train_state(split / TRAIN_STATE)
    assert _same(ema_a, ema_b) and _same(on_a, on_b)
    assert opt_a["param_groups"] == opt_b["param_groups"] and sorted(opt_a["state"]) == sorted(opt_b["state"])
    for i in opt_a["state"]:
        assert _same(opt_a["state"][i], opt_b["state"][i])
    assert float(opt_b["state"][0]["step"]) == 4.0
    # the exported weights are the EMA, not the online weights
    assert not _same(ema_b, on_b)
    state = json.loads((split / "state.json").read_text())
    assert state["step"] == 4 and state["ema_updates"] == 4
    entry = json.loads((split / "model.json").read_text())
    assert entry["training"]["ema_decay"] == 0.8 and entry["training"]["weights"] == "ema"
    assert [r["val_loss"] for r in _rows(straight / "log.csv")] == [r["val_loss"] for r in _rows(split / "log.csv")]


def test_plain_run_checkpoints_in_safetensors_and_resumes_a_legacy_optimizer_pt(tmp_path):
    """A run without EMA keeps its optimizer state in train_state.safetensors too (no pickle in a committed
    checkpoint) and resumes bitwise; a folder written before (optimizer.pt, torch format) still resumes,
    identically, and its next checkpoint replaces optimizer.pt by train_state.safetensors."""
    straight, split, legacy = tmp_path / "straight", tmp_path / "split", tmp_path / "legacy"
    train(_cfg(), straight, device="cpu", progress=False, log=None)
    train(_cfg(steps=2), split, device="cpu", progress=False, log=None)
    assert sorted(p.name for p in split.iterdir()) == ["best.safetensors", "config.json", "log.csv", "model.json",
                                                      "model.safetensors", "state.json", TRAIN_STATE]
    online, opt_state = load_train_state(split / TRAIN_STATE)
    assert _same(online, load_weights(split / "model.safetensors"))  # without EMA: the same weights
    # the same folder as the code before stop 29 wrote it
    import shutil
    shutil.copytree(split, legacy)
    (legacy / TRAIN_STATE).unlink()
    torch.save(opt_state, legacy / "optimizer.pt")
    for run in (split, legacy):
        train(_cfg(steps=4), run, resume=True, device="cpu", progress=False, log=None)
        assert _same(load_weights(run / "model.safetensors"), load_weights(straight / "model.safetensors"))
        (on_a, opt_a), (on_b, opt_b) = load_train_state(straight / TRAIN_STATE), load_train_state(run / TRAIN_STATE)
        assert _same(on_a, on_b) and opt_a["param_groups"] == opt_b["param_groups"]
        for i in opt_a["state"]:
            assert _same(opt_a["state"][i], opt_b["state"][i])
    assert not (legacy / "optimizer.pt").exists()


def test_best_validation_weights_are_kept_and_exported(tmp_path, monkeypatch):
    """best.safetensors holds the validated (EMA) weights of the step with the lowest validation loss, whatever
    came after (here a loss that rises after step 4, as a late excursion does); export_run(weights="best")
    bundles them and records that step and loss."""
    from uad import training
    from uad.training import BEST_WEIGHTS, export_run
    from uad.zoo import sha256_file

    scripted = iter([0.5, 0.3, 0.4, 0.6])  # validation at steps 2, 4, 6, 8: the best is step 4
    monkeypatch.setattr(training, "validation_loss", lambda *a, **k: next(scripted))
    run = tmp_path / "run"
    train(_cfg(ema_decay=0.8, steps=8), run, device="cpu", progress=False, log=None)
    vals = {int(r["step"]): float(r["val_loss"]) for r in _rows(run / "log.csv") if r["val_loss"]}
    assert vals == {2: 0.5, 4: 0.3, 6: 0.4, 8: 0.6}
    best = 4
    assert not _same(load_weights(run / BEST_WEIGHTS), load_weights(run / "model.safetensors"))
    state = json.loads((run / "state.json").read_text())
    assert state["best_step"] == best and state["best_val"] == pytest.approx(vals[best])
    # the same run stopped at the best step has exactly those weights (training is deterministic)
    short = tmp_path / "short"
    monkeypatch.setattr(training, "validation_loss", lambda *a, **k: 1.0)  # does not change the weights
    train(_cfg(ema_decay=0.8, steps=best), short, device="cpu", progress=False, log=None)
    assert _same(load_weights(run / BEST_WEIGHTS), load_weights(short / "model.safetensors"))
    models = tmp_path / "models"
    entry = export_run(run, models, "m-best", weights="best")
    assert entry["sha256"] == sha256_file(run / BEST_WEIGHTS) and entry["training"]["steps"] == best
    assert entry["training"]["best_val_loss"] == pytest.approx(vals[best]) and entry["training"]["run_steps"] == 8
    latest = export_run(run, models, "m-latest")
    assert latest["sha256"] == sha256_file(run / "model.safetensors") and latest["training"]["steps"] == 8
    with pytest.raises(UADError, match="'latest' or 'best'"):
        export_run(run, models, "m", weights="last")


def test_weights_a_run_stops_with_count_for_the_best(tmp_path, monkeypatch):
    """A run stopped between validations (time limit, signal) validates the weights it stops with: when they
    have the lowest loss they become best.safetensors and state.json's best step (they used to be left out,
    so a stopped run's export of its best weights went back to an older step)."""
    from uad import training
    from uad.methods import get_method_class
    from uad.training import BEST_WEIGHTS

    scripted = iter([0.5, 0.3])  # validation at step 2 (val_every), then at the stop, step 3
    monkeypatch.setattr(training, "validation_loss", lambda *a, **k: next(scripted))
    cls = get_method_class("anoddpm")
    loss, calls = cls.training_loss, []

    def stop_after_three(model, x, mask, rng, labels=None):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # honoured before step 4
        return loss(model, x, mask, rng, labels=labels)

    monkeypatch.setattr(cls, "training_loss", stop_after_three)
    run, msgs = tmp_path / "run", []
    train(_cfg(ema_decay=0.8, steps=5), run, device="cpu", progress=False, log=msgs.append)
    assert any("stopped on request at step 3 of 5" in m for m in msgs)
    state = json.loads((run / "state.json").read_text())
    assert state["step"] == 3 and state["best_step"] == 3 and state["best_val"] == pytest.approx(0.3)
    assert state["val_history"] == [[2, 0.5], [3, 0.3]]
    assert _same(load_weights(run / BEST_WEIGHTS), load_weights(run / "model.safetensors"))
    # resumed, it validates the same step no second time, and the best stays until beaten
    scripted = iter([0.4, 0.35])  # steps 4 (val_every) and 5 (the run's last)
    monkeypatch.setattr(training, "validation_loss", lambda *a, **k: next(scripted))
    monkeypatch.setattr(cls, "training_loss", loss)
    train(_cfg(ema_decay=0.8, steps=5), run, resume=True, device="cpu", progress=False, log=None)
    state = json.loads((run / "state.json").read_text())
    assert state["step"] == 5 and state["best_step"] == 3
    assert state["val_history"] == [[2, 0.5], [3, 0.3], [4, 0.4], [5, 0.35]]


def test_ema_run_without_train_state_is_refused(tmp_path):
    run = tmp_path / "run"
    train(_cfg(ema_decay=0.5, steps=2), run, device="cpu", progress=False, log=None)
    (run / TRAIN_STATE).unlink()
    with pytest.raises(UADError, match="EMA run but has no train_state.safetensors"):
        train(_cfg(steps=3), run, resume=True, device="cpu", progress=False, log=None)
    assert json.loads((run / "state.json").read_text())["step"] == 2


# --------------------------------------------------------------------------- timestep range
class _Recorder(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.seen = net, []

    def forward(self, x, timesteps=None, **kw):
        self.seen.append(timesteps.detach().clone())
        return self.net(x, timesteps=timesteps, **kw)


def test_training_timesteps_stay_in_the_range():
    from uad.methods import get_method_class
    from uad.rng import BatchRNG

    mc = model_config_for(_cfg(t_min=300, t_max=310))
    assert (mc["train_t_min"], mc["train_t_max"]) == (300, 310)
    model = build_model(mc)
    rec = _Recorder(model.net("denoiser"))
    model.networks["denoiser"] = rec
    x = torch.rand(16, 1, 32, 32)
    for method in ("anoddpm", "thor", "autoddpm"):
        for b in range(4):
            get_method_class(method).training_loss(model, x, None, BatchRNG.for_slices(b, range(16)))
    t = torch.cat(rec.seen)
    assert t.numel() == 3 * 4 * 16 and int(t.min()) >= 300 and int(t.max()) <= 309
    assert len(torch.unique(t)) >= 8  # spread over the range, not one value
    # default: the full range, and the model config says nothing
    assert "train_t_min" not in model_config_for(_cfg()) and "train_t_max" not in model_config_for(_cfg())


def test_timestep_range_errors():
    with pytest.raises(UADError, match="t_max must be an integer above t_min"):
        _cfg(t_min=50, t_max=50)
    with pytest.raises(UADError, match=r"do not fit the schedule's 1000 timesteps"):
        model_config_for(_cfg(t_max=1001))
    with pytest.raises(UADError, match="supported for anoddpm, thor, autoddpm only, not 'pddpm'"):
        model_config_for(_cfg(method="pddpm", t_max=400, model_overrides={}))
    with pytest.raises(UADError, match="ema_decay must be a number in"):
        _cfg(ema_decay=1.0)


# --------------------------------------------------------------------------- init
def test_init_from_a_run_folder_and_from_safetensors(tmp_path):
    first = tmp_path / "first"
    train(_cfg(steps=2, t_max=400), first, device="cpu", progress=False, log=None)
    w_first = load_weights(first / "model.safetensors")

    # lr 0: the weights of a run initialised from `first` stay exactly first's weights
    second = tmp_path / "second"
    train(_cfg(steps=2, lr=0.0, init=str(first), model_overrides={}, image_size=None), second, device="cpu",
          progress=False, log=None)
    assert _same(load_weights(second / "model.safetensors"), w_first)
    entry = json.loads((second / "model.json").read_text())
    assert entry["image_size"] == 32  # the architecture and size come from the init model
    assert entry["networks"]["denoiser"]["channels"] == [8, 16, 16]
    assert entry["training"]["init"]["model"] == json.loads((first / "model.json").read_text()).get("id", "first")
    assert entry["training"]["init"]["steps"] == 2 and len(entry["training"]["init"]["sha256"]) == 64
    assert "train_t_max" not in entry  # the init model's range is not inherited
    saved = json.loads((second / "config.json").read_text())
    assert saved["train"]["init"] == str(first) and saved["train"]["image_size"] == 32

    # a bare .safetensors file: the weights must fit the run's own (tiny) config
    bare = tmp_path / "weights.safetensors"
    bare.write_bytes((first / "model.safetensors").read_bytes())
    third = tmp_path / "third"
    train(_cfg(steps=1, lr=0.0, init=str(bare)), third, device="cpu", progress=False, log=None)
    assert _same(load_weights(third / "model.safetensors"), w_first)
    # ... and when they do not, one clear error and no run folder content
    bad = tmp_path / "bad"
    with pytest.raises(UADError, match="weights do not match the 'denoiser' network config"):
        train(_cfg(steps=1, init=str(bare), model_overrides={"networks": {"denoiser": tiny_unet_config((8, 8, 16))}}),
              bad, device="cpu", progress=False, log=None)
    assert not (bad / "config.json").exists()


def test_init_at_another_resolution(tmp_path):
    """--image-size with --init trains the init model's weights at that size (a window the size of the
    old image follows the new one); without it the init model's size is kept."""
    first = tmp_path / "first"
    train(_cfg(method="disyre", steps=1), first, device="cpu", progress=False, log=None)
    e1 = json.loads((first / "model.json").read_text())
    assert e1["image_size"] == 32 and e1["patch_size"] == 32
    second = tmp_path / "second"
    train(_cfg(method="disyre", steps=1, lr=0.0, init=str(first), model_overrides={}, image_size=48), second,
          device="cpu", progress=False, log=None)
    assert _same(load_weights(second / "model.safetensors"), load_weights(first / "model.safetensors"))
    e2 = json.loads((second / "model.json").read_text())
    assert (e2["image_size"], e2["patch_size"]) == (48, 48)
    assert e2["networks"] == e1["networks"]
    assert json.loads((second / "config.json").read_text())["train"]["image_size"] == 48
    # the model runs at its new size: 48 x 48 slices in, 48 x 48 maps out, in one window
    m = build_model(e2, load_weights(second / "model.safetensors"))
    assert m.image_size == 48
    from uad.methods import build_method
    from uad.rng import BatchRNG

    meth = build_method("disyre", m, "paper")
    x = torch.rand(2, 1, 48, 48)
    out = meth(x, torch.ones_like(x, dtype=torch.bool), BatchRNG([1, 2]))
    assert out.anomaly.shape == (2, 1, 48, 48) and out.extras["windows"] == 1
    assert out.nfe == meth.nfe_per_slice() == len(out.extras["labels"])
    cfg = model_config_for(TrainConfig.from_dict({"method": "disyre", "init": str(first)}))
    assert (cfg["image_size"], cfg["patch_size"]) == (32, 32)
    with pytest.raises(UADError, match="image_size must be an integer >= 8"):
        _cfg(image_size=4)


def test_init_errors(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(UADError, match="no such file or folder, and no model with id 'no-such-model'"):
        train(_cfg(init="no-such-model"), run, device="cpu", progress=False, log=None)
    first = tmp_path / "first"
    train(_cfg(steps=1), first, device="cpu", progress=False, log=None)
    with pytest.raises(UADError, match="serves anoddpm, thor, autoddpm, not 'disyre'"):
        train(_cfg(method="disyre", init=str(first), model_overrides={}), run, device="cpu", progress=False, log=None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UADError, match="the folder has no model.json"):
        train(_cfg(init=str(tmp_path / "empty")), run, device="cpu", progress=False, log=None)


def _tiny_wolleb(**kw) -> TrainConfig:
    """A tiny Wolleb run (class-conditional UNet + noise-aware classifier) on 32 px phantoms."""
    clf = {"type": "DiffusionModelEncoder", "spatial_dims": 2, "in_channels": 1, "out_channels": 2,
           "channels": [8, 16, 16], "attention_levels": [False, False, False], "num_res_blocks": 1,
           "num_head_channels": 16, "norm_num_groups": 8, "input_shape": [32, 32]}
    over = {"networks": {"denoiser": tiny_unet_config((8, 16, 16), num_class_embeds=2), "classifier": clf}}
    base = dict(method="wolleb", lesion_fraction=0.5, model_overrides=over)
    base.update(kw)
    return _cfg(**base)


def test_init_of_wolleb_starts_denoiser_and_classifier_and_trains_both(tmp_path):
    """A Wolleb fine-tune (e.g. wolleb-flair-phantom from wolleb-t2-phantom) takes BOTH networks from the
    init model, and training moves both (the classifier's parameters are in the optimizer)."""
    first = tmp_path / "first"
    train(_tiny_wolleb(steps=1), first, device="cpu", progress=False, log=None)
    w_first = load_weights(first / "model.safetensors")
    roles = {k.split(".", 1)[0] for k in w_first}
    assert roles == {"denoiser", "classifier"}

    # lr 0: every tensor of both networks is exactly the init model's
    same = tmp_path / "same"
    train(_tiny_wolleb(steps=1, lr=0.0, init=str(first), model_overrides={}, contrast="FLAIR", seed=7), same,
          device="cpu", progress=False, log=None)
    assert _same(load_weights(same / "model.safetensors"), w_first)
    entry = json.loads((same / "model.json").read_text())
    assert entry["contrast"] == "FLAIR" and entry["training"]["init"]["steps"] == 1
    assert entry["networks"]["classifier"]["channels"] == [8, 16, 16]  # architecture from the init model

    # lr > 0: both networks move away from the init weights
    moved = tmp_path / "moved"
    train(_tiny_wolleb(steps=2, init=str(first), model_overrides={}, contrast="FLAIR", seed=7), moved,
          device="cpu", progress=False, log=None)
    w_moved = load_weights(moved / "model.safetensors")
    for role in ("denoiser", "classifier"):
        keys = [k for k in w_first if k.startswith(role + ".") and w_first[k].is_floating_point()]
        change = max(float((w_moved[k] - w_first[k]).abs().max()) for k in keys)
        assert change > 1e-5, role


# --------------------------------------------------------------------------- learning curve
def test_learning_curve_csv_png_and_resume(tmp_path):
    run = tmp_path / "run"
    cfg = _cfg(steps=4, ema_decay=0.5, curve_every=2, curve_methods=["anoddpm"], curve_slices=3)
    train(cfg, run, device="cpu", progress=False, log=None)
    rows = _rows(run / "curve.csv")
    assert [int(r["step"]) for r in rows] == [0, 2, 4]
    # the curve's validation loss is the run's (EMA) validation loss at the same steps
    log = {int(r["step"]): r["val_loss"] for r in _rows(run / "log.csv") if r["val_loss"]}
    assert [float(rows[i]["val_loss"]) for i in (1, 2)] == pytest.approx([float(log[2]), float(log[4])], abs=1e-6)
    aps = [float(r["ap_anoddpm"]) for r in rows]
    prevalence = float(curve_sample(3)["lesion"][curve_sample(3)["brain"]].mean())
    assert all(prevalence / 10 < a <= 1.0 for a in aps), (aps, prevalence)
    # the AP of the last point is the AP of the exported weights, recomputed independently
    mc = json.loads((run / "config.json").read_text())["model"]
    model = build_model(mc, load_weights(run / "model.safetensors"))
    sample = curve_sample(3)
    assert len(sample["slices"]) == 3 and sample["lesion"].shape == sample["brain"].shape
    assert sample["lesion"].any() and (sample["lesion"] <= sample["brain"]).all()
    assert sample_ap(model, "anoddpm", "fast", sample, "cpu") == pytest.approx(aps[-1], abs=1e-5)
    png = (run / "curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    # resume to 6 steps: the curve keeps its rows and grows by one
    cfg6 = _cfg(steps=6)
    train(cfg6, run, resume=True, device="cpu", progress=False, log=None)
    assert [int(r["step"]) for r in _rows(run / "curve.csv")] == [0, 2, 4, 6]
    assert [r["ap_anoddpm"] for r in _rows(run / "curve.csv")][:3] == [r["ap_anoddpm"] for r in rows]


def test_plot_curve_without_ap_columns(tmp_path):
    from uad.training import plot_curve

    p = tmp_path / "c.csv"
    p.write_text("step,seconds,val_loss\n0,1.0,0.5\n10,2.0,0.4\n")
    out = plot_curve(p, tmp_path / "c.png", title="t")
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_long_curve_title_stays_inside_the_figure():
    """A run's title (name, objective, EMA, timesteps, AP probe) is wrapped, not cut at the figure's edges."""
    from uad.training import curve_figure

    rows = [{"step": "0", "val_loss": "0.1", "ap_thor": "0.01", "ap_anoddpm": "0.01"},
            {"step": "500", "val_loss": "0.06", "ap_thor": "0.1", "ap_anoddpm": "0.03"}]
    title = ("ddpm-t1-ft: anoddpm objective, batch 32, EMA 0.999, t in [0, 400), AP: preset fast, "
             "24 T1 tumour phantom slices")
    fig = curve_figure(rows, prevalence=0.014, title=title)
    renderer = fig.canvas.get_renderer()
    box = fig._suptitle.get_window_extent(renderer)
    width, height = fig.bbox.width, fig.bbox.height
    assert fig._suptitle.get_text().count("\n") >= 1
    assert box.x0 >= 0 and box.x1 <= width and box.y1 <= height
    assert fig._suptitle.get_text().replace("\n", " ") == title


# --------------------------------------------------------------------------- stopping
def test_time_limit_and_signal_checkpoint_and_stop(tmp_path):
    run = tmp_path / "run"
    msgs: list[str] = []
    train(_cfg(steps=50, ema_decay=0.5, curve_every=2), run, device="cpu", progress=False, log=msgs.append,
          time_limit=1e-9)
    assert json.loads((run / "state.json").read_text())["step"] == 0  # stopped before its first step
    assert any("stopped at the time limit at step 0 of 50" in m for m in msgs)

    # SIGTERM during the run (sent here when the curve reports step 2): checkpoint at step 2 and stop
    def log(m):
        msgs.append(m)
        if m.startswith("curve: step 2"):
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    train(_cfg(steps=50, curve_every=2), run, resume=True, device="cpu", progress=False, log=log)
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back
    assert json.loads((run / "state.json").read_text())["step"] == 2
    assert any("stopped on request at step 2 of 50" in m for m in msgs)
    assert [int(r["step"]) for r in _rows(run / "log.csv")] == [1, 2]


# --------------------------------------------------------------------------- DDP
def test_ema_run_resumes_under_torchrun(tmp_path):
    """An EMA run started in one process continues data-parallel (2 processes, Gloo): the EMA state is
    restored on rank 0 and keeps averaging the (identical) weights of both processes."""
    run, debug = tmp_path / "run", tmp_path / "debug"
    train(_cfg(steps=2, ema_decay=0.5), run, device="cpu", progress=False, log=None)
    ema2 = load_weights(run / "model.safetensors")
    env = subprocess_env(tmp_path, UAD_DDP_DEBUG_DIR=debug)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "uad.cli",
           "train", "--method", "anoddpm", "-o", str(run), "--resume", "--steps", "3", "--device", "cpu",
           "--no-progress"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    state = json.loads((run / "state.json").read_text())
    assert state["step"] == 3 and state["world_size"] == 2 and state["ema_updates"] == 3
    online, _ = load_train_state(run / TRAIN_STATE)
    ema3 = load_weights(run / "model.safetensors")
    # EMA after one more update: d = min(0.5, 3/12) = 0.25 -> ema3 = 0.25 ema2 + 0.75 online3
    for k in ema3:
        if ema3[k].is_floating_point():
            torch.testing.assert_close(ema3[k], 0.25 * ema2[k] + 0.75 * online[k], rtol=1e-5, atol=1e-6)
    r0, r1 = (json.loads((debug / f"rank{r}.json").read_text()) for r in (0, 1))
    from uad.training import state_digest

    assert r0["weights_sha256"] == r1["weights_sha256"] == state_digest(online)


# --------------------------------------------------------------------------- CLI
def test_cli_options_reach_the_run(tmp_path, capsys):
    from uad.cli import main

    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps({"image_size": 32, "batch_size": 4, "val_every": 2, "val_batches": 1,
                               "checkpoint_every": 2, "pool_size": 1,
                               "model_overrides": {"networks": {"denoiser": tiny_unet_config((8, 16, 16))}}}))
    first, run = tmp_path / "first", tmp_path / "run"
    assert main(["train", "--method", "thor", "-o", str(first), "--config", str(cfg), "--steps", "1",
                 "--no-progress"]) == 0
    assert main(["train", "--method", "thor", "-o", str(run), "--config", str(cfg), "--steps", "2", "--init",
                 str(first), "--ema-decay", "0.99", "--t-min", "5", "--t-max", "400", "--curve-every", "2",
                 "--no-progress"]) == 0
    capsys.readouterr()
    saved = json.loads((run / "config.json").read_text())
    assert {k: saved["train"][k] for k in ("init", "ema_decay", "t_min", "t_max", "curve_every")} == {
        "init": str(first), "ema_decay": 0.99, "t_min": 5, "t_max": 400, "curve_every": 2}
    assert (saved["model"]["train_t_min"], saved["model"]["train_t_max"]) == (5, 400)
    entry = json.loads((run / "model.json").read_text())
    assert entry["training"]["timesteps"] == [5, 400] and entry["training"]["ema_decay"] == 0.99
    assert [int(r["step"]) for r in _rows(run / "curve.csv")] == [0, 2]
    # resuming keeps the saved settings and says which options it ignores
    assert main(["train", "--method", "thor", "-o", str(run), "--resume", "--steps", "3", "--ema-decay", "0.5",
                 "--curve-method", "thor", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "ignoring --ema-decay, --curve-method" in out
    assert json.loads((run / "config.json").read_text())["train"]["ema_decay"] == 0.99
    rc = main(["train", "--method", "thor", "-o", str(run), "--resume", "--time-limit", "0"])
    err = capsys.readouterr().err
    assert rc == 1 and "--time-limit must be a positive number of minutes" in err


def test_learning_curve_of_a_flair_run_measures_on_a_flair_phantom(tmp_path):
    """The bundled sample is T2: a FLAIR run's curve AP comes from a labelled FLAIR phantom instead."""
    import SimpleITK as sitk

    from uad.phantoms import make_phantom
    from uad.training import CURVE_PHANTOM_SEED

    sample = curve_sample(3, "FLAIR")
    assert sample["contrast"] == "FLAIR" and len(sample["slices"]) == 3
    ph = make_phantom(CURVE_PHANTOM_SEED, contrast="FLAIR", lesion="tumour", spacing=2.0)
    ref = sitk.GetArrayFromImage(ph.image)[sample["slices"]]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sample["image"]), ref)
    np.testing.assert_array_equal(sample["lesion"], sitk.GetArrayFromImage(ph.lesion_mask)[sample["slices"]] > 0)
    assert sample["lesion"].any() and (sample["lesion"] <= sample["brain"]).all()
    assert sample["image"].GetSpacing() == ph.image.GetSpacing()
    t2 = curve_sample(3)
    assert t2["contrast"] == "T2" and t2["image"].GetSize() != sample["image"].GetSize()

    run = tmp_path / "run"
    train(_cfg(contrast="FLAIR", steps=2, curve_every=2, curve_methods=["anoddpm"], curve_slices=3), run, device="cpu",
          progress=False, log=None)
    rows = _rows(run / "curve.csv")
    model = build_model(json.loads((run / "config.json").read_text())["model"], load_weights(run / "model.safetensors"))
    assert float(rows[-1]["ap_anoddpm"]) == pytest.approx(sample_ap(model, "anoddpm", "fast", sample, "cpu"), abs=1e-5)
