"""The held-out table of the README and of every model card, written from a ``uad benchmark`` run.

    python scripts/update_cards.py BENCH_DIR [--models models/] [--readme README.md]

One row per contrast, method, preset and lesion type: mean per-volume AP on the held-out
set next to the intensity floor's and the lesion prevalence, AP / floor, best Dice (oracle
threshold), Dice at the calibrated threshold, the healthy false-positive percentage (of the
healthy volumes' brain voxels at that threshold), NFE per slice, seconds per volume, the
number of volumes the row used, and whether the row beats the floor and reaches twice it.
Issue 7's target is spelled out under the table for the default presets: beat the floor on
tumour and stroke for T2 and FLAIR, with at least twice the floor on T2 tumour and T2 stroke.

The table goes between ``<!-- heldout-table:begin -->`` and ``<!-- heldout-table:end -->``:
text outside the markers is never changed, a second run with the same ``benchmark.json``
changes nothing, a card without markers gets the section appended, and a file with
unbalanced markers is refused (nothing is written).  Files are replaced atomically.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from .calibration import other_model

BEGIN = "<!-- heldout-table:begin -->"
END = "<!-- heldout-table:end -->"
LESIONS = ("tumour", "stroke", "ms")
#: issue 7: (contrast, lesion) where the default preset must beat the floor, and where it must reach 2x
TARGET_BEAT = {("T2", "tumour"), ("T2", "stroke"), ("FLAIR", "tumour"), ("FLAIR", "stroke")}
TARGET_TWICE = {("T2", "tumour"), ("T2", "stroke")}
CARD_HEADING = "## Held-out benchmark"


def load_report(path) -> dict:
    """``benchmark.json`` of a benchmark folder (or the file itself)."""
    p = Path(path)
    if p.is_dir():
        p = p / "benchmark.json"
    if not p.is_file():
        raise ValueError(f"{p} does not exist (give a 'uad benchmark -o DIR' folder or its benchmark.json)")
    try:
        rep = json.loads(p.read_text())
    except ValueError as e:
        raise ValueError(f"{p} is not valid JSON ({e})") from None
    if not isinstance(rep, dict) or not isinstance(rep.get("results"), list):
        raise ValueError(f"{p} is not a uad benchmark report (no 'results' list)")
    return rep


def _as_reports(report) -> list[dict]:
    """One report or a list of them, as a list."""
    return list(report) if isinstance(report, (list, tuple)) else [report]


def manifest_entries(models_dir) -> list[dict]:
    """The entries of ``models_dir/manifest.json`` (``ValueError`` when it does not exist)."""
    man = Path(models_dir) / "manifest.json"
    if not man.is_file():
        raise ValueError(f"{man} does not exist")
    return json.loads(man.read_text()).get("models") or []


def card_path(models_dir, entry: dict) -> Path | None:
    """The entry's model card when it names one that exists inside ``models_dir`` (else None)."""
    card = entry.get("card")
    if not card:
        return None
    path = (Path(models_dir) / card).resolve()
    return path if Path(models_dir).resolve() in path.parents and path.is_file() else None


def current_weights(report, entries) -> tuple:
    """``report`` (one or a list) without the rows measured with weights a model no longer has.

    A result row records the sha256 of the weights it ran (``model_sha256``); when a manifest entry of the
    same id now carries other weights (the model was retrained and re-bundled), that row measured a model
    that is no longer shipped and is left out of cards, README and ``evaluation.heldout``; so is a row whose
    recorded intensity normalisation (``model_normalisation``) differs from the entry's today (its
    ``normalisation`` was changed since, e.g. ``clip_max``), and one whose recorded preprocessing profile
    (``model_preprocessing``) differs from the entry's.  Rows without a recorded sha256, normalisation or profile
    (older reports) and rows of models not in ``entries`` are kept.  Returns
    ``(report or list of reports, [(model id, run index, method, preset), ...] left out)``; the input is not
    changed."""
    by_id = {e.get("id"): e for e in entries}
    single = not isinstance(report, (list, tuple))
    out, dropped = [], []
    for i, rep in enumerate(_as_reports(report), 1):
        keep = []
        for r in rep.get("results") or []:
            e = by_id.get(r.get("model"))
            if e is not None and other_model(r, e, "model_"):
                dropped.append((r.get("model"), i, r.get("method"), r.get("preset")))
                continue
            keep.append(r)
        out.append(dict(rep, results=keep))
    return (out[0] if single else out), dropped


def _num(v):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _lesion_stats(r: dict, lt: str) -> dict:
    """AP, Dice, prevalence, n of one lesion type in a result row (older reports: AP and prevalence only)."""
    d = dict((r.get("by_lesion") or {}).get(lt) or {})
    d.setdefault("ap", r.get(lt))
    d.setdefault("prevalence", (r.get("prevalence") or {}).get(lt))
    if d.get("n") is None:
        d["n"] = (r.get("volumes") or {}).get(lt)
    return d


def earlier_definition(row: dict) -> bool:
    """Whether a result row was measured under another definition of its preset than the method's today
    (the row's ``preset_values`` differ from ``Method.preset_values``): such a row is shown as such and not
    judged, or selected, as the default.  Rows without the record (older reports) count as current."""
    from .calibration import other_definition

    return row.get("method") != "intensity-floor" and other_definition(row, row.get("method"), row.get("preset"))


def table_rows(report: dict, model_ids=None) -> list[dict]:
    """One dict per (contrast, method, preset, lesion type) with a measured AP (``model_ids``: only rows of
    those models).  The floor of the same contrast and lesion type is in ``floor_ap``."""
    floors = {r["contrast"]: r for r in report["results"]
              if r.get("method") == "intensity-floor" and r.get("status") == "ok"}
    cpu = not str(report.get("device", "cpu")).startswith("cuda")
    out = []
    for r in report["results"]:
        if r.get("status") != "ok" or r.get("method") == "intensity-floor":
            continue
        if model_ids is not None and r.get("model") not in model_ids:
            continue
        fl = floors.get(r["contrast"])
        for lt in LESIONS:
            d = _lesion_stats(r, lt)
            ap = _num(d.get("ap"))
            if ap is None:
                continue
            f_ap = _num(_lesion_stats(fl, lt).get("ap")) if fl else None
            secs = r.get("clock_seconds_per_volume") if cpu and r.get("clock_seconds_per_volume") is not None \
                else r.get("seconds_per_volume")
            earlier = earlier_definition(r)
            out.append({
                "contrast": r["contrast"], "lesion": lt, "method": r["method"], "preset": r["preset"],
                "model": r.get("model"), "earlier_definition": earlier,
                "default": None if r.get("default_preset") is None else
                (r["preset"] == r["default_preset"] and not earlier),
                "n": d.get("n"), "n_healthy": r.get("n_healthy", (r.get("volumes") or {}).get("healthy")),
                "ap": ap, "floor_ap": f_ap, "prevalence": _num(d.get("prevalence")),
                "ratio": ap / f_ap if f_ap else None,
                "best_dice": _num(d.get("best_dice")), "dice_calibrated": _num(d.get("dice_calibrated")),
                "healthy_fp_percent": _num(r.get("healthy_fp_percent")),
                "threshold_source": r.get("threshold_source", ""),
                "nfe_per_slice": r.get("nfe_per_slice"), "seconds_per_volume": _num(secs),
                "beats_floor": None if f_ap is None else ap > f_ap,
                "twice_floor": None if f_ap is None else ap >= 2.0 * f_ap,
            })
    return out


def _f(v, nd=3):
    return "-" if v is None else f"{v:.{nd}f}"


def _yn(v):
    return "-" if v is None else ("yes" if v else "**no**")


def header(report: dict) -> str:
    cpu = not str(report.get("device", "cpu")).startswith("cuda")
    subset = "quick subset" if report.get("quick") else "held-out set"
    if report.get("max_volumes"):
        subset += f", at most {report['max_volumes']} volume(s) per lesion type and {report['max_volumes']} healthy"
    if report.get("partial"):
        subset += (f", interrupted after {report['partial']['units_done']} of {report['partial']['units']} "
                   f"units (the rows here are those measured)")
    cmd = report.get("command") or "command not recorded in benchmark.json"
    jobs = report.get("jobs") or 1
    return (f"Measured {report.get('date_utc', '?')} on {report.get('hardware', '?')} (device "
            f"{report.get('device', '?')}, {jobs} worker process(es), batch {report.get('batch_size', '?')}, "
            f"{report.get('precision', 'fp32')}), {subset}, with `{cmd}`. AP = mean per-volume average precision "
            f"over brain voxels; floor = the intensity threshold (`uad.evaluation.IntensityBaseline`); "
            f"prevalence = lesion voxels / brain voxels; best Dice at the oracle threshold; Dice@cal and healthy "
            f"FP % (flagged share of the healthy volumes' brain voxels) at the model's calibrated threshold "
            f"(\"-\" where the model has none); s/volume = "
            f"{'process CPU seconds' if cpu else 'wall seconds'} per volume; volumes = lesion volumes of the row "
            f"/ healthy volumes.")


def merged_rows(reports: list[dict], model_ids=None) -> list[dict]:
    """Rows of several runs (each against the floor of its own run), in run order; a (contrast, method,
    preset, model) measured by a later run replaces that of an earlier one.  ``run`` = 1-based run index."""
    order, by_key = [], {}
    for i, rep in enumerate(reports, 1):
        rows = table_rows(rep, model_ids)
        keys = list(dict.fromkeys((r["contrast"], r["method"], r["preset"], r["model"]) for r in rows))
        for k in keys:  # in the run's row order (deterministic)
            if k not in by_key:
                order.append(k)
            by_key[k] = [dict(r, run=i) for r in rows if (r["contrast"], r["method"], r["preset"], r["model"]) == k]
    return [r for k in order for r in by_key[k]]


def markdown_table(rows: list[dict]) -> str:
    runs = any(r.get("run") for r in rows)
    lines = ["| contrast | lesion | method | preset | model | " + ("run | " if runs else "")
             + "volumes | AP | floor AP | prevalence | AP / floor | "
             "best Dice | Dice@cal | healthy FP % | NFE/slice | s/volume | beats floor | >= 2x floor |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if runs else "")]
    for r in rows:
        preset = r["preset"] + (" (default)" if r.get("default") else "") + (
            " (earlier definition)" if r.get("earlier_definition") else "")
        vols = f"{r['n'] if r['n'] is not None else '?'} / {r['n_healthy'] if r['n_healthy'] is not None else '?'}"
        ratio = "-" if r["ratio"] is None else f"x{r['ratio']:.2f}"
        lines.append(
            f"| {r['contrast']} | {r['lesion']} | {r['method']} | {preset} | {r['model']} | "
            + (f"{r['run']} | " if runs else "") + f"{vols} | "
            f"{_f(r['ap'])} | {_f(r['floor_ap'])} | {_f(r['prevalence'], 4)} | "
            f"{ratio} | "
            f"{_f(r['best_dice'])} | {_f(r['dice_calibrated'])} | {_f(r['healthy_fp_percent'], 2)} | "
            f"{r['nfe_per_slice'] if r['nfe_per_slice'] is not None else '-'} | {_f(r['seconds_per_volume'], 1)} | "
            f"{_yn(r['beats_floor'])} | {_yn(r['twice_floor'])} |")
    return "\n".join(lines)


def default_model_id(method: str, contrast: str) -> str | None:
    """The model ``uad detect --method METHOD`` runs on a scan of ``contrast`` (``uad.zoo.find_model``: the one of
    that contrast that measured best for the method), or None where the zoo cannot say."""
    from .zoo import find_model

    try:
        return find_model(method=method, contrast=contrast).id
    except Exception:  # no zoo, no model: the sentence just does not say
        return None


def verdicts(rows: list[dict]) -> list[str]:
    """One sentence per (method, contrast) default preset on issue 7's targets (T2/FLAIR tumour and stroke
    beat the floor; T2 tumour and stroke at least 2x the floor).  Where several models of one method and
    contrast have rows, each sentence says whether its model is the one ``uad detect`` runs by default."""
    out = []
    keys = []
    for r in rows:
        k = (r["method"], r["preset"], r["contrast"], r["model"])
        if (r.get("default") in (True, None)) and k not in keys:
            keys.append(k)
    shared = {(m, c) for m, _, c, _ in keys if len({x[3] for x in keys if (x[0], x[2]) == (m, c)}) > 1}
    for method, preset, contrast, model in keys:
        parts = []
        for lt in ("tumour", "stroke"):
            r = next((x for x in rows if (x["method"], x["preset"], x["contrast"], x["model"], x["lesion"]) ==
                      (method, preset, contrast, model, lt)), None)
            if r is None or r["beats_floor"] is None:
                if (contrast, lt) in TARGET_BEAT:
                    parts.append(f"{lt}: not measured")
                continue
            txt = f"{lt} AP {r['ap']:.3f} vs floor {r['floor_ap']:.3f}: "
            txt += "beats the floor" if r["beats_floor"] else "does NOT beat the floor"
            if (contrast, lt) in TARGET_TWICE:
                txt += ", reaches 2x the floor" if r["twice_floor"] else ", does NOT reach 2x the floor"
            parts.append(txt)
        if not parts:
            continue
        met = all(("NOT" not in p and "not measured" not in p) for p in parts)
        goal = "T2/FLAIR tumour and stroke above the floor, T2 at 2x" if contrast in ("T2", "FLAIR") else \
            "no target for this contrast"
        if (method, contrast) in shared:
            d = default_model_id(method, contrast)
            if d is not None:
                model = f"{model}, {'the default model' if d == model else f'not the default model ({d} is)'}"
        out.append(f"- **{method}** ({preset}, {contrast}, model {model}): "
                   + "; ".join(parts) + (f" -- target ({goal}) {'met' if met else 'NOT met'}."
                                         if contrast in ("T2", "FLAIR") else "."))
    return out


def _values(method: str, preset: str) -> str:
    from .calibration import preset_values

    return ", ".join(f"{k}={v}" for k, v in (preset_values(method, preset) or {}).items()) or "nothing"


def block(report, model_ids=None) -> str:
    """The text between the markers: header, table, verdicts (``model_ids``: rows of those models only).
    ``report``: one report, or a list of them (``merged_rows``: a ``run`` column says which run a row is from,
    and the header lists every run)."""
    reports = list(report) if isinstance(report, (list, tuple)) else None
    if reports is None:
        rows = table_rows(report, model_ids)
        head = header(report)
    else:
        rows = merged_rows(reports, model_ids)
        used = sorted({r["run"] for r in rows}) or list(range(1, len(reports) + 1))
        head = "\n\n".join(f"Run {i}: " + header(reports[i - 1]) for i in used)
    if not rows:
        return "\n" + head + "\n\nNo held-out measurement of this model in that run.\n"
    v = verdicts(rows)
    text = "\n" + head + "\n\n" + markdown_table(rows) + "\n"
    earlier = list(dict.fromkeys((r["method"], r["preset"]) for r in rows if r.get("earlier_definition")))
    if earlier:
        text += ("\n*(earlier definition)*: measured under a definition of the preset that has changed since ("
                 + "; ".join(f"{m} {p} now sets {_values(m, p)}" for m, p in earlier)
                 + "); not judged as the default.\n")
    if v:
        text += ("\nDefault presets against issue 7's target (beat the floor on tumour and stroke for T2 and "
                 "FLAIR; at least twice the floor on T2 tumour and T2 stroke):\n\n" + "\n".join(v) + "\n")
    return text


def _marker_lines(text: str, marker: str) -> list[int]:
    """Offsets of the lines that are exactly ``marker`` (a marker quoted inside a sentence does not count)."""
    import re

    return [m.start() for m in re.finditer(r"(?m)^[ \t]*" + re.escape(marker) + r"[ \t]*$", text)]


def replace_marked(text: str, content: str, heading: str | None = CARD_HEADING, begin: str = BEGIN,
                   end: str = END) -> str:
    """``text`` with the part between the marker lines (``begin`` / ``end``, the held-out table's by default)
    replaced by ``content`` (markers kept); without markers the section (``heading``, markers, content) is
    appended.  Unbalanced or repeated marker lines: ``ValueError``."""
    nb, ne = _marker_lines(text, begin), _marker_lines(text, end)
    if not nb and not ne:
        sep = "" if text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
        return text + sep + (f"{heading}\n\n" if heading else "") + begin + content + end + "\n"
    if len(nb) != 1 or len(ne) != 1 or nb[0] > ne[0]:
        raise ValueError(f"the marker lines {begin} ... {end} are unbalanced or repeated "
                         f"({len(nb)} begin, {len(ne)} end)")
    a = text.index(begin, nb[0]) + len(begin)
    b = text.index(end, ne[0])
    return text[:a] + content + text[b:]


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        try:
            os.chmod(tmp, path.stat().st_mode & 0o777)
        except OSError:
            pass
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def update_file(path, content: str, heading: str | None = CARD_HEADING, require_markers: bool = False) -> bool:
    """Put ``content`` between the markers of ``path``; True when the file changed."""
    path = Path(path)
    text = path.read_text()
    if require_markers and not _marker_lines(text, BEGIN):
        raise ValueError(f"{path} has no {BEGIN} ... {END} section")
    new = replace_marked(text, content, heading)
    if new == text:
        return False
    _write_atomic(path, new)
    return True


def update_cards(report, models_dir) -> list[tuple[str, str]]:
    """Replace the held-out section of the card of every model of ``models_dir/manifest.json`` that the run
    measured; returns (model id, what happened) per model.  Every card is checked before any is written."""
    entries = manifest_entries(models_dir)
    report, _ = current_weights(report, entries)
    measured = {r.get("model") for rep in _as_reports(report) for r in rep["results"] if r.get("status") == "ok"}
    plan, log = [], []
    for e in entries:
        mid, card = e.get("id"), e.get("card")
        if not card:
            log.append((mid, "no card in the manifest: skipped"))
            continue
        path = card_path(models_dir, e)
        if path is None:
            log.append((mid, f"card {card} not found inside {Path(models_dir)}: skipped"))
            continue
        if mid not in measured:
            log.append((mid, "not measured in this benchmark: card unchanged"))
            continue
        content = block(report, {mid})
        replace_marked(path.read_text(), content)  # refuses bad markers before anything is written
        plan.append((mid, path, content))
    for mid, path, content in plan:
        changed = update_file(path, content)
        log.append((mid, f"{path}: {'updated' if changed else 'unchanged (same table)'}"))
    return log


def heldout_measurements(report, model_id: str) -> dict | None:
    """The ``evaluation.heldout`` record of one model from a benchmark run (or several, merged as
    ``merged_rows``): per method its default preset's AP per lesion type, their mean, the floor's AP, the
    lesion and healthy volume counts and the run (date, command); ``None`` when the run did not measure
    the model's default presets.  ``uad.selection.best_method`` reads it."""
    reports = _as_reports(report)
    rows = merged_rows(reports, {model_id})
    results = {}
    for r in rows:
        if r.get("default") is False:
            continue  # a non-default preset is not what 'uad detect' runs without --preset
        rec = results.setdefault(r["method"], {"preset": r["preset"], "floor": {}, "n": {}, "run": r["run"]})
        if rec["preset"] != r["preset"]:
            continue
        rec[r["lesion"]] = round(r["ap"], 4)
        rec["floor"][r["lesion"]] = None if r["floor_ap"] is None else round(r["floor_ap"], 4)
        rec["n"][r["lesion"]] = r["n"]
        rec["n_healthy"] = r["n_healthy"]
    if not results:
        return None
    for rec in results.values():
        aps = [rec[lt] for lt in LESIONS if lt in rec]
        rec["mean_ap"] = round(sum(aps) / len(aps), 4)
        ns = [n for n in rec["n"].values() if n is not None]
        rec["n_per_type"] = min(ns) if ns else None
        rep = reports[rec.pop("run") - 1]
        rec["run"] = {"date_utc": rep.get("date_utc"), "command": rep.get("command"),
                      "subset": "quick" if rep.get("quick") else "held-out set", "device": rep.get("device")}
    ns = [rec["n_per_type"] for rec in results.values() if rec["n_per_type"] is not None]
    return {"source": "uad benchmark (scripts/update_cards.py)", "n_per_type": min(ns) if ns else None,
            "results": results}


def update_manifest(report, models_dir) -> list[tuple[str, str]]:
    """Write ``evaluation.heldout`` (``heldout_measurements``) into every entry of
    ``models_dir/manifest.json`` that the run measured; other fields and entries are kept as they are, the
    file is replaced atomically under the zoo's manifest lock.  Returns (model id, what happened)."""
    from .zoo import MANIFEST, _manifest_lock, _read_manifest, _write_manifest

    path = Path(models_dir) / MANIFEST
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    log = []
    with _manifest_lock(path):
        data = _read_manifest(path)
        before = json.dumps(data, sort_keys=True)
        report, _ = current_weights(report, data["models"])
        for e in data["models"]:
            mid = e.get("id")
            rec = heldout_measurements(report, mid)
            if rec is None:
                log.append((mid, "manifest: not measured in these runs, unchanged"))
                continue
            ev = e.setdefault("evaluation", {})
            old = ev.get("heldout")
            ev["heldout"] = rec
            log.append((mid, "manifest: evaluation.heldout " + ("unchanged" if old == rec else "written")))
        if json.dumps(data, sort_keys=True) != before:
            _write_manifest(path, data)
    return log


def restamp_defaults(report: dict) -> dict:
    """Mark each result row with the method's default preset **today** (``Method.default_preset_for``)
    instead of the one recorded when the run was made, so that an older run's rows of a preset that is no
    longer the default are shown as such and not judged as the default (the recorded value is kept in
    ``default_preset_recorded``).  Changes ``report`` in place and returns it."""
    from .methods import get_method_class

    for r in report.get("results") or []:
        if r.get("status") != "ok" or r.get("method") in (None, "intensity-floor"):
            continue
        try:
            now = get_method_class(r["method"]).default_preset_for(None)
        except (ValueError, KeyError):
            continue
        if now != r.get("default_preset"):
            r.setdefault("default_preset_recorded", r.get("default_preset"))
            r["default_preset"] = now
    return report
