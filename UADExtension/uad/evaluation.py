"""Evaluation on labelled cases: per-case and pooled AP / AUROC / best Dice, and the
intensity-threshold baseline every model must beat.

The field reports both pooled and per-volume numbers (see the evaluation notes
in docs); both are computed here, over brain voxels only (background excluded,
so a method gets no credit for the empty space around the head).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from .metrics import auroc, average_precision, best_dice


@dataclass
class Case:
    name: str
    image: sitk.Image
    lesion: sitk.Image
    brain_mask: sitk.Image
    lesion_type: str = ""


def _normalise(arr: np.ndarray, brain: np.ndarray, lower: float = 1.0, upper: float = 99.0) -> np.ndarray:
    lo, hi = np.percentile(arr[brain], [lower, upper])
    return np.clip((arr - lo) / max(hi - lo, 1e-6), 0, 1)


class IntensityBaseline:
    """Flag voxels whose (brain-normalised) intensity is rare in healthy brains.

    ``fit`` builds a histogram of normalised intensities over the brain voxels
    of healthy volumes; the score of a voxel is -log of the healthy density at
    its intensity.  Hyper- and hypo-intense lesions both score high where their
    intensity is uncommon in healthy tissue; a lesion as bright as CSF in T2
    does not — which is exactly why a learned model of healthy anatomy is needed.
    """

    def __init__(self, bins: int = 64):
        self.bins = bins
        self.log_density: np.ndarray | None = None

    def fit(self, images: list[sitk.Image], brain_masks: list[sitk.Image]) -> "IntensityBaseline":
        hist = np.zeros(self.bins)
        for img, bm in zip(images, brain_masks):
            a = sitk.GetArrayFromImage(img).astype(np.float32)
            b = sitk.GetArrayFromImage(bm) > 0
            v = _normalise(a, b)[b]
            hist += np.histogram(v, bins=self.bins, range=(0, 1))[0]
        p = (hist + 1.0) / (hist.sum() + self.bins)
        self.log_density = np.log(p)
        return self

    def score(self, image: sitk.Image, brain_mask: sitk.Image) -> sitk.Image:
        if self.log_density is None:
            raise RuntimeError("IntensityBaseline.fit must be called first")
        a = sitk.GetArrayFromImage(image).astype(np.float32)
        b = sitk.GetArrayFromImage(brain_mask) > 0
        idx = np.clip((_normalise(a, b) * self.bins).astype(int), 0, self.bins - 1)
        s = np.where(b, -self.log_density[idx], 0.0).astype(np.float32)
        out = sitk.GetImageFromArray(s)
        out.CopyInformation(image)
        return out


def score_case(anomaly: sitk.Image, case: Case) -> dict:
    a = sitk.GetArrayFromImage(anomaly)
    y = sitk.GetArrayFromImage(case.lesion) > 0
    b = sitk.GetArrayFromImage(case.brain_mask) > 0
    return {"case": case.name, "lesion_type": case.lesion_type, "ap": average_precision(a, y, mask=b),
            "auroc": auroc(a, y, mask=b), "best_dice": best_dice(a, y, mask=b),
            "prevalence": float(y[b].mean())}


def pooled(anomalies: list[sitk.Image], cases: list[Case]) -> dict:
    """AP / best Dice over the brain voxels of all cases pooled (per-case maps scaled as they are)."""
    a = np.concatenate([sitk.GetArrayFromImage(x)[sitk.GetArrayFromImage(c.brain_mask) > 0] for x, c in zip(anomalies, cases)])
    y = np.concatenate([(sitk.GetArrayFromImage(c.lesion) > 0)[sitk.GetArrayFromImage(c.brain_mask) > 0] for c in cases])
    return {"ap": average_precision(a, y), "best_dice": best_dice(a, y), "prevalence": float(y.mean())}


def evaluate_method(cases: list[Case], method: str, model=None, preset: str | None = None, device: str = "auto",
                    seed: int = 0, params: dict | None = None) -> dict:
    """Run ``method`` on every case; per-case scores, their mean, pooled scores, seconds per volume."""
    from .pipeline import detect

    rows, maps, secs, nfe = [], [], [], None
    for c in cases:
        t0 = time.time()
        res = detect(c.image, method=method, model=model, device=device, seed=seed, preset=preset, params=params,
                     brain_mask=c.brain_mask)
        secs.append(time.time() - t0)
        nfe = res.info.get("nfe_per_slice")
        maps.append(res.anomaly)
        rows.append(score_case(res.anomaly, c))
    return {"method": method, "cases": rows, "mean_ap": float(np.mean([r["ap"] for r in rows])),
            "mean_best_dice": float(np.mean([r["best_dice"] for r in rows])), "pooled": pooled(maps, cases),
            "seconds_per_volume": float(np.mean(secs)), "nfe_per_slice": nfe}


def evaluate_baseline(cases: list[Case], baseline: IntensityBaseline) -> dict:
    maps = [baseline.score(c.image, c.brain_mask) for c in cases]
    rows = [score_case(m, c) for m, c in zip(maps, cases)]
    return {"method": "intensity-baseline", "cases": rows, "mean_ap": float(np.mean([r["ap"] for r in rows])),
            "mean_best_dice": float(np.mean([r["best_dice"] for r in rows])), "pooled": pooled(maps, cases)}


def phantom_cases(lesion_types=("tumour", "stroke", "ms"), n_per_type: int = 2, contrast: str = "T2",
                  seed: int = 3_000_000, spacing: float | None = 2.0) -> list[Case]:
    """A held-out labelled test set of phantoms (seeds far from training and calibration seeds)."""
    from .phantoms import make_phantom

    cases = []
    for li, lt in enumerate(lesion_types):
        for i in range(n_per_type):
            s = seed + 1000 * li + i
            ph = make_phantom(s, contrast=contrast, lesion=lt, spacing=spacing)
            cases.append(Case(f"{contrast}-{lt}-{s}", ph.image, ph.lesion_mask, ph.brain_mask, lt))
    return cases


def healthy_reference(contrast: str = "T2", n: int = 3, seed: int = 4_000_000, spacing: float | None = 2.0):
    from .phantoms import make_phantom

    phs = [make_phantom(seed + i, contrast=contrast, lesion="none", spacing=spacing) for i in range(n)]
    return [p.image for p in phs], [p.brain_mask for p in phs]


# ----------------------------------------------------------------------------- evaluate folders
#: Lesion size strata (lesion volume per case, ml): [lo, hi)
SIZE_BINS = (("small (<1 ml)", 0.0, 1.0), ("medium (1-10 ml)", 1.0, 10.0), ("large (>=10 ml)", 10.0, math.inf))
_PRED_SUFFIXES = ("_anomaly", "_heatmap", "_pred", "_score", "")
_GT_SUFFIXES = ("_lesion", "_seg", "_mask", "_label", "_gt", "")
_BRAIN_SUFFIXES = ("_brainmask", "_brain_mask", "_brain", "")
_LESION_WORDS = ("tumour", "tumor", "stroke", "ms", "healthy")


def postprocess_volume(scores: np.ndarray, brain: np.ndarray, median: int = 0, erode: int = 0) -> np.ndarray:
    """The literature's map post-processing on a (K, J, I) volume: ``erode`` iterations of 3-D brain-mask
    erosion (6-connected; scores zeroed outside the eroded mask), then a ``median`` x ``median`` x ``median``
    median filter inside the brain.  Returns a new float32 array."""
    from scipy import ndimage

    out = np.where(brain, np.asarray(scores, np.float32), 0.0).astype(np.float32)
    m = brain
    if erode > 0:
        m = ndimage.binary_erosion(brain, structure=ndimage.generate_binary_structure(3, 1), iterations=int(erode))
        out *= m
    if median > 1:
        out = ndimage.median_filter(out, size=int(median), mode="constant", cval=0.0) * m
    return out.astype(np.float32)


def remove_small_components(binary: np.ndarray, min_size: int) -> np.ndarray:
    """Drop 26-connected components smaller than ``min_size`` voxels."""
    from scipy import ndimage

    if min_size <= 1 or not binary.any():
        return binary
    lab, _ = ndimage.label(binary, structure=np.ones((3, 3, 3), bool))
    keep = np.bincount(lab.ravel()) >= int(min_size)
    keep[0] = False
    return keep[lab]


def _size_bin(ml: float) -> str:
    for name, lo, hi in SIZE_BINS:
        if lo <= ml < hi:
            return name
    return SIZE_BINS[-1][0]


def _guess_lesion_type(name: str) -> str:
    """The lesion type named in a case name (``..._stroke_...`` -> stroke), else ""."""
    import re

    for tok in re.split(r"[_\-.\s]+", name.lower()):
        if tok in _LESION_WORDS:
            return {"tumor": "tumour", "healthy": "none"}.get(tok, tok)
    return ""


def evaluate_arrays(items: list[dict], fpr: float = 0.01, threshold: float | None = None, median: int = 0,
                    erode: int = 0, min_component: int = 0, healthy: list[dict] | None = None) -> dict:
    """Evaluate anomaly maps against lesion masks over brain voxels.

    ``items``: dicts with ``name``, ``scores``, ``lesion``, ``brain`` (arrays of one
    shape) and optional ``lesion_type`` / ``voxel_ml``.  Items whose lesion mask is
    empty are healthy: with no explicit ``threshold`` they calibrate it (the
    threshold at which a fraction ``fpr`` of their brain voxels is flagged); with
    one given they report their false-positive volume.  ``healthy`` adds more such
    items.  Returns ``{"pooled", "per_volume", "by_lesion_type", "by_size",
    "healthy", "threshold", ...}``.
    """
    from .metrics import dice_at, pr_stats, threshold_at_fpr

    def prep(it):
        b = np.asarray(it["brain"]) > 0
        s = postprocess_volume(it["scores"], b, median, erode) if (median > 1 or erode > 0) else \
            np.where(b, np.asarray(it["scores"], np.float32), 0.0).astype(np.float32)
        y = (np.asarray(it["lesion"]) > 0) & b
        return s, y, b

    lesioned, normal = [], []
    for it in list(items) + list(healthy or []):
        s, y, b = prep(it)
        if s.shape != y.shape or s.shape != b.shape:
            raise ValueError(f"{it.get('name')}: scores {s.shape}, lesion {y.shape} and brain {b.shape} differ")
        if not b.any():
            raise ValueError(f"{it.get('name')}: the brain mask is empty")
        rec = dict(it, scores=s, lesion=y, brain=b)
        (lesioned if y.any() else normal).append(rec)
    if not lesioned:
        raise ValueError("no case with a lesion to evaluate (every lesion mask is empty)")

    if threshold is not None:
        thr, thr_source = float(threshold), "given"
    elif normal:
        thr = threshold_at_fpr([r["scores"][r["brain"]] for r in normal], fpr)
        thr_source = f"calibrated: {100 * fpr:g}% of the brain voxels of {len(normal)} healthy volume(s) above it"
    else:
        thr, thr_source = None, "none (no healthy volume and no --threshold)"

    def binarise(s, b, t):
        p = (s > t) & b
        return remove_small_components(p, min_component) if min_component > 1 else p

    def dice_bin(p, y):
        den = int(p.sum()) + int(y.sum())
        return 1.0 if den == 0 else 2.0 * int((p & y).sum()) / den

    pooled_s = np.concatenate([r["scores"][r["brain"]] for r in lesioned])
    pooled_y = np.concatenate([r["lesion"][r["brain"]] for r in lesioned])
    pooled = pr_stats(pooled_s, pooled_y)
    pooled["prevalence"] = float(pooled_y.mean())
    oracle = pooled["best_dice_threshold"]
    del pooled_s, pooled_y

    rows = []
    for r in lesioned:
        st = pr_stats(r["scores"], r["lesion"], r["brain"])
        vml = float(r.get("voxel_ml") or 0.0)
        n_les = int(r["lesion"].sum())
        row = {"case": r["name"], "lesion_type": r.get("lesion_type") or _guess_lesion_type(r["name"]),
               "lesion_voxels": n_les, "lesion_ml": round(n_les * vml, 4) if vml else None,
               "prevalence": n_les / int(r["brain"].sum()), "ap": st["ap"], "auroc": st["auroc"],
               "best_dice": st["best_dice"],
               "dice_oracle": dice_bin(binarise(r["scores"], r["brain"], oracle), r["lesion"])
               if math.isfinite(oracle) else 0.0,
               "dice_calibrated": dice_bin(binarise(r["scores"], r["brain"], thr), r["lesion"])
               if thr is not None else None}
        row["size_bin"] = _size_bin(row["lesion_ml"]) if row["lesion_ml"] is not None else ""
        rows.append(row)

    if thr is not None:
        tp = sum(int((binarise(r["scores"], r["brain"], thr) & r["lesion"]).sum()) for r in lesioned)
        npred = sum(int(binarise(r["scores"], r["brain"], thr).sum()) for r in lesioned)
        npos = sum(int(r["lesion"].sum()) for r in lesioned)
        pooled["dice_calibrated"] = 2.0 * tp / max(npred + npos, 1)
    pooled["dice_oracle"] = pooled["best_dice"]

    def summary(sel):
        if not sel:
            return {}
        names = {x["case"] for x in sel}
        sub = [r for r in lesioned if r["name"] in names]
        ps = np.concatenate([r["scores"][r["brain"]] for r in sub])
        py = np.concatenate([r["lesion"][r["brain"]] for r in sub])
        pst = pr_stats(ps, py)
        out = {"n": len(sel), "pooled_ap": pst["ap"], "pooled_best_dice": pst["best_dice"],
               "prevalence": float(py.mean())}
        for k in ("ap", "auroc", "best_dice", "dice_oracle", "dice_calibrated"):
            v = [x[k] for x in sel if x[k] is not None and not (isinstance(x[k], float) and math.isnan(x[k]))]
            out[f"mean_{k}"] = float(np.mean(v)) if v else None
        return out

    by_type = {lt: summary([r for r in rows if r["lesion_type"] == lt])
               for lt in sorted({r["lesion_type"] for r in rows})}
    by_size = {name: summary([r for r in rows if r["size_bin"] == name]) for name, _, _ in SIZE_BINS
               if any(r["size_bin"] == name for r in rows)}
    healthy_rows = []
    if threshold is not None:
        for r in normal:
            p = binarise(r["scores"], r["brain"], thr)
            vml = float(r.get("voxel_ml") or 0.0)
            healthy_rows.append({"case": r["name"], "fp_fraction": float(p.sum() / r["brain"].sum()),
                                 "fp_ml": round(int(p.sum()) * vml, 3) if vml else None})
    return {"threshold": thr, "threshold_source": thr_source, "oracle_threshold": oracle, "fpr_target": fpr,
            "postprocess": {"median": int(median), "erode": int(erode), "min_component": int(min_component)},
            "pooled": pooled, "mean": summary(rows), "per_volume": rows, "by_lesion_type": by_type,
            "by_size": by_size, "healthy": healthy_rows, "n_lesion_volumes": len(lesioned),
            "n_healthy_volumes": len(normal)}


def _index_folder(folder: Path, suffixes) -> dict:
    from .imageio import IMAGE_SUFFIXES, stem

    out: dict = {}
    for p in sorted(folder.iterdir()):
        if not p.is_file() or not any(p.name.lower().endswith(s) for s in IMAGE_SUFFIXES):
            continue
        st = stem(p)
        for suf in suffixes:  # longest match first; "" last
            if suf and st.endswith(suf):
                out.setdefault(("s", st[: -len(suf)], suf), p)
        out.setdefault(("s", st, ""), p)
    return out


def _lookup(index: dict, key: str, suffixes) -> Path | None:
    for suf in suffixes:
        p = index.get(("s", key, suf))
        if p is not None:
            return p
    return None


def match_files(pred_dir, gt_dir, brain_dir=None) -> list[dict]:
    """Pair ``<case>_anomaly.*`` (or ``<case>.*``) in ``pred_dir`` with ``<case>_lesion.*`` (or ``_seg``,
    ``_label``, ``_gt``, ``_mask``) in ``gt_dir`` and a brain mask ``<case>_brainmask.*`` in ``brain_dir`` (default: ``gt_dir``).
    A prediction without a lesion file is an error; cases without a prediction are listed as missing."""
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    brain_dir = Path(brain_dir) if brain_dir else gt_dir
    for d, what in ((pred_dir, "prediction"), (gt_dir, "ground-truth"), (brain_dir, "brain-mask")):
        if not d.is_dir():
            raise ValueError(f"{what} folder {d} does not exist")
    gt_idx = _index_folder(gt_dir, _GT_SUFFIXES + _BRAIN_SUFFIXES)
    br_idx = _index_folder(brain_dir, _BRAIN_SUFFIXES)
    pairs = []
    cases = sorted({k[1] for k in _index_folder(pred_dir, _PRED_SUFFIXES) if k[2] in ("_anomaly", "_heatmap",
                                                                                         "_pred", "_score")})
    pred_idx = _index_folder(pred_dir, _PRED_SUFFIXES)
    if not cases:  # bare names
        cases = sorted({k[1] for k in pred_idx if k[2] == ""})
    for c in cases:
        pred = _lookup(pred_idx, c, ("_anomaly", "_heatmap", "_pred", "_score", ""))
        gt = _lookup(gt_idx, c, ("_lesion", "_seg", "_label", "_gt", "_mask"))
        if gt is None:
            continue  # e.g. the restoration / mask files that uad detect writes beside the anomaly map
        brain = _lookup(br_idx, c, ("_brainmask", "_brain_mask", "_brain"))
        pairs.append({"case": c, "pred": pred, "lesion": gt, "brain": brain})
    if not pairs:
        raise ValueError(f"no prediction in {pred_dir} has a lesion mask in {gt_dir} "
                         f"(expected <case>_anomaly.nii.gz and <case>_lesion.nii.gz)")
    return pairs


def _manifest_types(gt_dir: Path) -> dict:
    import json

    p = gt_dir / "heldout.json"
    if p.is_file():
        try:
            return {r["case"]: r["lesion"] for r in json.loads(p.read_text())["cases"]}
        except (ValueError, KeyError, TypeError):
            return {}
    return {}


def evaluate_dirs(pred_dir, gt_dir, brain_dir=None, **kw) -> dict:
    """``evaluate_arrays`` on the files of two folders (see ``match_files``); the brain mask defaults to the
    whole volume when no brain-mask file is found (then the result says so)."""
    from .imageio import read_image

    pairs = match_files(pred_dir, gt_dir, brain_dir)
    types = _manifest_types(Path(gt_dir))
    items, no_brain = [], []
    for p in pairs:
        pred = read_image(p["pred"])
        les = read_image(p["lesion"])
        a = sitk.GetArrayFromImage(pred).astype(np.float32)
        y = sitk.GetArrayFromImage(les)
        if a.shape != y.shape:
            raise ValueError(f"{p['case']}: prediction {p['pred'].name} {a.shape[::-1]} and lesion "
                             f"{p['lesion'].name} {y.shape[::-1]} have different sizes")
        if p["brain"] is not None:
            b = sitk.GetArrayFromImage(read_image(p["brain"])) > 0
            if b.shape != a.shape:
                raise ValueError(f"{p['case']}: brain mask {p['brain'].name} has another size than the prediction")
        else:
            b = np.ones(a.shape, bool)
            no_brain.append(p["case"])
        lt = types.get(p["case"], "") or _guess_lesion_type(p["case"])
        items.append({"name": p["case"], "scores": a, "lesion": y, "brain": b, "lesion_type": lt,
                      "voxel_ml": float(np.prod(pred.GetSpacing())) / 1000.0})
    res = evaluate_arrays(items, **kw)
    res["pred_dir"], res["gt_dir"] = str(pred_dir), str(gt_dir)
    res["cases_without_brain_mask"] = no_brain
    return res


_CSV_COLS = ["case", "lesion_type", "lesion_voxels", "lesion_ml", "size_bin", "prevalence", "ap", "auroc",
             "best_dice", "dice_oracle", "dice_calibrated"]


def write_evaluation(res: dict, outdir) -> dict:
    """``evaluation.json`` and ``evaluation.csv`` (one row per lesion volume, then POOLED / MEAN rows)."""
    import csv
    import json

    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "evaluation.json", "csv": out / "evaluation.csv"}
    paths["json"].write_text(json.dumps(res, indent=1, default=_json_default))
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=_CSV_COLS, extrasaction="ignore")
        w.writeheader()
        for r in res["per_volume"]:
            w.writerow(r)
        p = res["pooled"]
        w.writerow({"case": "POOLED", "prevalence": p["prevalence"], "ap": p["ap"], "auroc": p["auroc"],
                    "best_dice": p["best_dice"], "dice_oracle": p["dice_oracle"],
                    "dice_calibrated": p.get("dice_calibrated")})
        m = res["mean"]
        w.writerow({"case": "MEAN", "ap": m.get("mean_ap"), "auroc": m.get("mean_auroc"),
                    "best_dice": m.get("mean_best_dice"), "dice_oracle": m.get("mean_dice_oracle"),
                    "dice_calibrated": m.get("mean_dice_calibrated")})
    return paths


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _fmt(v, nd=3):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def _cli_evaluate(args) -> int:
    from . import UADError

    try:
        res = evaluate_dirs(args.pred_dir, args.gt_dir, args.brain_masks, fpr=args.fpr, threshold=args.threshold,
                            median=args.median, erode=args.erode, min_component=args.min_component)
    except ValueError as e:
        raise UADError(" ".join(str(e).split())) from None
    p, m = res["pooled"], res["mean"]
    print(f"{res['n_lesion_volumes']} lesion volume(s), {res['n_healthy_volumes']} healthy; threshold "
          f"{_fmt(res['threshold'], 4)} ({res['threshold_source']})")
    if res["cases_without_brain_mask"]:
        print(f"warning: no brain mask for {len(res['cases_without_brain_mask'])} case(s): all voxels used")
    for r in res["per_volume"]:
        print(f"  {r['case']:40s} {r['lesion_type'] or '-':7s} AP {_fmt(r['ap'])}  AUROC {_fmt(r['auroc'])}  "
              f"best Dice {_fmt(r['best_dice'])}  Dice@cal {_fmt(r['dice_calibrated'])}")
    for name, d in list(res["by_lesion_type"].items()) + list(res["by_size"].items()):
        print(f"  [{name or '?'}] n={d['n']}: pooled AP {_fmt(d['pooled_ap'])}, mean AP {_fmt(d['mean_ap'])}, "
              f"mean best Dice {_fmt(d['mean_best_dice'])}")
    print(f"mean per volume: AP {_fmt(m.get('mean_ap'))}, best Dice {_fmt(m.get('mean_best_dice'))}, "
          f"Dice@calibrated {_fmt(m.get('mean_dice_calibrated'))}")
    print(f"pooled AP {_fmt(p['ap'], 4)}  (AUROC {_fmt(p['auroc'])}, best Dice {_fmt(p['best_dice'])} at "
          f"{_fmt(res['oracle_threshold'], 4)}, Dice@calibrated {_fmt(p.get('dice_calibrated'))}, "
          f"prevalence {_fmt(p['prevalence'], 4)})")
    if args.output:
        paths = write_evaluation(res, args.output)
        print(f"wrote {paths['json']} and {paths['csv']}")
    return 0


def add_cli(subparsers) -> None:
    """Register ``uad evaluate PRED_DIR GT_DIR [--brain-masks DIR] [-o OUT]``."""
    p = subparsers.add_parser(
        "evaluate", help="score anomaly maps against lesion masks (AP, AUROC, best Dice, calibrated Dice)",
        description="Pixel-level evaluation over brain voxels: AP (scikit-learn's step-wise definition) pooled "
                    "over all volumes and per volume, AUROC, best Dice (closed form from the PR curve) and the "
                    "Dice at a threshold calibrated on the healthy volumes (empty lesion masks) or given, "
                    "stratified by lesion type and size. Predictions: <case>_anomaly.nii.gz (as 'uad detect' "
                    "writes them) or <case>.nii.gz; ground truth: <case>_lesion.nii.gz (or _seg, _mask); brain "
                    "masks: <case>_brainmask.nii.gz in --brain-masks or GT_DIR.")
    p.add_argument("pred_dir", help="folder of anomaly maps")
    p.add_argument("gt_dir", help="folder of lesion masks (and brain masks); empty masks = healthy volumes")
    p.add_argument("--brain-masks", default=None, metavar="DIR", help="folder of brain masks (default: GT_DIR)")
    p.add_argument("-o", "--output", default=None, metavar="OUT", help="write evaluation.json / evaluation.csv here")
    p.add_argument("--fpr", type=float, default=0.01,
                   help="healthy false-positive rate of the calibrated threshold (default 0.01)")
    p.add_argument("--threshold", type=float, default=None, help="use this threshold instead of calibrating")
    p.add_argument("--median", type=int, default=0, help="3-D median filter size applied to the maps (e.g. 5)")
    p.add_argument("--erode", type=int, default=0, help="brain-mask erosion iterations (e.g. 3)")
    p.add_argument("--min-component", type=int, default=0,
                   help="remove connected components smaller than this (voxels) from thresholded masks")
    p.set_defaults(func=_cli_evaluate)
