#!/usr/bin/env python
"""Issue 7's GPU run, prepared: train the paper-size DDPM (THOR's 128-256-256 UNet at 128 px) in one device call,
measure it there, and bring it back as a bundled model.

A session lent a GPU has 15 minutes of device time in all (the machine's start included) and one command runs at
most 10 minutes; the CPU here cannot evaluate a paper-size DDPM on the held-out set in useful time. So one call
does everything that needs the GPU, and what comes back is small enough for the tool (at most 8 files, 16 MiB
each, 64 MiB together):

  ``run`` (on the GPU machine, through ``bash scripts/gpu/train.sh``):
    1. generates the held-out set of the contrast (``uad heldout``) in a background process while
    2. ``uad train --method anoddpm`` trains the Gaussian epsilon-DDPM shared by AnoDDPM, THOR and AutoDDPM
       (``scripts/gpu/ddpm_paper.json``: the paper UNet, 128 px, batch 64, EMA 0.999, t < 400, bf16 autocast,
       a learning curve of THOR's and AnoDDPM's sample AP) for ``--minutes`` (default 4);
    3. stores the EMA weights in float16 (37 MB instead of 74: the bundled weights stay under 100 MB; every
       measurement below is of the float16 weights), exports, calibrates every method's default preset and
       writes the card (``scripts/train_bundled.py --finalize-only``) into a fresh ``models/`` (the bundled
       models do not travel: ``scripts/gpu/stage.sh``);
    4. runs ``uad benchmark`` on ``--bench-volumes`` held-out volumes per lesion type for the three methods
       until ``--deadline-minutes`` (a benchmark stopped part-way keeps every finished unit; the model is packed
       before it starts). Estimated cost of the paper UNet at 128 px: about 110 GFLOP a forward pass, so a
       default-preset volume (55 NFE x ~100 slices) is seconds on an H200 and a training step at batch 64 about
       70 ms under bf16: 4 minutes give some 3,000 steps (estimates, not measured: train.log says);
    5. writes to ``--out`` the weights in parts of 12 MiB and ``result.tar.gz`` (manifest entry, card, curve,
       run log, benchmark report, logs).
  ``unpack FILES_AT`` (here, on the files the call brought back): joins the parts, checks them against the
    manifest entry's sha256, installs the model into models/ (``uad.zoo.upsert_manifest_entry``), the run's
    small files into checkpoints/<id>/ and the benchmark into docs/benchmark/gpu-<id>/; then the usual
    ``scripts/update_cards.py`` and ``uad models verify``. (The optimizer state, 220 MB, cannot come back: the
    run does not resume in a later session.)

``run --dry-run`` runs the same steps on the CPU in a few minutes (a tiny network, 32 px, a quick held-out
set) to check the script end to end; like ``run`` it refuses a checkout whose models/ holds the bundled models
(use a scratch clone without models/, or the staged tree).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PART_BYTES = 12 * 1024 * 1024  # the device tool brings back files of at most 16 MiB
MAX_OUT_FILES = 8
GPU_TRAIN_SEED = 500_000  # phantom seeds of the run (validation + 1,000,000); Testing/test_heldout.py checks them


def _log(msg: str) -> None:
    print(f"[gpu/train {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def to_float16(src: Path, dst: Path) -> None:
    """A safetensors file with every floating-point tensor stored as float16 (metadata kept)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    out = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    save_file(out, str(dst), metadata={**meta, "uad_dtype": "float16"})


def split_file(path: Path, outdir: Path, part_bytes: int = PART_BYTES) -> list[Path]:
    """``path`` cut into ``<name>.part0``, ``.part1``, ... of at most ``part_bytes`` bytes."""
    parts = []
    with open(path, "rb") as f:
        for i, block in enumerate(iter(lambda: f.read(part_bytes), b"")):
            p = outdir / f"{path.name}.part{i}"
            p.write_bytes(block)
            parts.append(p)
    return parts


def join_parts(folder: Path, name: str, dst: Path) -> None:
    """The inverse of ``split_file``: ``folder/<name>.part0..N`` concatenated into ``dst`` (no gap allowed)."""
    parts = sorted(folder.glob(f"{name}.part*"), key=lambda p: int(p.name.rsplit("part", 1)[1]))
    if not parts:
        raise SystemExit(f"no {name}.part* files in {folder}")
    idx = [int(p.name.rsplit("part", 1)[1]) for p in parts]
    if idx != list(range(len(parts))):
        raise SystemExit(f"{folder}: parts of {name} missing (have {idx})")
    tmp = dst.with_name(dst.name + ".part")
    with open(tmp, "wb") as out:
        for p in parts:
            out.write(p.read_bytes())
    os.replace(tmp, dst)


def _fp16_run(run: Path, dst: Path) -> None:
    """A copy of the run folder whose model.safetensors holds the EMA weights in float16 (no optimizer state, no
    best.safetensors: the bundle is the latest weights)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in run.iterdir():
        if f.is_file() and f.name not in ("model.safetensors", "train_state.safetensors", "optimizer.pt",
                                          "best.safetensors"):
            shutil.copy2(f, dst / f.name)
    to_float16(run / "model.safetensors", dst / "model.safetensors")


def _config(args) -> Path:
    cfg = json.loads(Path(args.config).read_text())
    if args.dry_run:  # the same steps, CPU-sized: the small network at 32 px
        cfg.update({"small": True, "image_size": 32, "batch_size": 4, "val_every": 2, "val_batches": 1,
                    "checkpoint_every": 2, "curve_every": 2, "curve_slices": 4, "pool_size": 1})
    path = Path(args.work) / "train_config.json"
    path.write_text(json.dumps(cfg, indent=2))
    return path


def cmd_run(args) -> int:
    out, work = Path(args.out), Path(args.work)
    models = ROOT / "models"
    if (models / "manifest.json").exists():
        raise SystemExit(f"{models} holds a manifest: run this on the staged tree (scripts/gpu/stage.sh), where the "
                         f"bundled models do not travel, or in a scratch clone without models/ (--dry-run)")
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise SystemExit(f"{out} is not empty")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    py = sys.executable
    t0 = time.time()
    env = dict(os.environ)
    cores = os.cpu_count() or 2
    logs = work / "logs"
    logs.mkdir()

    # 1. the held-out set of the contrast, on the CPU cores, while the GPU trains
    hold = work / "heldout"
    hold_cmd = [py, "-m", "uad.cli", "heldout", str(hold), "--contrasts", args.contrast]
    hold_cmd += ["--quick"] if args.dry_run else ["--n", str(args.bench_volumes)]  # the set's first N per type
    henv = dict(env, OMP_NUM_THREADS=str(max(1, cores // 2)))
    hold_p = subprocess.Popen(hold_cmd, env=henv, stdout=open(logs / "heldout.log", "w"), stderr=subprocess.STDOUT)

    # 2. training
    run = work / "run"
    cfg = _config(args)
    train_cmd = [py, "-m", "uad.cli", "train", "--method", "anoddpm", "--contrast", args.contrast, "--config",
                 str(cfg), "-o", str(run), "--device", args.device, "--no-progress", "--seed", str(args.seed)]
    train_cmd += ["--steps", "6"] if args.dry_run else ["--time-limit", str(args.minutes)]
    _log("train: " + " ".join(train_cmd[1:]))
    with open(logs / "train.log", "w") as f:
        rc = subprocess.run(train_cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    _log(f"train exited {rc} after {time.time() - t0:.0f} s; " + (logs / "train.log").read_text()[-600:])
    if rc != 0 or not (run / "model.safetensors").exists():
        hold_p.kill()
        _pack(out, work, None, args)
        return 1

    # 3. float16 weights -> models/<id> (export, calibration, sample + phantom evaluation, card)
    run16 = work / "run-fp16"
    _fp16_run(run, run16)
    fin_cmd = [py, str(ROOT / "scripts" / "train_bundled.py"), "--id", args.id, "--method", "anoddpm",
               "--finalize-only", "--run-dir", str(run16), "--device", args.device, "--description", args.description,
               "--phantoms-per-type", "1"]  # the card's quick table; the held-out benchmark is the measurement
    if args.dry_run:
        fin_cmd += ["--calibration-volumes", "1"]
    _log("finalize: " + " ".join(fin_cmd[1:]))
    with open(logs / "finalize.log", "w") as f:
        rc = subprocess.run(fin_cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    _log(f"finalize exited {rc} at {time.time() - t0:.0f} s")
    weights = models / args.id / "model.safetensors"
    if rc != 0 or not weights.exists():
        hold_p.kill()
        _pack(out, work, None, args)
        return 1
    _pack(out, work, weights, args)  # the model is safe in $OUT even if the call is stopped from here on

    # 4. the held-out benchmark, within what is left of the call's time (partial reports are kept)
    hold_rc = hold_p.wait()
    left = args.deadline_minutes * 60 - (time.time() - t0) - 30
    _log(f"held-out set exited {hold_rc} at {time.time() - t0:.0f} s; {left:.0f} s left for the benchmark")
    if hold_rc == 0 and left > 30:
        bench_cmd = [py, "-m", "uad.cli", "benchmark", "--heldout", str(hold), "--contrasts", args.contrast,
                     "--methods", *args.methods, "--presets", "default", "--device", args.device, "--jobs", "1",
                     "--speed-slices", "0", "--max-volumes", str(args.bench_volumes), "-o", str(work / "bench")]
        _log("benchmark: " + " ".join(bench_cmd[1:]))
        with open(logs / "bench.log", "w") as f:
            try:
                subprocess.run(bench_cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=left)
            except subprocess.TimeoutExpired:
                _log("benchmark stopped at its time budget (finished units kept)")
    _pack(out, work, weights, args)
    _log(f"done in {time.time() - t0:.0f} s")
    return 0


def _pack(out: Path, work: Path, weights: Path | None, args) -> None:
    """At most ``MAX_OUT_FILES`` files into ``out``: the weight parts and result.tar.gz (what was there is replaced:
    called once the model is exported and again after the benchmark)."""
    models = ROOT / "models"
    for f in out.iterdir():
        f.unlink()
    with tarfile.open(out / "result.tar.gz", "w:gz") as tar:
        tar.add(str(work / "logs"), arcname="logs")
        if (work / "train_config.json").exists():
            tar.add(str(work / "train_config.json"), arcname="train_config.json")
        run = work / "run"
        if run.exists():
            for f in sorted(run.iterdir()):
                if f.is_file() and f.suffix in (".json", ".csv", ".png"):
                    tar.add(str(f), arcname=f"run/{f.name}")
        if (models / "manifest.json").exists():
            tar.add(str(models / "manifest.json"), arcname="models/manifest.json")
            for f in sorted((models / args.id).glob("*")):
                if f.name != "model.safetensors":
                    tar.add(str(f), arcname=f"models/{args.id}/{f.name}")
        if (work / "bench").exists():
            tar.add(str(work / "bench"), arcname="bench")
    parts = split_file(weights, out) if weights is not None else []
    n = len(list(out.iterdir()))
    if n > MAX_OUT_FILES:
        raise SystemExit(f"{n} files in {out}: the device tool brings back {MAX_OUT_FILES}")
    _log(f"packed {out}: result.tar.gz + {len(parts)} weight part(s)")


def cmd_unpack(args) -> int:
    """Install what a ``run`` brought back (``files``) into this checkout."""
    sys.path.insert(0, str(ROOT / "UADExtension"))
    from uad.zoo import sha256_file, upsert_manifest_entry

    files, root = Path(args.files), Path(args.root)
    tmp = Path(args.work) / "unpack"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    with tarfile.open(files / "result.tar.gz") as tar:
        for m in tar.getmembers():  # only plain files and folders below tmp
            if not (m.isfile() or m.isdir()) or m.name.startswith("/") or ".." in Path(m.name).parts:
                raise SystemExit(f"result.tar.gz: refusing member {m.name!r}")
        tar.extractall(str(tmp))
    manifest = json.loads((tmp / "models" / "manifest.json").read_text())
    entries = manifest["models"] if isinstance(manifest.get("models"), list) else list(manifest["models"].values())
    if args.id is None:  # the run's fresh models/ holds its one model
        if len(entries) != 1:
            raise SystemExit(f"result.tar.gz holds {len(entries)} models: name one with --id")
        args.id = entries[0]["id"]
    entry = next((e for e in entries if e["id"] == args.id), None)
    if entry is None:
        raise SystemExit(f"result.tar.gz holds no model {args.id!r}")
    dest = root / "models" / args.id
    dest.mkdir(parents=True, exist_ok=True)
    join_parts(files, "model.safetensors", tmp / "model.safetensors")
    if sha256_file(tmp / "model.safetensors") != entry["sha256"]:
        raise SystemExit("the joined weights do not match the manifest entry's sha256: not installed")
    shutil.copy2(tmp / "model.safetensors", dest / "model.safetensors")
    for f in (tmp / "models" / args.id).iterdir():
        shutil.copy2(f, dest / f.name)
    upsert_manifest_entry(root / "models", entry)
    ck = root / "checkpoints" / args.id
    ck.mkdir(parents=True, exist_ok=True)
    for f in (tmp / "run").iterdir():
        shutil.copy2(f, ck / f.name)
    if (tmp / "train_config.json").exists():
        shutil.copy2(tmp / "train_config.json", ck / "train_config.json")
    shutil.copytree(tmp / "logs", ck / "logs", dirs_exist_ok=True)
    if (tmp / "bench").exists():
        shutil.copytree(tmp / "bench", root / "docs" / "benchmark" / f"gpu-{args.id}", dirs_exist_ok=True)
    total = sum(p.stat().st_size for p in (root / "models").glob("*/*.safetensors"))
    print(f"installed {args.id} (sha256 {entry['sha256'][:12]}...); bundled weights now {total / 1e6:.1f} MB "
          f"(keep under 100 MB); next: scripts/update_cards.py docs/benchmark/gpu-{args.id} ... and uad models verify")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="on the GPU machine (bash scripts/gpu/train.sh)")
    r.add_argument("--out", required=True, help="the folder whose files come back ($OUT)")
    r.add_argument("--work", default="/tmp/uad-gpu")
    r.add_argument("--id", default=None, help="the model id (default ddpm-<contrast>-paper)")
    r.add_argument("--contrast", default="T2", choices=["T1", "T2", "FLAIR"])
    r.add_argument("--config", default=str(ROOT / "scripts" / "gpu" / "ddpm_paper.json"))
    r.add_argument("--minutes", type=float, default=4.0, help="training wall time")
    r.add_argument("--deadline-minutes", type=float, default=9.0,
                   help="the benchmark stops so that everything is packed by then (from this script's start; the "
                        "device tool stops a command at 10 minutes)")
    r.add_argument("--bench-volumes", type=int, default=3,
                   help="held-out volumes per lesion type (and healthy) the benchmark uses: a benchmark unit (one "
                        "method on all of them) stopped by the deadline is lost, so fewer that finish beat more")
    r.add_argument("--methods", nargs="+", default=["thor", "anoddpm", "autoddpm"])
    r.add_argument("--seed", type=int, default=GPU_TRAIN_SEED, help="phantom seeds (unused by every other run)")
    r.add_argument("--device", default="cuda")
    r.add_argument("--description", default=None)
    r.add_argument("--dry-run", action="store_true", help="the same steps, CPU-sized (a few minutes)")
    u = sub.add_parser("unpack", help="here: install what a run brought back")
    u.add_argument("files", help="the folder holding result.tar.gz and model.safetensors.part*")
    u.add_argument("--id", default=None, help="default: the one model the run exported")
    u.add_argument("--work", default="/tmp/uad-gpu")
    u.add_argument("--root", default=str(ROOT), help="the checkout to install into (default this one)")
    a = ap.parse_args(argv)
    if a.cmd == "run":
        a.id = a.id or f"ddpm-{a.contrast.lower()}-paper"
        a.description = a.description or (
            f"paper-size Gaussian epsilon-DDPM (THOR's 128-256-256 UNet, 128 px) on {a.contrast} MNI152 phantoms, "
            f"trained on one GPU; serves AnoDDPM, THOR and AutoDDPM; float16 weights")
    return cmd_run(a) if a.cmd == "run" else cmd_unpack(a)


if __name__ == "__main__":
    sys.exit(main())
