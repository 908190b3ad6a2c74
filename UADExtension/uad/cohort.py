"""Cohorts for ``uad detect``: inputs (files and folders) -> cases, output safety checks, summary.csv.

    cases, skipped = expand_inputs(["scans/", "extra.nii.gz"])
    check_outputs(cases, outdir, kinds_of, overwrite=False)    # before any computing
    write_summary(outdir / "summary.csv", rows)

* A folder stands for the images directly inside it (sorted by name).  Skipped,
  and reported: hidden files, non-image files, files this tool wrote (they carry
  its marker, ``uad.imageio.read_output_marker``), and masks / labels by name
  (``<stem>_mask``, ``_brainmask``, ``_brain_mask``, ``_lesion``, ``_seg``,
  ``_label``...).  A folder's ``<stem>_brainmask`` (or ``_brain_mask``) file is
  used as the brain mask of ``<stem>`` when no ``--brain-mask`` is given.
  Files named explicitly are always taken as inputs.
* Outputs never replace a file that is not this tool's own output of the same
  input: an existing output path must carry the marker ``uad-output <kind>
  <input sha256>``; ``summary.csv`` must have this tool's header.  ``overwrite``
  lifts that check, but an output path that is an input or a brain mask of the
  same run is always refused.
* Under ``torchrun`` the cases are dealt round-robin to the ranks
  (``split_cases``); ``gather_rows`` brings every rank's summary rows to rank 0.
"""

from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import InputError
from .imageio import IMAGE_SUFFIXES, read_output_marker, sha256_file, stem

SUMMARY_NAME = "summary.csv"
SUMMARY_COLUMNS = ("case", "status", "method", "model", "preset", "anomaly_volume_ml", "max_score", "seconds",
                   "error", "input")
#: Stem endings of files that are masks or labels, not scans (skipped when a folder is expanded).
MASK_SUFFIX = re.compile(r"_(mask|brainmask|brain_mask|brain-mask|lesion|lesions|seg|segmentation|label|labels|"
                         r"labelmap|gt|truth|restoration|anomaly|overview)$", re.IGNORECASE)
BRAIN_MASK_SUFFIXES = ("_brainmask", "_brain_mask")
NON_IMAGE = (".png", ".json", ".csv", ".txt", ".md", ".jpg", ".jpeg", ".pdf", ".pt", ".safetensors")


@dataclass
class Case:
    path: Path
    mask: Path | None = None
    digest: str = ""  # sha256 of the input file (to recognise this tool's outputs of it)

    @property
    def stem(self) -> str:
        return stem(self.path)


def _is_image_name(p: Path) -> bool:
    low = p.name.lower()
    if low.endswith(NON_IMAGE):
        return False
    return any(low.endswith(s) for s in IMAGE_SUFFIXES)


def expand_inputs(paths, log: Callable[[str], None] | None = None) -> tuple[list[Case], list[tuple[Path, str]]]:
    """Files and folders -> (cases, skipped (path, reason)); a path that does not exist is kept as a case."""
    cases: list[Case] = []
    skipped: list[tuple[Path, str]] = []
    for raw in paths:
        p = Path(raw)
        if not p.is_dir():  # a file (a missing one is a case whose reading fails: reported like any bad input)
            cases.append(Case(p))
            continue
        files = sorted(f for f in p.iterdir() if f.is_file())
        names = {f.name for f in files}
        found = []
        for f in files:
            low = f.name.lower()
            if f.name.startswith("."):
                continue
            if not _is_image_name(f):
                skipped.append((f, "not an image file"))
                continue
            if low.endswith((".img", ".img.gz")) and (stem(f) + ".hdr") in names:
                continue  # the data half of an Analyze pair (the .hdr is the input)
            if read_output_marker(f) is not None:
                skipped.append((f, "an output of uad"))
                continue
            if MASK_SUFFIX.search(stem(f)):
                skipped.append((f, "a mask or label (by its name)"))
                continue
            found.append(f)
        for f in found:
            mask = None
            for suf in BRAIN_MASK_SUFFIXES:
                for cand in files:
                    if stem(cand) == stem(f) + suf and read_output_marker(cand) is None:
                        mask = cand
                        break
                if mask is not None:
                    break
            cases.append(Case(f, mask))
        if not found:
            skipped.append((p, "no image in this folder"))
    if log is not None:
        for f, why in skipped:
            log(f"  skipped {f}: {why}")
    return cases, skipped


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.normcase(os.path.abspath(a)) == os.path.normcase(os.path.abspath(b))


def summary_is_ours(path: Path) -> bool:
    try:
        with open(path, newline="") as f:
            return f.readline().strip() == ",".join(SUMMARY_COLUMNS)
    except (OSError, UnicodeDecodeError):
        return False


def check_outputs(cases: list[Case], outdir: Path, outputs_of: Callable[[Case], dict[str, Path]],
                  overwrite: bool = False, marker_of: Callable[[str, str], str] | None = None) -> None:
    """Refuse (``InputError``, one line) before any computing when an output would replace

    * an input or a brain mask of this run (always), or
    * an existing file that is not this tool's output of the same input (unless ``overwrite``).

    ``outputs_of(case)`` -> {kind: path}.  Inputs get their ``digest`` here.
    """
    from .imageio import output_marker

    marker_of = marker_of or output_marker
    protected = [(c.path, f"the input {c.path}") for c in cases]
    protected += [(c.mask, f"the brain mask {c.mask}") for c in cases if c.mask is not None]
    summary = outdir / SUMMARY_NAME
    clashes = []
    for c in cases:
        outs = outputs_of(c)
        for kind, out in outs.items():
            for p, what in protected:
                if _same_file(out, p):
                    raise InputError(f"{out}: the {kind} output of {c.path.name} would overwrite {what} of this "
                                     f"run; write the results into another folder (-o)")
        if overwrite or not c.path.is_file():  # a missing input fails validation and writes nothing
            continue
        existing = [(k, o) for k, o in outs.items() if o.exists()]
        if existing and not c.digest:
            c.digest = sha256_file(c.path)
        for kind, out in existing:
            if read_output_marker(out) != marker_of(kind, c.digest):
                clashes.append((out, c))
    for p, what in protected:
        if _same_file(summary, p):
            raise InputError(f"{summary}: the summary would overwrite {what} of this run; use another folder (-o)")
    if not overwrite and summary.exists() and not summary_is_ours(summary):
        clashes.append((summary, None))
    if clashes:
        out, c = clashes[0]
        whose = f"uad's output of {c.path.name}" if c is not None else "a uad summary"
        more = f" (and {len(clashes) - 1} more file(s))" if len(clashes) > 1 else ""
        raise InputError(f"{out} exists and is not {whose}{more}; nothing was computed. Use another output folder, "
                         f"or --overwrite to replace it")


def split_cases(cases: list, rank: int, world_size: int) -> list:
    """The cases of one rank: round-robin, so that every rank gets about the same number."""
    return list(cases[rank::world_size])


def gather_rows(rows: list[dict], ctx) -> list[dict]:
    """Every rank's rows on rank 0 (in case order, by ``_index``); other ranks get []."""
    if ctx is None or not ctx.enabled:
        return sorted(rows, key=lambda r: r.get("_index", 0))
    import torch.distributed as dist

    gathered = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(rows, gathered, dst=0)
    if not ctx.is_main:
        return []
    return sorted((r for part in gathered for r in (part or [])), key=lambda r: r.get("_index", 0))


def summary_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(SUMMARY_COLUMNS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in SUMMARY_COLUMNS})
    return buf.getvalue()


def write_summary(path: Path, rows: list[dict]) -> None:
    """Write ``summary.csv`` atomically (temporary file, then rename; mode from the umask)."""
    from .imageio import _write_error, apply_umask, discard_temp, temp_path_like

    tmp = temp_path_like(path)
    try:
        try:
            with open(tmp, "w", newline="") as f:
                f.write(summary_text(rows))
            apply_umask(tmp)
            os.replace(tmp, path)
        except OSError as e:
            raise _write_error(path, e) from None
    finally:
        discard_temp(tmp)
