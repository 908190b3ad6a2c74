#!/usr/bin/env python
"""Train, calibrate, evaluate and bundle one model of the model zoo (models/).

    python scripts/train_bundled.py --id ddpm-t2-ema --method anoddpm --steps 3000
    python scripts/train_bundled.py --id ddpm-t2-ema --method anoddpm --finalize-only

Steps: ``uad.training.train`` on MNI-based phantoms -> export the weights into
models/<id>/ with a manifest entry -> calibrate the default threshold on
held-out healthy phantoms per method, preset and perceptual backend (uad.calibration; 1% and 5%
healthy FPR among others) ->
evaluate every method the model serves on the bundled sample -> write the
model card models/<id>/README.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from uad.calibration import GEOMETRIES
from uad.imageio import read_image, sample_paths
from uad.metrics import average_precision, best_dice
from uad.pipeline import detect
from uad.training import default_config, export_run, train
from uad.zoo import find_model, load_model, verify
from uad.networks import count_parameters

ROOT = Path(__file__).resolve().parents[1]


def evaluate_on_sample(model, methods: list[str], device: str) -> dict:
    sp = sample_paths()
    img = read_image(sp["image"])
    lesion = sitk.GetArrayFromImage(read_image(sp["lesion"])) > 0
    brain = sitk.GetArrayFromImage(read_image(sp["brain_mask"])) > 0
    out = {}
    for m in methods:
        t0 = time.time()
        res = detect(img, method=m, model=model, device=device, seed=0, brain_mask=read_image(sp["brain_mask"]))
        dt = time.time() - t0
        a = sitk.GetArrayFromImage(res.anomaly)
        out[m] = {
            "ap": float(average_precision(a, lesion, mask=brain)),
            "best_dice": float(best_dice(a, lesion, mask=brain)),
            "prevalence": float(lesion[brain].mean()),
            "seconds": round(dt, 1),
            "preset": res.info.get("preset"),
            "nfe_per_slice": res.info.get("nfe_per_slice"),
            "device": str(res.info.get("device")),
        }
        print(f"  {m}: AP {out[m]['ap']:.3f} (prevalence {out[m]['prevalence']:.3f}), "
              f"best Dice {out[m]['best_dice']:.3f}, {dt:.0f} s")
    return out


def evaluate_on_phantoms(model, methods: list[str], contrast: str, device: str, n: int = 2) -> dict:
    """Held-out phantoms (tumour, stroke, MS), per lesion type mean AP, next to the intensity baseline."""
    from uad.evaluation import IntensityBaseline, evaluate_baseline, evaluate_method, healthy_reference, phantom_cases

    lesions = ("tumour", "stroke", "ms")
    cases = phantom_cases(lesions, n, contrast, spacing=2.0)
    imgs, masks = healthy_reference(contrast, spacing=2.0)
    rows = [evaluate_baseline(cases, IntensityBaseline().fit(imgs, masks))]
    rows += [evaluate_method(cases, m, model=model, device=device) for m in methods]
    out = {}
    for r in rows:
        out[r["method"]] = {lt: float(np.mean([c["ap"] for c in r["cases"] if c["lesion_type"] == lt]))
                            for lt in lesions}
        out[r["method"]]["pooled_ap"] = float(r["pooled"]["ap"])
        out[r["method"]]["mean_best_dice"] = float(r["mean_best_dice"])
        out[r["method"]]["prevalence"] = {lt: float(np.mean([c["prevalence"] for c in r["cases"]
                                                             if c["lesion_type"] == lt])) for lt in lesions}
        print(f"  {r['method']:20s} " + " ".join(f"{lt} AP {out[r['method']][lt]:.3f}" for lt in lesions))
    return {"n_per_type": n, "contrast": contrast, "spacing_mm": 2.0, "results": out}


def _ordinal(v: float) -> str:
    """1 -> '1st', 99 -> '99th', 0.5 -> '0.5th'."""
    t = f"{v:g}"
    if float(v) != int(v) or 11 <= int(v) % 100 <= 13:
        return t + "th"
    return t + {1: "st", 2: "nd", 3: "rd"}.get(int(v) % 10, "th")


def _normalisation_text(entry: dict) -> str:
    """The card's words for the entry's intensity normalisation (``uad.preprocess``: the brain's lower / upper
    percentiles -> 0 / 1, clipped at 0 and at ``clip_max``), resolved as the preprocessing resolves it."""
    from uad.preprocess import normalisation_settings

    n = normalisation_settings(entry.get("normalisation"))
    lo, hi = n["lower"], n["upper"]
    top = n["clip_max"] if n["clip"] else None
    text = f"percentile-normalised (brain's {_ordinal(lo)} / {_ordinal(hi)} percentiles -> 0 / 1)"
    if top is None:
        return text + ", not clipped"
    text += f", clipped to [0, {top:g}]"
    if top > 1.0:
        text += (f" (`clip_max` {top:g}: intensities above the brain's {_ordinal(hi)} percentile, such as FLAIR "
                 f"hyperintensities, are kept)")
    return text


def card_header(entry: dict, parameters: int) -> list[str]:
    """A model card's title and its list of what the model is (methods, contrast, input, noise, networks, size,
    checksum, licence), from its manifest entry."""
    return [
        f"# Model card: {entry['id']}",
        "",
        f"- **Methods served**: {', '.join(entry.get('methods', []))}",
        f"- **Contrast**: {entry.get('contrast')} · **input**: {entry.get('image_size')}x{entry.get('image_size')} "
        f"axial slices, brain-cropped, {_normalisation_text(entry)}, network range {entry.get('intensity_range')}",
        f"- **Noise / schedule**: {entry.get('noise')} · {json.dumps(entry.get('schedule'))}",
        f"- **Networks**: " + "; ".join(f"{r}: {c.get('type')} channels={c.get('channels')} "
                                        f"attention={c.get('attention_levels')}" for r, c in entry['networks'].items()),
        f"- **Parameters**: {parameters:,}",
        f"- **sha256**: `{entry['sha256']}`",
        f"- **Licence**: {entry.get('license', 'Apache-2.0')}",
    ]


def write_card(entry: dict, path: Path, extra: dict) -> None:
    tr = entry.get("training", {})
    lines = [
        *card_header(entry, extra["parameters"]),
        "",
        "## Training",
        "",
        f"Trained with `uad train` (scripts/train_bundled.py) on {tr.get('data')} — healthy phantoms built from the "
        f"MNI152 2009a template shipped by nilearn (random affine + elastic deformation, randomised tissue "
        f"intensities, bias field, Rician noise); {tr.get('steps')} steps, batch {tr.get('batch_size')}, "
        f"lr {tr.get('lr')}, seed {tr.get('seed')}, best validation loss {tr.get('best_val_loss'):.4f} on held-out "
        f"phantoms.",
        f"Hardware: {extra['hardware']}; {extra['train_seconds'] / 60:.0f} min wall time. "
        + ("This is the small CPU configuration, not the paper's network: expect lower accuracy than a GPU-trained "
           "paper-size model." if tr.get("small") else ""),
        *training_details(tr, entry),
        "",
    ]
    lines += threshold_section(entry)
    if extra["sample"]:
        lines += ["", "## Measured on the bundled sample (Resources/SampleData, T2 phantom with a tumour)", "",
                  "| method | preset | AP (brain voxels) | lesion prevalence | best Dice | NFE/slice | seconds (CPU) |",
                  "|---|---|---|---|---|---|---|"]
        for m, r in extra["sample"].items():
            lines.append(f"| {m} | {r['preset']} | {r['ap']:.3f} | {r['prevalence']:.3f} | {r['best_dice']:.3f} | "
                         f"{r['nfe_per_slice']} | {r['seconds']} |")
    elif entry.get("contrast") != "T2":
        lines += ["", "## Bundled sample", "",
                  f"The bundled sample (Resources/SampleData) is a T2 volume, so this {entry.get('contrast')} model "
                  f"is not measured on it: its numbers come from {entry.get('contrast')} phantoms with lesions "
                  f"(the held-out set below and the learning curve's phantom)."]
    lines += curve_section(path.parent)
    ph = extra["phantoms"]
    res = ph["results"]
    lt = ("tumour", "stroke", "ms")
    lines += ["", f"## Held-out phantom test set ({ph['contrast']}, {ph['n_per_type']} volumes per lesion type, "
                  f"{ph['spacing_mm']} mm, default presets)", "",
              "Mean per-volume AP over brain voxels; the baseline flags voxels whose intensity is rare in healthy "
              "brains (uad.evaluation.IntensityBaseline).", "",
              "| method | tumour AP | stroke AP | MS AP | pooled AP | mean best Dice |", "|---|---|---|---|---|---|"]
    for m, r in res.items():
        lines.append(f"| {m} | {r['tumour']:.4f} | {r['stroke']:.4f} | {r['ms']:.4f} | {r['pooled_ap']:.4f} | "
                     f"{r['mean_best_dice']:.3f} |")
    prev = next(iter(res.values()))["prevalence"]
    lines.append(f"| (lesion prevalence) | {prev['tumour']:.4f} | {prev['stroke']:.4f} | {prev['ms']:.4f} | | |")
    base = res["intensity-baseline"]
    verdicts = []
    for m, r in res.items():
        if m == "intensity-baseline":
            continue
        beats = [t for t in lt if r[t] > base[t]]
        loses = [t for t in lt if r[t] <= base[t]]
        verdicts.append(f"- **{m}** beats the intensity baseline on: {', '.join(beats) or 'none'}"
                        + (f"; it does **not** beat it on: {', '.join(loses)}." if loses else "."))
    lines += ["", *verdicts, "",
              "AP above the lesion prevalence means the heatmap ranks lesion voxels above healthy ones better than "
              "chance. Best Dice uses the oracle threshold and is reported for comparison with the literature "
              "only.", ""]
    path.write_text("\n".join(lines))


def lineage_steps(init: dict, depth: int = 0) -> int:
    """Training steps behind a fine-tune's starting weights: ``init['steps']`` plus, where the init model is
    itself a fine-tune whose bundled entry still holds those weights (same sha256 and steps), the steps behind
    its own init, and so on (``ddpm-t1-simplex`` <- ``ddpm-t2-simplex`` <- ``ddpm-t2-ema``)."""
    steps = int(init.get("steps") or 0)
    if depth > 10:
        return steps
    try:
        parent = find_model(init["model"]).data
    except Exception:  # the parent is no longer bundled
        return steps
    tr = parent.get("training") or {}
    same = str(parent.get("sha256") or "") == str(init.get("sha256") or "") and int(tr.get("steps") or -1) == steps
    if same and isinstance(tr.get("init"), dict) and tr["init"].get("steps"):
        steps += lineage_steps(tr["init"], depth + 1)
    return steps


def training_details(tr: dict, entry: dict | None = None) -> list[str]:
    """Card lines for a fine-tune (``init``), EMA weights and a restricted timestep range."""
    from uad.noise import options_for

    out = []
    init = tr.get("init")
    if init:
        before = f" ({init['steps']} steps)" if init.get("steps") else ""
        total = f", {lineage_steps(init) + int(tr['steps']):,} steps in all" if init.get("steps") else ""
        out.append(f"This is a **fine-tune of `{init['model']}`**{before} (sha256 `{str(init.get('sha256'))[:12]}...`): "
                   f"{tr.get('steps')} further steps on {tr.get('contrast')} phantoms{total}. The phantoms share "
                   f"the anatomy generator across contrasts; only the tissue contrast differs.")
        try:
            parent = find_model(init["model"]).data
        except Exception:  # the parent is no longer bundled
            parent = None
        if entry is not None and parent is not None and str(entry.get("noise", "")).startswith("simplex"):
            was, now = options_for(parent), options_for(entry)
            if not str(parent.get("noise", "gaussian")).startswith("simplex"):
                out.append(f"Noise: `{init['model']}` was trained with {parent.get('noise', 'gaussian')} noise; this "
                           f"fine-tune learns to predict simplex fields with {now} (the reference amplitude and "
                           f"frequency, uad.noise.REFERENCE_OPTIONS) and runs with them.")
            elif was != now:
                out.append(f"Simplex noise: `{init['model']}` was trained with {was}; this fine-tune trains and "
                           f"runs with {now} (the reference amplitude and frequency, uad.noise.REFERENCE_OPTIONS).")
    if tr.get("weights") == "ema":
        out.append(f"Exported weights: an exponential moving average of the training weights (decay "
                   f"{tr.get('ema_decay')}).")
    if tr.get("timesteps"):
        lo, hi = tr["timesteps"]
        out.append(f"Training timesteps t in [{lo}, {hi}) only (the range the methods' samplers use).")
    return [""] + out if out else []


def copy_curve(run_dir: Path, model_dir: Path) -> bool:
    """The run's learning curve (curve.png / curve.csv) into the model folder, for the card."""
    import shutil

    done = False
    for name in ("curve.png", "curve.csv"):
        src = run_dir / name
        if src.is_file():
            shutil.copyfile(src, model_dir / name)
            done = True
    return done


def curve_section(model_dir: Path) -> list[str]:
    """The card's learning-curve section from models/<id>/curve.csv (+ curve.png), if the run recorded one."""
    import csv

    f = model_dir / "curve.csv"
    if not f.is_file():
        return []
    with open(f, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return []
    aps = [k for k in rows[0] if k.startswith("ap_")]
    lines = ["", "## Learning curve", "",
             "Validation loss (held-out phantoms) and, per method, AP of its fast preset on a fixed labelled "
             "volume against training steps (`uad train --curve-every`): the bundled T2 sample for T2 models, a "
             "tumour phantom of the model's contrast (seed 5000000, used nowhere else) otherwise; steps count "
             "from the start of this run.", ""]
    if (model_dir / "curve.png").is_file():
        lines += ["![learning curve](curve.png)", ""]
    lines += ["| step | minutes | validation loss | " + " | ".join(f"{k[3:]} AP" for k in aps) + " |",
              "|---|---|---|" + "---|" * len(aps)]
    for r in rows:
        lines.append(f"| {r['step']} | {float(r['seconds']) / 60:.0f} | {float(r['val_loss']):.4f} | "
                     + " | ".join(f"{float(r[k]):.3f}" if r[k] else "-" for k in aps) + " |")
    return lines


def rewrite_card(args) -> None:
    """Re-run the sample evaluation of a bundled model and rewrite its card and manifest entry.

    Works from models/ alone (weights, stored calibration and phantom results); never trains.
    """
    from uad.zoo import upsert_manifest_entry

    e = find_model(args.id)
    verify(e)
    entry = dict(e.data)
    model = load_model(e, device="cpu")
    sample = evaluate_on_sample(model, entry["methods"], args.device) if entry.get("contrast") == "T2" else {}
    entry.setdefault("evaluation", {})["sample"] = sample
    if args.train_minutes is not None:
        entry.setdefault("training", {})["wall_seconds"] = 60.0 * args.train_minutes
    upsert_manifest_entry(ROOT / "models", entry)
    write_card(entry, ROOT / "models" / args.id / "README.md",
               {"parameters": sum(count_parameters(n) for n in model.networks.values()), "hardware": _hardware(),
                "train_seconds": entry.get("training", {}).get("wall_seconds", 0.0),
                "calibration": entry["calibration"], "sample": sample, "phantoms": entry["evaluation"]["phantoms"]})


def calibrate_bundled(args) -> None:
    """Re-calibrate a bundled model's thresholds per method, preset and perceptual backend (uad.calibration).

    For every method the model serves (or ``--methods``): its default preset and, with
    ``--paper``, its paper preset; on ``--calibration-volumes`` healthy phantoms at 2 mm (axial) or acquired
    like clinical scans (``--calibration-geometry acquired``).
    Each result is written into models/manifest.json as soon as it is measured, and the card's
    threshold section is rewritten from the stored entry (no re-evaluation).
    """
    from uad.calibration import calibrate, store
    from uad.methods import get_method_class

    e = find_model(args.id)
    verify(e)
    model = load_model(e, device="cpu")
    methods = args.methods.split(",") if args.methods else list(e.data["methods"])
    for m in methods:
        cls = get_method_class(m)
        presets = [cls.default_preset_for(model)]
        if args.paper and "paper" not in presets:
            presets.append("paper")
        if args.presets:
            presets = args.presets.split(",")
        for preset in presets:
            n = args.calibration_volumes if preset == presets[0] else args.paper_volumes
            t0 = time.time()
            preset, backend, rec = calibrate(model, m, preset, contrast=e.data.get("contrast"), n_volumes=n,
                                             spacing=2.0, device=args.device, geometry=args.calibration_geometry)
            rec["seconds"] = round(time.time() - t0, 1)
            update_entry_in_place(args.id, lambda entry: store(entry, m, preset, backend, rec))
            print(f"stored {args.id}: {m}/{preset}/{backend} ({rec['seconds']:.0f} s)", flush=True)
    entry = dict(find_model(args.id).data)
    card = ROOT / "models" / args.id / "README.md"
    if card.is_file():
        update_card_thresholds(entry, card)


def update_entry_in_place(model_id: str, change, models_dir: Path | None = None) -> dict:
    """Apply ``change(entry)`` to the manifest entry ``model_id`` (of models/ by default) where it stands (order kept)."""
    from uad.zoo import MANIFEST, _manifest_lock, _read_manifest, _write_manifest

    path = Path(models_dir or ROOT / "models") / MANIFEST
    with _manifest_lock(path):
        data = _read_manifest(path)
        for e in data["models"]:
            if e.get("id") == model_id:
                change(e)
                _write_manifest(path, data)
                return e
    raise SystemExit(f"{model_id}: not in {path}")


def threshold_section(entry: dict) -> list[str]:
    """The card's threshold table from the manifest entry's calibration (new and legacy records)."""
    from uad.calibration import calibration_record

    lines = ["## Thresholds", "",
             "Calibrated per method, preset and perceptual backend on held-out healthy phantoms "
             "(uad.calibration): the anomaly value that flags the given fraction of healthy brain voxels after "
             "the method's post-processing. `uad detect` uses the 1% value by default (`--fpr 0.05` for 5%) "
             "and warns when the preset or backend in use has no calibration. AutoDDPM's stage-1 tau is "
             "calibrated the same way (5% of healthy stage-1 pixels). The perceptual backend on the calibration "
             "machine was the SSIM fallback (no LPIPS weights); with real LPIPS, THOR and AutoDDPM run "
             "uncalibrated (warned) until calibrated for it.", "",
             "| method | preset | perceptual backend | threshold at 1% | at 5% | AutoDDPM tau | NFE/slice | "
             "healthy volumes | voxels |", "|---|---|---|---|---|---|---|---|---|"]
    for m, cal in (entry.get("calibration") or {}).items():
        if not isinstance(cal, dict) or "presets" not in cal:
            continue
        for preset, per in cal["presets"].items():
            for backend in per:
                r = calibration_record(entry, m, preset, backend)
                th = r.get("thresholds", {})
                tau = f"{r['tau']:.4g}" if r.get("tau") is not None else "-"
                lines.append(f"| {m} | {preset} | {backend} | {th.get('0.01', float('nan')):.4g} | "
                             f"{th.get('0.05', float('nan')):.4g} | {tau} | {r.get('nfe_per_slice')} | "
                             f"{volumes_cell(r)} | {r.get('n_voxels'):,} |")
    return lines


def volumes_cell(record: dict) -> str:
    """How many healthy volumes a calibration record used, and acquired how."""
    n, geom = record.get("n_volumes"), record.get("geometry")
    if geom == "acquired":
        return f"{n} acquired like clinical scans (1.5-4 mm slices, every orientation)"
    if record.get("spacing_mm") is not None:  # axial records carry their spacing
        return f"{n} at {record['spacing_mm']:g} mm axial"
    return f"{n}"


def update_card_thresholds(entry: dict, card: Path) -> None:
    """Replace the generated part of a card's '## Thresholds' section by ``threshold_section``.

    The generated part is the heading, its paragraph and the first table; notes written after that table
    (up to the next '## ') are kept.
    """
    text = card.read_text().splitlines()
    try:
        start = next(i for i, ln in enumerate(text) if ln.startswith("## Thresholds"))
    except StopIteration:  # appended after one blank line
        while text and not text[-1].strip():
            text.pop()
        text.append("")
        start = len(text)
    end = next((i for i in range(start + 1, len(text)) if text[i].startswith("## ")), len(text))
    table = next((i for i in range(start, end) if text[i].startswith("|")), end)
    generated_end = next((i for i in range(table, end) if not text[i].startswith("|")), end)
    notes = "\n".join(text[generated_end:end]).strip("\n").splitlines()
    new = text[:start] + threshold_section(entry) + [""] + (notes + [""] if notes else []) + text[end:]
    card.write_text("\n".join(new).rstrip() + "\n")


def _hardware() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return (f"{platform.machine()} CPU, 1 thread per training, 2-core machine shared by the bundled models' "
            f"trainings running side by side")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--id", required=True)
    ap.add_argument("--method", required=True, help="method whose objective trains the model")
    ap.add_argument("--contrast", default="T2")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--noise", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--finalize-only", action="store_true")
    ap.add_argument("--card-only", action="store_true",
                    help="re-run the sample evaluation and rewrite the card from models/ alone (no training, the "
                         "stored calibration and phantom results are kept)")
    ap.add_argument("--train-minutes", type=float, default=None, help="with --card-only: training wall time")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--run-dir", default=None,
                    help="the training run folder (default runs/<id>); with --finalize-only: export a run made "
                         "with 'uad train' (e.g. a fine-tune with --init), calibrate, evaluate and write the card")
    ap.add_argument("--weights", choices=("latest", "best"), default="latest",
                    help="with --finalize-only: the run's latest weights or those of its lowest validation loss "
                         "(best.safetensors)")
    ap.add_argument("--calibration-volumes", type=int, default=2)
    ap.add_argument("--calibration-geometry", choices=GEOMETRIES, default="axial",
                    help="the calibration's healthy phantoms: at 2 mm on the axial training grid (default) or "
                         "acquired like clinical scans (1.5-4 mm slices, every orientation; uad.calibration)")
    ap.add_argument("--phantoms-per-type", type=int, default=2,
                    help="held-out phantoms per lesion type for the card's table (default 2)")
    ap.add_argument("--calibrate-only", action="store_true",
                    help="re-calibrate the bundled model per method / preset / perceptual backend (no training)")
    ap.add_argument("--methods", default=None, help="with --calibrate-only: comma-separated methods")
    ap.add_argument("--presets", default=None, help="with --calibrate-only: comma-separated presets")
    ap.add_argument("--paper", action="store_true", help="with --calibrate-only: also the paper preset")
    ap.add_argument("--paper-volumes", type=int, default=1)
    ap.add_argument("--description", default="")
    args = ap.parse_args()

    run_dir = Path(args.run_dir).resolve() if args.run_dir else ROOT / "runs" / args.id
    t0 = time.time()
    if args.card_only:
        return rewrite_card(args)
    if args.calibrate_only:
        return calibrate_bundled(args)
    if not args.finalize_only:
        cfg = default_config(args.method, contrast=args.contrast, steps=args.steps, batch_size=args.batch_size,
                             image_size=args.image_size, noise=args.noise)
        train(cfg, run_dir, resume=args.resume, device=args.device)
    train_seconds = float((run_dir / "log.csv").read_text().strip().splitlines()[-1].split(",")[-1])

    models_dir = ROOT / "models"
    # every export starts from the run's model.json: pass everything added so far each time
    from uad.preprocess import normalisation_settings

    stored_cfg = json.loads((run_dir / "config.json").read_text())["model"]
    args.contrast = stored_cfg.get("contrast") or args.contrast  # a run knows its contrast
    extra_training = {"wall_seconds": train_seconds}
    extra = {"license": "Apache-2.0", "description": args.description, "card": f"{args.id}/README.md",
             "normalisation": normalisation_settings(stored_cfg.get("normalisation")),
             "training": extra_training}
    entry = export_run(run_dir, models_dir, args.id, extra, weights=args.weights)
    copy_curve(run_dir, models_dir / args.id)
    verify(find_model(args.id))
    model = load_model(find_model(args.id), device="cpu")
    methods = entry["methods"]
    from uad.calibration import calibrate, store

    cal_entry: dict = {}
    for m in methods:  # the default preset of every method, for the perceptual backend of this machine
        preset, backend, rec = calibrate(model, m, None, contrast=args.contrast,
                                         n_volumes=args.calibration_volumes, device=args.device,
                                         geometry=args.calibration_geometry)
        store(cal_entry, m, preset, backend, rec)
    calibration = cal_entry["calibration"]
    extra.update({"threshold": cal_entry["threshold"], "calibration": calibration})
    entry = export_run(run_dir, models_dir, args.id, extra, weights=args.weights)
    model = load_model(find_model(args.id), device="cpu")
    sample = evaluate_on_sample(model, methods, args.device) if args.contrast == "T2" else {}
    bench = evaluate_on_phantoms(model, methods, args.contrast, args.device, n=args.phantoms_per_type)
    extra["evaluation"] = {"sample": sample, "phantoms": bench}
    entry = export_run(run_dir, models_dir, args.id, extra, weights=args.weights)
    nparams = sum(count_parameters(n) for n in model.networks.values())
    write_card(entry, models_dir / args.id / "README.md",
               {"parameters": nparams, "hardware": _hardware(), "train_seconds": train_seconds, "calibration": calibration,
                "sample": sample, "phantoms": bench})
    print(f"bundled {args.id} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
