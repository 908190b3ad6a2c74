"""One trainer for every method's objective.

``train(TrainConfig, run_dir)`` builds the method's default model config (plus
overrides), streams 2-D axial training slices (MNI-based phantoms, or a folder
of healthy NIfTI/NRRD volumes) through the same preprocessing as inference,
and optimises ``Method.training_loss``.  It validates on held-out healthy
data, checkpoints (safetensors weights + a weights-only optimizer state) and
resumes.  A run directory holds:

    config.json          the TrainConfig and the model config
    model.safetensors    the latest weights (one file, keys <role>.<param>)
    model.json           a manifest entry for the weights (see ``uad.zoo``)
    optimizer.pt         optimizer state (loaded with ``weights_only=True``)
    state.json           step, best validation loss
    log.csv              step, loss, validation loss, seconds
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import UADError
from .methods import get_method_class
from .rng import BatchRNG, slice_seed
from .zoo import Model, build_model, save_weights, sha256_file


@dataclass
class TrainConfig:
    method: str = "anoddpm"
    data: str = "phantoms"  # "phantoms" or a folder of healthy volumes
    contrast: str = "T2"
    image_size: int = 64
    small: bool = True  # small CPU-friendly network instead of the paper's
    steps: int = 2000
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    val_every: int = 250
    val_batches: int = 4
    checkpoint_every: int = 250
    amp: bool = True  # bf16 autocast on CUDA
    lesion_fraction: float = 0.0  # fraction of lesion phantoms (weakly supervised methods)
    pool_size: int = 8
    noise: str | None = None  # override the model's noise kind (gaussian | simplex)
    model_overrides: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = set(cls.__dataclass_fields__)
        bad = set(d) - known
        if bad:
            raise UADError(f"unknown training option(s): {', '.join(sorted(bad))}")
        return cls(**d)


def default_config(method: str, **overrides) -> TrainConfig:
    cls = get_method_class(method)
    base = {"method": method}
    if cls.needs_labels:
        base["lesion_fraction"] = 0.5
    base.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig.from_dict(base)


def model_config_for(cfg: TrainConfig) -> dict:
    mc = get_method_class(cfg.method).default_model_config(image_size=cfg.image_size, small=cfg.small)
    if cfg.noise is not None:
        mc["noise"] = cfg.noise
    _deep_update(mc, cfg.model_overrides)
    mc["contrast"] = cfg.contrast
    mc["image_size"] = cfg.image_size
    return mc


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v


# --------------------------------------------------------------------------- data
class VolumeFolderSource:
    """Training slices from a folder of healthy volumes (NIfTI, NRRD, ...).

    Optional brain masks are picked up from ``<stem>_brainmask.<ext>`` (or
    ``_mask``) files next to each volume; otherwise the preprocessing computes
    one for skull-stripped input.
    """

    def __init__(self, folder: str | os.PathLike, image_size: int, holdout: bool = False,
                 holdout_fraction: float = 0.1, normalisation: dict | None = None):
        from .imageio import read_image
        from .preprocess import preprocess

        folder = Path(folder)
        exts = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
        files = sorted(p for p in folder.iterdir()
                       if p.name.endswith(exts) and not any(s in p.name for s in ("_brainmask", "_mask", "_lesion")))
        if not files:
            raise UADError(f"no volumes (.nii.gz, .nii, .nrrd, .mha) found in {folder}")
        n_hold = max(1, int(round(len(files) * holdout_fraction))) if len(files) > 1 else 0
        files = files[:n_hold] if holdout else (files[n_hold:] or files)
        slices, masks = [], []
        for f in files:
            stem = f.name
            for e in exts:
                if stem.endswith(e):
                    stem = stem[: -len(e)]
                    break
            mask_img = None
            for suffix in ("_brainmask", "_mask"):
                for e in exts:
                    m = f.parent / f"{stem}{suffix}{e}"
                    if m.is_file():
                        mask_img = read_image(m)
                        break
                if mask_img is not None:
                    break
            stack = preprocess(read_image(f), image_size, brain_mask=mask_img, normalisation=normalisation)
            keep = stack.masks.reshape(len(stack.masks), -1).mean(1) > 0.05
            slices.append(stack.slices[keep])
            masks.append(stack.masks[keep])
        self.slices = np.concatenate(slices).astype(np.float32)
        self.masks = np.concatenate(masks)
        self.files = files

    def sample_batch(self, batch_size: int, generator: np.random.Generator):
        idx = generator.integers(0, len(self.slices), batch_size)
        x = self.slices[idx].copy()
        m = self.masks[idx].copy()
        flip = generator.random(batch_size) < 0.5
        x[flip] = x[flip][..., ::-1]
        m[flip] = m[flip][..., ::-1]
        return (torch.from_numpy(np.ascontiguousarray(x))[:, None], torch.from_numpy(np.ascontiguousarray(m))[:, None],
                torch.zeros(batch_size, dtype=torch.long))


def make_source(cfg: TrainConfig, holdout: bool = False, normalisation: dict | None = None):
    if cfg.data == "phantoms":
        from .phantoms import TrainingSliceSource

        return TrainingSliceSource(contrast=cfg.contrast, image_size=cfg.image_size, seed=cfg.seed,
                                   pool_size=max(1, cfg.pool_size // (4 if holdout else 1)),
                                   lesion="any" if cfg.lesion_fraction > 0 else "none",
                                   lesion_fraction=cfg.lesion_fraction, holdout=holdout,
                                   normalisation=normalisation, prefetch=not holdout)
    return VolumeFolderSource(cfg.data, cfg.image_size, holdout=holdout, normalisation=normalisation)


# --------------------------------------------------------------------------- loop
def _unwrap(net):
    return net.module if hasattr(net, "module") else net


def _parameters(model: Model):
    return [p for net in model.networks.values() for p in net.parameters()]


def _batch_rng(seed: int, step: int, batch: int, device) -> BatchRNG:
    return BatchRNG([slice_seed(seed, step * 4096 + i) for i in range(batch)], device)


def validation_loss(cls, model: Model, source, cfg: TrainConfig, device) -> float:
    """Mean objective on held-out slices with fixed randomness (comparable across steps)."""
    for net in model.networks.values():
        net.eval()
    losses = []
    with torch.no_grad():
        for b in range(cfg.val_batches):
            g = np.random.default_rng([cfg.seed, 999_999, b])
            x, m, y = source.sample_batch(cfg.batch_size, g)
            rng = _batch_rng(cfg.seed + 7, 10_000_000 + b, x.shape[0], device)
            loss = cls.training_loss(model, x.to(device), m.to(device), rng, labels=y.to(device))
            losses.append(float(loss))
    for net in model.networks.values():
        net.train()
    return float(np.mean(losses))


def train(cfg: TrainConfig, run_dir: str | os.PathLike, resume: bool = False, device: str = "auto",
          progress: bool = True, log: Callable[[str], None] = print) -> Path:
    """Train ``cfg.method``'s networks; returns the run directory."""
    from .pipeline import resolve_device

    run_dir = Path(run_dir)
    dev = resolve_device(device)
    cls = get_method_class(cfg.method)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % (2 ** 32))

    state = {"step": 0, "best_val": math.inf}
    if resume:
        if not (run_dir / "config.json").is_file():
            raise UADError(f"cannot resume: {run_dir} has no config.json")
        saved = json.loads((run_dir / "config.json").read_text())
        target_steps = cfg.steps
        cfg = TrainConfig.from_dict(saved["train"])
        cfg.steps = max(target_steps, cfg.steps)
        model_cfg = saved["model"]
        from safetensors.torch import load_file

        model = build_model(model_cfg, load_file(str(run_dir / "model.safetensors")), "run")
        state = json.loads((run_dir / "state.json").read_text())
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        model_cfg = model_config_for(cfg)
        model = build_model(model_cfg, None, "run")
    model.to(dev)
    for net in model.networks.values():
        net.train()

    params = _parameters(model)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay) if cfg.weight_decay else \
        torch.optim.Adam(params, lr=cfg.lr)
    if resume and (run_dir / "optimizer.pt").is_file():
        opt.load_state_dict(torch.load(run_dir / "optimizer.pt", map_location=dev, weights_only=True))

    (run_dir / "config.json").write_text(json.dumps({"train": asdict(cfg), "model": model_cfg}, indent=2))
    source = make_source(cfg, normalisation=model_cfg.get("normalisation"))
    val_source = make_source(cfg, holdout=True, normalisation=model_cfg.get("normalisation"))

    use_amp = cfg.amp and dev.type == "cuda"
    log_path = run_dir / "log.csv"
    new_log = not log_path.is_file() or not resume
    log_f = open(log_path, "w" if new_log else "a", newline="")
    writer = csv.writer(log_f)
    if new_log:
        writer.writerow(["step", "loss", "val_loss", "seconds"])

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=state["step"], desc=f"train {cfg.method}", unit="step")
    t0 = time.time()
    ema = None
    try:
        while state["step"] < cfg.steps:
            step = state["step"]
            g = np.random.default_rng([cfg.seed, step])
            x, m, y = source.sample_batch(cfg.batch_size, g)
            x, m, y = x.to(dev), m.to(dev), y.to(dev)
            rng = _batch_rng(cfg.seed, step, x.shape[0], dev)
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_amp):
                loss = cls.training_loss(model, x, m, rng, labels=y)
            if not torch.isfinite(loss):
                raise UADError(f"training diverged at step {step} (loss {float(loss)})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            state["step"] = step + 1
            lv = float(loss.detach())
            ema = lv if ema is None else 0.98 * ema + 0.02 * lv
            val = ""
            last = state["step"] == cfg.steps
            if state["step"] % cfg.val_every == 0 or last:
                val = validation_loss(cls, model, val_source, cfg, dev)
                state["best_val"] = min(state["best_val"], val)
                state.setdefault("val_history", []).append([state["step"], val])
            writer.writerow([state["step"], f"{lv:.6f}", f"{val:.6f}" if val != "" else "", f"{time.time() - t0:.1f}"])
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{ema:.4f}", val=f"{val:.4f}" if val != "" else "-")
            if state["step"] % cfg.checkpoint_every == 0 or last:
                log_f.flush()
                _checkpoint(model, opt, state, run_dir, cfg)
    finally:
        if bar is not None:
            bar.close()
        log_f.close()
    return run_dir


def _checkpoint(model: Model, opt, state: dict, run_dir: Path, cfg: TrainConfig) -> None:
    plain = Model(model.id, model.config, {k: _unwrap(v) for k, v in model.networks.items()})
    tmp = run_dir / "model.safetensors.tmp"
    digest = save_weights(plain, tmp)
    os.replace(tmp, run_dir / "model.safetensors")
    torch.save(opt.state_dict(), run_dir / "optimizer.pt.tmp")
    os.replace(run_dir / "optimizer.pt.tmp", run_dir / "optimizer.pt")
    (run_dir / "state.json").write_text(json.dumps(state, indent=2, default=float))
    entry = dict(model.config)
    entry.update({
        "file": "model.safetensors",
        "sha256": digest,
        "training": {"data": cfg.data, "contrast": cfg.contrast, "steps": state["step"],
                     "batch_size": cfg.batch_size, "lr": cfg.lr, "seed": cfg.seed, "small": cfg.small,
                     "best_val_loss": state.get("best_val")},
    })
    (run_dir / "model.json").write_text(json.dumps(entry, indent=2, default=float))


# --------------------------------------------------------------------------- export / calibration
def export_run(run_dir: str | os.PathLike, models_dir: str | os.PathLike, model_id: str,
               extra: dict | None = None) -> dict:
    """Copy a run's weights into a model folder and add / replace its manifest entry."""
    import shutil

    run_dir, models_dir = Path(run_dir), Path(models_dir)
    entry = json.loads((run_dir / "model.json").read_text())
    dest = models_dir / model_id
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / "model.safetensors", dest / "model.safetensors")
    entry["id"] = model_id
    entry["file"] = f"{model_id}/model.safetensors"
    entry["sha256"] = sha256_file(dest / "model.safetensors")
    if extra:
        _deep_update(entry, extra)
    manifest_path = models_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"models": []}
    manifest["models"] = [m for m in manifest["models"] if m.get("id") != model_id] + [entry]
    manifest_path.write_text(json.dumps(manifest, indent=2, default=float) + "\n")
    return entry


def calibrate_threshold(model: Model, method: str, contrast: str = "T2", n_volumes: int = 3,
                        quantile: float = 0.95, preset: str | None = None, seed: int = 2_000_000,
                        device: str = "auto", spacing: float | None = 1.5) -> dict:
    """Anomaly score at which ~(1-quantile) of healthy brain voxels are flagged.

    Runs the method on ``n_volumes`` held-out healthy phantoms (seeds far from
    the training seeds) and returns the quantile of the in-brain anomaly values.
    """
    import SimpleITK as sitk

    from .phantoms import make_phantom
    from .pipeline import detect

    values = []
    for i in range(n_volumes):
        ph = make_phantom(seed + i, contrast=contrast, lesion="none", spacing=spacing)
        res = detect(ph.image, method=method, model=model, device=device, seed=i, preset=preset,
                     brain_mask=ph.brain_mask, threshold=float("inf"))
        a = sitk.GetArrayFromImage(res.anomaly)
        b = sitk.GetArrayFromImage(ph.brain_mask) > 0
        values.append(a[b])
    v = np.concatenate(values)
    return {"threshold": float(np.quantile(v, quantile)), "quantile": quantile, "n_volumes": n_volumes,
            "n_voxels": int(v.size), "preset": preset}


# --------------------------------------------------------------------------- CLI
def add_cli(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a method's networks on healthy data",
                              description="Train a method on MNI-based phantoms or a folder of healthy volumes.")
    p.add_argument("--method", required=True, help="method name (see 'uad methods')")
    p.add_argument("--data", default="phantoms", help="'phantoms' or a folder of healthy NIfTI/NRRD volumes")
    p.add_argument("--contrast", default="T2", choices=["T1", "T2", "FLAIR"])
    p.add_argument("-o", "--output", required=True, help="run directory")
    p.add_argument("--config", help="JSON file with TrainConfig overrides")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--image-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default="auto")
    p.add_argument("--resume", action="store_true", help="continue the run in --output")
    p.set_defaults(func=_cli_train)


def _cli_train(args) -> int:
    overrides = {}
    if args.config:
        overrides.update(json.loads(Path(args.config).read_text()))
    overrides.update({"data": args.data, "contrast": args.contrast, "steps": args.steps,
                      "batch_size": args.batch_size, "image_size": args.image_size, "lr": args.lr,
                      "seed": args.seed})
    cfg = default_config(args.method, **overrides)
    run = train(cfg, args.output, resume=args.resume, device=args.device)
    print(f"run directory: {run}")
    print(f"weights: {run / 'model.safetensors'}  (import with 'uad models import {run}')")
    return 0
