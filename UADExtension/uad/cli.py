"""The ``uad`` command line.

    uad detect INPUT... -o OUTDIR [--method NAME] [--model ID] [--device D] [--seed N] [--preset P]
               [--threshold X] [--batch-size B] [--param KEY=VALUE ...] [--brain-mask FILE ...] [--sample]
    uad methods
    uad models [list | info ID | verify [ID...] | import PATH [--id ID] | download ID... | remove ID...]
    uad phantoms OUTDIR ...        (uad.phantoms)
    uad train --method NAME -o RUN_DIR [--data DIR|phantoms] [--contrast C] [--config FILE] [--steps N]
              [--resume]           (uad.training; data-parallel under torchrun)

Other modules extend it: if ``uad.phantoms`` / ``uad.training`` define
``add_cli(subparsers)``, it is called with the ``argparse`` sub-parsers object;
each sub-command must ``set_defaults(func=handler)`` where ``handler(args)``
returns an exit status (None means 0).  ``uad.UADError`` raised by a handler is
printed as ``uad: error: <message>`` with exit status 1.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path

from . import Cancelled, InputError, UADError, __version__

EXIT_ERROR = 1
EXIT_CANCELLED = 130
OUTPUT_KINDS = ("restoration", "anomaly", "mask")


def _one_line(text) -> str:
    return " ".join(str(text).split())


def _error(msg: str) -> None:
    print(f"uad: error: {_one_line(msg)}", file=sys.stderr)


def parse_value(text: str):
    """``--param`` values: int, float, true/false, none/null, JSON lists/objects, else the string."""
    low = text.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    if text.strip()[:1] in "[{":
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass
    return text


def parse_params(items) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise UADError(f"--param expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        k = k.strip().replace("-", "_")
        if not k:
            raise UADError(f"--param expects KEY=VALUE, got {item!r}")
        out[k] = parse_value(v)
    return out


# -- detect ---------------------------------------------------------------------------------------
def _outputs(outdir: Path, stem: str) -> dict[str, Path]:
    d = {k: outdir / f"{stem}_{k}.nii.gz" for k in OUTPUT_KINDS}
    d["overview"] = outdir / f"{stem}_overview.png"
    return d


def _write_all(result, image, outputs: dict[str, Path], title: str) -> None:
    """Write every output to temporary files, then rename them all; nothing half-written remains on error."""
    from .imageio import temp_path_like, write_image
    from .overview import write_overview

    outdir = next(iter(outputs.values())).parent
    outdir.mkdir(parents=True, exist_ok=True)
    tmps: dict[str, Path] = {}
    try:
        for kind in OUTPUT_KINDS:
            tmps[kind] = temp_path_like(outputs[kind])
            write_image(getattr(result, kind), tmps[kind])
        tmps["overview"] = temp_path_like(outputs["overview"])
        write_overview(tmps["overview"], image, result.restoration, result.anomaly, result.mask,
                       brain_mask=result.brain_mask, title=title, threshold=result.info.get("threshold"))
        for kind, tmp in tmps.items():
            os.replace(tmp, outputs[kind])
    finally:
        for tmp in tmps.values():
            if tmp.exists():
                tmp.unlink()


def cmd_detect(args) -> int:
    from .imageio import read_image, sample_paths, stem, validate, validate_mask
    from .pipeline import build, detect, method_class, method_key, resolve_device, resolve_model

    inputs = [Path(p) for p in args.inputs]
    lesion_path = None
    masks = [Path(p) for p in (args.brain_mask or [])]
    if args.sample:
        sample = sample_paths()
        inputs.insert(0, sample["image"])
        lesion_path = sample.get("lesion")
        if not masks and "brain_mask" in sample and len(inputs) == 1:
            masks = [sample["brain_mask"]]
    if not inputs:
        raise InputError("no input image given (pass INPUT files or --sample)")
    if masks and len(masks) != len(inputs):
        raise InputError(f"give one --brain-mask per input ({len(inputs)} input(s), {len(masks)} mask(s))")
    stems = [stem(p) for p in inputs]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise InputError(f"several inputs have the same name stem ({', '.join(dup)}); their outputs would collide")
    params = parse_params(args.param)
    if args.method is not None:
        method_class(method_key(args.method))
    outdir = Path(args.output)
    if outdir.exists() and not outdir.is_dir():
        raise InputError(f"{outdir}: exists and is not a folder")

    # 1. validate every input (and mask) before processing any; without --method, choose per input
    choices = []
    for i, p in enumerate(inputs):
        img = read_image(p)
        validate(img, name=str(p))
        mimg = None
        if masks:
            mimg = read_image(masks[i])
            validate_mask(mimg, img, name=str(masks[i]))
        if args.method is None:
            from .selection import default_choice

            choice, ctext = default_choice(img, args.contrast, args.model, mimg)
            print(f"{p}: contrast {ctext}")
            print(f"{p}: method {choice.method} (model {choice.model}"
                  f"{', preset ' + choice.preset if choice.preset and not args.preset else ''}): {choice.reason}")
            choices.append((method_key(choice.method), args.model or choice.model, args.preset or choice.preset))
        else:
            choices.append((method_key(args.method), args.model, args.preset))
        del img
    # 2. the models and the methods (errors before any work)
    dev = resolve_device(args.device)
    models = {}
    for name, model_id, preset in choices:
        if (name, model_id) not in models:
            models[(name, model_id)] = resolve_model(model_id, name, dev)
        build(name, models[(name, model_id)], preset, params)

    from tqdm import tqdm

    from .overview import overview_title

    for i, p in enumerate(inputs):
        name, model_id, preset = choices[i]
        model = models[(name, model_id)]
        image = read_image(p)
        bmask = read_image(masks[i]) if masks else None
        bar = tqdm(total=None, desc=p.name, unit="slice", disable=args.no_progress, file=sys.stderr,
                   dynamic_ncols=True)

        def progress(done, total, bar=bar):
            if bar.total != total:
                bar.total = total
            bar.n = done
            bar.refresh()

        try:
            result = detect(image, method=name, model=model, device=dev, seed=args.seed,
                            batch_size=args.batch_size, preset=preset, params=params,
                            threshold=args.threshold, brain_mask=bmask, progress=progress, fpr=args.fpr)
        finally:
            bar.close()
        info = result.info
        outputs = _outputs(outdir, stems[i])
        title = overview_title(p.name, info)
        _write_all(result, image, outputs, title)
        print(f"{p}: {info['slices']} slices, {info['network_evaluations']} network evaluations, "
              f"{info['seconds']:.1f} s on {info['device']}; threshold {info['threshold']:.4g} "
              f"({info['threshold_source']}); perceptual backend {info.get('perceptual_backend', 'none')}")
        for w in info.get("warnings", []):
            print(f"  warning: {w}")
        for w in info.get("preprocess", {}).get("warnings", []):
            print(f"  warning: {w}")
        for kind, path in outputs.items():
            print(f"  {kind:12s} {path}")
        if args.sample and i == 0 and lesion_path is not None:
            from .metrics import average_precision, best_dice

            lesion = read_image(lesion_path)
            brain = result.brain_mask
            if lesion.GetSize() != image.GetSize():
                print(f"  warning: the sample lesion mask {lesion_path.name} is not on the image grid; not scored")
            else:
                ap = average_precision(result.anomaly, lesion, brain)
                bd, thr = best_dice(result.anomaly, lesion, brain, return_threshold=True)
                print(f"  sample lesion (within the brain): AP {ap:.3f}, best Dice {bd:.3f} "
                      f"at threshold {thr:.4g}")
        del image, result
    return 0


# -- methods / models ---------------------------------------------------------------------------
def cmd_methods(args) -> int:
    from .methods import available_methods, get_method_class

    for name in available_methods():
        d = get_method_class(name).describe()
        nfe = d.get("preset_nfe") or {}
        presets = ", ".join(p + ("*" if p == d["default_preset"] else "") + (f" ({nfe[p]} NFE)" if p in nfe else "")
                            for p in d["presets"])
        print(f"{name:12s} {d['title']}")
        print(f"{'':12s} presets: {presets}   networks: {', '.join(d['roles'])}")
        if args.verbose:
            print(f"{'':12s} reference: {d['reference']}")
            print(f"{'':12s} parameters: " + ", ".join(f"{k}={v!r}" for k, v in d["parameters"].items()))
    return 0


def cmd_models_list(args) -> int:
    from .zoo import SUMMARY_HEADER, list_models, user_models_dir

    entries = list_models()
    if not entries:
        print("no models found (train one with 'uad train', then 'uad models import RUN_DIR --id NAME')")
    else:
        print(SUMMARY_HEADER)
        for e in entries:
            print(e.summary())
    print(f"(user cache: {user_models_dir()})")
    return 0


def cmd_models_info(args) -> int:
    from .zoo import find_model

    e = find_model(args.id)
    w = e.weights_path
    print(f"id:        {e.id}")
    print(f"location:  {e.location} ({e.root})")
    print(f"weights:   {w}" + ("" if w.is_file() else ("  (not downloaded: run 'uad models download "
                                                         f"{e.id}')" if e.url else "  (missing)")))
    if e.url:
        print(f"url:       {e.url}")
    print("manifest entry:")
    print(json.dumps(e.data, indent=2, default=float))
    card = e.card_path
    if card is None:
        print("card:      none")
    elif not card.is_file():
        print(f"card:      {card} (missing)")
    else:
        print(f"card:      {card}")
        lines = card.read_text(errors="replace").splitlines()
        shown = lines if args.card else lines[:args.head]
        for line in shown:
            print(f"  | {line}")
        if len(shown) < len(lines):
            print(f"  | ... ({len(lines) - len(shown)} more lines; --card prints it all)")
    return 0


def cmd_models_verify(args) -> int:
    from .zoo import find_model, list_models, load_model, verify

    entries = [find_model(i) for i in args.ids] if args.ids else list_models()
    if not entries:
        print("no models found")
        return 0
    failed = 0
    skipped = 0
    for e in entries:
        if not args.ids and not e.available and e.url:  # remote entries are checked when downloaded
            skipped += 1
            print(f"skip    {e.id}: not downloaded (uad models download {e.id})")
            continue
        try:
            digest = verify(e)
            load_model(e)
            print(f"ok      {e.id}  sha256 {digest[:16]}...  ({e.location})")
        except UADError as err:
            failed += 1
            print(f"FAILED  {e.id}: {_one_line(err)}")
        except Exception as err:  # a model that cannot be built is a failed model, not a crash
            failed += 1
            print(f"FAILED  {e.id}: {type(err).__name__}: {_one_line(err)}")
    if failed:
        _error(f"{failed} of {len(entries) - skipped} model(s) failed verification")
        return EXIT_ERROR
    return 0


def cmd_models_import(args) -> int:
    """Copy models into the per-user model folder (checksums verified, weights loaded once)."""
    from .zoo import import_models

    entries = import_models(args.path, model_id=args.id, only=args.only, log=print)
    for e in entries:
        print(f"  use it with: uad detect INPUT --model {e.id} --method {(e.methods or ['?'])[0]} -o OUTDIR")
    return 0


def cmd_models_download(args) -> int:
    from .zoo import download_model

    for model_id in args.ids:
        download_model(model_id, force=args.force, progress=not args.no_progress, timeout=args.timeout,
                       log=print)
    return 0


def cmd_models_remove(args) -> int:
    from .zoo import remove_model

    for model_id in args.ids:
        remove_model(model_id, log=print)
    return 0


# -- parser -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="uad", description="Unsupervised anomaly detection in brain MRI "
                                                        "with diffusion models.")
    p.add_argument("--version", action="version", version=f"uad {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("detect", help="detect anomalies in volumes",
                       description="Writes <stem>_restoration.nii.gz, <stem>_anomaly.nii.gz, "
                                   "<stem>_mask.nii.gz and <stem>_overview.png per input into OUTDIR.")
    d.add_argument("inputs", nargs="*", metavar="INPUT", help="3-D volumes (NIfTI, NRRD, MHA, ...)")
    d.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder (created if needed)")
    d.add_argument("--method", default=None,
                   help="method name (see 'uad methods'); default: the method whose bundled model measured best "
                        "on the held-out set for the input's contrast (printed with the reason)")
    d.add_argument("--contrast", default=None, type=str.upper, choices=["T1", "T2", "FLAIR"],
                   help="input contrast for the default method (default: guessed from the image, see "
                        "uad.selection.guess_contrast)")
    d.add_argument("--model", default=None, metavar="ID", help="model id (default: the method's default model)")
    d.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    d.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    d.add_argument("--preset", default=None, help="method preset (default: the method's default)")
    d.add_argument("--threshold", type=float, default=None,
                   help="anomaly threshold for the mask (default: the model's threshold calibrated for the "
                        "method, preset and perceptual backend at --fpr)")
    d.add_argument("--fpr", type=float, default=None, metavar="RATE",
                   help="healthy false-positive rate of the calibrated threshold, a fraction of healthy brain "
                        "voxels (default 0.01; 0.05 as THOR and AutoDDPM calibrate)")
    d.add_argument("--batch-size", type=int, default=16, metavar="B", help="slices per batch (default 16)")
    d.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="method parameter overriding the preset (repeatable)")
    d.add_argument("--brain-mask", action="append", default=None, metavar="FILE",
                   help="brain mask (one, or one per input); default: automatic (skull-stripped input)")
    d.add_argument("--sample", action="store_true",
                   help="run on the bundled sample and score the anomaly map against its lesion mask")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(func=cmd_detect)

    m = sub.add_parser("methods", help="list the methods")
    m.add_argument("-v", "--verbose", action="store_true", help="also show references and parameters")
    m.set_defaults(func=cmd_methods)

    z = sub.add_parser("models", help="list, inspect, verify, import, download or remove models",
                       description="The model zoo: bundled models and the per-user cache ($UAD_CACHE_DIR or "
                                   "~/.cache/uad)/models. Without an action: list.")
    z.set_defaults(func=cmd_models_list)
    zs = z.add_subparsers(dest="models_command", metavar="ACTION")
    zs.add_parser("list", help="list the models (default)").set_defaults(func=cmd_models_list)
    zi = zs.add_parser("info", help="show a model's manifest entry and model card")
    zi.add_argument("id", metavar="ID")
    zi.add_argument("--card", action="store_true", help="print the whole model card")
    zi.add_argument("--head", type=int, default=15, metavar="N", help="card lines to show (default 15)")
    zi.set_defaults(func=cmd_models_info)
    zv = zs.add_parser("verify", help="check checksums and load every model (or the given ones)")
    zv.add_argument("ids", nargs="*", metavar="ID")
    zv.set_defaults(func=cmd_models_verify)
    zm = zs.add_parser("import", help="copy a model into the user cache: a training run folder, a model folder "
                                      "with manifest.json, or a .safetensors file with its .json entry beside it")
    zm.add_argument("path", metavar="PATH")
    zm.add_argument("--id", default=None, help="model id to give the imported model (default: its own id, "
                                               "or the run folder's / file's name)")
    zm.add_argument("--only", nargs="+", metavar="ID", help="import only these ids from a manifest")
    zm.set_defaults(func=cmd_models_import)
    zd = zs.add_parser("download", help="download models that have a url into the user cache (checksum verified)")
    zd.add_argument("ids", nargs="+", metavar="ID")
    zd.add_argument("--force", action="store_true", help="download again even if a valid copy is present")
    zd.add_argument("--timeout", type=float, default=None, metavar="S",
                    help="seconds without data before giving up (default 30, or $UAD_DOWNLOAD_TIMEOUT)")
    zd.add_argument("--no-progress", action="store_true", help="no progress bar")
    zd.set_defaults(func=cmd_models_download)
    zr = zs.add_parser("remove", help="remove user-cache models (folder and manifest entry)")
    zr.add_argument("ids", nargs="+", metavar="ID")
    zr.set_defaults(func=cmd_models_remove)

    for mod in ("phantoms", "training"):
        full = f"{__package__}.{mod}"
        if importlib.util.find_spec(full) is not None:
            module = importlib.import_module(full)
            add = getattr(module, "add_cli", None)
            if callable(add):
                add(sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    try:
        rc = args.func(args)
    except Cancelled as e:
        _error(str(e) or "cancelled")
        return EXIT_CANCELLED
    except KeyboardInterrupt:
        _error("cancelled (interrupted); nothing was written for the volume in progress")
        return EXIT_CANCELLED
    except RuntimeError as e:
        if "out of memory" not in str(e).lower():
            raise
        _error("the device ran out of memory; try a smaller --batch-size or --device cpu")
        return EXIT_ERROR
    except (UADError, FileNotFoundError, IsADirectoryError, PermissionError) as e:
        if isinstance(e, OSError) and getattr(e, "filename", None):
            _error(f"{e.filename}: {e.strerror}")
        else:
            _error(str(e))
        return EXIT_ERROR
    return 0 if rc is None else int(rc)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
