#!/usr/bin/env python
"""Re-bundle a model of models/ from a training run that continued it (``uad train --init ID`` or ``--resume``).

    python scripts/rebundle.py backfill --id ID DIR...          # before prep: tag the replaced weights' report rows
    python scripts/rebundle.py prep --id ID --run-dir RUN [--weights best|latest] [--threads N] [--note TEXT]
    python scripts/train_bundled.py --id ID --method M --calibrate-only [--presets ...]   # then calibrate
    uad benchmark --heldout DIR --contrasts C --methods ... --presets default -o NEW      # and measure
    python scripts/rebundle.py card --id ID --new NEW --old OLD [--old METHOD=DIR ...]

    python scripts/rebundle.py new --id NEW_ID --run-dir RUN [--before ID] [--methods a,b] [--weights ...]
    (calibrate, measure)
    python scripts/rebundle.py card --id NEW_ID --new NEW --old OTHER_REPORT --compare-model ID

``backfill`` writes the bundled weights' sha256 into the rows of committed benchmark reports that measured
model ID without recording which weights (reports older than ``model_sha256``), so that once the weights are
replaced ``scripts/update_cards.py`` drops those rows instead of showing them under the new weights.

``prep`` copies the run's weights (``best.safetensors``: the lowest validation loss, or ``model.safetensors``)
and learning curve into models/ID/ and rebuilds the manifest entry from the run's model.json, keeping the
entry's id, licence, card, normalisation, preprocessing profile, description and methods; it records the
training (steps, validation loss, the run's steps, wall time, threads) and what it replaces (sha256, steps, note),
and drops the replaced weights' calibration, thresholds and evaluation, which belong to other weights.

``card`` rewrites the model card's sha256 line, its Thresholds and Learning curve sections and a "Compared with
the weights it replaces" table (tumour / stroke / MS AP, best Dice, Dice at the calibrated threshold, healthy
false positives and CPU seconds per volume, old -> new) from two benchmark reports, and drops the card's
stale "Held-out phantom test set" section.

``new`` bundles a run as a model of its own beside the existing ones (a simplex-noise DDPM beside the Gaussian
one): the weights, the learning curve, an entry with the licence, card, normalisation, description and training
record, placed before ``--before`` in the manifest (so that ``uad benchmark`` measures it; once measured, ``uad
detect`` takes whichever of the two measured better as the default model of a method and contrast), a card
with its header, training and learning-curve sections, and its files in ``MODULE_MODELS`` of
UADExtension/CMakeLists.txt (what the Slicer extension installs; when ``--models`` is the repository's
models/); ``card --compare-model ID`` then compares it with that model's rows instead of replaced weights.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "UADExtension"))
sys.path.insert(0, str(ROOT / "scripts"))

METRICS = (("tumour", "{:.3f}"), ("stroke", "{:.3f}"), ("ms", "{:.3f}"), ("best_dice", "{:.3f}"),
           ("dice_calibrated", "{:.3f}"), ("healthy_fp_percent", "{:.2f}"), ("clock_seconds_per_volume", "{:.0f}"))
HEADER = ("| method | preset | tumour AP | stroke AP | MS AP | best Dice | Dice@cal | healthy FP % | CPU s/volume |",
          "|---|---|---|---|---|---|---|---|---|")


def _entry(models_dir: Path, model_id: str) -> dict:
    data = json.loads((models_dir / "manifest.json").read_text())
    for e in data["models"]:
        if e.get("id") == model_id:
            return e
    raise SystemExit(f"{model_id}: not in {models_dir / 'manifest.json'}")


def _write_report(path: Path, rep: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rep, indent=1) + "\n")
    tmp.replace(path)


def backfill(model_id: str, sha: str, report_dirs: list[Path]) -> int:
    """Record ``sha`` as ``model_sha256`` in every row of model ``model_id`` that has none; returns rows changed."""
    changed = 0
    for d in report_dirs:
        p = d / "benchmark.json" if d.is_dir() else d
        rep = json.loads(p.read_text())
        n = 0
        for row in rep.get("results", []):
            if row.get("model") == model_id and not row.get("model_sha256"):
                row["model_sha256"] = sha
                n += 1
        if n:
            _write_report(p, rep)
        changed += n
    return changed


def _training_record(st: dict, weights: str, threads: int | None) -> dict:
    """What an export records of the run (its state.json): steps of the exported weights, the run's steps, wall
    time, threads, and the validation loss of best weights (``export_run`` adds its own "exported" note for them)."""
    tr = {"run_steps": int(st["step"]), "wall_seconds": round(float(st.get("seconds", 0.0)), 1)}
    if weights == "best":
        tr.update({"steps": int(st["best_step"]), "best_val_loss": float(st["best_val"])})
    else:
        tr.update({"steps": int(st["step"]), "exported": "latest weights"})
    if threads:
        tr["threads"] = int(threads)
    return tr


def prep(model_id: str, run_dir: Path, models_dir: Path, weights: str = "best", threads: int | None = None,
         note: str = "", description: str | None = None) -> dict:
    """Install the run's weights as model ``model_id`` (see the module docstring); returns the new entry.

    ``uad.training.export_run`` copies the weights and rebuilds the entry from the run's model.json where the old
    entry stood; this adds what a re-bundle keeps (licence, card, normalisation, preprocessing profile, description,
    methods) and records (what it replaces, wall time, threads), and drops what belonged to the replaced weights."""
    from train_bundled import update_entry_in_place
    from uad.training import export_run
    from uad.zoo import sha256_file

    old = _entry(models_dir, model_id)
    st = json.loads((run_dir / "state.json").read_text())
    src = run_dir / ("best.safetensors" if weights == "best" else "model.safetensors")
    if not src.is_file():
        raise SystemExit(f"{src}: missing (a run validates and keeps its best weights since stop 27)")
    if sha256_file(src) == old.get("sha256"):
        raise SystemExit(f"{model_id}: the run's {src.name} is the bundled file already")
    old_tr = old.get("training") or {}
    replaces = {"sha256": old.get("sha256"), "steps": old_tr.get("steps")}
    if note:
        replaces["note"] = note
    tr = dict(_training_record(st, weights, threads), replaces=replaces)
    # what the bundled entry says beyond the run: its licence, card, normalisation, preprocessing profile,
    # description and the methods it serves (a run's model.json can list fewer: 'rebundle.py new --methods' widens
    # a bundled entry's)
    keep = {k: old[k] for k in ("license", "card", "normalisation", "preprocessing", "description", "methods")
            if k in old}
    if description:
        keep["description"] = description
    export_run(run_dir, models_dir, model_id, extra={"training": tr}, weights=weights)

    def change(e: dict) -> None:
        for k in ("threshold", "calibration", "evaluation"):  # the replaced weights' (or none)
            e.pop(k, None)
        e.update(keep)

    e = update_entry_in_place(model_id, change, models_dir=models_dir)
    for name in ("curve.csv", "curve.png"):
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, models_dir / model_id / name)
    return e


def new(model_id: str, run_dir: Path, models_dir: Path, weights: str = "best", before: str | None = None,
        methods: list[str] | None = None, description: str = "", threads: int | None = None,
        cmake: Path | None = None) -> dict:
    """Bundle a run as a new model ``model_id``: weights, curve, entry (placed before ``before`` in the manifest, so
    that ``uad benchmark`` measures it where both serve a method and contrast; ``uad.zoo.find_model`` then takes
    the better measured as the default), a card with its header and training section, and its files listed in
    ``cmake``'s MODULE_MODELS (default: UADExtension/CMakeLists.txt when models_dir is the repository's models/;
    see the module docstring)."""
    from train_bundled import card_header, curve_section, training_details
    from uad.networks import count_parameters
    from uad.preprocess import normalisation_settings
    from uad.training import export_run
    from uad.zoo import build_model, load_weights

    ids = {x.get("id") for x in json.loads((models_dir / "manifest.json").read_text())["models"]}
    if model_id in ids:
        raise SystemExit(f"{model_id}: already in {models_dir / 'manifest.json'} (re-bundle it with 'prep')")
    if before is not None and before not in ids:
        raise SystemExit(f"{before}: not in {models_dir / 'manifest.json'}")
    st = json.loads((run_dir / "state.json").read_text())
    cfg = json.loads((run_dir / "config.json").read_text())
    tr = _training_record(st, weights, threads)
    extra = {"license": "Apache-2.0", "card": f"{model_id}/README.md", "description": description,
             "normalisation": normalisation_settings((cfg.get("model") or {}).get("normalisation")), "training": tr}
    if methods:
        extra["methods"] = list(methods)
    e = export_run(run_dir, models_dir, model_id, extra=extra, weights=weights, before=before)
    for name in ("curve.csv", "curve.png"):
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, models_dir / model_id / name)
    model = build_model(e, load_weights(models_dir / model_id / "model.safetensors"), model_id)
    n_params = sum(count_parameters(n) for n in model.networks.values())
    t = e["training"]
    minutes = float(t.get("wall_seconds") or 0.0) / 60.0
    lines = [*card_header(e, n_params), "",
             "## Training", "",
             f"Trained with `uad train` on {t.get('data')} (healthy phantoms built from the MNI152 2009a template shipped "
             f"by nilearn: random affine + elastic deformation, randomised tissue intensities, bias field, Rician "
             f"noise); run `{_rel(run_dir)}`, {t.get('run_steps'):,} steps, batch {t.get('batch_size')}, lr {t.get('lr')}, "
             f"seed {t.get('seed')}; these weights: "
             + (f"the run's lowest validation loss ({t['best_val_loss']:.4f}) at step {t['steps']:,}" if weights == "best"
                else f"its latest step ({t['steps']:,})")
             + f". CPU, {t.get('threads') or 1} thread(s), {minutes:.0f} min. This is the small CPU configuration, "
             "not the paper's network: expect lower accuracy than a GPU-trained paper-size model.",
             *training_details(t, e), ""]
    lines += curve_section(models_dir / model_id)
    (models_dir / model_id / "README.md").write_text("\n".join(lines).rstrip("\n") + "\n")
    if cmake is None and models_dir.resolve() == (ROOT / "models").resolve():
        cmake = ROOT / "UADExtension" / "CMakeLists.txt"
    if cmake is not None:
        register_module_files(model_id, models_dir, cmake, before)
    return e


MODEL_FILES = ("README.md", "curve.csv", "curve.png", "model.safetensors")


def register_module_files(model_id: str, models_dir: Path, cmake: Path, before: str | None = None) -> list[str]:
    """Add ``model_id``'s files (those of MODEL_FILES present in models_dir/model_id) to the MODULE_MODELS list of
    ``cmake`` (the extension installs only what is listed there): before ``before``'s first line, else at the end
    of the list. Lines already listed are kept once. Returns the lines added."""
    lines = cmake.read_text().split("\n")
    try:
        start = next(i for i, x in enumerate(lines) if x.strip() == "set(MODULE_MODELS")
        end = next(i for i in range(start + 1, len(lines)) if lines[i].strip() == ")")
    except StopIteration:
        raise SystemExit(f"{cmake}: no MODULE_MODELS list") from None
    listed = {x.strip() for x in lines[start + 1:end]}
    new_lines = [f"{model_id}/{n}" for n in MODEL_FILES if (models_dir / model_id / n).is_file()]
    new_lines = [x for x in new_lines if x not in listed]
    at = end
    if before is not None:
        at = next((i for i in range(start + 1, end) if lines[i].strip().startswith(f"{before}/")), end)
    indent = next((x[:len(x) - len(x.lstrip())] for x in lines[start + 1:end] if x.strip()), "  ")
    lines[at:at] = [indent + x for x in new_lines]
    if new_lines:
        cmake.write_text("\n".join(lines))
    return new_lines


def _row(rep: dict, method: str, model_id: str, sha: str | None) -> dict | None:
    for r in rep.get("results", []):
        if r.get("method") == method and r.get("status") == "ok" and r.get("model") == model_id:
            if sha is None or r.get("model_sha256") in (None, sha):
                return r
    return None


def compare_lines(model_id: str, entry: dict, new_dir: Path, old_dirs: dict, other: str | None = None,
                  other_sha: str | None = None) -> list[str]:
    """The card section comparing the replaced weights' held-out rows with the new ones (old -> new), or, with
    ``other`` (a model id; ``other_sha`` its weights), another model's rows with this model's."""
    from uad.heldout_table import load_report

    new = load_report(new_dir)
    rep_sha = other_sha if other else (entry.get("training") or {}).get("replaces", {}).get("sha256")
    floor = next((r for r in new["results"] if r.get("method") == "intensity-floor"), None)
    contrast = entry.get("contrast")
    title = (f"## Compared with `{other}`" + (f" (sha256 `{str(rep_sha)[:12]}...`)" if rep_sha else "") if other
             else f"## Compared with the weights it replaces (sha256 `{str(rep_sha)[:12]}...`)")
    lines = [title, "",
             f"The whole held-out {contrast} set, default presets, each weight set with its own calibration"
             + (f"; floor = the intensity threshold (tumour / stroke / MS AP {floor['tumour']:.3f} / "
                f"{floor['stroke']:.3f} / {floor['ms']:.3f})" if floor else "")
             + f". These weights: `{_rel(new_dir)}/`; " + (f"`{other}`: " if other else "the replaced ones: ")
             + ", ".join(sorted({f"`{_rel(p)}/`" for p in old_dirs.values()}))
             + f". Each cell: {'`' + other + '` -> this model' if other else 'old -> new'}.", "",
             *HEADER]
    n_rows = 0
    for m in entry.get("methods", []):
        old_dir = old_dirs.get(m, old_dirs.get("*"))
        o = _row(load_report(old_dir), m, other or model_id, rep_sha) if old_dir is not None else None
        n = _row(new, m, model_id, entry.get("sha256"))
        if o is None or n is None:
            continue
        cells = [" -> ".join(f.format(float(x[k])) if x.get(k) is not None else "-" for x in (o, n)) for k, f in METRICS]
        lines.append(f"| {m} | {n.get('preset')} | " + " | ".join(cells) + " |")
        n_rows += 1
    if not n_rows:
        raise SystemExit(f"{model_id}: no method has a row in both reports (new {new_dir}, old {old_dirs})")
    return lines


def _rel(p: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


def replace_section(text: str, title: str, new_lines: list[str], after: str | None = None) -> str:
    """Replace the card's ``## title`` section by ``new_lines`` (drop it if empty; else insert before ``after``)."""
    lines = text.split("\n")
    heads = [i for i, line in enumerate(lines) if line.startswith("## ")]
    hit = [h for h in heads if lines[h].startswith("## " + title)]
    if not hit:
        if not new_lines:
            return text
        at = next((h for h in heads if after and lines[h].startswith("## " + after)), len(lines))
        return "\n".join(lines[:at] + new_lines + [""] + lines[at:])
    i = hit[0]
    j = next((h for h in heads if h > i), len(lines))
    return "\n".join(lines[:i] + (new_lines + [""] if new_lines else []) + lines[j:])


def card(model_id: str, models_dir: Path, new_dir: Path, old_dirs: dict, other: str | None = None) -> Path:
    """Rewrite the card's sha256, thresholds, learning curve and comparison (with ``other``: against that model)."""
    from train_bundled import curve_section, threshold_section

    e = _entry(models_dir, model_id)
    path = models_dir / model_id / "README.md"
    text = path.read_text()
    text = "\n".join(f"- **sha256**: `{e['sha256']}`" if line.startswith("- **sha256**") else line
                     for line in text.split("\n"))
    text = replace_section(text, "Thresholds", threshold_section(e))
    text = replace_section(text, "Held-out phantom test set", [])
    curve = curve_section(models_dir / model_id)[1:]
    if curve:
        text = replace_section(text, "Learning curve", curve, after="Held-out benchmark")
    if other:
        other_sha = _entry(models_dir, other).get("sha256")
        text = replace_section(text, f"Compared with `{other}`",
                               compare_lines(model_id, e, new_dir, old_dirs, other, other_sha), after="Held-out benchmark")
    else:
        text = replace_section(text, "Compared with the weights it replaces", compare_lines(model_id, e, new_dir, old_dirs),
                               after="Held-out benchmark")
    path.write_text(text.rstrip("\n") + "\n")
    return path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("backfill", help="tag the bundled weights' untagged report rows with their sha256")
    b.add_argument("--id", required=True)
    b.add_argument("--models", default=str(ROOT / "models"))
    b.add_argument("reports", nargs="+")
    p = sub.add_parser("prep", help="install a run's weights as the model (entry rebuilt, calibration dropped)")
    p.add_argument("--id", required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--models", default=str(ROOT / "models"))
    p.add_argument("--weights", choices=("best", "latest"), default="best")
    p.add_argument("--threads", type=int, default=None, help="torch threads the run trained with (for the card)")
    p.add_argument("--note", default="", help="what the replaced weights were (recorded under training.replaces)")
    p.add_argument("--description", default=None)
    n = sub.add_parser("new", help="bundle a run as a new model (entry before --before, card header and training)")
    n.add_argument("--id", required=True)
    n.add_argument("--run-dir", required=True)
    n.add_argument("--models", default=str(ROOT / "models"))
    n.add_argument("--weights", choices=("best", "latest"), default="best")
    n.add_argument("--before", default=None,
                   help="place the entry before this model's (the one uad benchmark measures where both serve)")
    n.add_argument("--methods", default=None, help="comma-separated methods the model serves (default: the run's)")
    n.add_argument("--threads", type=int, default=None, help="torch threads the run trained with (for the card)")
    n.add_argument("--description", default="")
    c = sub.add_parser("card", help="rewrite the card's sha256, thresholds, learning curve and comparison")
    c.add_argument("--id", required=True)
    c.add_argument("--models", default=str(ROOT / "models"))
    c.add_argument("--new", required=True, help="benchmark folder of the new weights")
    c.add_argument("--old", action="append", required=True,
                   help="benchmark folder of the replaced weights, or METHOD=DIR (repeatable)")
    c.add_argument("--compare-model", default=None,
                   help="compare with this other model's rows in the --old reports (a new model against the one it "
                        "stands beside) instead of the replaced weights")
    a = ap.parse_args(argv)
    models = Path(a.models).resolve()
    if a.cmd == "backfill":
        sha = _entry(models, a.id)["sha256"]
        n = backfill(a.id, sha, [Path(x) for x in a.reports])
        print(f"{a.id}: {n} row(s) tagged with sha256 {sha[:12]}...")
    elif a.cmd == "prep":
        e = prep(a.id, Path(a.run_dir).resolve(), models, a.weights, a.threads, a.note, a.description)
        tr = e["training"]
        print(f"{a.id}: step {tr['steps']} of {tr['run_steps']} ({tr['exported']}), sha256 {e['sha256'][:12]}...; "
              f"calibrate next: python scripts/train_bundled.py --id {a.id} --method {e['methods'][0]} "
              f"--calibrate-only [--presets ...]")
    elif a.cmd == "new":
        e = new(a.id, Path(a.run_dir).resolve(), models, a.weights, a.before,
                a.methods.split(",") if a.methods else None, a.description, a.threads)
        print(f"{a.id}: new entry, step {e['training']['steps']} of {e['training']['run_steps']}, sha256 "
              f"{e['sha256'][:12]}...; calibrate next: python scripts/train_bundled.py --id {a.id} --method "
              f"{e['methods'][0]} --calibrate-only [--presets ...]")
    else:
        old = {}
        for x in a.old:
            m, _, d = x.partition("=") if "=" in x.split("/")[0] else ("*", "", x)
            old[m] = Path(d)
        print(card(a.id, models, Path(a.new), old, a.compare_model))


if __name__ == "__main__":
    main()
