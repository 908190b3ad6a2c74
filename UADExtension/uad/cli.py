"""The ``uad`` command line.

    uad detect INPUT_OR_FOLDER... -o OUTDIR [--method NAME] [--model ID] [--device D] [--seed N] [--preset P]
               [--threshold X] [--batch-size B] [--param KEY=VALUE ...] [--brain-mask FILE ...] [--sample]
               [--overwrite] [--contrast C] [--threads N]
               (cohorts: summary.csv, exit 0 all ok / 3 some cases failed / 1 error; cases split under torchrun)
    uad methods
    uad models [list | info ID | verify [ID...] | import PATH [--id ID] | download ID... | remove ID...]
    uad models import-reference thor|autoddpm FILE [--id ID] [--noise N] [--input-range R]   (uad.reference)
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
#: Exit status of ``uad detect`` when some cases failed and others succeeded (see summary.csv).
EXIT_PARTIAL = 3
#: Bytes per input voxel the outputs take at most uncompressed (restoration, anomaly, mask, brain mask).
OUTPUT_BYTES_PER_VOXEL = 10


def _outputs(outdir: Path, stem: str) -> dict[str, Path]:
    d = {k: outdir / f"{stem}_{k}.nii.gz" for k in OUTPUT_KINDS}
    d["brainmask"] = outdir / f"{stem}_brainmask.nii.gz"  # the brain mask used (given, automatic or stripped)
    d["overview"] = outdir / f"{stem}_overview.png"
    return d


def _write_all(result, image, outputs: dict[str, Path], title: str, input_digest: str = "") -> None:
    """Write every output to temporary files, then rename them all; nothing half-written remains on error.

    Each file carries the marker ``uad-output <kind> <input sha256>`` (NIfTI descrip, PNG text) by
    which a later run recognises its own outputs; files get the mode the umask gives.
    """
    from .imageio import (_write_error, apply_umask, discard_temp, mark_png, output_marker, temp_path_like,
                          write_image)
    from .overview import write_overview

    outdir = next(iter(outputs.values())).parent
    tmps: dict[str, Path] = {}
    try:
        try:
            outdir.mkdir(parents=True, exist_ok=True)
            for kind in OUTPUT_KINDS:
                tmps[kind] = temp_path_like(outputs[kind])
                write_image(getattr(result, kind), tmps[kind], marker=output_marker(kind, input_digest))
            if "brainmask" in outputs and result.brain_mask is not None:
                tmps["brainmask"] = temp_path_like(outputs["brainmask"])
                write_image(result.brain_mask, tmps["brainmask"], marker=output_marker("brainmask", input_digest))
            tmps["overview"] = temp_path_like(outputs["overview"])
            write_overview(tmps["overview"], image, result.restoration, result.anomaly, result.mask,
                           brain_mask=result.brain_mask, title=title, threshold=result.info.get("threshold"))
            mark_png(tmps["overview"], output_marker("overview", input_digest))
            for tmp in tmps.values():
                apply_umask(tmp)
            for kind, tmp in tmps.items():
                os.replace(tmp, outputs[kind])
        except OSError as e:
            raise _write_error(Path(getattr(e, "filename", None) or outdir), e) from None
    finally:
        for tmp in tmps.values():
            discard_temp(tmp)


def _case_row(case, index: int, **kw) -> dict:
    row = {"_index": index, "case": case.stem, "input": str(case.path), "status": kw.pop("status", "ok")}
    row.update(kw)
    return row


class _SingleProcess:
    """The context of a run without torchrun (what ``training.distributed_env`` gives, without importing torch)."""

    rank, local_rank, world_size, enabled, is_main, owns_group = 0, 0, 1, False, True, False


def _distributed_context():
    if os.environ.get("WORLD_SIZE", "").strip() in ("", "1"):
        return _SingleProcess()
    from .training import distributed_env

    return distributed_env()


def _emit_json(event: str, **fields) -> None:
    """``--progress-format json``: one JSON object per stdout line (read by UADExtensionLib.runner)."""
    print(json.dumps({"event": event, **fields}, default=str), flush=True)


class _JsonWarnings:
    """While active, warnings logged by the engine (logger ``uad``) are also emitted as JSON events."""

    def __enter__(self):
        import logging

        class Handler(logging.Handler):
            def emit(self, record):
                _emit_json("warning", message=_one_line(record.getMessage()), source=record.name)

        self.handler = Handler(level=logging.WARNING)
        self.logger = logging.getLogger(__package__)
        self.logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)


def cmd_detect(args) -> int:
    if getattr(args, "progress_format", "bar") == "json":
        with _JsonWarnings():
            return _cmd_detect(args, json_events=True)
    return _cmd_detect(args)


def _cmd_detect(args, json_events: bool = False) -> int:
    import time

    import numpy as np

    from .cohort import SUMMARY_NAME, Case, check_outputs, expand_inputs, gather_rows, write_summary
    from .imageio import (check_writable, plausibility_warnings, read_image,
                          remove_temporaries_on_signal, sample_paths, sha256_file, validate, validate_mask)
    from .pipeline import (build, check_params, check_threshold, configure_threads, describe_device, detect,
                           method_class, method_key, resolve_device, resolve_model)

    ctx = _distributed_context()
    say = print if ctx.is_main else (lambda *a, **k: None)
    # 1. the cases: files, folders (expanded; masks and this tool's outputs skipped), the sample
    cases, skipped = expand_inputs(args.inputs)
    for f, why in skipped:
        say(f"skipped {f}: {why}")
    lesion_path = None
    if args.sample:
        sample = sample_paths()
        cases.insert(0, Case(sample["image"], sample.get("brain_mask") if not cases and not args.brain_mask
                             else None))
        lesion_path = sample.get("lesion")
    if not cases:
        raise InputError("no input image given (pass INPUT files or folders, or --sample)" if not skipped else
                         f"no input image found ({len(skipped)} file(s) skipped: {skipped[0][0]}: {skipped[0][1]}"
                         f"{', ...' if len(skipped) > 1 else ''})")
    masks = [Path(p) for p in (args.brain_mask or [])]
    if masks:
        if len(masks) != len(cases):
            raise InputError(f"give one --brain-mask per input ({len(cases)} input(s), {len(masks)} mask(s))")
        for c, m in zip(cases, masks):
            c.mask = m
    stems = [c.stem for c in cases]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise InputError(f"several inputs have the same name stem ({', '.join(dup)}); their outputs would collide")
    params = parse_params(args.param)
    name = method_key(args.method) if args.method is not None else None  # None: chosen per case (contrast)
    if name is not None:
        method_class(name)
        check_params(name, params)
    threshold = check_threshold(args.threshold) if args.threshold is not None else None
    outdir = Path(args.output)
    if outdir.exists() and not outdir.is_dir():
        raise InputError(f"{outdir}: exists and is not a folder")
    # 2. outputs never replace a file that is not this tool's output of the same input (before any computing)
    check_outputs(cases, outdir, lambda c: _outputs(outdir, c.stem), overwrite=args.overwrite)

    # 3. validate every input (and mask) before processing any; in a cohort a bad case is an error row
    # a cohort (several inputs, a folder, torchrun) reports failing cases in summary.csv and goes on
    single = len(cases) == 1 and not ctx.enabled and not any(Path(x).is_dir() for x in args.inputs)
    errors: dict[int, str] = {}
    choices: dict[int, tuple] = {}  # case -> (method, model id, preset)
    contrasts: dict[int, tuple] = {}  # case -> its contrast, resolved once (uad.selection.resolve_contrast)
    voxels = 0
    from .selection import resolve_contrast

    for i, c in enumerate(cases):
        try:
            img = read_image(c.path)
            validate(img, name=str(c.path))
            mimg = None
            if c.mask is not None:
                mimg = read_image(c.mask)
                validate_mask(mimg, img, name=str(c.mask))
            voxels = max(voxels, int(np.prod(img.GetSize(), dtype=np.int64)))
            contrasts[i] = resolve_contrast(args.contrast, img, c.path, mimg)
            choices[i] = _choose_method(args, name, img, c.path, mimg, say, contrasts[i])
            del img, mimg
        except UADError as e:
            if single:
                raise
            errors[i] = _one_line(e)
    if len(errors) == len(cases):
        first = next(iter(errors.values()))
        raise InputError(f"{first}" + (f" (and all {len(cases) - 1} other input(s) failed too)"
                                       if len(cases) > 1 else ""))
    # 4. the output folder takes files and has room for the largest case's outputs (uncompressed; cases are
    # written one after the other, and a disk that fills up later fails that case with one line)
    check_writable(outdir, voxels * OUTPUT_BYTES_PER_VOXEL + 2**20)

    # 5. device, threads, the model and the method (errors before any work)
    if ctx.enabled:
        from .training import setup_distributed

        ctx, dev = setup_distributed(args.device)
    else:
        dev = resolve_device(args.device, log=None if json_events else print)  # json: a warning event
    local = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size if ctx.enabled else 1) or 1)
    configure_threads(args.threads, processes=local)
    from .precision import precision_dtype

    precision_dtype(dev, getattr(args, "precision", "fp32"))  # e.g. fp16 where torch cannot: refused before any work
    where = f"rank {ctx.rank}: " if ctx.enabled else ""
    print(f"{where}device: {describe_device(dev)}" + (" (picked by --device auto)" if args.device == "auto"
                                                      else ""))
    models = {}
    for key in dict.fromkeys(choices.values()):
        meth_name, model_id, preset = key
        if (meth_name, model_id) not in models:
            models[(meth_name, model_id)] = resolve_model(model_id, meth_name, dev)
        check_params(meth_name, params)
        build(meth_name, models[(meth_name, model_id)], preset, params)

    from tqdm import tqdm

    from .overview import overview_title

    rows = []
    mine = [i for i in range(len(cases)) if i % ctx.world_size == ctx.rank]
    with remove_temporaries_on_signal():
        for i in mine:
            c = cases[i]
            p = c.path
            if i in errors:
                print(f"{p}: error: {errors[i]}")
                rows.append(_case_row(c, i, status="error", error=errors[i]))
                continue
            t_case = time.perf_counter()
            name, model_id, preset = choices[i]
            model = models[(name, model_id)]
            model_contrast = (model.config.get("contrast") or "").upper() or None
            try:
                image = read_image(p)
                bmask = read_image(c.mask) if c.mask is not None else None
                warnings = plausibility_warnings(image)
                scan_contrast, source = contrasts[i][:2]
                if model_contrast and scan_contrast and scan_contrast != model_contrast:
                    warnings.append(f"the model {model.id} is for {model_contrast} but the scan looks "
                                    f"{scan_contrast} ({source}); pick a {scan_contrast} model with --model")
                bar = tqdm(total=None, desc=p.name, unit="slice", disable=args.no_progress or json_events,
                           file=sys.stderr, dynamic_ncols=True)
                if json_events:
                    _emit_json("start", input=str(p), index=i, count=len(cases), method=name, device=str(dev))

                def progress(done, total, bar=bar, i=i):
                    if json_events:
                        _emit_json("progress", index=i, done=int(done), total=int(total))
                    if bar.total != total:
                        bar.total = total
                    bar.n = done
                    bar.refresh()

                try:
                    result = detect(image, method=name, model=model, device=dev, seed=args.seed,
                                    batch_size=args.batch_size, preset=preset, params=params,
                                    threshold=threshold, brain_mask=bmask, progress=progress, log=print,
                                    fpr=args.fpr, precision=getattr(args, "precision", "fp32"), contrast=scan_contrast if scan_contrast in CONTRASTS else None,
                                    skull_stripped=args.skull_stripped,
                                    bias_correction=(None if args.bias_correction == "auto"
                                                     else args.bias_correction == "yes"),
                                    preprocessing=_registration_override(getattr(args, "register", "profile")))
                finally:
                    bar.close()
                info = result.info
                outputs = _outputs(outdir, c.stem)
                title = overview_title(p.name, info)
                _write_all(result, image, outputs, title, c.digest or sha256_file(p))
            except (Cancelled, KeyboardInterrupt):
                raise
            except Exception as e:  # noqa: BLE001 - a failing case is reported and the others go on
                if single:
                    raise
                msg = _one_line(e) if isinstance(e, UADError) else f"{type(e).__name__}: {_one_line(e)}"
                print(f"{p}: error: {msg}")
                if json_events:
                    _emit_json("case_error", input=str(p), index=i, message=msg)
                rows.append(_case_row(c, i, status="error", method=name, model=model.id, error=msg,
                                      seconds=f"{time.perf_counter() - t_case:.2f}"))
                continue
            mask_arr = sitk_array(result.mask)
            voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
            anom = sitk_array(result.anomaly)
            rows.append(_case_row(c, i, method=info["method"], model=info["model"], preset=info["preset"],
                                  anomaly_volume_ml=f"{int(np.count_nonzero(mask_arr)) * voxel_ml:.4g}",
                                  max_score=f"{float(anom.max()) if anom.size else 0.0:.6g}",
                                  seconds=f"{info['seconds']:.2f}", error=""))
            print(f"{p}: {info['slices']} slices, {info['network_evaluations']} network evaluations, "
                  f"{info['seconds']:.1f} s on {info['device']}; threshold {info['threshold']:.4g} "
                  f"({info['threshold_source']}); perceptual backend {info.get('perceptual_backend', 'none')}")
            for w in warnings + list(info.get("warnings", [])) + list(info.get("preprocess", {}).get("warnings", [])):
                print(f"  warning: {w}")
                if json_events:
                    _emit_json("warning", message=_one_line(w), source="preprocess", index=i)
            if json_events:
                _emit_json("result", input=str(p), index=i, info=info,
                           outputs={k: str(v) for k, v in outputs.items()})
            for kind, path in outputs.items():
                print(f"  {kind:12s} {path}")
            if args.sample and i == 0 and lesion_path is not None:
                _score_sample(result, image, lesion_path)
            del image, result, anom, mask_arr

        # 6. the summary (rank 0, every rank's rows) and the exit status
        all_rows = gather_rows(rows, ctx)
        status = EXIT_ERROR
        if ctx.is_main:
            failed = sum(r["status"] != "ok" for r in all_rows)
            summary = outdir / SUMMARY_NAME
            if not single:
                write_summary(summary, all_rows)
            status = 0 if failed == 0 else (EXIT_PARTIAL if failed < len(all_rows) else EXIT_ERROR)
            if not single:
                print(f"summary: {summary} ({len(all_rows) - failed} ok, {failed} failed)")
            if failed:
                _error(f"{failed} of {len(all_rows)} case(s) failed; see {summary}")
        if ctx.enabled:
            import torch.distributed as dist

            box = [status]
            dist.broadcast_object_list(box, src=0)  # the other ranks wait until the summary is written
            dist.barrier()  # every rank has its copy before any tears the group down (gloo aborts otherwise)
            from .training import cleanup_distributed

            cleanup_distributed(ctx)
            # rank 0 carries the exit status: a failing status on another rank would make torchrun stop
            # rank 0 (SIGTERM) while it finishes
            if not ctx.is_main:
                return 0
    return status


CONTRASTS = ("T1", "T2", "FLAIR")


def _choose_method(args, name, image, path, brain_mask, say, contrast=None) -> tuple:
    """(method, model id, preset) for one case: the given ``--method``, else the method whose bundled
    model measured best for the case's contrast (``contrast``: its ``uad.selection.resolve_contrast`` resolution, made
    here when not given), printed with the reason."""
    if name is not None and args.model:
        return name, args.model, args.preset
    from .pipeline import method_key
    from .selection import default_choice, resolve_contrast
    from .zoo import find_model

    c, source, ctext = contrast if contrast is not None else resolve_contrast(args.contrast, image, path, brain_mask)
    if name is not None:  # the given method without --model: its model for the case's contrast
        return name, find_model(method=name, contrast=c if c in CONTRASTS else None).id, args.preset
    if c is None:  # the guess failed: its one-line reason
        raise InputError(f"{path}: {ctext}")
    if c not in CONTRASTS:
        raise InputError(f"{path}: no bundled model for contrast {c}; give --method and --model")
    try:
        choice, _ = default_choice(image, c, args.model, brain_mask)
    except ValueError as e:
        raise InputError(f"{path}: {_one_line(e)}") from None
    say(f"{path}: contrast {ctext}")
    say(f"{path}: method {choice.method} (model {choice.model}"
        f"{', preset ' + choice.preset if choice.preset and not args.preset else ''}): {choice.reason}")
    return method_key(choice.method), args.model or choice.model, args.preset or choice.preset


def sitk_array(img):
    import SimpleITK as sitk

    return sitk.GetArrayViewFromImage(img)


def _score_sample(result, image, lesion_path) -> None:
    from .imageio import read_image
    from .metrics import average_precision, best_dice

    lesion = read_image(lesion_path)
    brain = result.brain_mask
    if lesion.GetSize() != image.GetSize():
        print(f"  warning: the sample lesion mask {lesion_path.name} is not on the image grid; not scored")
        return
    ap = average_precision(result.anomaly, lesion, brain)
    bd, thr = best_dice(result.anomaly, lesion, brain, return_threshold=True)
    print(f"  sample lesion (within the brain): AP {ap:.3f}, best Dice {bd:.3f} at threshold {thr:.4g}")


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
    from .zoo import SUMMARY_HEADER, list_models, manifest_warnings, user_models_dir

    entries = list_models()
    for w in manifest_warnings():
        print(f"warning: {w}", file=sys.stderr)
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
                                   "<stem>_mask.nii.gz and <stem>_overview.png per input into OUTDIR, and "
                                   "summary.csv for several inputs. Exit status: 0 all cases ok, 1 error, "
                                   f"{EXIT_PARTIAL} some cases failed (see summary.csv). Under torchrun the cases "
                                   "are split across the processes.")
    d.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="3-D volumes (NIfTI, NRRD, MHA, ...) or folders of them (masks and uad outputs in a folder "
                        "are skipped; a folder's <stem>_brainmask file is the brain mask of <stem>)")
    d.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder (created if needed)")
    d.add_argument("--method", default=None,
                   help="method name (see 'uad methods'); default: the method whose bundled model measured best "
                        "on the held-out set for the input's contrast (printed with the reason)")
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
    d.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="precision of the networks: fp32 (default), or bf16 / fp16 autocast around the networks "
                        "only (samplers, noise and maps stay float32); fp16 on the CPU only where torch supports it")
    d.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="method parameter overriding the preset (repeatable)")
    d.add_argument("--brain-mask", action="append", default=None, metavar="FILE",
                   help="brain mask (one, or one per input); default: automatic (skull-stripped input)")
    d.add_argument("--skull-stripped", choices=("auto", "yes", "no"), default="auto",
                   help="is the input skull-stripped? auto (default): detected (masked background, brain-sized "
                        "foreground); if not, it is skull-stripped (deepbet for T1, MNI152 registration mask for "
                        "T2/FLAIR) unless --brain-mask is given")
    d.add_argument("--bias-correction", choices=("auto", "yes", "no"), default="auto",
                   help="N4 bias-field correction: auto (default: the model's profile; on for inputs that are "
                        "not skull-stripped), yes or no")
    d.add_argument("--register", choices=("profile", "auto", "yes", "no"), default="profile",
                   help="rigid + affine registration to the MNI152 template (inference in template space, results "
                        "back on the input grid): profile (default: the model's preprocessing profile), auto (for "
                        "inputs that are not skull-stripped), yes or no")
    d.add_argument("--sample", action="store_true",
                   help="run on the bundled sample and score the anomaly map against its lesion mask")
    d.add_argument("--overwrite", action="store_true",
                   help="replace existing files in OUTDIR even when they are not uad's outputs of the same input "
                        "(inputs and brain masks of the run are never replaced)")
    d.add_argument("--contrast", default=None, type=str.upper, choices=("T1", "T2", "FLAIR", "PD"),
                   help="the scans' contrast (default: from the image metadata / file name, else guessed from the "
                        "intensities, see uad.selection.guess_contrast); it chooses the default method, and a model "
                        "for another contrast gets a warning")
    d.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch (default: the cores this process may use, os.sched_getaffinity, "
                        "shared among torchrun processes, at most $OMP_NUM_THREADS)")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.add_argument("--progress-format", choices=("bar", "json"), default="bar",
                   help="bar (default): a progress bar on stderr; json: one JSON object per stdout line "
                        "(events start, progress, warning, result) for programs such as the Slicer module")
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
    from .reference import add_models_cli  # models import-reference (the authors' published checkpoints)

    add_models_cli(zs)

    for mod in ("phantoms", "training", "heldout", "evaluation", "benchmark"):
        full = f"{__package__}.{mod}"
        if importlib.util.find_spec(full) is not None:
            module = importlib.import_module(full)
            add = getattr(module, "add_cli", None)
            if callable(add):
                add(sub)
    return p


def _registration_override(choice: str):
    """``--register`` as a ``preprocessing`` override of the model's profile (None: the profile's own)."""
    return None if choice == "profile" else {"registration": {"auto": "auto", "yes": "mni152", "no": None}[choice]}


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
    except (UADError, OSError) as e:
        if isinstance(e, OSError) and getattr(e, "filename", None):
            _error(f"{e.filename}: {e.strerror}")
        else:
            _error(str(e))
        return EXIT_ERROR
    except BaseException as e:
        from .imageio import Terminated

        if not isinstance(e, Terminated):
            raise
        _error(f"terminated (signal {e.signum}); temporary files removed, finished outputs kept")
        return 128 + e.signum
    return 0 if rc is None else int(rc)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
